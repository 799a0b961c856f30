"""Faults: non-finite steps, loss spikes, and SIGKILLs at every point a run can fail.

Default suite (fast, forked ranks): a non-finite loss or gradient skips the step without
touching the optimizer state and names the term and ranks; too many in a row stop the run with
one error; a loss spike rolls back to the last checkpoint and skips the batches since; SIGINT
saves and exits like SIGTERM; a torchrun job SIGKILLed between writing a checkpoint and moving
``latest`` resumes from the previous one and ends equal to an uninterrupted run.

The fault tier (``pytest --faults -m faults tests``): real torchrun jobs killed (platform/
faults.py, ``MEGATRON_PD_FAULTS``) during forward/backward, during an async save, while a
logits shard is written, while recorded logits are flushed, while the teacher loads - each
rerun resumes and equals the uninterrupted run; a rank that dies leaves no rank waiting in a
collective (the job ends within a stated time, naming the dead rank); ``torchrun
--max-restarts`` brings a job back from its last checkpoint by itself.
"""

import os
import signal
import subprocess
import time

import pytest
import torch
from _dist import run_distributed
from _models import rank_microbatches, synthetic_global_batch, tiny_config
from _runs import TORCHRUN_ENV, losses, run_args, torchrun_command, train_in_ranks

from megatron_pd.engine.metrics import read_metrics

# a dead rank's peers must be gone well before any collective timeout (minutes)
DEAD_RANK_EXIT_S = 60


def with_faults(text):
    from megatron_pd.platform import faults

    faults._FAULTS = faults._parse(text)


def adam_state(module) -> list:
    """Copies of every optimizer state tensor (moments, step) of the torch optimizers."""
    from megatron_pd.models.checkpoint import _torch_optimizers

    out = []
    for optimizer in _torch_optimizers(module.optimizer):
        for state in optimizer.state.values():
            out.extend(torch.as_tensor(v).clone() for _, v in sorted(state.items()))
    return out


def skipped_steps(rank, world_size, fault_spec):
    from megatron_pd.engine.train_module import TrainModule
    from megatron_pd.parallel import topology

    with_faults(fault_spec)
    cfg = tiny_config("--optimizer.name=adamw", "--train.global_batch_size=4")
    dp = cfg.validate_for_world(world_size)
    groups = topology.init_student_groups(1, 1)
    module = TrainModule(cfg, groups, cfg.model.vocab_size, dp)
    out = []
    for step in range(3):
        module.step = step
        batches = rank_microbatches(cfg, synthetic_global_batch(cfg, step), rank, dp)
        before = [p.detach().clone() for p in module.model.parameters()]
        state = adam_state(module)
        result = module.train_step(batches, lr=1e-3)
        changed = any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))
        after = adam_state(module)
        same_state = len(state) == len(after) and all(
            torch.equal(a, b) for a, b in zip(state, after)
        )
        out.append((result.skipped, result.nonfinite, changed, same_state))
    return out


@pytest.mark.parametrize(
    "fault_spec, named",
    [("nan_loss:step=2", "lm loss on rank(s) [0, 1]"),
     ("nan_grad:step=2:rank=1", "gradients on rank(s) [")],
)
def test_nonfinite_step_is_skipped_with_the_optimizer_untouched(fault_spec, named):
    for per_step in run_distributed(skipped_steps, 2, fault_spec):
        (skip1, why1, changed1, _), (skip2, why2, changed2, same2), (skip3, _, changed3, _) = (
            per_step
        )
        assert not skip1 and why1 is None and changed1
        assert skip2 and named in why2, why2
        assert not changed2 and same2  # no update, Adam's moments and step untouched
        assert not skip3 and changed3  # and training goes on


def run_error(rank, world_size, args, fault_spec):
    with_faults(fault_spec)
    try:
        train_in_ranks(rank, world_size, args)
    except ValueError as err:
        return type(err).__name__, str(err)
    return None


def test_too_many_nonfinite_steps_stop_the_run(tiny_corpus, tmp_path):
    args = run_args(tiny_corpus, tmp_path / "nan", "--train.train_steps=6",
                    "--train.max_skipped_steps=2", "--checkpoint.save_interval=2")
    kind, message = run_distributed(run_error, 2, args, "nan_loss:step=3,nan_loss:step=4")[0]
    assert kind == "TrainingStopped" and "2 steps in a row were not finite (last: step 4" in message
    rows = read_metrics(str(tmp_path / "nan" / "metrics.jsonl"), "train")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1]
    assert os.path.isdir(tmp_path / "nan" / "checkpoints" / "iter_0000002")  # intact


