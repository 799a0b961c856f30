"""Tokenizer, preprocessing to megatron's indexed format, data checks, dataset splits."""

import json
import os
import shutil
import sys

import numpy
import pytest

from megatron_pd.data.datasets import (
    GlobalBatchSampler,
    build_splits,
    check_data,
    check_prefix,
    parse_blend,
)
from megatron_pd.data.preprocess import preprocess
from megatron_pd.data.tokenizer import Tokenizer


def test_tokenizer_round_trips_code(tiny_corpus):
    tok = Tokenizer(tiny_corpus["tokenizer"])
    assert tok.vocab_size == 512
    text = "def f(x):\n\tif x:\n        return {'a': 1}  # comment\n"
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.eod == 2 and tok.pad == 3
    assert len(tok.fingerprint) == 16


def test_preprocess_is_readable_by_megatron(tiny_corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = Tokenizer(tiny_corpus["tokenizer"])
    dataset = IndexedDataset(tiny_corpus["prefix"])
    assert len(dataset) == len(tiny_corpus["files"])  # one document per file, none empty
    for index in (0, 7, len(dataset) - 1):
        with open(tiny_corpus["files"][index], encoding="utf-8", errors="replace") as f:
            expected = tok.tokenize(f.read()) + [tok.eod]
        numpy.testing.assert_array_equal(dataset[index], numpy.asarray(expected))
    info = check_prefix(tiny_corpus["prefix"])
    assert info.documents == len(dataset)
    assert info.tokens == int(dataset.sequence_lengths.sum())
    meta = json.load(open(tiny_corpus["prefix"] + ".meta.json"))
    assert meta["tokenizer_fingerprint"] == tok.fingerprint


def test_megatron_written_file_passes_our_checks(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "mcore")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for length in (5, 1, 9):
        builder.add_document(torch.arange(length), [length])
    builder.finalize(prefix + ".idx")
    info = check_prefix(prefix)
    assert (info.documents, info.tokens, info.dtype_code) == (3, 15, 4)


def test_preprocess_output_does_not_depend_on_workers(tiny_corpus, tmp_path):
    files = tiny_corpus["files"][:12]
    for workers in (1, 2):
        preprocess(
            files,
            str(tmp_path / f"w{workers}"),
            tiny_corpus["tokenizer"],
            workers=workers,
            progress=False,
        )
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_preprocess_jsonl_and_bad_records(tiny_corpus, tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"text": "hello world"}\n\n{"text": "x = 1"}\n')
    stats = preprocess([str(good)], str(tmp_path / "j"), tiny_corpus["tokenizer"], progress=False)
    assert stats.documents == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a 'text'"):
        preprocess([str(bad)], str(tmp_path / "b"), tiny_corpus["tokenizer"], progress=False)
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.tmp").exists()


def _copy_prefix(src, dst):
    for suffix in (".bin", ".idx"):
        shutil.copy(src + suffix, dst + suffix)


def test_check_prefix_errors_name_the_file(tiny_corpus, tmp_path):
    with pytest.raises(ValueError, match="nowhere.idx does not exist"):
        check_prefix(str(tmp_path / "nowhere"))
    prefix = str(tmp_path / "cut")
    _copy_prefix(tiny_corpus["prefix"], prefix)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 10)
    with pytest.raises(ValueError, match="cut.bin has .* bytes but .*cut.idx describes"):
        check_prefix(prefix)
    prefix = str(tmp_path / "garbled")
    _copy_prefix(tiny_corpus["prefix"], prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTMEGA!!")
    with pytest.raises(ValueError, match="garbled.idx is not a megatron index file"):
        check_prefix(prefix)
    prefix = str(tmp_path / "short")
    _copy_prefix(tiny_corpus["prefix"], prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="short.idx is truncated or corrupt"):
        check_prefix(prefix)


def test_data_made_with_another_tokenizer_is_refused(tiny_corpus, tmp_path):
    from megatron_pd.data.tokenizer import train_sentencepiece

    other = train_sentencepiece(
        tiny_corpus["files"][:5], str(tmp_path / "other"), 400, num_threads=1
    )
    with pytest.raises(ValueError, match="was tokenized with tokenizer"):
        check_data([tiny_corpus["prefix"]], Tokenizer(other))


def test_parse_blend():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="data.blend is empty"):
        parse_blend([])
    with pytest.raises(ValueError, match="either prefixes only or weight, prefix pairs"):
        parse_blend(["a", "0.5"])


def _data_cfg(blend, seed=1234, seq=64):
    from megatron_pd.config import DataConfig

    return DataConfig(blend=list(blend), split="90,10,0", seq_length=seq, seed=seed)


