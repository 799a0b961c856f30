"""The quickstart: pre-training distillation end to end on the Python stdlib source, on CPU.

    python tools/quickstart.py                   # about 14 minutes on 2 cores
    python tools/quickstart.py --seeds 1 --steps-scale 0.1   # a 2-minute smoke run

Stages (each resumes or is skipped when its output exists, so a rerun continues):
  1. data      train a 4k byte-level BPE tokenizer (an HF tokenizer.json) on the stdlib source
               of this Python and tokenize it to megatron .bin/.idx (about 4M tokens)
  2. teacher   pre-train a 3.2M-parameter teacher (examples/configs/quickstart_teacher.yaml)
  3. students  for each seed: a 0.6M-parameter student distilled online from the frozen teacher
               (examples/configs/quickstart_pd.yaml) and the same student trained LM-only on
               the same tokens (the baseline); every run is
               ``torchrun --nproc_per_node=N -m megatron_pd.train`` on N gloo ranks
  4. report    the validation-loss table (teacher, baseline and PD student per seed, the PD
               margin) and a PNG of the students' validation curves

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
    from megatron_pd.data.tokenizer import train_hf_bpe

    data_dir = os.path.join(workdir, "data")
    tokenizer = os.path.join(data_dir, "stdlib_tok")  # an HF tokenizer directory
    prefix = os.path.join(data_dir, "stdlib_text_document")
    if os.path.exists(os.path.join(tokenizer, "tokenizer.json")) and os.path.exists(
        prefix + ".idx"
    ):
        print(f"[data] reusing {prefix}")
        return {"tokenizer": tokenizer, "prefix": prefix}
    files = stdlib_corpus_files()
    print(f"[data] corpus: {len(files)} .py files under {stdlib_source_dir()}")
    start = time.monotonic()
    train_hf_bpe(files, tokenizer, VOCAB_SIZE)
    print(
        f"[data] tokenizer: {VOCAB_SIZE} byte-level BPE tokens in {time.monotonic() - start:.1f}s"
    )
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


def stage_train(
    workdir: str, data: dict, nproc: int, scale: float, name: str, config: str, extra: list
) -> str:
    """One training run (resumed if interrupted, a no-op if complete)."""
    from megatron_pd.config.loader import load_config

    run_dir = os.path.join(workdir, name)
    overrides = [
        f"--run_dir={run_dir}",
        f"--data.tokenizer_model={data['tokenizer']}",
        f"--data.blend=[{data['prefix']}]",
        f"--data.cache_dir={os.path.join(workdir, 'data', 'cache')}",
        *extra,
    ]
    if scale != 1.0:
        base = load_config(os.path.join(REPO, config))
        steps = max(4, int(base.train.train_steps * scale))
        overrides += [
            f"--train.train_steps={steps}",
            f"--train.eval_interval={max(2, steps // 3)}",
            f"--checkpoint.save_interval={steps // 2}",
            f"--lr_schedule.warmup_steps={max(1, steps // 10)}",
        ]
    print(
        f"[{name}] torchrun --nproc_per_node={nproc} -m megatron_pd.train --config {config} "
        + " ".join(overrides)
    )
    torchrun(nproc, os.path.join(REPO, config), overrides, os.path.join(run_dir, "train.log"))
    return run_dir


def held_out_lm_loss(run_dir: str) -> list:
    """(step, LM loss) of every validation of a run (a distilled run's "loss" mixes in the
    KD term; its "lm_loss" is the comparable number)."""
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"), "valid")
    return [(r["step"], r.get("lm_loss", r["loss"])) for r in rows]


def validation_table(runs: dict) -> str:
    """Markdown table: held-out LM loss of each run at each evaluation step."""
    curves = {name: dict(held_out_lm_loss(d)) for name, d in runs.items()}
    steps = sorted({s for curve in curves.values() for s in curve})
    lines = ["| step | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|"]
    for step in steps:
        cells = [f"{curves[n][step]:.4f}" if step in curves[n] else "" for n in curves]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(teacher_dir: str, pairs: dict) -> tuple:
    """Final held-out LM loss of the teacher and of each seed's students; (markdown, PD won
    in every seed)."""
    teacher = held_out_lm_loss(teacher_dir)[-1][1]
    lines = [
        "| model | seed | held-out LM loss (nats/token) | PD margin |",
        "|---|---|---|---|",
        f"| teacher (3.2M params) | - | {teacher:.4f} | |",
    ]
    won = True
    for seed, (baseline_dir, pd_dir) in pairs.items():
        base = held_out_lm_loss(baseline_dir)[-1][1]
        pd = held_out_lm_loss(pd_dir)[-1][1]
        won &= pd < base
        lines.append(f"| student, LM-only baseline (0.6M) | {seed} | {base:.4f} | |")
        lines.append(f"| student, online PD (0.6M) | {seed} | {pd:.4f} | {base - pd:+.4f} |")
    return "\n".join(lines), won


def plot_curves(runs: dict, path: str, title: str) -> None:
    """Held-out LM loss of each run (markers) over its training LM loss (10-step mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, run_dir in runs.items():
        train = read_metrics(os.path.join(run_dir, "metrics.jsonl"), "train")
        lm = [r.get("lm_loss", r["loss"]) for r in train]
        smooth = [sum(lm[max(0, i - 9) : i + 1]) / (i - max(0, i - 9) + 1) for i in range(len(lm))]
        (line,) = ax.plot([r["step"] for r in train], smooth, alpha=0.35)
        valid = held_out_lm_loss(run_dir)
        ax.plot(
            [s for s, _ in valid],
            [v for _, v in valid],
            "o-",
            color=line.get_color(),
            label=f"{name}: held-out (faint: train)",
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
    parser.add_argument("--seeds", type=int, default=2, help="student seeds (initialisation)")
    parser.add_argument(
        "--steps-scale", type=float, default=1.0, help="scale every run's steps (0.1: a smoke run)"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    workdir, scale = os.path.abspath(args.workdir), args.steps_scale
    data = stage_data(workdir)
    teacher = stage_train(
        workdir, data, args.nproc, scale, "teacher", "examples/configs/quickstart_teacher.yaml", []
    )
    pairs, runs = {}, {}
    for seed in range(1, args.seeds + 1):
        init = [f"--train.seed={1000 + seed}"]
        pd = stage_train(
            workdir,
            data,
            args.nproc,
            scale,
            f"pd_seed{seed}",
            "examples/configs/quickstart_pd.yaml",
            init + [f"--distill.teacher.load={teacher}"],
        )
        baseline = stage_train(
            workdir,
            data,
            args.nproc,
            scale,
            f"baseline_seed{seed}",
            "examples/configs/quickstart_pd.yaml",
            init + ["--distill.teacher.load=null"],
        )
        pairs[seed] = (baseline, pd)
        runs[f"LM-only seed {seed}"], runs[f"PD seed {seed}"] = baseline, pd
    print("\nHeld-out LM loss (nats/token) on held-out stdlib files, by step:\n")
    print(validation_table({"teacher": teacher, **runs}))
    table, won = summary_table(teacher, pairs)
    print("\nFinal held-out LM loss:\n")
    print(table)
    verdict = "lower" if won else "NOT lower"
    print(
        f"\nPD student vs LM-only baseline: {verdict} held-out LM loss in "
        f"{'all ' if len(pairs) > 1 else ''}{len(pairs)} seed(s)"
    )
    png = os.path.join(workdir, "loss_curves.png")
    plot_curves(runs, png, "megatron_pd quickstart: online PD vs LM-only student, Python stdlib")
    print(f"loss curves: {png}")
    print(f"quickstart finished in {format_duration(time.monotonic() - start)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
