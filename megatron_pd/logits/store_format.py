"""The offline logits store's on-disk format: sample blocks, shard files, the header.

A store directory holds, per dataset split (``train/``, ``valid/``):

    header.json        what every reader must agree with (see ``StoreHeader``), written
                       atomically; ``complete`` turns true when every shard exists
    shard_00000.pd     a shard: any set of samples, each one compressed block

Shard file layout (little-endian):

    b"PDLOGIT1" | u32 json length | json (shard metadata) | zstd dictionary bytes
    | u64 sample ids [n] | u64 block offsets [n + 1] (relative to the data start)
    | i64 training steps [n] (-1 for a dump) | u32 crc32 of each block [n] | blocks...

A sample block holds, for each of the sample's S tokens, the kept teacher entries of a top-p-k
truncation: token ids ascending, stored as gaps between consecutive ids in fixed-width byte
planes (no vocabulary cap), log-probabilities at tau = 1 under the full teacher distribution
quantized to ``value_bits`` (uniform over [-logp_range, 0]), and (format version 2) the log of
the teacher mass outside the kept entries, log r, as one float16 per token: the tail mass of
a confident teacher (r = 1e-10 .. 1e-30) is far below what the 8-bit values resolve, and in the
log domain fp16 keeps it to 2^-11 relative. The concatenated streams are zstd-compressed with
a dictionary trained on the shard's first samples, so each sample decodes on its own (random
access by sample id). Version 1 stores (no tail field) are still read; their tail mass is then
derived from the decoded values.

Everything here is pure numpy/zstd; writing and reading whole stores is logits/store.py.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

MAGIC = b"PDLOGIT1"
FORMAT = "megatron_pd.logit_store"
VERSION = 2
READABLE_VERSIONS = (1, 2)
TAIL_ENCODING = "log r per token, float16"
_HEADER_NAME = "header.json"


# ------------------------------------------------------------------------------ header
@dataclass
class StoreHeader:
    """What a student (and the tools) must agree with before reading a split of a store."""

    vocab_size: int
    tokenizer_fingerprint: str
    dataset: dict  # fingerprint, prefixes, seq_length, split, seed, split_name, num_samples
    teacher: dict  # checkpoint, step, model shape, precision
    truncation: dict  # name, top_p, top_k, min_k, slots
    encoding: dict = field(
        default_factory=lambda: {
            "indices": "ascending ids, gaps in byte planes",
            "values": "uniform logp quantization",
            "value_bits": 8,
            "logp_range": 16.0,
            "compression": "zstd",
            "level": 9,
            "dictionary": "per shard",
            "tail": TAIL_ENCODING,
        }
    )
    samples_per_shard: int = 1024
    num_shards: int = 0
    # dumps: one entry per dump run ({file: its sorted sample ids (.npy), positions: the
    # training positions it was asked to cover, samples, shards, complete})
    segments: list = field(default_factory=list)
    source: str = "dump"  # or "pretraining" (the paper's online logits)
    complete: bool = False
    stats: dict = field(default_factory=dict)  # tokens, kept_per_token, bytes_per_token, ...
    format: str = FORMAT
    version: int = VERSION

    def __post_init__(self):
        if "id_bytes" not in self.encoding:
            self.encoding = dict(self.encoding, id_bytes=id_bytes_for(self.vocab_size))

    def codec(self) -> BlockCodec:
        """The block codec of this split's samples."""
        return BlockCodec(
            int(self.dataset["seq_length"]),
            int(self.truncation["slots"]),
            int(self.encoding["id_bytes"]),
            int(self.encoding["value_bits"]),
            float(self.encoding["logp_range"]),
            vocab_size=int(self.vocab_size),
            tail=self.encoding.get("tail") == TAIL_ENCODING,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def read(cls, split_dir: str) -> StoreHeader:
        path = os.path.join(split_dir, _HEADER_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{split_dir} is not a logits store split (no {_HEADER_NAME})")
        try:
            with open(path) as f:
                raw = json.load(f)
        except ValueError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path}: format {raw.get('format')!r} is not {FORMAT!r}")
        if raw.get("version") not in READABLE_VERSIONS:
            raise ValueError(
                f"{path}: store version {raw.get('version')} is not supported "
                f"(this reader reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        _check_header_fields(raw, path)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def write(self, split_dir: str) -> None:
        os.makedirs(split_dir, exist_ok=True)
        write_atomic(os.path.join(split_dir, _HEADER_NAME), self.to_json().encode())


def _check_header_fields(raw, path: str) -> None:
    """A header's fields that readers rely on are present and of the right type."""
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a store header is a JSON object, not {type(raw).__name__}")
    wanted = {
        "vocab_size": int,
        "tokenizer_fingerprint": str,
        "dataset": dict,
        "teacher": dict,
        "truncation": dict,
    }
    for name, kind in wanted.items():
        if name not in raw:
            raise ValueError(f"{path}: field {name!r} is missing")
        if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
            raise ValueError(f"{path}: field {name!r} must be {kind.__name__}, not {raw[name]!r}")
    if raw["vocab_size"] <= 0:
        raise ValueError(f"{path}: field 'vocab_size' must be positive, not {raw['vocab_size']}")
    nested = (("dataset", "seq_length"), ("truncation", "slots"))
    nested += tuple(("encoding", k) for k in ("id_bytes", "value_bits") if "encoding" in raw)
    if "encoding" in raw and not isinstance(raw["encoding"], dict):
        raise ValueError(f"{path}: field 'encoding' must be dict, not {raw['encoding']!r}")
    for outer, inner in nested:
        value = raw[outer].get(inner)
        if outer == "encoding" and inner == "id_bytes" and value is None:
            continue  # derived from vocab_size
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"{path}: field '{outer}.{inner}' must be a positive integer, not {value!r}"
            )
    for name in ("num_shards", "samples_per_shard"):
        value = raw.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"{path}: field {name!r} must be a non-negative integer, not {value!r}"
            )


