"""Fuzzing (hypothesis): whatever a user's files or overrides hold, megatron_pd ends in a
ValueError (or RuntimeError) whose message names the field or file - never another exception
from deep inside a library, a hang, or a silently wrong result.

Inputs: random config overrides (any field, values of every type); random byte flips and
truncations of a data prefix's .idx and a truncated .bin; of a logits store's header and
shard; of an HF config.json's fields and a safetensors header; and checkpoint metadata
pickles naming any global (only the allow-list unpickles).
Each property runs a bounded number of examples (the suite's time), with a fixed seed.
"""

import json
import os
import shutil

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from megatron_pd.config.loader import describe_fields, load_config  # noqa: E402

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FIELDS = [name for name, *_ in describe_fields()]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3))
def test_random_overrides_give_a_config_or_an_error_naming_a_field(pairs):
    try:
        load_config(None, pairs)
    except ValueError as err:
        message = str(err)
        assert any(
            key.split(".")[0] in message or key.split(".")[-1] in message for key, _ in pairs
        ), (pairs, message)


def flips(data: bytes, positions, values) -> bytes:
    out = bytearray(data)
    for p, v in zip(positions, values):
        if out:
            out[p % len(out)] ^= v or 1
    return bytes(out)


DAMAGE = st.tuples(
    st.lists(st.integers(0, 10**9), min_size=1, max_size=4),
    st.lists(st.integers(1, 255), min_size=4, max_size=4),
    st.one_of(st.none(), st.floats(0.0, 0.99)),
)


def damaged(path, original: bytes, damage) -> None:
    positions, values, cut = damage
    data = flips(original, positions, values)
    if cut is not None:
        data = data[: int(len(data) * cut)]
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def prefix(tiny_corpus, tmp_path_factory):
    from megatron_pd.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("fuzz_data")
    out = str(root / "data")
    preprocess(tiny_corpus["files"][:3], out, tiny_corpus["tokenizer"], progress=False)
    return out, tiny_corpus["tokenizer"]


@FUZZ
@given(DAMAGE)
def test_damaged_idx_is_named(prefix, tmp_path, damage):
    from megatron_pd.data.datasets import check_data
    from megatron_pd.data.tokenizer import load_tokenizer

    source, tokenizer = prefix
    work = tmp_path / "d"
    work.mkdir(exist_ok=True)
    for ext in (".bin", ".idx", ".meta.json"):
        if os.path.exists(source + ext):
            shutil.copy(source + ext, str(work / "data") + ext)
    damaged(str(work / "data.idx"), open(source + ".idx", "rb").read(), damage)
    try:
        check_data([str(work / "data")], load_tokenizer(tokenizer))
    except ValueError as err:
        assert "data" in str(err) and (".idx" in str(err) or "prefix" in str(err)), str(err)


@FUZZ
@given(st.floats(0.0, 0.99))
def test_truncated_bin_is_named(prefix, tmp_path, cut):
    from megatron_pd.data.datasets import check_data
    from megatron_pd.data.tokenizer import load_tokenizer

    source, tokenizer = prefix
    target = str(tmp_path / "data")
    for ext in (".idx", ".meta.json"):
        if os.path.exists(source + ext):
            shutil.copy(source + ext, target + ext)
    data = open(source + ".bin", "rb").read()
    with open(target + ".bin", "wb") as f:
        f.write(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"\.bin"):
        check_data([target], load_tokenizer(tokenizer))


@pytest.fixture(scope="module")
def store_split(tmp_path_factory):
    import numpy as np

    from megatron_pd.logits import store_format as F
    from megatron_pd.logits.store import StoreWriter

    split = str(tmp_path_factory.mktemp("fuzz_store") / "train")
    header = F.StoreHeader(
        vocab_size=300,
        tokenizer_fingerprint="t",
        dataset={"seq_length": 8, "fingerprint": "x", "split_name": "train"},
        teacher={},
        truncation={"name": "top-1.0-4", "top_p": 1.0, "top_k": 4, "min_k": 1, "slots": 4},
    )
    header.write(split)
    writer = StoreWriter(split, header)
    g = np.random.default_rng(0)
    blocks = []
    for _ in range(6):
        ids = np.sort(g.choice(300, size=(8, 4), replace=True), axis=1)
        ids = np.stack([np.sort(g.choice(300, 4, replace=False)) for _ in range(8)])
        logp = np.log(np.full((8, 4), 0.2, dtype=np.float32))
        blocks.append(writer.encode(ids, logp, np.log(np.full(8, 0.2, dtype=np.float32))))
    writer.write_shard(0, list(range(6)), [-1] * 6, blocks)
    writer.finish(1)
    return split


