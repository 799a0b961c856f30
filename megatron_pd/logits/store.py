"""Writing and reading an offline logits store (one dataset split per directory).

``StoreWriter`` compresses shards (atomically, so a crash leaves only complete shards and a
restarted dump skips them); ``StoreReader`` gives random access by sample id, checks the
header against what the student expects (every mismatch names the field and both values)
and prefetches the next step's samples in a background thread. Format: logits/store_format.py.

Shape legend: S tokens of a sample, K entry slots per token.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from megatron_pd.logits import store_format as F

DICTIONARY_BYTES = 16384
_DICTIONARY_SAMPLES = 32


def _zstd():
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a declared dependency
        raise RuntimeError("the logits store needs the zstandard package") from None
    return zstandard


def compress_blocks(raw_blocks: list, level: int) -> tuple:
    """(dictionary bytes, compressed blocks): a dictionary trained on the first samples.

    Deterministic for the same blocks (fixed COVER parameters, one thread), so a resumed dump
    writes byte-identical shards. Too few samples: no dictionary.
    """
    zstd = _zstd()
    dictionary = b""
    if len(raw_blocks) >= 8:
        try:
            trained = zstd.train_dictionary(DICTIONARY_BYTES, raw_blocks[:_DICTIONARY_SAMPLES])
            dictionary = trained.as_bytes()
        except zstd.ZstdError:
            dictionary = b""
    if dictionary:
        compressor = zstd.ZstdCompressor(
            level=level, dict_data=zstd.ZstdCompressionDict(dictionary)
        )
    else:
        compressor = zstd.ZstdCompressor(level=level)
    return dictionary, [compressor.compress(block) for block in raw_blocks]


class StoreWriter:
    """Writes shards of one split; ``finish`` marks the split complete."""

    def __init__(self, split_dir: str, header: F.StoreHeader):
        self.split_dir = split_dir
        self.header = header
        os.makedirs(split_dir, exist_ok=True)

    def shard_path(self, name) -> str:
        return os.path.join(
            self.split_dir, f"shard_{name}.pd" if isinstance(name, str) else f"shard_{name:05d}.pd"
        )

    def shard_done(self, name) -> bool:
        """A shard that exists and whose every block checks out (writes are atomic, so only
        later damage makes one fail: a rerun of the dump then rewrites it)."""
        path = self.shard_path(name)
        if not os.path.isfile(path):
            return False
        try:
            F.ShardFile(path).verify()
            return True
        except ValueError as err:
            print(f"warning: rewriting damaged {err}", flush=True)
            return False

    def write_shard(
        self, name, sample_ids: list, steps: list, raw_blocks: list, stats: dict | None = None
    ) -> int:
        """Compress and write one shard (``stats`` go into its metadata); returns bytes."""
        encoding = self.header.encoding
        dictionary, blocks = compress_blocks(raw_blocks, encoding["level"])
        meta = {
            "shard": name,
            "seq_length": self.header.dataset["seq_length"],
            "stats": stats or {},
        }
        return F.write_shard(self.shard_path(name), meta, sample_ids, steps, blocks, dictionary)

    def shard_stats(self) -> dict:
        """Totals over the shard files present: tokens, kept entries, KL sums, bytes."""
        totals = {"tokens": 0, "kept": 0, "kl_sum": 0.0, "kl_rows": 0, "bytes": 0, "shards": 0}
        for name in sorted(os.listdir(self.split_dir)):
            if name.startswith("shard_") and name.endswith(".pd"):
                shard = F.ShardFile(os.path.join(self.split_dir, name))
                for key in ("tokens", "kept", "kl_sum", "kl_rows"):
                    totals[key] += shard.meta.get("stats", {}).get(key, 0)
                totals["bytes"] += os.path.getsize(shard.path)
                totals["shards"] += 1
        return totals

    def summary(self) -> tuple:
        """(statistics for the header, number of shards), from the shards' own metadata, so
        a resumed dump or recording reports exactly what an uninterrupted one does."""
        totals = self.shard_stats()
        tokens = max(totals["tokens"], 1)
        stats = {
            "tokens": totals["tokens"],
            "kept_per_token": totals["kept"] / tokens,
            "bytes_per_token": totals["bytes"] / tokens,
            "compression_vs_fp32_logits": self.header.vocab_size * 4 / (totals["bytes"] / tokens),
        }
        if totals["kl_rows"]:  # a dump measures its value encoding's fidelity
            stats["value_kl_nats"] = totals["kl_sum"] / totals["kl_rows"]
        return stats, totals["shards"]

    def encode(
        self, indices_SK: np.ndarray, logprobs_SK: np.ndarray, log_tail_S: np.ndarray | None
    ) -> bytes:
        return self.header.codec().encode(indices_SK, logprobs_SK, log_tail_S)

    def remove_leftovers(self) -> list:
        """Delete the temporary files of writers that died before their rename (called once
        every writer of the split is done); returns their names."""
        names = sorted(n for n in os.listdir(self.split_dir) if ".tmp." in n)
        for name in names:
            os.remove(os.path.join(self.split_dir, name))
        return names

    def finish(self, num_shards: int) -> None:
        self.header.num_shards = num_shards
        self.header.complete = True
        self.header.write(self.split_dir)


def compare_headers(actual: dict, expected: dict, where: str) -> None:
    """ValueError naming the first field whose value differs (``expected`` may be partial)."""
    for key, want in expected.items():
        have = actual.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            compare_headers(have, want, f"{where}.{key}")
        elif have != want:
            raise ValueError(f"logits store {where}.{key} is {have!r} but this run has {want!r}")


class StoreReader:
    """Random access to one split of a store, with an LRU cache and a prefetching thread."""

    def __init__(self, split_dir: str, cache_samples: int = 1024, require_complete: bool = True):
        self.split_dir = split_dir
        self.header = F.StoreHeader.read(split_dir)
        if require_complete and not self.header.complete:
            raise ValueError(f"logits store {split_dir} is incomplete (its dump has not finished)")
        self.codec = self.header.codec()
        self.seq_length = self.header.dataset["seq_length"]
        self.slots = self.header.truncation["slots"]
        self._shards = []
        self._where: dict = {}
        names = sorted(
            n for n in os.listdir(split_dir) if n.startswith("shard_") and n.endswith(".pd")
        )
        best_step: dict = {}
        for name in names:
            shard = F.ShardFile(os.path.join(split_dir, name))
            number = len(self._shards)
            self._shards.append(shard)
            # A recorded store may hold a sample more than once (a pre-training run of more
            # than one epoch): the latest training step wins, whatever the file order.
            for position, (sample, step) in enumerate(
                zip(shard.sample_ids.tolist(), shard.steps.tolist())
            ):
                if step >= best_step.get(sample, step):
                    best_step[sample] = step
                    self._where[sample] = (number, position)
        if require_complete and len(names) != self.header.num_shards:
            raise ValueError(
                f"logits store {split_dir}: header lists {self.header.num_shards} "
                f"shards, {len(names)} shard files found"
            )
        self._decompressors = threading.local()
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_samples
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="logit-prefetch")
        self._pending = None

    @property
    def num_samples(self) -> int:
        return len(self._where)

    def sample_ids(self) -> list:
        """Every stored sample id, ascending."""
        return sorted(self._where)

    def check(self, expected: dict) -> None:
        """Compare the header with what this run expects (see compare_headers)."""
        from dataclasses import asdict

        compare_headers(asdict(self.header), expected, "header")

    def _decompressor(self, shard_number: int):
        cache = getattr(self._decompressors, "by_shard", None)
        if cache is None:
            cache = self._decompressors.by_shard = {}
        if shard_number not in cache:
            zstd = _zstd()
            dictionary = self._shards[shard_number].dictionary
            cache[shard_number] = (
                zstd.ZstdDecompressor(dict_data=zstd.ZstdCompressionDict(dictionary))
                if dictionary
                else zstd.ZstdDecompressor()
            )
        return cache[shard_number]

    def _unpack(self, sample_id: int) -> tuple:
        located = self._where.get(int(sample_id))
        if located is None:
            raise ValueError(
                f"logits store {self.split_dir} has no sample {sample_id} (it holds "
                f"{self.num_samples} samples)"
            )
        number, position = located
        block = self._shards[number].block(position)
        raw = self._decompressor(number).decompress(block)
        try:
            return self.codec.unpack(raw)
        except ValueError as err:
            raise ValueError(
                f"shard file {self._shards[number].path}: sample {sample_id} does "
                f"not decode ({err})"
            ) from None

    def _compact(self, sample_id: int) -> tuple:
        """The unpacked sample, from the LRU cache (which holds compact samples)."""
        with self._lock:
            if sample_id in self._cache:
                self._cache.move_to_end(sample_id)
                return self._cache[sample_id]
        value = self._unpack(sample_id)
        if self._cache_size:
            with self._lock:
                self._cache[sample_id] = value
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return value

    def get(self, sample_id: int) -> tuple:
        """([S, K] int32 ids, -1 padded; [S, K] float32 log-probs at tau = 1; [S] float32
        log of the tail mass, or None for a format-1 store)."""
        ids, values, log_tail = self.codec.pad([self._compact(int(sample_id))])
        return ids[0], values[0], None if log_tail is None else log_tail[0]

    def get_many(self, sample_ids) -> tuple:
        """[len, S, K] ids and log-probs and [len, S] log tail mass (or None) for several
        samples (padded in one pass)."""
        return self.codec.pad([self._compact(int(s)) for s in sample_ids])

    def step_of(self, sample_id: int) -> int | None:
        """The training step that recorded a sample (-1 for a dump; None: not stored)."""
        located = self._where.get(int(sample_id))
        if located is None:
            return None
        number, position = located
        return int(self._shards[number].steps[position])

    def prefetch(self, sample_ids) -> None:
        """Decode these samples in the background (call with the next step's samples)."""
        ids = [int(s) for s in sample_ids]
        self._pending = self._pool.submit(lambda: [self._compact(s) for s in ids])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