def test_loss_spike_rolls_back_and_skips_the_batches(tiny_corpus, tmp_path):
    run = tmp_path / "spike"
    args = run_args(tiny_corpus, run, "--train.train_steps=8", "--checkpoint.save_interval=2",
                    "--train.spike_factor=5", "--train.spike_warmup_steps=2",
                    "--train.eval_interval=0")
    assert run_distributed(run_error, 2, args, "spike_loss:step=5:times=1")[0] is None
    rows = read_metrics(str(run / "metrics.jsonl"))
    events = [r for r in rows if r["split"] == "event"]
    assert len(events) == 1 and events[0]["rollback_from"] == 5 and events[0]["step"] == 4
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5, 6, 7, 8]  # step 5 again, now on the next batches
    normal = tmp_path / "normal"
    run_distributed(train_in_ranks, 2, run_args(tiny_corpus, normal, "--train.train_steps=8",
                                                "--train.eval_interval=0"))
    spiked = [r for r in rows if r["split"] == "train" and r["step"] == 5][0]["loss"]
    plain = read_metrics(str(normal / "metrics.jsonl"), "train")
    assert spiked != [r for r in plain if r["step"] == 5][0]["loss"]  # other batches


def torchrun_job(tiny_corpus, run_dir, *extra, faults=None, nproc=2, torchrun_args=()):
    args = run_args(tiny_corpus, run_dir, "--train.train_steps=10",
                    "--checkpoint.save_interval=2", *extra)
    command = torchrun_command(*torchrun_args, "-m", "megatron_pd.train", *args)
    if nproc != 2:
        command = [c.replace("--nproc_per_node=2", f"--nproc_per_node={nproc}") for c in command]
    env = dict(TORCHRUN_ENV, MEGATRON_PD_FAULTS=faults or "")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = torchrun_job(tiny_corpus, run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return losses(run_dir)


def killed_then_resumed(tiny_corpus, run_dir, faults, *extra):
    first = torchrun_job(tiny_corpus, run_dir, *extra, faults=faults)
    assert first.returncode != 0, "the fault did not fire"
    again = torchrun_job(tiny_corpus, run_dir, *extra)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    return losses(run_dir)


def test_killed_between_checkpoint_and_latest_resumes_exactly(tiny_corpus, tmp_path,
                                                              uninterrupted):
    """Killed after iter_0000004 is renamed into place but before ``latest`` names it: the
    rerun starts from iter_0000002 (what latest says) and ends equal."""
    run_dir = tmp_path / "run"
    assert killed_then_resumed(tiny_corpus, run_dir, "checkpoint_before_latest:step=4:rank=0") \
        == uninterrupted


def sigint_mid_run(tiny_corpus, run_dir, sig, group=True):
    args = run_args(tiny_corpus, run_dir, "--train.train_steps=200",
                    "--checkpoint.save_interval=0")
    command = torchrun_command("-m", "megatron_pd.train", *args)
    command[command.index("torch.distributed.run")] = "megatron_pd.launch"
    job = subprocess.Popen(command, env=TORCHRUN_ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (
        metrics.exists() and len(read_metrics(str(metrics), "train")) >= 3
    ):
        time.sleep(0.2)
    if group:
        os.killpg(job.pid, sig)  # the whole job, as a terminal's Ctrl-C or SLURM does
    else:
        os.kill(job.pid, sig)  # the launcher only (kill PID, scancel --batch to a script)
    out, err = job.communicate(timeout=180)
    return job.returncode, out, err


@pytest.mark.parametrize(
    "sig, group",
    [(signal.SIGINT, True), (signal.SIGTERM, True), (signal.SIGUSR1, True),
     (signal.SIGUSR1, False)],
    ids=["sigint", "sigterm", "sigusr1", "sigusr1-launcher-only"],
)
def test_interrupt_saves_and_exits_in_one_line(tiny_corpus, tmp_path, sig, group):
    code, out, err = sigint_mid_run(tiny_corpus, tmp_path / "run", sig, group)
    saved = [line for line in out.splitlines() if "saving at step" in line]
    assert len(saved) == 1, out[-2000:] + err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert code == 128 + sig and f"{signal.Signals(sig).name}: the ranks were asked" in err
    step = int(saved[0].split("saving at step ")[1].split()[0])
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / f"iter_{step:07d}")


@pytest.mark.faults
@pytest.mark.parametrize(
    "faults, extra",
    [
        ("forward_backward:step=5:rank=1", []),
        ("async_save:step=4:rank=0", ["--checkpoint.async_save=true"]),
    ],
    ids=["forward_backward", "async_save"],
)
def test_killed_at_a_point_resumes_exactly(tiny_corpus, tmp_path, uninterrupted, faults, extra):
    assert killed_then_resumed(tiny_corpus, tmp_path / "run", faults, *extra) == uninterrupted


@pytest.mark.faults
def test_dead_rank_ends_the_job_and_is_named(tiny_corpus, tmp_path):
    start = time.monotonic()
    done = torchrun_job(tiny_corpus, tmp_path / "run", faults="forward_backward:step=3:rank=1")
    assert done.returncode != 0
    assert time.monotonic() - start < DEAD_RANK_EXIT_S + 30
    assert "local_rank: 1" in done.stderr or "rank: 1" in done.stderr, done.stderr[-3000:]


@pytest.mark.faults
def test_max_restarts_brings_the_job_back(tiny_corpus, tmp_path, uninterrupted):
    done = torchrun_job(tiny_corpus, tmp_path / "run", faults="forward_backward:step=5:rank=1:"
                        "restart=0", torchrun_args=("--max-restarts=1",))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout
    assert losses(tmp_path / "run") == uninterrupted


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL_TEACHER = ("--model.hidden_size=48", "--model.num_attention_heads=4",
                 "--train.train_steps=4", "--train.eval_interval=2")


def store_contents(split_dir) -> dict:
    """{sample id: (ids, log-probs, tail)} of every sample of a store split."""
    from megatron_pd.logits.store import StoreReader

    reader = StoreReader(str(split_dir))
    return {s: tuple(a.tolist() for a in reader.get(s)) for s in sorted(reader._where)}


def job(command, faults=""):
    env = dict(TORCHRUN_ENV, MEGATRON_PD_FAULTS=faults)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.faults
def test_killed_while_a_store_shard_is_written_resumes_byte_identical(small_corpus, teacher_run,
                                                                      tmp_path):
    """The dump dies with a shard's bytes written under its temporary name: the rerun never
    reads that file, redoes the shard, removes the leftover, and the store equals an
    uninterrupted dump's bytes."""
    args = run_args(small_corpus, tmp_path / "dump_run", *SMALL_TEACHER,
                    f"--distill.teacher.load={teacher_run}", "--distill.truncation=top-0.9-12")

    def dump(store):
        return torchrun_command(os.path.join(REPO, "tools", "dump_teacher_logits.py"), "--store",
                                str(store), "--splits", "train", "--samples-per-shard", "4",
                                *args)

    assert job(dump(tmp_path / "straight")).returncode == 0
    first = job(dump(tmp_path / "killed"), "store_shard_write:rank=1")
    assert first.returncode != 0, "the fault did not fire"
    leftovers = [n for n in os.listdir(tmp_path / "killed" / "train") if "tmp" in n]
    assert leftovers, "no half-written shard was left to ignore"
    again = job(dump(tmp_path / "killed"))
    assert again.returncode == 0, again.stderr[-3000:]
    straight, killed = tmp_path / "straight" / "train", tmp_path / "killed" / "train"
    names = sorted(os.listdir(straight))
    assert names == sorted(os.listdir(killed))  # the dead writer's temporary file is gone
    for name in names:
        assert (straight / name).read_bytes() == (killed / name).read_bytes(), name


@pytest.mark.faults
def test_killed_before_recorded_logits_are_flushed_resumes_exactly(small_corpus, tmp_path):
    """Pre-training that records its logits dies with steps 3-4 buffered: the rerun resumes
    from step 2, records them again, and run and store equal an uninterrupted one's."""

    def command(name):
        return torchrun_command("-m", "megatron_pd.train", *run_args(
            small_corpus, tmp_path / name, "--train.train_steps=6", "--train.eval_interval=0",
            "--checkpoint.save_interval=2", f"--train.record_logits={tmp_path / name}_store",
            "--train.record_truncation=top-0.95-16"))

    assert job(command("straight")).returncode == 0
    assert job(command("killed"), "record_flush:step=4:rank=1").returncode != 0
    again = job(command("killed"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert store_contents(tmp_path / "killed_store" / "train") == store_contents(
        tmp_path / "straight_store" / "train")


@pytest.mark.faults
def test_killed_while_the_teacher_loads_reruns_exactly(small_corpus, teacher_run, tmp_path):
    """Distillation dies with the teacher half loaded: nothing of it remains (no lock, no
    half state), and the rerun equals an uninterrupted run."""

    def command(name):
        return torchrun_command("-m", "megatron_pd.train", *run_args(
            small_corpus, tmp_path / name, *SMALL_TEACHER, "--checkpoint.save_interval=2",
            f"--distill.teacher.load={teacher_run}", "--distill.alpha.value=0.5"))

    assert job(command("straight")).returncode == 0
    assert job(command("killed"), "teacher_load:rank=0").returncode != 0
    again = job(command("killed"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")


@pytest.mark.faults
def test_soak_script_survives_its_faults(tmp_path):
    """tools/soak.py at a small size: a kill of each kind, then everything equal."""
    import json
    import sys

    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "soak.py"), "--workdir", str(tmp_path),
         "--steps", "60", "--kills", "4", "--save-interval", "10", "--eval-interval", "20",
         "--files", "30", "--seed", "3"],
        capture_output=True, text=True, timeout=1200, env=TORCHRUN_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.load(open(tmp_path / "soak_report.json"))
    assert report["faults"] >= 3 and report["losses_equal"] and report["final_weights_equal"]
    assert report["weights_compared"] > 10
