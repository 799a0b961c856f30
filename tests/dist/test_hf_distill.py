"""Distillation with a Hugging Face teacher directory, end to end.

A teacher pre-trained here with an HF tokenizer is exported to an HF directory; distilling a
student from that directory (online, teacher TP=1 and TP=2) equals distilling from the native
run step for step, a student starts from a converted checkpoint (``checkpoint.init_from``),
and the offline dump from the HF directory writes the same store entries as from the native
run.
"""

import os

import numpy as np
import pytest

pytest.importorskip("transformers")

from _dist import run_distributed  # noqa: E402
from _runs import losses, run_args, train_error, train_in_ranks  # noqa: E402

from megatron_pd.config import load_config  # noqa: E402

# The exported teacher holds the native teacher's fp32 weights; its vocabulary rows are padded
# differently (300 vs 384), which the loss ignores: the same losses up to fp32 reduction order.
LOSS_ATOL = 2e-5


@pytest.fixture(scope="module")
def hf_corpus(tmp_path_factory):
    """A byte-level BPE HF tokenizer and the 12-file stdlib data it tokenized."""
    from megatron_pd.data.corpus import stdlib_corpus_files
    from megatron_pd.data.preprocess import preprocess
    from megatron_pd.data.tokenizer import train_hf_bpe

    root = tmp_path_factory.mktemp("hf_corpus")
    files = stdlib_corpus_files()[:12]
    tokenizer = train_hf_bpe(files, str(root / "tokenizer"), vocab_size=300)
    prefix = str(root / "text_document")
    preprocess(files, prefix, tokenizer, progress=False)
    return {"tokenizer": tokenizer, "prefix": prefix, "root": root}


def export_in_ranks(rank, world_size, load, out):
    from megatron_pd.models.convert import export_hf

    return export_hf(load, out, dtype="float32")


@pytest.fixture(scope="module")
def teachers(hf_corpus, tmp_path_factory):
    native = str(tmp_path_factory.mktemp("hf_teacher") / "native")
    args = run_args(hf_corpus, native, "--train.train_steps=3", "--model.num_layers=3",
                    "--model.hidden_size=96", "--train.eval_interval=0")
    run_distributed(train_in_ranks, 1, args)
    exported = native + "_hf"
    run_distributed(export_in_ranks, 1, native, exported)
    return {"native": native, "hf": exported}


def student(hf_corpus, run_dir, *extra):
    return run_args(hf_corpus, run_dir, "--model.hidden_size=48", "--train.train_steps=3",
                    "--train.eval_interval=3", "--distill.alpha.value=0.7",
                    "--distill.tau.value=2.0", *extra)


@pytest.mark.parametrize("teacher_tp, truncation", [(1, None), (2, "top-0.9-16")])
def test_online_pd_from_the_hf_export_equals_the_native_teacher(hf_corpus, teachers, tmp_path,
                                                               teacher_tp, truncation):
    extra = [f"--distill.teacher.tp={teacher_tp}"]
    if truncation:
        extra += [f"--distill.truncation={truncation}", "--distill.tail=true"]
    results = {}
    for name in ("native", "hf"):
        run_dir = str(tmp_path / name)
        args = student(hf_corpus, run_dir, f"--distill.teacher.load={teachers[name]}", *extra)
        run_distributed(train_in_ranks, teacher_tp, args)
        results[name] = losses(run_dir)
    assert len(results["native"]) >= 4
    for (split_a, step_a, a), (split_b, step_b, b) in zip(results["native"], results["hf"]):
        assert (split_a, step_a) == (split_b, step_b)
        assert abs(a - b) < LOSS_ATOL, (split_a, step_a, a, b)


def test_student_initialised_from_a_converted_model(hf_corpus, teachers, tmp_path):
    """The exported teacher, converted back, initialises a student of the same shape: its
    first validation loss equals the teacher's own, and an HF directory initialises alike."""
    from megatron_pd.models.convert import import_hf

    converted = str(tmp_path / "converted")
    run_distributed(lambda r, w: import_hf(teachers["hf"], converted), 1)
    shape = load_config(os.path.join(converted, "config.yaml")).model
    model_args = [f"--model.{field}={getattr(shape, field)}" for field in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups", "padded_vocab_size", "hf_vocab_rows", "tie_embeddings")]
    first = {}
    for name, source in (("converted", converted), ("hf", teachers["hf"])):
        run_dir = str(tmp_path / f"from_{name}")
        args = run_args(hf_corpus, run_dir, *model_args, "--train.train_steps=2",
                        "--train.eval_interval=1", "--lr_schedule.value=1e-12",
                        f"--checkpoint.init_from={source}")
        run_distributed(train_in_ranks, 2, args + ["--parallel.tp=2"])
        first[name] = [loss for split, step, loss in losses(run_dir) if split == "valid"][0]
    assert abs(first["converted"] - first["hf"]) < LOSS_ATOL
    wrong = run_args(hf_corpus, str(tmp_path / "wrong"), "--train.train_steps=1",
                     f"--checkpoint.init_from={teachers['hf']}")
    message = run_distributed(train_error, 1, wrong)[0]
    assert message and "its config.json differs from model.* in num_layers (3 vs 2)" in message


def dump_in_ranks(rank, world_size, args, store):
    from megatron_pd.logits.dump import dump_teacher_logits
    from megatron_pd.train import _absolute_paths

    cfg = load_config(None, args)
    _absolute_paths(cfg)
    return dump_teacher_logits(cfg, store, ["train"], 64)


def test_offline_dump_from_the_hf_directory(hf_corpus, teachers, tmp_path):
    from megatron_pd.logits.store import StoreReader

    readers = {}
    for name in ("native", "hf"):
        store = str(tmp_path / f"store_{name}")
        args = student(hf_corpus, str(tmp_path / f"dump_{name}"),
                       f"--distill.teacher.load={teachers[name]}", "--distill.teacher.tp=2",
                       "--distill.truncation=top-0.9-12")
        run_distributed(dump_in_ranks, 2, args, store)
        readers[name] = StoreReader(os.path.join(store, "train"))
    native, hf = readers["native"], readers["hf"]
    assert native.sample_ids() == hf.sample_ids() and native.num_samples > 0
    for sample in native.sample_ids()[:8]:
        for a, b in zip(native.get(sample), hf.get(sample)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    assert hf.header.teacher["checkpoint"] == teachers["hf"]
