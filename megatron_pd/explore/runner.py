"""Running a sweep plan: locally (sequential, resumable, one progress line) or on SLURM.

Every job's resolved config is written to ``<workdir>/configs/<job>.yaml`` first; a job is a
plain ``torchrun -m megatron_pd.train --config`` (teachers, students) or
``tools/dump_teacher_logits.py --config ... --store`` (dumps), so a sweep's run directories
are ordinary run directories. A finished job is skipped (students and teachers: their final
validation is in metrics.jsonl; dumps: their store is complete and holds what the runs
read); a half-finished one resumes from its checkpoint (or its dump segment). Locally the
jobs run in dependency order, one at a time, each logging to ``<workdir>/logs/<job>.log``;
the console gets one line per event with the sweep's progress and ETA (the rate in seconds
per FLOP measured on the finished jobs of the same kind). ``emit_slurm`` writes the same
jobs as sbatch job arrays (one task per job, through launch/slurm/node_entry.sh) chained
with afterok dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from megatron_pd.explore.spec import Plan
from megatron_pd.platform.lifetime import die_with_parent

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DUMP_TOOL = os.path.join(REPO, "tools", "dump_teacher_logits.py")


def config_path(plan: Plan, name: str) -> str:
    return os.path.join(plan.workdir, "configs", f"{name}.yaml")


def write_configs(plan: Plan) -> None:
    """Every job's config file (atomic writes; unchanged files are left alone)."""
    from megatron_pd.explore.spec import _digest

    os.makedirs(os.path.join(plan.workdir, "configs"), exist_ok=True)
    for name, job in plan.jobs.items():
        if job.config is None:
            continue
        path = config_path(plan, name)
        text = yaml.safe_dump(job.config, sort_keys=False)
        if os.path.isfile(path) and _digest(open(path).read()) == _digest(text):
            continue
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def _total_steps(config: dict) -> int:
    from megatron_pd.config.loader import build_section
    from megatron_pd.config.schema import Config

    return build_section(Config, config).total_steps()


def job_done(plan: Plan, job) -> bool:
    """Whether ``job``'s outputs are complete (wherever it ran)."""
    if job.kind == "data":
        data = plan.data
        return os.path.isfile(data["prefix"] + ".idx") and _tokenizer_ready(data["tokenizer"])
    if job.kind == "dump":
        return _store_covers(job)
    from megatron_pd.engine.metrics import read_metrics

    path = os.path.join(job.out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return False
    valid = read_metrics(path, "valid")
    if not valid or valid[-1]["step"] < _total_steps(job.config):
        return False
    record = job.config["train"].get("record_logits")
    if record:
        header = os.path.join(record, "train", "header.json")
        return os.path.isfile(header) and json.load(open(header)).get("complete", False)
    return True


def _tokenizer_ready(path: str) -> bool:
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, "tokenizer.json"))


def _store_covers(job) -> bool:
    """A complete store whose latest dump was asked for at least this job's positions."""
    header = os.path.join(job.out_dir, "train", "header.json")
    if not os.path.isfile(header):
        return False
    with open(header) as f:
        head = json.load(f)
    if not head.get("complete"):
        return False
    gbs = job.config["train"]["global_batch_size"]
    wanted = _total_steps(job.config) * gbs
    return any(s.get("positions", 0) >= wanted for s in head.get("segments", []))


def command(plan: Plan, job) -> list:
    """The command line of a job (data preparation runs in-process: None)."""
    if job.kind == "data":
        return None
    run = [sys.executable, "-m", "megatron_pd.launch", f"--nproc_per_node={plan.nproc}"]
    run += list(plan.torchrun)
    if job.kind == "dump":
        return run + [DUMP_TOOL, "--config", config_path(plan, job.name), "--store", job.out_dir]
    return run + ["-m", "megatron_pd.train", "--config", config_path(plan, job.name)]


