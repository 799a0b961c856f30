"""The training command line: one clear error line for bad inputs, dry run, --help-config."""

import os
import subprocess
import sys

import pytest

from megatron_pd.train import main


def base_args(corpus, tmp_path):
    return [
        "--model.preset=tiny",
        f"--data.tokenizer_model={corpus['tokenizer']}",
        f"--data.blend=[{corpus['prefix']}]",
        "--data.seq_length=64",
        f"--run_dir={tmp_path / 'run'}",
    ]


def error_of(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def test_missing_data_prefix(tiny_corpus, tmp_path, capsys):
    line = error_of(base_args(tiny_corpus, tmp_path) + ["--data.blend=[/no/such/prefix]"], capsys)
    assert "/no/such/prefix.idx does not exist" in line


def test_vocab_smaller_than_tokenizer(tiny_corpus, tmp_path, capsys):
    line = error_of(base_args(tiny_corpus, tmp_path) + ["--model.vocab_size=100"], capsys)
    assert "model.vocab_size=100 is smaller than the tokenizer's 512 tokens" in line


def test_tp_not_dividing_heads(tiny_corpus, tmp_path, capsys):
    line = error_of(base_args(tiny_corpus, tmp_path) + ["--parallel.tp=3"], capsys)
    assert "parallel.tp=3: must divide model.num_attention_heads=4" in line


def test_corrupt_idx(tiny_corpus, tmp_path, capsys):
    prefix = tmp_path / "broken"
    for suffix in (".bin", ".idx"):
        data = open(tiny_corpus["prefix"] + suffix, "rb").read()
        (tmp_path / f"broken{suffix}").write_bytes(data[:-40] if suffix == ".idx" else data)
    line = error_of(base_args(tiny_corpus, tmp_path) + [f"--data.blend=[{prefix}]"], capsys)
    assert "broken.idx is truncated or corrupt" in line


def test_dry_run_prints_groups_for_any_world_size(tiny_corpus, tmp_path, capsys):
    argv = base_args(tiny_corpus, tmp_path) + [
        "--parallel.tp=2",
        "--parallel.pp=2",
        "--dry-run",
        "--world-size=8",
        "--train.global_batch_size=16",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "student: world_size=8 tp=2 pp=2 dp=2" in out
    assert "tp   groups: [0, 1] [2, 3] [4, 5] [6, 7]" in out
    assert "pp   groups: [0, 4] [1, 5] [2, 6] [3, 7]" in out
    assert "dry run OK" in out
    assert not os.path.exists(tmp_path / "run")


def test_help_config_lists_fields(capsys):
    assert main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "--lr_schedule.decay_shape" in out and "--parallel.tp" in out
    # the shared schedule fields say whose they are, with that schedule's defaults
    lines = out.splitlines()
    doc = {lines[i].split()[0]: (lines[i], lines[i + 1]) for i in range(0, len(lines) - 1)
           if lines[i].startswith("--")}
    assert "default 0.0003" in doc["--lr_schedule.value"][0]
    assert "learning rate" in doc["--lr_schedule.value"][1]
    assert "Temperature" in doc["--distill.tau.value"][1]
    assert "KD term" in doc["--distill.alpha.final"][1]
    assert "default 1.0" in doc["--distill.tau.final"][0]  # tau's default, not the class's 0.0


@pytest.mark.slow
def test_real_command_prints_one_line(tiny_corpus, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_pd.train",
            *base_args(tiny_corpus, tmp_path),
            "--parallel.tp=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: parallel.tp=3: must divide model.num_attention_heads=4"
    ]


def test_student_longer_than_its_teacher(tiny_corpus, teacher_run, hf_models, tmp_path, capsys):
    # a megatron_pd teacher trained on 64-token sequences: a one-line notice
    argv = base_args(tiny_corpus, tmp_path) + [
        "--data.seq_length=128", f"--distill.teacher.load={teacher_run}", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "notice: data.seq_length=128 is longer than the teacher was trained on" in out
    assert "data.seq_length of " in out and ": 64)" in out
    # an HF teacher built for 128 positions: an error naming its config field
    llama = hf_models["models"]["llama"]
    argv = base_args(tiny_corpus, tmp_path) + [
        "--data.seq_length=256", f"--distill.teacher.load={llama}", "--dry-run"]
    line = error_of(argv, capsys)
    assert "data.seq_length=256 is longer than the teacher's max_position_embeddings" in line
    assert "config.json (128)" in line
