"""A 3-run sweep end to end: ``python -m megatron_pd.explore`` on the tiny corpus.

Two live-teacher variants (tau 1 and 2) and their LM-only baseline, one seed, 12 steps each
on one rank. The sweep is SIGKILLed while its first run is mid-way (only the explorer: its
job must die with it, not keep writing), then rerun: it resumes that run from its checkpoint
and finishes. A third invocation starts nothing. Run directories, results.csv/.md, the plots
and the findings are checked, and each variant's delta against the metrics its runs wrote.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from megatron_pd.engine.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sweep_spec(tiny_corpus, teacher_run, tmp_path):
    base = {
        "model": {"preset": "tiny"},
        "data": {"tokenizer_model": tiny_corpus["tokenizer"], "blend": [tiny_corpus["prefix"]],
                 "split": "90,10,0", "seq_length": 64,
                 "cache_dir": str(tiny_corpus["root"] / "cache")},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "train_steps": 12,
                  "eval_interval": 6, "eval_batches": 1, "precision": "fp32"},
        "checkpoint": {"save_interval": 2},
        "logging": {"tensorboard": False},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "e2e", "workdir": str(tmp_path / "work"), "base": "base.yaml", "nproc": 1,
        "seeds": [1], "teachers": {"t": {"load": str(teacher_run)}},
        "defaults": {"teacher": "t", "source": "live"},
        "axes": {"tau": {"distill.tau.value": [1, 2]}},
        "claims": [{"claim": "PD helps", "gain": ["tau/1"]}],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return str(tmp_path / "spec.yaml"), tmp_path / "work"


def explore(spec, *extra, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "megatron_pd.explore", spec, *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def children_running(config_dir) -> list:
    return [p for p in psutil.process_iter(["cmdline"])
            if any(str(config_dir) in part for part in (p.info["cmdline"] or []))]


def test_sweep_runs_resumes_after_a_kill_and_skips_finished_runs(sweep_spec):
    spec, work = sweep_spec
    job = explore(spec)
    first_checkpoint = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:  # kill mid-way through run 1
        found = list(work.glob("runs/*/seed1/checkpoints/iter_0000002"))
        if found:
            first_checkpoint = found[0]
            break
        time.sleep(0.2)
    assert first_checkpoint is not None and job.poll() is None, job.stdout.read()
    os.kill(job.pid, signal.SIGKILL)  # the explorer only, not its job's process group
    job.wait()
    deadline = time.monotonic() + 60
    while children_running(work / "configs") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not children_running(work / "configs"), "a run outlived its killed sweep"

    out, _ = explore(spec).communicate(timeout=600)
    assert "results:" in out, out
    run_dir = first_checkpoint.parent.parent
    log = (work / "logs" / f"{run_dir.parent.name}-s1.log").read_text()
    assert "resumed from" in log and log.count("training 12 steps") == 2  # run, then resume

    runs = sorted(work.glob("runs/*/seed1"))
    assert len(runs) == 3  # tau 1, tau 2, the LM-only baseline
    for run in runs:
        assert (run / "config.yaml").is_file() and (run / "checkpoints" / "latest").is_file()
    stamps = {r: os.path.getmtime(r / "metrics.jsonl") for r in runs}
    again, _ = explore(spec).communicate(timeout=120)
    assert "start student" not in again and "results:" in again
    assert stamps == {r: os.path.getmtime(r / "metrics.jsonl") for r in runs}

    finals = {}
    for run in runs:
        valid = read_metrics(str(run / "metrics.jsonl"), "valid")
        config = yaml.safe_load((run / "config.yaml").read_text())
        key = config["distill"]["tau"]["value"] if config["distill"]["teacher"]["load"] else "lm"
        finals[key] = valid[-1]["lm_loss"]
    rows = (work / "results.csv").read_text().splitlines()
    assert rows[0].startswith("axis,variant") and len(rows) == 3
    for row in rows[1:]:
        cells = row.split(",")
        tau = float(cells[1])
        assert float(cells[7]) == pytest.approx(finals["lm"] - finals[tau], abs=1e-9)
    for name in ("results.md", "curves_tau.png", "deltas.png", "findings.md"):
        assert (work / name).stat().st_size > 0, name
    assert "| PD helps |" in (work / "findings.md").read_text()
    times = json.loads((work / "state" / "times.json").read_text())
    assert sum(1 for t in times.values() if t["kind"] == "student") == 3
