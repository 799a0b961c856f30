"""Soak test: a tiny online distillation run killed again and again must end equal to one that
never was.

    python tools/soak.py                              # 2,000 steps, up to 12 kills, <= 90 min
    python tools/soak.py --steps 200 --kills 3        # a few minutes

Stages (in --workdir, default runs/soak):
  1. data and teacher   a 512-token SentencePiece tokenizer on part of the stdlib source, and
                        a teacher pre-trained for a few steps on it
  2. straight           the student distilled online for --steps, never interrupted
  3. soak               the same command, launched again and again through megatron_pd.launch
                        until it finishes; while --kills and --max-minutes allow, each attempt
                        is ended at a random moment by one of:
                          sigkill-job    SIGKILL of the launcher and every rank (a node lost)
                          sigkill-rank   SIGKILL of one rank (a process crash; torchrun ends
                                         the others)
                          sigterm        SIGTERM of the job (pre-emption: save, exit)
                          fault:POINT    a rank kills itself at a named point (platform/
                                         faults.py): forward_backward, checkpoint_before_latest,
                                         async_save
  4. compare            every train and validation loss of the soaked run equals the straight
                        run's (bitwise), and so does every weight of the final checkpoint

Checkpoints are frequent (--save-interval) and asynchronous, so kills land during saves as
well as during steps. The report (printed, and soak_report.json) counts the faults injected by
kind and whether the run survived them. Exit status 0 only when everything is equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_pd.engine.metrics import format_duration, read_metrics  # noqa: E402
from megatron_pd.platform import quiet_known_warnings  # noqa: E402

KINDS = ("sigkill-job", "sigkill-rank", "sigterm", "fault")
FAULT_POINTS = ("forward_backward", "checkpoint_before_latest", "async_save")


def prepare(workdir: str, files: int) -> dict:
    """Tokenizer, data prefix and a briefly trained teacher (reused when present)."""
    from megatron_pd.data.corpus import stdlib_corpus_files
    from megatron_pd.data.preprocess import preprocess
    from megatron_pd.data.tokenizer import train_sentencepiece

    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    prefix = os.path.join(data, "text_document")
    model = os.path.join(data, "tok.model")
    if not os.path.exists(prefix + ".idx"):
        sources = stdlib_corpus_files()[:files]
        model = train_sentencepiece(sources, os.path.join(data, "tok"), 512, num_threads=1)
        preprocess(sources, prefix, model, progress=False, shuffle_seed=1)
    corpus = {"tokenizer": model, "prefix": prefix, "cache": os.path.join(data, "cache")}
    teacher = os.path.join(workdir, "teacher")
    if not os.path.isfile(os.path.join(teacher, "checkpoints", "latest")):
        done = job(launch(2, common_args(corpus, teacher, 60) + ["--model.hidden_size=96"]))
        if done.returncode != 0:
            raise SystemExit(f"teacher training failed:\n{done.stderr[-3000:]}")
    corpus["teacher"] = teacher
    return corpus


def common_args(corpus: dict, run_dir: str, steps: int) -> list:
    return [
        "--model.preset=tiny",
        f"--data.tokenizer_model={corpus['tokenizer']}",
        f"--data.blend=[{corpus['prefix']}]",
        "--data.split=95,5,0",
        "--data.seq_length=64",
        f"--data.cache_dir={corpus['cache']}",
        "--train.micro_batch_size=2",
        "--train.global_batch_size=8",
        "--train.precision=fp32",
        "--lr_schedule.style=cosine",
        "--lr_schedule.value=3e-3",
        "--lr_schedule.warmup_steps=10",
        "--logging.tensorboard=false",
        f"--train.train_steps={steps}",
        f"--run_dir={run_dir}",
    ]


def student_args(corpus: dict, run_dir: str, args) -> list:
    return common_args(corpus, run_dir, args.steps) + [
        "--model.hidden_size=48",
        f"--distill.teacher.load={corpus['teacher']}",
        "--distill.truncation=top-0.95-16",
        "--distill.alpha.value=0.5",
        f"--train.eval_interval={args.eval_interval}",
        "--train.eval_batches=1",
        f"--checkpoint.save_interval={args.save_interval}",
        f"--checkpoint.async_save={str(args.async_save).lower()}",
        "--checkpoint.keep_last=2",
        # per-parameter optimizer state, so the final state compares bitwise (the distributed
        # optimizer's flat buckets hold never-written alignment padding)
        "--parallel.distributed_optimizer=false",
    ]


def launch(nproc: int, args: list) -> list:
    return [
        sys.executable,
        "-m",
        "megatron_pd.launch",
        f"--nproc_per_node={nproc}",
        "-m",
        "megatron_pd.train",
        *args,
    ]


def job(command: list, faults: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_PD_FAULTS=faults)
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)


def last_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    step = 0
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if row.get("split") == "train":
                    step = max(step, int(row["step"]))
    except OSError:
        pass
    return step


def checkpoint_step(run_dir: str) -> int:
    latest = os.path.join(run_dir, "checkpoints", "latest")
    try:
        return int(open(latest).read().strip().rsplit("_", 1)[-1])
    except (OSError, ValueError):
        return 0


def attempt(command: list, run_dir: str, kind: str | None, rng, args, log) -> dict:
    """One launch; ``kind`` None runs it to its end. Returns what happened."""
    from megatron_pd.launch import _children

    start_step = checkpoint_step(run_dir)
    faults = ""
    if kind == "fault":
        point = rng.choice(FAULT_POINTS)
        spread = max(3 * args.save_interval, 2 * args.steps // max(args.kills, 1))
        if point == "forward_backward":
            at = start_step + rng.randint(1, spread)
        else:  # a save: one of the next checkpoint steps
            saves = max(1, spread // args.save_interval)
            at = (start_step // args.save_interval + rng.randint(1, saves)) * args.save_interval
        at = min(at, args.steps - 1)
        if point != "forward_backward":
            at -= at % args.save_interval
        if at <= start_step:
            point, at = "forward_backward", min(start_step + 1, args.steps)
        # rank 0 moves ``latest``; any rank may die in a step or a save
        rank = 0 if point == "checkpoint_before_latest" else rng.randint(0, args.nproc - 1)
        faults = f"{point}:step={at}:rank={rank}"
        kind = f"fault:{point}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_PD_FAULTS=faults)
    out = open(log, "a")
    out.write(f"\n===== attempt: {kind or 'to the end'} {faults}\n")
    out.flush()
    proc = subprocess.Popen(
        command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )
    # spread over the run: a kill lands up to twice the run's length per fault past the resume
    spread = max(3 * args.save_interval, 2 * args.steps // max(args.kills, 1))
    target = start_step + rng.randint(1, spread)
    fired = None
    while proc.poll() is None:
        time.sleep(0.05)
        if kind in ("sigkill-job", "sigkill-rank", "sigterm") and last_step(run_dir) >= target:
            # a random moment inside the step, not only at its boundary
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is not None:
                break
            if kind == "sigkill-job":
                os.killpg(proc.pid, signal.SIGKILL)
            elif kind == "sigterm":
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                ranks = _children(proc.pid)
                if ranks:
                    os.kill(rng.choice(ranks), signal.SIGKILL)
            fired = last_step(run_dir)
            break
    proc.wait()
    out.close()
    injected = (
        fired is not None if kind != f"fault:{faults.split(':')[0]}" else (proc.returncode != 0)
    )
    return {
        "kind": kind,
        "faults": faults,
        "from_checkpoint": start_step,
        "killed_near_step": fired,
        "returncode": proc.returncode,
        "reached": last_step(run_dir),
        "injected": bool(kind) and injected,
    }


def losses(run_dir: str) -> list:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    return [(r["split"], r["step"], r["loss"]) for r in rows if r["split"] in ("train", "valid")]


def final_weights(run_dir: str) -> dict:
    """{key: tensor} of the run's latest checkpoint: the model's weights and the optimizer's
    state (read with torch.distributed.checkpoint)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_pd.platform import safe_loading

    safe_loading.install()
    latest = os.path.join(
        run_dir, "checkpoints", open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    )
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(latest, os.path.join(tmp, "all.pt"))
        state = torch.load(os.path.join(tmp, "all.pt"), weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}  # weights and optimizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "soak"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=12, help="at most this many faults")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=90.0,
        help="no new fault after this long (the run then finishes)",
    )
    parser.add_argument("--save-interval", type=int, default=20)
    parser.add_argument("--eval-interval", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--files", type=int, default=60, help="stdlib files in the corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--async-save", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    quiet_known_warnings()
    rng = random.Random(args.seed)
    start = time.monotonic()
    os.makedirs(args.workdir, exist_ok=True)
    corpus = prepare(args.workdir, args.files)
    straight = os.path.join(args.workdir, "straight")
    if last_step(straight) < args.steps:
        print(f"[straight] {args.steps} steps, uninterrupted", flush=True)
        t0 = time.monotonic()
        done = job(launch(args.nproc, student_args(corpus, straight, args)))
        if done.returncode != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
        print(f"[straight] done in {format_duration(time.monotonic() - t0)}", flush=True)
    soaked = os.path.join(args.workdir, "soaked")
    command = launch(args.nproc, student_args(corpus, soaked, args))
    log = os.path.join(args.workdir, "soak.log")
    history = []
    soak_start = time.monotonic()
    while last_step(soaked) < args.steps or checkpoint_step(soaked) < args.steps:
        faults_left = sum(1 for h in history if h["injected"]) < args.kills
        in_time = time.monotonic() - soak_start < args.max_minutes * 60
        kind = rng.choice(KINDS) if faults_left and in_time else None
        result = attempt(command, soaked, kind, rng, args, log)
        history.append(result)
        print(
            f"[soak] {result['kind'] or 'run to the end'} {result['faults']}: from checkpoint "
            f"{result['from_checkpoint']}, reached step {result['reached']}, exit "
            f"{result['returncode']}",
            flush=True,
        )
        if kind is None and result["returncode"] not in (0,):
            raise SystemExit(
                f"a run without faults failed (exit {result['returncode']}); see {log}"
            )
        if len(history) > 4 * args.kills + 5:
            raise SystemExit(f"no progress after {len(history)} attempts; see {log}")
    same_losses = losses(soaked) == losses(straight)
    a, b = final_weights(straight), final_weights(soaked)
    same_weights = a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and bool((a[k] == b[k]).all()) for k in a
    )
    faults = [h for h in history if h["injected"]]
    by_kind: dict = {}
    for h in faults:
        by_kind[h["kind"]] = by_kind.get(h["kind"], 0) + 1
    report = {
        "steps": args.steps,
        "save_interval": args.save_interval,
        "attempts": len(history),
        "faults": len(faults),
        "faults_by_kind": by_kind,
        "losses_equal": same_losses,
        "final_weights_equal": same_weights,
        "weights_compared": len(a),
        "train_and_valid_losses_compared": len(losses(straight)),
        "soak_minutes": round((time.monotonic() - soak_start) / 60, 1),
        "total_minutes": round((time.monotonic() - start) / 60, 1),
        "history": history,
    }
    with open(os.path.join(args.workdir, "soak_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(
        f"soak: {args.steps} steps, {len(faults)} faults injected "
        f"({', '.join(f'{k} x{v}' for k, v in sorted(by_kind.items()))}), "
        f"{len(history)} launches, {report['soak_minutes']} min"
    )
    print(
        f"  {len(losses(straight))} train/valid losses equal to the uninterrupted run: "
        f"{same_losses}; {len(a)} final weight tensors equal: {same_weights}"
    )
    return 0 if same_losses and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
