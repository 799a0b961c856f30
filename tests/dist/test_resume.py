"""Checkpoint/resume: a resumed run equals the uninterrupted one, bit for bit (CPU, fp32).

Also: a run killed with SIGKILL under torchrun resumes from its last complete checkpoint, and
a save that crashes half-way leaves the previous "latest" checkpoint loadable.
"""

import os
import subprocess

import pytest

from _dist import run_distributed
from _runs import (
    TORCHRUN_ENV,
    losses,
    run_args,
    sigkill_when,
    torchrun_command,
    train_in_ranks,
)
from megatron_pd.engine.metrics import read_metrics


@pytest.mark.parametrize(
    "layout",
    [["--parallel.tp=1"], ["--parallel.tp=2", "--checkpoint.async_save=true"],
     ["--parallel.distributed_optimizer=false"]],
    ids=["dp2_distopt", "tp2_async_save", "dp2_plain_adam"],
)
def test_resume_equals_uninterrupted(tiny_corpus, tmp_path, layout):
    common = ["--train.train_steps=8", "--checkpoint.save_interval=3", *layout]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_distributed(train_in_ranks, 2, run_args(tiny_corpus, straight, *common))
    run_distributed(train_in_ranks, 2,
                    run_args(tiny_corpus, resumed, *common, "--train.stop_after_steps=5"))
    assert max(step for _, step, _ in losses(resumed)) == 5
    run_distributed(train_in_ranks, 2, run_args(tiny_corpus, resumed, *common))
    expected, actual = losses(straight), losses(resumed)
    assert len(expected) == 8 + 2  # train steps + validations at 4 and at the end
    assert actual == expected  # exact: same data, same arithmetic, restored state


def test_sigkilled_torchrun_job_resumes(tiny_corpus, tmp_path):
    args = run_args(tiny_corpus, tmp_path / "killed", "--train.train_steps=60",
                    "--checkpoint.save_interval=5")
    command = torchrun_command("-m", "megatron_pd.train", *args)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    sigkill_when(command, lambda: metrics.exists() and any(
        r["step"] >= 12 for r in read_metrics(str(metrics))), timeout=240, poll=0.05)
    resumed = subprocess.run(command, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    straight = tmp_path / "straight"
    run_distributed(train_in_ranks, 2, run_args(tiny_corpus, straight, "--train.train_steps=60",
                                                "--checkpoint.save_interval=5"))
    assert losses(tmp_path / "killed") == losses(straight)


def crash_during_second_save(rank, world_size, root):
    from megatron.core import dist_checkpointing

    from _models import tiny_config
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.models.checkpoint import CheckpointManager, latest_checkpoint, load_checkpoint
    from megatron_pd.parallel import topology

    cfg = tiny_config("--optimizer.name=adamw")
    module = TrainModule(cfg, topology.init_student_groups(1, 1), cfg.model.vocab_size, 1)
    manager = CheckpointManager(root, keep_last=2)
    manager.save(module, 1, {"step": 1})
    real_save = dist_checkpointing.save

    def write_half_then_die(state, directory, **kwargs):
        with open(os.path.join(directory, "partial.distcp"), "wb") as f:
            f.write(b"\0" * 100)
        raise RuntimeError("simulated crash during save")

    dist_checkpointing.save = write_half_then_die
    try:
        manager.save(module, 2, {"step": 2})
    except RuntimeError:
        pass
    finally:
        dist_checkpointing.save = real_save
    leftovers = sorted(os.listdir(root))
    # A process killed mid-save cannot clean up: leave what it would leave.
    os.makedirs(os.path.join(root, ".iter_0000002.tmp"))
    with open(os.path.join(root, ".iter_0000002.tmp", "partial.distcp"), "wb") as f:
        f.write(b"\0" * 100)
    after_crash = latest_checkpoint(root)
    state = load_checkpoint(module, after_crash)
    manager.save(module, 2, {"step": 2})
    return after_crash, state, leftovers, sorted(os.listdir(root))


def test_crash_mid_save_keeps_latest_checkpoint(tmp_path):
    root = str(tmp_path / "ckpt")
    after_crash, state, leftovers, final = run_distributed(crash_during_second_save, 1, root)[0]
    assert after_crash.endswith("iter_0000001") and state == {"step": 1}
    # A failed save removes its temporary directory; a killed one's leftover is ignored by
    # resume and replaced by the next save of that step.
    assert leftovers == ["iter_0000001", "latest"]
    assert final == ["iter_0000001", "iter_0000002", "latest"]