def write_atomic(path: str, data: bytes, point: str | None = None) -> None:
    """Write to a temporary name in the same directory, fsync, rename. ``point`` names a
    fault-injection point between the write and the rename (platform/faults.py)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a full disk, a read-only path: nothing half-written stays
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f"{path}: cannot write {len(data):,} bytes ({err.strerror})") from None
    if point is not None:
        from megatron_pd.platform.faults import fault

        fault(point)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ header parts
def dataset_header(ids, split_name: str, data_cfg) -> dict:
    """The dataset part of a store header (what defines each sample)."""
    return {
        "fingerprint": ids.fingerprint(),
        "prefixes": [os.path.basename(c.dataset_path) for c in ids.components],
        "seq_length": data_cfg.seq_length,
        "split": data_cfg.split,
        "seed": data_cfg.seed,
        "split_name": split_name,
        "num_samples": ids.total,
    }


def truncation_header(spec) -> dict:
    """The truncation part of a store header (a logits.truncation.TruncationSpec)."""
    return {
        "name": spec.name,
        "top_p": spec.top_p,
        "top_k": spec.top_k,
        "min_k": spec.min_k,
        "slots": spec.slots,
        # top-p-inf keeps at most k_cap entries (the slots); recorded so a reader knows
        "k_cap": spec.k_cap if spec.top_k is None else None,
    }


def expected_fields(header: StoreHeader) -> dict:
    """The header fields a resumed dump (or a student) must agree with."""
    return {
        "vocab_size": header.vocab_size,
        "tokenizer_fingerprint": header.tokenizer_fingerprint,
        "dataset": {k: header.dataset[k] for k in ("fingerprint", "seq_length", "split_name")},
        "truncation": header.truncation,
        "encoding": header.encoding,
    }


# ------------------------------------------------------------------------------ sample blocks
def id_bytes_for(vocab_size: int) -> int:
    """Bytes per stored id gap: ceil(log2 V) bits rounded up to whole bytes (no vocab cap)."""
    return max(1, ((int(vocab_size) - 1).bit_length() + 7) // 8)


def quantize(logp: np.ndarray, bits: int, logp_range: float) -> np.ndarray:
    """Uniform codes 0..2^bits-1 over [-logp_range, 0] (0 = log-prob 0)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"value_bits={bits}: must be 1..8")
    levels = (1 << bits) - 1
    codes = np.rint(np.clip(-logp, 0.0, logp_range) * (levels / logp_range))
    return codes.astype(np.uint8)