@FUZZ
@given(DAMAGE, st.sampled_from(["header.json", "shard_00000.pd"]))
def test_damaged_store_is_named(store_split, tmp_path, damage, name):
    from megatron_pd.logits.store import StoreReader

    split = tmp_path / "train"
    if split.exists():
        shutil.rmtree(split)
    shutil.copytree(store_split, split)
    damaged(str(split / name), open(os.path.join(store_split, name), "rb").read(), damage)
    try:
        reader = StoreReader(str(split))
        for sample in range(6):
            ids, logp, tail = reader.get(sample)
            assert ((ids >= -1) & (ids < 300)).all() and (logp <= 1e-3).all()
    except ValueError as err:
        assert str(split) in str(err) or name in str(err), str(err)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "intermediate_size",
                "num_hidden_layers",
                "vocab_size",
                "rope_theta",
                "rope_scaling",
                "hidden_act",
                "tie_word_embeddings",
                "architectures",
                "partial_rotary_factor",
                "rms_norm_eps",
                "attention_bias",
                "sliding_window",
                "max_position_embeddings",
            ]
        ),
        VALUES,
        min_size=1,
        max_size=3,
    )
)
def test_hf_config_fields_are_read_or_named(changes):
    from megatron_pd.models.hf_config import model_config_from_hf

    base = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "vocab_size": 320,
        "rms_norm_eps": 1e-5,
    }
    try:
        model_config_from_hf({**base, **changes}, "config.json", seq_length=64)
    except ValueError as err:
        assert "config.json" in str(err) and any(k in str(err) for k in changes), str(err)


@pytest.fixture(scope="module")
def safetensors_file(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("fuzz_st")
    save_file({"a": torch.ones(4, 3), "b": torch.zeros(5)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return root


@FUZZ
@given(DAMAGE)
def test_damaged_safetensors_header_is_named(safetensors_file, tmp_path, damage):
    from megatron_pd.models.hf_weights import SafetensorsIndex

    target = tmp_path / "m"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(safetensors_file, target)
    original = open(safetensors_file / "model.safetensors", "rb").read()
    positions, values, cut = damage
    # aim the flips at the 8-byte length and the JSON header
    damaged(
        str(target / "model.safetensors"), original, ([p % 120 for p in positions], values, cut)
    )
    try:
        index = SafetensorsIndex(str(target))
        for name in ("a", "b"):
            if index.has(name):
                index.read(name, tuple(index.shape(name)))
    except ValueError as err:
        assert "model.safetensors" in str(err) or str(target) in str(err), str(err)


CALLABLES = [
    ("os", "system"),
    ("posix", "system"),
    ("subprocess", "Popen"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("torch", "load"),
    ("numpy", "load"),
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
]


@FUZZ
@given(
    st.sampled_from(CALLABLES),
    st.text(alphabet="abcdefgh /._-", max_size=12),
    st.lists(st.integers(0, 10**6), max_size=3),
    st.lists(st.integers(1, 255), max_size=3),
)
def test_checkpoint_metadata_runs_nothing_outside_the_allow_list(target, arg, spots, values):
    """A pickle naming any global: the allow-list admits checkpoint classes and plain
    containers; anything that could run code is refused naming the file and the class,
    also after random byte flips (which at worst give an unpickling error)."""
    import io
    import pickle

    from megatron_pd.platform.safe_loading import load_metadata

    module, name = target
    data = flips(
        b"c%s\n%s\n(V%s\ntR." % (module.encode(), name.encode(), arg.encode()), spots, values
    )
    allowed = {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("pathlib", "PosixPath"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
    }
    try:
        load_metadata(io.BytesIO(data), "ckpt/.metadata")
    except ValueError as err:
        if "refuses" in str(err):
            assert "ckpt/.metadata" in str(err), str(err)
            assert target not in allowed or data.count(b"\n") < 3 or spots, str(err)
        return
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
        OverflowError,
    ):
        return  # not a pickle any more, or arguments the class rejects: nothing ran
    assert target in allowed or spots, (target, data)
