"""Run argument lists and in-rank training for tests that train on the tiny corpus."""

import os
import signal
import subprocess
import sys
import time

from megatron_pd.config import load_config
from megatron_pd.engine.metrics import read_metrics


def run_args(corpus, run_dir, *extra):
    return [
        "--model.preset=tiny",
        f"--data.tokenizer_model={corpus['tokenizer']}",
        f"--data.blend=[{corpus['prefix']}]",
        "--data.split=90,10,0",
        "--data.seq_length=64",
        f"--data.cache_dir={corpus['root']}/cache",
        "--train.micro_batch_size=2",
        "--train.global_batch_size=8",
        "--train.eval_interval=4",
        "--train.eval_batches=1",
        "--train.precision=fp32",
        "--lr_schedule.style=cosine",
        "--lr_schedule.value=3e-3",
        "--lr_schedule.warmup_steps=2",
        "--logging.tensorboard=false",
        f"--run_dir={run_dir}",
        *extra,
    ]


def train_in_ranks(rank, world_size, args):
    from megatron_pd.train import run

    run(load_config(None, args))
    return None


def train_error(rank, world_size, args):
    """Train in the ranks; the ValueError's message a bad input gave, or None."""
    try:
        train_in_ranks(rank, world_size, args)
    except ValueError as err:
        return str(err)
    return None


def losses(run_dir):
    return [
        (row["split"], row["step"], row["loss"])
        for row in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    ]


def torchrun_command(*args) -> list:
    """``python -m torch.distributed.run --nproc_per_node=2 *args``."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args]


TORCHRUN_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def sigkill_when(command: list, ready, timeout: float, poll: float) -> None:
    """Start a job in its own session, SIGKILL all of it once ``ready()`` holds.

    Fails if the job ends on its own first (it must be interrupted mid-way)."""
    job = subprocess.Popen(
        command,
        env=TORCHRUN_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if ready():
            break
        time.sleep(poll)
    assert job.poll() is None, "the job ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
