"""Config tree: validation errors name the field, overrides and presets, exact round trip."""

import dataclasses

import pytest

from megatron_pd.config import Config, load_config, save_config
from megatron_pd.config.loader import describe_fields, parse_overrides
from megatron_pd.config.presets import MODEL_PRESETS


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--parallel.tp=3"], "parallel.tp=3: must divide model.num_attention_heads=4"),
        (["--model.num_query_groups=3"], "model.num_query_groups=3: must divide"),
        (["--parallel.tp=4", "--model.num_query_groups=2"], "must divide the key/value heads"),
        (["--parallel.pp=3"], "parallel.pp=3: must divide model.num_layers=2"),
        (["--train.global_batch_size=10", "--train.micro_batch_size=4"], "multiple of"),
        (["--train.train_tokens=1000"], "set exactly one of"),
        (["--model.normalization=BatchNorm"], "model.normalization='BatchNorm'"),
        (["--lr_schedule.style=step"], "lr_schedule.style='step'"),
        (["--data.split=90,10"], "data.split='90,10'"),
        (["--model.hiden_size=8"], "did you mean model.hidden_size"),
        (["--model.hidden_size=abc"], "model.hidden_size='abc': expected an integer"),
        (["--model.preset=gpt5"], "model.preset='gpt5': unknown preset"),
        (
            [
                "--lr_schedule.style=wsd",
                "--lr_schedule.warmup_fraction=0.5",
                "--lr_schedule.decay_fraction=0.6",
            ],
            "exceeds the whole run",
        ),
    ],
)
def test_invalid_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_world_size_checks():
    cfg = load_config(None, ["--parallel.tp=2", "--train.global_batch_size=16"])
    assert cfg.validate_for_world(4) == 2
    with pytest.raises(ValueError, match="must divide the world size 3"):
        cfg.validate_for_world(3)
    cfg = load_config(None, ["--train.global_batch_size=8", "--train.micro_batch_size=4"])
    with pytest.raises(ValueError, match="micro_batch_size\\*dp = 4\\*4"):
        cfg.validate_for_world(4)


def test_override_forms_and_types():
    pairs = parse_overrides(["--a.b=1", "--c.d", "2.5", "--e=[x, 0.3]", "--f=null", "--g=true"])
    assert pairs == [("a.b", 1), ("c.d", 2.5), ("e", ["x", 0.3]), ("f", None), ("g", True)]
    cfg = load_config(
        None,
        ["--data.blend=[0.3, a, 0.7, b]", "--train.train_steps", "7", "--lr_schedule.value=3e-4"],
    )
    assert cfg.lr_schedule.value == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert cfg.data.blend == ["0.3", "a", "0.7", "b"]
    assert cfg.train.train_steps == 7


def test_preset_is_a_default_that_fields_override():
    cfg = load_config(None, ["--model.preset=student-1.9b", "--model.num_layers=4"])
    expected = dict(MODEL_PRESETS["student-1.9b"], num_layers=4)
    for name, value in expected.items():
        assert getattr(cfg.model, name) == value, name


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_every_preset_is_valid(preset):
    load_config(None, [f"--model.preset={preset}"])


def test_paper_student_table():
    # PAPER.md: hidden, FFN, layers, heads, query groups, tied embeddings.
    table = {
        "student-330m": (1024, 4096, 12, 16, 2, True),
        "student-670m": (1024, 4096, 24, 16, 2, False),
        "student-1.9b": (2048, 6912, 24, 16, 2, False),
        "student-3.8b": (3072, 8192, 28, 24, 8, False),
        "student-6.8b": (4096, 12800, 28, 32, 8, False),
    }
    for name, row in table.items():
        m = MODEL_PRESETS[name]
        actual = (
            m["hidden_size"],
            m["ffn_hidden_size"],
            m["num_layers"],
            m["num_attention_heads"],
            m["num_query_groups"],
            m["tie_embeddings"],
        )
        assert actual == row, name


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        None,
        [
            "--model.preset=tiny",
            "--parallel.tp=2",
            "--data.blend=[p]",
            "--lr_schedule.style=wsd",
            "--lr_schedule.decay_fraction=0.2",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert not list(tmp_path.glob("*.tmp"))


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(bad))
    bad.write_text("modle:\n  num_layers: 2\n")
    with pytest.raises(ValueError, match="unknown config field modle \\(did you mean model\\?\\)"):
        load_config(str(bad))


def test_every_field_is_documented():
    rows = describe_fields(Config)
    undocumented = [name for name, _, _, doc in rows if not doc]
    assert not undocumented
    assert len(rows) > 60
