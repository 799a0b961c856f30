"""Tokenize documents into megatron-core's indexed format (.bin tokens + .idx index).

Documents: each line of a ``.jsonl``/``.json`` file (the ``json_key`` string), or each whole
text file (source code, prose). Every document becomes ``tokenizer.encode_document(text)``:
the tokenizer's own special-token template (BOS where it adds one) and its end-of-document id
(data/tokenizer.py). ``<prefix>.meta.json`` records the tokenizer (kind, path, fingerprint,
EOD, BOS, template), the inputs and the counts. Tokenization runs in a process pool; results
are written in input order, so the output is identical for any number of workers. Files are
written under temporary names and renamed when complete: an interrupted run leaves no
half-written prefix behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy

_worker_tokenizer = None


@dataclass
class PreprocessStats:
    documents: int
    tokens: int
    seconds: float
    skipped: int
    binary_skipped: list = field(default_factory=list)  # paths of files that are not text


def looks_binary(data: bytes) -> bool:
    """A file that is not text: a NUL byte in its first 8 KiB, or more than 30% of that
    head not decodable as UTF-8 (an executable, an archive, an image)."""
    head = data[:8192]
    if b"\0" in head:
        return True
    if not head:
        return False
    try:
        head.decode("utf-8")
        return False
    except UnicodeDecodeError:
        pass
    text = head.decode("utf-8", errors="replace")
    return text.count("\ufffd") > 0.3 * len(text)


def _iter_documents(paths: list, json_key: str, binary: list | None = None) -> Iterator[str]:
    """Each input's documents; a whole-text input that is binary is left out and its path
    appended to ``binary``."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        text = record[json_key]
                    except (ValueError, KeyError, TypeError):
                        raise ValueError(
                            f"{path}:{number}: expected a JSON object with a {json_key!r} field"
                        ) from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{number}: field {json_key!r} is not a string")
                    yield text
        else:
            with open(path, "rb") as f:
                data = f.read(8192)
                if looks_binary(data):
                    if binary is not None:
                        binary.append(path)
                    continue
                data += f.read()
            yield data.decode("utf-8", errors="replace")


def count_documents(paths: list) -> int:
    """Documents in the inputs (jsonl lines that are not blank; one per other file)."""
    total = 0
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        else:
            total += 1
    return total


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    from megatron_pd.data.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(text: str) -> list:
    return _worker_tokenizer.encode_document(text)


class _Progress:
    """One carriage-return line on stderr: docs, docs/s, tokens/s, ETA."""

    def __init__(self, total: int, label: str, stream=sys.stderr, every_s: float = 0.5):
        self.total, self.label, self.stream, self.every_s = total, label, stream, every_s
        self.start = self.last = time.monotonic()

    def update(self, docs: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = docs / elapsed
        eta = (self.total - docs) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "?"
        pct = 100.0 * docs / max(self.total, 1)
        self.stream.write(
            f"\r[{self.label}] {docs}/{self.total} docs ({pct:5.1f}%) "
            f"{rate:,.0f} docs/s {tokens / elapsed:,.0f} tokens/s ETA {eta_text}"
            + ("\n" if final else "")
        )
        self.stream.flush()


def _write_meta(
    prefix: str,
    tokenizer,
    documents: int,
    tokens: int,
    num_inputs: int,
    json_key: str,
    skipped,
    binary: list,
    shuffle_seed,
) -> None:
    from megatron_pd.data.datasets import meta_path

    meta = {
        "tokenizer_model": tokenizer.path,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer": tokenizer.describe(),
        "vocab_size": tokenizer.vocab_size,
        "eod": tokenizer.eod,
        "bos": tokenizer.bos,
        "documents": documents,
        "tokens": tokens,
        "input_files": num_inputs,
        "json_key": json_key,
        "empty_documents_skipped": skipped,
        "binary_files_skipped": len(binary),
        "binary_files_skipped_first": binary[:20],
        # the valid/test splits are the last documents in this order
        "input_order": "input order" if shuffle_seed is None else f"shuffled, seed {shuffle_seed}",
    }
    tmp = meta_path(prefix) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, meta_path(prefix))


def preprocess(
    input_paths: list,
    output_prefix: str,
    tokenizer_model: str,
    json_key: str = "text",
    workers: int = 1,
    chunksize: int = 16,
    progress: bool = True,
    shuffle_seed: int | None = None,
) -> PreprocessStats:
    """Tokenize ``input_paths`` into ``<output_prefix>.bin/.idx``; returns counts and time.

    Documents are written in input order, or with ``shuffle_seed`` the input files in a
    seeded random order: megatron's split takes valid/test from the last documents, which in
    a sorted directory listing are the last files by name. Binary files are skipped and
    returned (``binary_skipped``)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_pd.data.tokenizer import load_tokenizer

    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    tokenizer = load_tokenizer(tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    bin_tmp, idx_tmp = output_prefix + ".bin.tmp", output_prefix + ".idx.tmp"
    input_paths = list(input_paths)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(input_paths)
    total = count_documents(input_paths)
    binary: list = []
    meter = _Progress(total, "preprocess") if progress else None
    documents = tokens = skipped = 0
    start = time.monotonic()
    builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
    empty_length = len(tokenizer.encode_document(""))
    try:
        texts = _iter_documents(input_paths, json_key, binary)
        if workers == 1:
            _init_worker(tokenizer.path)
            encoded = map(_encode, texts)
            pool = None
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.path,))
            encoded = pool.imap(_encode, texts, chunksize=chunksize)
        try:
            for ids in encoded:
                if len(ids) <= empty_length:  # no text: only the template and EOD
                    skipped += 1
                    continue
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                documents += 1
                tokens += len(ids)
                if meter:
                    meter.update(documents + skipped, tokens)
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        builder.finalize(idx_tmp)
    except BaseException:
        builder.data_file.close()
        for path in (bin_tmp, idx_tmp):
            if os.path.exists(path):
                os.remove(path)
        raise
    if documents == 0:
        os.remove(bin_tmp)
        os.remove(idx_tmp)
        what = f" ({len(binary)} binary, skipped)" if binary else ""
        raise ValueError(f"no non-empty documents in {len(input_paths)} input file(s){what}")
    os.replace(bin_tmp, output_prefix + ".bin")
    os.replace(idx_tmp, output_prefix + ".idx")
    _write_meta(
        output_prefix,
        tokenizer,
        documents,
        tokens,
        len(input_paths),
        json_key,
        skipped,
        binary,
        shuffle_seed,
    )
    if meter:
        meter.update(documents + skipped, tokens, final=True)
    return PreprocessStats(documents, tokens, time.monotonic() - start, skipped, binary)
