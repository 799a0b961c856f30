"""One run, one owner, and nothing lost: locks, reruns with another setup, unwritable and full
file systems.

* a run directory another live job holds is an error naming the holder (a dead holder's lock
  is taken over: the kernel dropped it);
* a rerun into a run directory with another model is an error naming each differing field,
  and writes nothing (config.yaml stays the first run's);
* an unwritable run_dir is an error before any compute, in a dry run too;
* a checkpoint on a full file system (a small tmpfs) stops the run with one error naming the
  bytes needed, the previous checkpoint intact and loadable; a logits shard likewise names
  its path and size.
"""

import os
import subprocess
import sys

import pytest
from _dist import run_distributed
from _runs import losses, run_args, train_in_ranks

from megatron_pd.platform.run_lock import DirectoryLock


def train_error(rank, world_size, args):
    try:
        train_in_ranks(rank, world_size, args)
    except (ValueError, RuntimeError) as err:
        return type(err).__name__, str(err)
    return None


def test_a_held_run_directory_is_an_error_naming_the_holder(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    args = run_args(tiny_corpus, run, "--train.train_steps=2", "--train.eval_interval=0")
    holder = DirectoryLock(str(run))
    holder.acquire()
    try:
        kind, message = run_distributed(train_error, 2, args)[0]
        assert kind == "ValueError" and "is in use by another job: pid" in message
        assert str(os.getpid()) in message
    finally:
        holder.release()
    assert run_distributed(train_error, 2, args)[0] is None  # free again: it trains


def test_stale_lock_of_a_dead_job_is_taken_over(tmp_path):
    code = ("import sys, os; sys.path.insert(0, sys.argv[2]); "
            "from megatron_pd.platform.run_lock import DirectoryLock; "
            "DirectoryLock(sys.argv[1]).acquire(); os._exit(0)")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code, str(tmp_path), repo], check=True)
    assert (tmp_path / ".megatron_pd.lock").exists()  # the dead job's file remains...
    lock = DirectoryLock(str(tmp_path))
    assert lock.acquire()  # ...and its lock does not
    lock.release()


def test_rerun_with_another_model_writes_nothing_and_names_the_fields(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    first = run_args(tiny_corpus, run, "--train.train_steps=2", "--train.eval_interval=0")
    run_distributed(train_in_ranks, 1, first)
    saved = (run / "config.yaml").read_text()
    before = losses(run)
    kind, message = run_distributed(
        train_error, 1, first + ["--model.hidden_size=96", "--data.seq_length=32"])[0]
    assert kind == "ValueError" and "holds a run with another setup" in message
    assert "model.hidden_size (64 there, 96 here)" in message
    assert "data.seq_length (64 there, 32 here)" in message
    assert (run / "config.yaml").read_text() == saved and losses(run) == before


def test_unwritable_run_dir_fails_before_any_compute(tiny_corpus, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    args = run_args(tiny_corpus, blocker / "run", "--train.train_steps=2")
    kind, message = run_distributed(train_error, 1, args)[0]
    assert kind == "ValueError" and "is not writable" in message
    dry = subprocess.run([sys.executable, "-m", "megatron_pd.train", "--dry-run", *args],
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 2 and "is not writable" in dry.stderr, dry.stderr[-2000:]


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()[:200]}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_stops_the_run_and_keeps_the_last_checkpoint(tiny_corpus, tmp_path,
                                                                small_tmpfs):
    save_dir = small_tmpfs / "checkpoints"
    args = run_args(tiny_corpus, tmp_path / "run", "--train.train_steps=8",
                    "--checkpoint.save_interval=2", "--checkpoint.keep_last=0",
                    f"--checkpoint.save_dir={save_dir}", "--train.eval_interval=0")
    kind, message = run_distributed(train_error, 1, args)[0]
    assert kind == "CheckpointWriteError", message
    assert "bytes needed" in message and "the previous checkpoint is intact" in message
    names = sorted(os.listdir(save_dir))
    assert not [n for n in names if n.endswith(".tmp")], names
    latest = (save_dir / "latest").read_text().strip()
    assert latest in names

    def load(rank, world_size):
        from megatron_pd.config import load_config
        from megatron_pd.engine.train_module import TrainModule
        from megatron_pd.models.checkpoint import load_checkpoint
        from megatron_pd.parallel import topology

        cfg = load_config(os.path.join(tmp_path / "run", "config.yaml"))
        module = TrainModule(cfg, topology.init_student_groups(1, 1), 512, 1)
        return load_checkpoint(module, str(save_dir / latest))["step"]

    assert run_distributed(load, 1)[0] == int(latest.split("_")[1])


def test_full_disk_store_write_names_the_path_and_bytes(small_tmpfs):
    from megatron_pd.logits.store_format import write_atomic

    with pytest.raises(ValueError, match=r"cannot write 4,000,000 bytes \(No space left"):
        write_atomic(str(small_tmpfs / "shard_00000.pd"), b"\0" * 4_000_000)
    assert os.listdir(small_tmpfs) == []  # no temporary left behind
