"""A killed-and-resumed online-distillation run reproduces the uninterrupted one exactly,
alpha and tau schedules included; the teacher is a real (briefly trained) run directory."""

import pytest

from _dist import run_distributed
from _runs import losses, run_args, train_in_ranks

from megatron_pd.config import load_config
from megatron_pd.engine.metrics import read_metrics
from megatron_pd.engine.schedules import schedule_value


def distill_args(corpus, run_dir, teacher, *extra):
    return run_args(
        corpus, run_dir, "--model.hidden_size=48", "--model.num_attention_heads=4",
        f"--distill.teacher.load={teacher}", "--distill.teacher.tp=2",
        "--distill.loss=forward_kl", "--distill.truncation=top-0.95-20",
        "--distill.alpha.style=linear", "--distill.alpha.value=0.2", "--distill.alpha.final=0.9",
        "--distill.tau.style=cosine", "--distill.tau.value=2.0", "--distill.tau.final=1.0",
        "--train.train_steps=8", "--checkpoint.save_interval=3", *extra)


def test_distill_resume_equals_uninterrupted(tiny_corpus, tmp_path, teacher_run):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed(train_in_ranks, 2, distill_args(tiny_corpus, straight, teacher_run))
    run_distributed(train_in_ranks, 2, distill_args(tiny_corpus, resumed, teacher_run,
                                                    "--train.stop_after_steps=5"))
    run_distributed(train_in_ranks, 2, distill_args(tiny_corpus, resumed, teacher_run))
    assert losses(resumed) == losses(straight)
    rows = read_metrics(str(straight / "metrics.jsonl"), "train")
    again = read_metrics(str(resumed / "metrics.jsonl"), "train")
    assert [r["kd_loss"] for r in again] == [r["kd_loss"] for r in rows]
    cfg = load_config(str(straight / "config.yaml"))
    for row in rows:  # logged alpha/tau follow the closed forms of their schedules
        step = row["step"] - 1
        assert row["alpha"] == pytest.approx(schedule_value(cfg.distill.alpha, step, 8))
        assert row["tau"] == pytest.approx(schedule_value(cfg.distill.tau, step, 8))
    teacher_valid = read_metrics(str(straight / "metrics.jsonl"), "teacher_valid")
    assert len(teacher_valid) == 1 and teacher_valid[0]["loss"] < teacher_valid[0]["chance"]
