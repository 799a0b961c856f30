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
truncation: token ids ascending, stored as gaps between consecutive ids in LEB128 varints (one
byte below 128, no vocabulary cap), and log-probabilities at tau = 1 under the full teacher
distribution quantized to ``value_bits`` (uniform over [-logp_range, 0]). The concatenated
streams (counts, gaps, values) are zstd-compressed with a dictionary trained on the shard's
first samples, so each sample decodes on its own (random access by sample id).

Everything here is pure numpy/zstd; writing and reading whole stores is logits/store.py.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

MAGIC = b"PDLOGIT1"
FORMAT = "megatron_pd.logit_store"
VERSION = 1
_HEADER_NAME = "header.json"


# ------------------------------------------------------------------------------ varints
def encode_varints(values: np.ndarray) -> np.ndarray:
    """LEB128: 7 bits per byte, high bit set on all but the last byte of a value."""
    v = np.asarray(values, dtype=np.uint64)
    if v.size == 0:
        return np.zeros(0, dtype=np.uint8)
    nbytes = np.ones(v.size, dtype=np.int64)
    for k in range(1, 10):
        nbytes += v >= (np.uint64(1) << np.uint64(7 * k))
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    starts = np.cumsum(nbytes) - nbytes
    for k in range(int(nbytes.max())):
        sel = nbytes > k
        low = ((v[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (nbytes[sel] > k + 1).astype(np.uint8) << 7
        out[starts[sel] + k] = low | more
    return out


def decode_varints(data: np.ndarray, count: int) -> tuple:
    """The first ``count`` varints of ``data``: (values uint64, bytes consumed)."""
    if count == 0:
        return np.zeros(0, dtype=np.uint64), 0
    ends = np.flatnonzero(data < 128)
    if ends.size < count:
        raise ValueError("varint stream is shorter than expected")
    ends = ends[:count]
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    used = int(ends[-1]) + 1
    chunk = data[:used]
    group = np.repeat(np.arange(count), ends - starts + 1)
    shift = (np.arange(used) - starts[group]).astype(np.uint64) * np.uint64(7)
    values = np.add.reduceat((chunk & 0x7F).astype(np.uint64) << shift, starts)
    return values, used


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
            "indices": "ascending ids, LEB128 varint gaps",
            "values": "uniform logp quantization",
            "value_bits": 8,
            "logp_range": 16.0,
            "compression": "zstd",
            "level": 9,
            "dictionary": "per shard",
        }
    )
    samples_per_shard: int = 1024
    num_shards: int = 0
    source: str = "dump"  # or "pretraining" (the paper's online logits)
    complete: bool = False
    stats: dict = field(default_factory=dict)  # tokens, kept_per_token, bytes_per_token, ...
    format: str = FORMAT
    version: int = VERSION

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
        if raw.get("version") != VERSION:
            raise ValueError(
                f"{path}: store version {raw.get('version')} is not supported "
                f"(this reader reads version {VERSION})"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})

    def write(self, split_dir: str) -> None:
        os.makedirs(split_dir, exist_ok=True)
        write_atomic(os.path.join(split_dir, _HEADER_NAME), self.to_json().encode())


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ sample blocks
def quantize(logp: np.ndarray, bits: int, logp_range: float) -> np.ndarray:
    levels = (1 << bits) - 1
    codes = np.rint(np.clip(-logp, 0.0, logp_range) * (levels / logp_range))
    return codes.astype(np.uint8 if bits <= 8 else np.uint16)


def dequantize(codes: np.ndarray, bits: int, logp_range: float) -> np.ndarray:
    levels = (1 << bits) - 1
    return -(codes.astype(np.float32) * np.float32(logp_range / levels))


def encode_sample(
    indices_SK: np.ndarray, logprobs_SK: np.ndarray, bits: int, logp_range: float
) -> bytes:
    """Uncompressed block of one sample: [S, K] ids (-1 = empty slot) and log-probs."""
    valid = indices_SK >= 0
    counts = valid.sum(axis=1)
    order = np.argsort(np.where(valid, indices_SK, np.iinfo(np.int64).max), axis=1, kind="stable")
    ids = np.take_along_axis(indices_SK, order, axis=1)
    values = np.take_along_axis(logprobs_SK, order, axis=1)
    kept = np.take_along_axis(valid, order, axis=1)
    # Kept entries come first in each row: the first is stored as its id, each later one as
    # the gap to the id before it.
    previous = np.zeros_like(ids)
    previous[:, 1:] = ids[:, :-1]
    gaps = ids - previous
    return b"".join(
        [
            encode_varints(counts).tobytes(),
            encode_varints(gaps[kept]).tobytes(),
            quantize(values[kept], bits, logp_range).tobytes(),
        ]
    )


def decode_sample(raw: bytes, seq_length: int, slots: int, bits: int, logp_range: float) -> tuple:
    """[S, slots] int64 ids (-1 padded, ascending per token) and float32 log-probs."""
    data = np.frombuffer(raw, dtype=np.uint8)
    counts, used = decode_varints(data, seq_length)
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    gaps, used_gaps = decode_varints(data[used:], total)
    value_bytes = data[used + used_gaps :]
    dtype = np.uint8 if bits <= 8 else np.uint16
    codes = np.frombuffer(value_bytes.tobytes(), dtype=dtype)
    if codes.size != total:
        raise ValueError("sample block has the wrong number of values")
    ids = np.full((seq_length, slots), -1, dtype=np.int64)
    values = np.zeros((seq_length, slots), dtype=np.float32)
    if total:
        token = np.repeat(np.arange(seq_length), counts)
        first = np.cumsum(counts) - counts
        position = np.arange(total) - first[token]
        running = np.cumsum(gaps.astype(np.int64))
        # Each token's ids restart from 0: subtract the running sum before its first entry.
        base = np.where(first > 0, running[np.maximum(first - 1, 0)], 0)
        flat_ids = running - base[token]
        ids[token, position] = flat_ids
        values[token, position] = dequantize(codes, bits, logp_range)
    return ids, values


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
    write_atomic(path, data)
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