def dequantize(codes: np.ndarray, bits: int, logp_range: float) -> np.ndarray:
    levels = (1 << bits) - 1
    return -(codes.astype(np.float32) * np.float32(logp_range / levels))


@dataclass(frozen=True)
class BlockCodec:
    """Encodes one sample's kept entries as a block and decodes it back.

    Block layout for S tokens, K slots and N kept entries in all: the counts [S] (uint8, or
    uint16 when K > 255); the id gaps as ``id_bytes`` byte planes of N bytes each (low byte
    first: each token's ids ascending, the first as itself, each later one as the gap to
    the one before; the high planes are mostly zero and compress to little); the N value
    codes (uint8); with ``tail``, log r [S] as little-endian float16. Every field is
    fixed-width, so decoding is a few vectorised numpy passes. Decoding checks what it
    produces: ids below ``vocab_size`` and strictly ascending (no repeated id in a token).
    """

    seq_length: int
    slots: int
    id_bytes: int
    value_bits: int
    logp_range: float
    vocab_size: int | None = None
    tail: bool = False

    @property
    def _count_dtype(self):
        return np.dtype(np.uint8) if self.slots <= 255 else np.dtype("<u2")

    def encode(
        self, indices_SK: np.ndarray, logprobs_SK: np.ndarray, log_tail_S: np.ndarray | None = None
    ) -> bytes:
        """[S, K] ids (-1 = empty slot, any order), log-probs and log r [S] -> block bytes."""
        if indices_SK.shape != (self.seq_length, self.slots):
            raise ValueError(
                f"sample entries have shape {tuple(indices_SK.shape)}, the store holds "
                f"[{self.seq_length}, {self.slots}]"
            )
        if self.tail != (log_tail_S is not None):
            raise ValueError(
                "this store keeps the tail mass per token: pass log_tail"
                if self.tail
                else "this store (format version 1) has no tail field"
            )
        valid = indices_SK >= 0
        order = np.argsort(
            np.where(valid, indices_SK, np.iinfo(np.int64).max), axis=1, kind="stable"
        )
        ids = np.take_along_axis(indices_SK, order, axis=1).astype(np.int64)
        values = np.take_along_axis(logprobs_SK, order, axis=1)
        kept = np.take_along_axis(valid, order, axis=1)  # kept entries first in each row
        if kept.any() and int(ids[kept].max()) >= 1 << (8 * self.id_bytes):
            raise ValueError(
                f"token id {int(ids[kept].max())} needs more than {self.id_bytes} bytes"
            )
        previous = np.zeros_like(ids)
        previous[:, 1:] = ids[:, :-1]
        gaps = (ids - previous)[kept].astype(np.uint32)
        planes = [
            ((gaps >> np.uint32(8 * b)) & np.uint32(0xFF)).astype(np.uint8)
            for b in range(self.id_bytes)
        ]
        counts = valid.sum(axis=1).astype(self._count_dtype)
        codes = quantize(values[kept], self.value_bits, self.logp_range)
        parts = [counts.tobytes(), *(p.tobytes() for p in planes), codes.tobytes()]
        if self.tail:
            parts.append(np.asarray(log_tail_S, dtype="<f2").reshape(self.seq_length).tobytes())
        return b"".join(parts)

    def decode(self, raw: bytes) -> tuple:
        """[S, K] int32 ids (-1 padded, ascending per token), float32 log-probs, and log r [S]
        float32 (None for a store without the tail field)."""
        ids, values, log_tail = self.pad([self.unpack(raw)])
        return ids[0], values[0], None if log_tail is None else log_tail[0]

    def unpack(self, raw: bytes) -> tuple:
        """A block's compact parts, checked: (counts [S] int32, gaps [N] int32, codes [N],
        log r [S] float16 or None)."""
        S, K = self.seq_length, self.slots
        data = np.frombuffer(raw, dtype=np.uint8)
        count_bytes = S * self._count_dtype.itemsize
        tail_bytes = 2 * S if self.tail else 0
        if data.size < count_bytes:
            raise ValueError("sample block is shorter than its token counts")
        counts = np.frombuffer(raw, dtype=self._count_dtype, count=S).astype(np.int32)
        if counts.max(initial=0) > K:
            raise ValueError(f"a token count exceeds the {K} slots")
        total = int(counts.sum())
        expected = count_bytes + total * (self.id_bytes + 1) + tail_bytes
        if data.size != expected:
            raise ValueError(f"sample block has {data.size} bytes, its counts describe {expected}")
        pos = count_bytes
        gaps = data[pos : pos + total].astype(np.int32)
        for b in range(1, self.id_bytes):
            pos += total
            gaps |= data[pos : pos + total].astype(np.int32) << (8 * b)
        if total:
            self._check_ids(counts, gaps)
        pos += total
        codes = data[pos : pos + total]
        log_tail = (
            np.frombuffer(raw, dtype="<f2", count=S, offset=pos + total) if self.tail else None
        )
        return counts, gaps, codes, log_tail

    def _check_ids(self, counts: np.ndarray, gaps: np.ndarray) -> None:
        """Every id below the vocabulary and no id twice in a token (gaps after the first > 0)."""
        nonempty = counts > 0
        starts = (np.cumsum(counts) - counts)[nonempty]
        later = np.ones(gaps.size, dtype=bool)
        later[starts] = False
        if (gaps[later] == 0).any():
            raise ValueError("a token repeats a kept id (a zero gap after its first entry)")
        if self.vocab_size is not None:
            largest = int(np.add.reduceat(gaps.astype(np.int64), starts).max())
            if largest >= self.vocab_size:
                raise ValueError(
                    f"token id {largest} is outside the vocabulary of {self.vocab_size}"
                )

    def pad(self, parts: list) -> tuple:
        """Unpacked samples -> [B, S, K] int32 ids (-1 padded), float32 log-probs, and
        [B, S] float32 log r (None without the tail field).

        One pass for the whole batch: the per-sample cost of decoding is then little more
        than unpacking (short samples decode as fast per token as long ones).
        """
        B, S, K = len(parts), self.seq_length, self.slots
        counts = np.concatenate([p[0] for p in parts]) if B > 1 else parts[0][0]
        mask = _columns(K) < counts[:, None]
        ids = np.zeros((B * S, K), dtype=np.int32)
        ids[mask] = np.concatenate([p[1] for p in parts]) if B > 1 else parts[0][1]
        if K > 1 and (mask[:, 1:] & (ids[:, 1:] == 0)).any():
            raise ValueError("a token repeats a kept id (a zero gap after its first entry)")
        np.cumsum(ids, axis=1, dtype=np.int32, out=ids)
        if self.vocab_size is not None and counts.any():
            largest = int(ids[np.arange(B * S), np.maximum(counts - 1, 0)][counts > 0].max())
            if largest >= self.vocab_size:
                raise ValueError(
                    f"token id {largest} is outside the vocabulary of {self.vocab_size}"
                )
        ids[~mask] = -1
        codes = np.zeros((B * S, K), dtype=np.uint8)  # code 0 is log-prob 0 in empty slots
        codes[mask] = np.concatenate([p[2] for p in parts]) if B > 1 else parts[0][2]
        values = np.take(_code_table(self.value_bits, self.logp_range), codes)
        log_tail = None
        if self.tail:
            log_tail = np.concatenate([p[3] for p in parts]).astype(np.float32).reshape(B, S)
        return ids.reshape(B, S, K), values.reshape(B, S, K), log_tail