def prepare_data(data: dict, log=print) -> None:
    """Tokenizer (trained on the corpus unless given) and megatron .bin/.idx of the corpus."""
    from megatron_pd.data.corpus import expand_inputs, stdlib_corpus_files
    from megatron_pd.data.preprocess import preprocess
    from megatron_pd.data.tokenizer import train_hf_bpe

    if data["stdlib"]:
        files = stdlib_corpus_files()
    else:
        files = expand_inputs([data["input"]], data["pattern"])
    if not files:
        raise ValueError(f"data: no files under {data['input']} match {data['pattern']!r}")
    if data["train_tokenizer"] and not _tokenizer_ready(data["tokenizer"]):
        log(f"[data] training a {data['vocab_size']}-token byte-level BPE on {len(files)} files")
        train_hf_bpe(files, data["tokenizer"], data["vocab_size"])
    if not os.path.isfile(data["prefix"] + ".idx"):
        stats = preprocess(
            files,
            data["prefix"],
            data["tokenizer"],
            json_key=data["json_key"],
            workers=max(1, min(4, os.cpu_count() or 1)),
            progress=False,
        )
        log(f"[data] {stats.documents} documents, {stats.tokens:,} tokens")


class Progress:
    """Sweep progress: jobs done and an ETA from the measured seconds per FLOP."""

    def __init__(self, plan: Plan, stream=None):
        self.plan, self.stream = plan, stream or sys.stdout
        self.path = os.path.join(plan.workdir, "state", "times.json")
        self.times = json.load(open(self.path)) if os.path.isfile(self.path) else {}
        self.start = time.monotonic()

    def record(self, job, seconds: float) -> None:
        self.times[job.name] = {"kind": job.kind, "seconds": seconds, "cost": job.cost}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.times, f, indent=1)
        os.replace(tmp, self.path)

    def eta(self, remaining: list) -> float | None:
        rates = {}
        for entry in self.times.values():
            total = rates.setdefault(entry["kind"], [0.0, 0.0])
            total[0] += entry["seconds"]
            total[1] += entry["cost"]
        computed = [r for kind, r in rates.items() if kind != "data"]  # data: not in FLOPs
        overall = [sum(r[0] for r in computed), sum(r[1] for r in computed)]
        seconds = 0.0
        for job in remaining:
            if job.kind == "data":
                continue
            spent, cost = rates.get(job.kind, overall)
            if cost <= 0:
                return None
            seconds += job.cost * spent / cost
        return seconds

    def line(self, done: int, remaining: list, message: str) -> None:
        from megatron_pd.engine.metrics import format_duration

        eta = self.eta(remaining)
        total = done + len(remaining)
        elapsed = format_duration(time.monotonic() - self.start)
        shown = format_duration(eta) if eta is not None else "?"
        print(
            f"[explore {done}/{total} jobs | {elapsed} | ETA {shown}] {message}",
            file=self.stream,
            flush=True,
        )


def run_local(plan: Plan, stream=None, poll_s: float = 30.0) -> None:
    """Run every unfinished job in order (resumable: rerun after any interruption)."""
    write_configs(plan)
    progress = Progress(plan, stream)
    jobs = list(plan.jobs.values())
    done = {job.name for job in jobs if job_done(plan, job)}
    for job in jobs:
        if job.name in done:
            continue
        missing = [d for d in job.depends if d not in done]
        if missing:
            raise RuntimeError(f"job {job.name} needs {missing}, which did not finish")
        remaining = [j for j in jobs if j.name not in done]
        progress.line(len(done), remaining, f"start {job.kind} {job.label or job.name}")
        start = time.monotonic()
        if job.kind == "data":
            prepare_data(plan.data, lambda m, r=remaining: progress.line(len(done), r, m))
        else:
            _run_job(plan, job, progress, len(done), remaining, poll_s)
        seconds = time.monotonic() - start
        progress.record(job, seconds)
        done.add(job.name)
        remaining = [j for j in jobs if j.name not in done]
        progress.line(
            len(done), remaining, f"done {job.kind} {job.label or job.name} in {seconds:.0f}s"
        )


def _run_job(plan: Plan, job, progress: Progress, done: int, remaining: list, poll_s) -> None:
    log_path = os.path.join(plan.workdir, "logs", f"{job.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(command(plan, job))}\n")
        log.flush()
        proc = subprocess.Popen(
            command(plan, job),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a SIGKILLed sweep takes its job with it
        )
        try:
            last = time.monotonic()
            while proc.poll() is None:
                time.sleep(0.5)
                if time.monotonic() - last >= poll_s:
                    last = time.monotonic()
                    progress.line(done, remaining, f"running {job.label}: {_where(job)}")
        except BaseException:  # Ctrl-C or a kill of the sweep: stop the job, it resumes
            _terminate(proc)
            raise
    if proc.returncode != 0:
        tail = open(log_path).read().splitlines()[-15:]
        raise RuntimeError(
            f"job {job.name} failed (exit {proc.returncode}); log {log_path}:\n" + "\n".join(tail)
        )


