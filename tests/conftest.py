"""Test-suite setup: the tests directory on sys.path (for _dist, _models) and markers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# No hub is reachable: transformers, datasets and lm-eval must never try (and stay quiet).
for _name, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_name, _value)

# Without CUDA, Triton kernels run in its CPU interpreter (must be set before any kernel is
# defined, i.e. before megatron_pd.loss is imported).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_addoption(parser):
    parser.addoption(
        "--faults",
        action="store_true",
        help="also run the fault-injection tier (marker faults; minutes of torchrun jobs)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: minutes on 2 CPU cores; part of the default suite")
    config.addinivalue_line(
        "markers", "faults: the fault-injection tier (run with --faults; a subset is unmarked)"
    )


def pytest_collection_modifyitems(config, items):
    import torch

    skips = []
    if not torch.cuda.is_available():
        skips.append(("gpu", pytest.mark.skip(reason="needs a CUDA GPU")))
    if not config.getoption("--faults"):
        skips.append(("faults", pytest.mark.skip(reason="the fault tier runs with --faults")))
    for item in items:
        for keyword, skip in skips:
            if keyword in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A 512-token SentencePiece model and a preprocessed .bin/.idx of 40 stdlib files.

    Returns a dict with the tokenizer model path, the data prefix and the source files.
    """
    from megatron_pd.data.corpus import stdlib_corpus_files
    from megatron_pd.data.preprocess import preprocess
    from megatron_pd.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("corpus")
    files = stdlib_corpus_files()[:40]
    model = train_sentencepiece(files, str(root / "tok"), vocab_size=512, num_threads=1)
    prefix = str(root / "text_document")
    preprocess(files, prefix, model, workers=1, progress=False)
    return {"tokenizer": model, "prefix": prefix, "files": files, "root": root}


@pytest.fixture(scope="session")
def small_corpus(tiny_corpus, tmp_path_factory):
    """The tiny corpus's tokenizer over only 12 files (a logits store of it dumps fast)."""
    from megatron_pd.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("small_corpus")
    prefix = str(root / "text_document")
    preprocess(tiny_corpus["files"][:12], prefix, tiny_corpus["tokenizer"], progress=False)
    return {
        "tokenizer": tiny_corpus["tokenizer"],
        "prefix": prefix,
        "files": tiny_corpus["files"][:12],
        "root": root,
    }


@pytest.fixture(scope="session")
def teacher_run(tiny_corpus, tmp_path_factory):
    """A briefly trained teacher run directory (config.yaml + checkpoint) on the tiny data."""
    from _dist import run_distributed
    from _runs import run_args, train_in_ranks

    run_dir = tmp_path_factory.mktemp("teacher_run")
    args = run_args(
        tiny_corpus,
        run_dir,
        "--train.train_steps=3",
        "--model.num_layers=3",
        "--model.hidden_size=96",
        "--train.eval_interval=0",
    )
    run_distributed(train_in_ranks, 1, args)
    return run_dir


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Tiny random HF models of every supported family (tests/_hf.py), their tokenizer, a batch
    of tokens and transformers' fp32 logits on it."""
    pytest.importorskip("transformers")
    import _hf
    import torch

    root = tmp_path_factory.mktemp("hf_models")
    tokenizer = _hf.train_tokenizer(str(root / "tokenizer"))
    models = {}
    for family in _hf.FAMILIES:
        path = str(root / family)
        _hf.build_model(family, path, tokenizer)
        models[family] = path
    tokens = torch.randint(0, _hf.TOKENS, (2, 40), generator=torch.Generator().manual_seed(0))
    expected = {family: _hf.hf_logits(path, tokens) for family, path in models.items()}
    return {
        "root": root,
        "models": models,
        "tokens": tokens,
        "expected": expected,
        "tokenizer": tokenizer,
    }