@functools.cache
def _columns(k: int) -> np.ndarray:
    return np.arange(k, dtype=np.int32)


@functools.cache
def _code_table(bits: int, logp_range: float) -> np.ndarray:
    return dequantize(np.arange(256), bits, logp_range)


# ------------------------------------------------------------------------------ shard files
def write_shard(
    path: str, meta: dict, sample_ids: list, steps: list, blocks: list, dictionary: bytes
) -> int:
    """Write a shard atomically; returns its size in bytes."""
    meta = dict(meta, num_samples=len(sample_ids), dictionary_bytes=len(dictionary))
    header = json.dumps(meta, sort_keys=True).encode()
    offsets = np.zeros(len(blocks) + 1, dtype=np.uint64)
    offsets[1:] = np.cumsum([len(b) for b in blocks])
    crcs = np.array([zlib.crc32(b) for b in blocks], dtype=np.uint32)
    parts = [
        MAGIC,
        struct.pack("<I", len(header)),
        header,
        dictionary,
        np.asarray(sample_ids, dtype=np.uint64).tobytes(),
        offsets.tobytes(),
        np.asarray(steps, dtype=np.int64).tobytes(),
        crcs.tobytes(),
        *blocks,
    ]
    data = b"".join(parts)
    write_atomic(path, data, point="store_shard_write")
    return len(data)