def _terminate(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _where(job) -> str:
    """The latest train step of a running job (from its metrics)."""
    path = os.path.join(job.out_dir, "metrics.jsonl")
    if job.kind == "dump" or not os.path.isfile(path):
        return "starting" if job.kind != "dump" else "dumping"
    from megatron_pd.engine.metrics import read_metrics

    rows = read_metrics(path, "train")
    return f"step {rows[-1]['step']}/{_total_steps(job.config)}" if rows else "starting"


# ------------------------------------------------------------------------------ SLURM
SBATCH_DEFAULTS = {"time": "24:00:00", "cpus-per-task": "16"}


def emit_slurm(plan: Plan, out_dir: str, options: dict | None = None) -> dict:
    """sbatch scripts for the plan's jobs: data (one task), then job arrays for teachers,
    dumps and students, chained by ``submit.sh`` with afterok dependencies. Returns
    {kind: (script path, list path, number of tasks)}."""
    write_configs(plan)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    options = {**SBATCH_DEFAULTS, **(options or {})}
    entry = os.path.join(REPO, "launch", "slurm", "node_entry.sh")
    written = {}
    submit = [
        "#!/usr/bin/env bash",
        "# Submit the sweep's jobs in dependency order.",
        "set -euo pipefail",
        f'cd "{out_dir}"',
        "after=''",
    ]
    for kind in ("data", "teacher", "dump", "student"):
        jobs = [j for j in plan.jobs.values() if j.kind == kind and not job_done(plan, j)]
        if not jobs:
            continue
        lines = _sbatch_header(plan, f"{plan.name}-{kind}", options, len(jobs), kind)
        list_path = None
        if kind == "data":
            quick = " --quick" if plan.quick else ""
            lines.append(f"srun python -m megatron_pd.explore {plan.spec_path} --stage data{quick}")
        else:
            list_path = os.path.join(out_dir, f"{kind}s.txt")
            with open(list_path, "w") as f:
                for job in jobs:
                    store = f" --store {job.out_dir}" if kind == "dump" else ""
                    f.write(f"{config_path(plan, job.name)}{store}\n")
            exports = [f"CONFIG_LIST={list_path}", f"GPUS_PER_NODE={plan.nproc}"]
            if kind == "dump":
                exports.append(f"ENTRY={DUMP_TOOL}")
            lines.insert(-1, f"#SBATCH --export=ALL,{','.join(exports)}")
            lines.append(f"srun --kill-on-bad-exit=1 bash {entry}")
        script = os.path.join(out_dir, f"{kind}.sbatch")
        with open(script, "w") as f:
            f.write("\n".join(lines) + "\n")
        submit.append(
            f"id=$(sbatch --parsable ${{after:+--dependency=afterok:$after}} {kind}.sbatch)"
        )
        submit.append('after="$id"')
        written[kind] = (script, list_path, len(jobs))
    submit.append(
        'echo "submitted; collect with: python -m megatron_pd.explore '
        f'{plan.spec_path} --collect{" --quick" if plan.quick else ""}"'
    )
    with open(os.path.join(out_dir, "submit.sh"), "w") as f:
        f.write("\n".join(submit) + "\n")
    os.chmod(os.path.join(out_dir, "submit.sh"), 0o755)
    return written


def _sbatch_header(plan: Plan, name: str, options: dict, tasks: int, kind: str) -> list:
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name={name}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
    ]
    if kind != "data":
        lines.append(f"#SBATCH --array=0-{tasks - 1}")
        if options.get("gpus", True):
            lines.append(f"#SBATCH --gpus-per-node={plan.nproc}")
    for key in ("time", "cpus-per-task", "partition", "account"):
        if options.get(key):
            lines.append(f"#SBATCH --{key}={options[key]}")
    lines.append(f"#SBATCH --output={os.path.join(plan.workdir, 'logs', '%x-%A_%a.out')}")
    return lines
