"""Damaged checkpoints: the damage is named; checkpoint.fallback resumes from an intact one;
no checkpoint file runs code when loaded.

A run saves at steps 2, 4 and 6; its latest checkpoint is then damaged three ways (a storage
file deleted, one truncated, the DCP metadata overwritten). Resuming is an error naming the
file and what is wrong with it; with ``checkpoint.fallback=true`` the run resumes from step 4
(a loud warning) and ends equal to an uninterrupted run. A ``.metadata`` crafted to run a
shell command on unpickling is refused, and the command never runs.
"""

import os
import pickle
import shutil

import pytest

from _dist import run_distributed
from _runs import losses, run_args, train_error, train_in_ranks

# an 8-step run (its LR schedule) stopped after step 6, saving at 2, 4 and 6
STEPS = ["--train.train_steps=8", "--checkpoint.save_interval=2", "--checkpoint.keep_last=0",
         "--train.eval_interval=0"]


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    run_distributed(train_in_ranks, 2, run_args(tiny_corpus, root / "run", *STEPS,
                                                "--train.stop_after_steps=6"))
    longer = root / "longer"
    run_distributed(train_in_ranks, 2, run_args(tiny_corpus, longer, *STEPS))
    return root / "run", losses(longer)


def damage(checkpoint, how):
    files = sorted(f for f in os.listdir(checkpoint) if f.endswith(".distcp"))
    if how == "missing":
        os.remove(checkpoint / files[0])
        return f"{files[0]} is missing"
    if how == "truncated":
        path = checkpoint / files[-1]
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return f"{files[-1]} is truncated"
    (checkpoint / ".metadata").write_bytes(b"\x80\x04garbage")
    return ".metadata is unreadable"


@pytest.mark.parametrize("how", ["missing", "truncated", "metadata"])
def test_damaged_latest_is_named_and_fallback_resumes(tiny_corpus, trained, tmp_path, how):
    source, expected = trained
    run = tmp_path / "run"
    shutil.copytree(source, run)
    named = damage(run / "checkpoints" / "iter_0000006", how)
    args = run_args(tiny_corpus, run, *STEPS)
    message = run_distributed(train_error, 2, args)[0]
    assert "the latest checkpoint" in message and named in message, message
    assert "checkpoint.fallback=true" in message
    assert run_distributed(train_error, 2, args + ["--checkpoint.fallback=true"])[0] is None
    assert losses(run) == expected  # resumed from step 4: steps 5-8 trained again, exactly


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_is_refused_and_runs_nothing(tiny_corpus, trained, tmp_path):
    source, _ = trained
    run = tmp_path / "run"
    shutil.copytree(source, run)
    marker = tmp_path / "pwned"
    with open(run / "checkpoints" / "iter_0000006" / ".metadata", "wb") as f:
        pickle.dump(_RunsAShellCommand(marker), f)
    args = run_args(tiny_corpus, run, *STEPS)
    message = run_distributed(train_error, 2, args)[0]
    assert "refuses to load posix.system" in message, message
    assert not marker.exists()