class ShardFile:
    """Read-only view of one shard file (memory-mapped), validated on open."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None
        if size < 12 or bytes(self._map[:8]) != MAGIC:
            raise ValueError(f"shard file {path} is not a logits shard (bad magic or empty)")
        (json_len,) = struct.unpack("<I", bytes(self._map[8:12]))
        try:
            self.meta = json.loads(bytes(self._map[12 : 12 + json_len]))
        except ValueError:
            raise ValueError(f"shard file {path} is corrupt (unreadable metadata)") from None
        counts = (
            [self.meta.get(k) for k in ("num_samples", "dictionary_bytes")]
            if isinstance(self.meta, dict)
            else [None]
        )
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError(
                f"shard file {path} is corrupt (metadata lacks num_samples/dictionary_bytes)"
            )
        n = int(self.meta["num_samples"])
        pos = 12 + json_len
        self.dictionary = bytes(self._map[pos : pos + self.meta["dictionary_bytes"]])
        pos += self.meta["dictionary_bytes"]
        index_bytes = n * 8 + (n + 1) * 8 + n * 8 + n * 4
        if size < pos + index_bytes:
            raise ValueError(
                f"shard file {path} is truncated: {size} bytes, its index needs {pos + index_bytes}"
            )
        self.sample_ids = np.frombuffer(self._map[pos : pos + 8 * n], dtype=np.uint64)
        pos += 8 * n
        self.offsets = np.frombuffer(self._map[pos : pos + 8 * (n + 1)], dtype=np.uint64)
        pos += 8 * (n + 1)
        self.steps = np.frombuffer(self._map[pos : pos + 8 * n], dtype=np.int64)
        pos += 8 * n
        self.crcs = np.frombuffer(self._map[pos : pos + 4 * n], dtype=np.uint32)
        pos += 4 * n
        self.data_start = pos
        expected = pos + int(self.offsets[-1]) if n else pos
        if size != expected:
            raise ValueError(
                f"shard file {path} is truncated or padded: {size} bytes, its "
                f"index describes {expected}"
            )

    def verify(self) -> None:
        """Check every block's crc32 (reads the whole file); ValueError names the sample."""
        for position in range(len(self.sample_ids)):
            self.block(position)

    def block(self, position: int) -> bytes:
        start = self.data_start + int(self.offsets[position])
        end = self.data_start + int(self.offsets[position + 1])
        block = bytes(self._map[start:end])
        if zlib.crc32(block) != int(self.crcs[position]):
            raise ValueError(
                f"shard file {self.path}: sample {int(self.sample_ids[position])} "
                "is corrupt (checksum mismatch)"
            )
        return block
