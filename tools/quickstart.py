"""The quickstart: the whole pipeline on the Python standard library source, on CPU.

    python tools/quickstart.py                 # data -> pre-training on 2 ranks -> report
    python tools/quickstart.py --nproc 1 --steps 50

Stages (each skipped when its output exists, so a rerun resumes):
  1. data      train a 4k BPE SentencePiece tokenizer on the stdlib source of this Python and
               tokenize it to megatron .bin/.idx (about 4M tokens)
  2. pretrain  pre-train a small GPT with ``torchrun --nproc_per_node=N -m megatron_pd.train``
               (data-parallel over N gloo ranks) using examples/configs/quickstart_lm.yaml
  3. report    print the validation-loss table and save a loss-curve PNG

Outputs go to ``--workdir`` (default runs/quickstart).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_pd.engine.metrics import format_duration, read_metrics  # noqa: E402

VOCAB_SIZE = 4096


def stage_data(workdir: str) -> dict:
    from megatron_pd.data.corpus import stdlib_corpus_files, stdlib_source_dir
    from megatron_pd.data.preprocess import preprocess
    from megatron_pd.data.tokenizer import train_sentencepiece

    data_dir = os.path.join(workdir, "data")
    tokenizer = os.path.join(data_dir, "stdlib_tok.model")
    prefix = os.path.join(data_dir, "stdlib_text_document")
    if os.path.exists(tokenizer) and os.path.exists(prefix + ".idx"):
        print(f"[data] reusing {prefix}")
        return {"tokenizer": tokenizer, "prefix": prefix}
    files = stdlib_corpus_files()
    print(f"[data] corpus: {len(files)} .py files under {stdlib_source_dir()}")
    start = time.monotonic()
    train_sentencepiece(files, tokenizer[: -len(".model")], VOCAB_SIZE, num_threads=os.cpu_count())
    print(f"[data] tokenizer: {VOCAB_SIZE} BPE pieces in {time.monotonic() - start:.1f}s")
    stats = preprocess(files, prefix, tokenizer, workers=max(1, min(4, os.cpu_count() or 1)))
    print(f"[data] {stats.documents} documents, {stats.tokens:,} tokens in {stats.seconds:.1f}s")
    return {"tokenizer": tokenizer, "prefix": prefix}


def torchrun(nproc: int, config: str, overrides: list, log_path: str) -> None:
    """Run megatron_pd.train under torchrun; output goes to the console and to a log file."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "-m",
        "megatron_pd.train",
        "--config",
        config,
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        for line in proc.stdout:
            log.write(line)
            if not line.startswith(("W1", "*****", "Setting OMP_NUM_THREADS")):
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"training failed (exit {proc.returncode}); log: {log_path}")


def stage_pretrain(
    workdir: str, data: dict, nproc: int, steps: int | None, name: str, config: str, extra: list
) -> str:
    run_dir = os.path.join(workdir, name)
    overrides = [
        f"--run_dir={run_dir}",
        f"--data.tokenizer_model={data['tokenizer']}",
        f"--data.blend=[{data['prefix']}]",
        f"--data.cache_dir={os.path.join(workdir, 'data', 'cache')}",
        *extra,
    ]
    if steps is not None:
        overrides.append(f"--train.train_steps={steps}")
    print(
        f"[{name}] torchrun --nproc_per_node={nproc} -m megatron_pd.train --config {config} "
        + " ".join(overrides)
    )
    torchrun(nproc, os.path.join(REPO, config), overrides, os.path.join(run_dir, "train.log"))
    return run_dir


def validation_table(runs: dict) -> str:
    """Markdown table: validation loss of each run at each evaluation step."""
    curves = {
        name: {
            r["step"]: r["loss"] for r in read_metrics(os.path.join(d, "metrics.jsonl"), "valid")
        }
        for name, d in runs.items()
    }
    steps = sorted({s for curve in curves.values() for s in curve})
    lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for step in steps:
        cells = [f"{curves[n][step]:.4f}" if step in curves[n] else "" for n in curves]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(runs: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run_dir in runs.items():
        metrics = os.path.join(run_dir, "metrics.jsonl")
        train = read_metrics(metrics, "train")
        valid = read_metrics(metrics, "valid")
        steps = [r["step"] for r in train]
        window = 10
        smooth = [
            sum(r["loss"] for r in train[max(0, i - window + 1) : i + 1])
            / (i - max(0, i - window + 1) + 1)
            for i in range(len(train))
        ]
        (line,) = ax.plot(steps, smooth, alpha=0.5, label=f"{name} train (10-step mean)")
        ax.plot(
            [r["step"] for r in valid],
            [r["loss"] for r in valid],
            "o-",
            color=line.get_color(),
            label=f"{name} validation",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("LM loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "quickstart"))
    parser.add_argument("--nproc", type=int, default=2, help="ranks (data-parallel)")
    parser.add_argument("--steps", type=int, help="override the config's train_steps")
    args = parser.parse_args(argv)
    start = time.monotonic()
    workdir = os.path.abspath(args.workdir)
    data = stage_data(workdir)
    lm = stage_pretrain(
        workdir, data, args.nproc, args.steps, "lm", "examples/configs/quickstart_lm.yaml", []
    )
    runs = {"lm": lm}
    print("\nValidation loss (nats/token) on held-out stdlib files:\n")
    print(validation_table(runs))
    png = os.path.join(workdir, "loss_curve.png")
    plot_curves(runs, png, "megatron_pd quickstart: pre-training on the Python stdlib")
    print(f"\nloss curve: {png}")
    print(f"quickstart finished in {format_duration(time.monotonic() - start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