def test_splits_are_deterministic_and_seeded(tiny_corpus, tmp_path):
    tok = Tokenizer(tiny_corpus["tokenizer"])
    prefix = tiny_corpus["prefix"]
    first = build_splits(_data_cfg([prefix]), tok, (64, 16, 0), str(tmp_path / "c1"))
    again = build_splits(_data_cfg([prefix]), tok, (64, 16, 0), str(tmp_path / "c2"))
    other = build_splits(_data_cfg([prefix], seed=7), tok, (64, 16, 0), str(tmp_path / "c3"))
    for i in range(8):
        numpy.testing.assert_array_equal(first.train[i]["tokens"], again.train[i]["tokens"])
    assert any(
        not numpy.array_equal(first.train[i]["tokens"], other.train[i]["tokens"]) for i in range(8)
    )
    sample = first.train[0]
    assert sample["tokens"].shape == (64,)
    numpy.testing.assert_array_equal(sample["tokens"][1:], sample["labels"][:-1])


def test_split_without_documents_is_an_error_not_a_hang(tiny_corpus, tmp_path):
    """40 documents at 99/1: the valid part rounds to none; megatron-core would loop forever."""
    from megatron_pd.config import DataConfig

    cfg = DataConfig(blend=[tiny_corpus["prefix"]], split="99,1,0", seq_length=64)
    with pytest.raises(
        ValueError, match=r"leaves the valid split no documents of .*\(40 documents\)"
    ):
        build_splits(cfg, Tokenizer(tiny_corpus["tokenizer"]), (16, 0, 0), str(tmp_path))


def _blend_counts(rank, world_size, tokenizer, blend, cache):
    splits = build_splits(_data_cfg(blend), Tokenizer(tokenizer), (2000, 0, 0), cache)
    return numpy.bincount(splits.train.dataset_index[:2000], minlength=2)


def test_blend_weights_are_respected(tiny_corpus, tmp_path):
    from _dist import run_distributed  # megatron's blended dataset needs a process group

    second = str(tmp_path / "second")
    preprocess(tiny_corpus["files"][20:40], second, tiny_corpus["tokenizer"], progress=False)
    blend = ["0.25", tiny_corpus["prefix"], "0.75", second]
    counts = run_distributed(
        _blend_counts, 1, tiny_corpus["tokenizer"], blend, str(tmp_path / "cache")
    )[0]
    assert abs(counts[0] / 2000 - 0.25) < 0.01, counts


def test_global_batch_sampler_partitions_the_batch():
    samplers = [GlobalBatchSampler(8, 2, 2, r) for r in range(2)]
    assert samplers[0].num_microbatches == 2
    seen = [i for s in samplers for mb in s.microbatch_indices(16) for i in mb]
    assert sorted(seen) == list(range(16, 24))
    with pytest.raises(ValueError, match="not a multiple"):
        GlobalBatchSampler(8, 3, 2, 0)


def test_binary_files_are_skipped_and_counted(tiny_corpus, tmp_path):
    from megatron_pd.data.preprocess import looks_binary

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = tiny_corpus["files"][:4]
    for i, path in enumerate(texts):
        shutil.copy(path, corpus / f"t{i}.py")
    shutil.copy(sys.executable, corpus / "python_copy")  # an executable in the corpus
    (corpus / "latin1.txt").write_bytes("café déjà vu, naïve\n".encode("latin-1"))  # text
    (corpus / "noise.dat").write_bytes(bytes(range(128, 256)) * 64)  # no NUL, not UTF-8
    assert looks_binary(open(sys.executable, "rb").read())
    assert not looks_binary("café déjà vu".encode("latin-1"))
    out = str(tmp_path / "docs")
    stats = preprocess(sorted(str(p) for p in corpus.iterdir()), out,
                       tiny_corpus["tokenizer"], progress=False)
    assert sorted(os.path.basename(p) for p in stats.binary_skipped) == ["noise.dat",
                                                                         "python_copy"]
    assert stats.documents == 5
    meta = json.load(open(out + ".meta.json"))
    assert meta["binary_files_skipped"] == 2 and meta["input_order"] == "input order"


def test_shuffled_file_order_is_seeded(tiny_corpus, tmp_path):
    from megatron_pd.data.datasets import check_prefix

    files = tiny_corpus["files"][:10]
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", None)):
        preprocess(files, str(tmp_path / name), tiny_corpus["tokenizer"], progress=False,
                   shuffle_seed=seed)
        runs[name] = (tmp_path / f"{name}.bin").read_bytes()
    assert runs["a"] == runs["b"] != runs["c"]  # same seed, same order; not the input order
    assert sorted(runs["a"]) == sorted(runs["c"])  # the same tokens
    assert check_prefix(str(tmp_path / "a")).documents == 10
    assert json.load(open(tmp_path / "a.meta.json"))["input_order"] == "shuffled, seed 7"
