"""Run argument lists and in-rank training for tests that train on the tiny corpus."""

import os

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


def losses(run_dir):
    return [
        (row["split"], row["step"], row["loss"])
        for row in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    ]
