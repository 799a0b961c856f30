"""Run outputs on rank 0: the console progress line, TensorBoard scalars, metrics.jsonl.

metrics.jsonl holds one JSON object per train step and per validation ({"split": ...,
"step": ...}); plots, the quickstart table and tests read it. On resume from step k, entries
after k (written by the interrupted run past its last checkpoint) are dropped, and TensorBoard
purges them too (``purge_step``), so both read like an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sys
import time


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def read_metrics(path: str, split: str | None = None) -> list:
    """Entries of a metrics.jsonl (optionally one split)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                if split is None or row.get("split") == split:
                    rows.append(row)
    return rows


class MetricsLogger:
    """Console + TensorBoard + jsonl sink; a no-op on ranks other than 0."""

    def __init__(
        self,
        run_dir: str,
        enabled: bool,
        total_steps: int,
        log_interval: int = 1,
        tensorboard: bool = True,
        resume_step: int = 0,
        stream=None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval = log_interval
        self.stream = stream or sys.stdout
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._writer = None
        self._step_times: list = []
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                os.path.join(run_dir, "tensorboard"),
                purge_step=resume_step + 1 if resume_step else None,
            )

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for row in kept:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)

    def rewind(self, step: int) -> None:
        """Forget the rows after ``step`` (a rollback restarts from there)."""
        if self.enabled:
            self._truncate_after(step)

    def event(self, step: int, values: dict) -> None:
        """A row of its own (split "event"): rollbacks and the like, kept in metrics.jsonl."""
        if self.enabled:
            self._append({"split": "event", "step": step, **values})

    def _append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def text(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def log_train(self, step: int, values: dict, step_seconds: float) -> None:
        """Record train step ``step`` (1-based count of completed steps)."""
        if not self.enabled:
            return
        self._step_times.append(step_seconds)
        self._append({"split": "train", "step": step, **values})
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and value == value:
                    self._writer.add_scalar(_tb_name("train", name), value, step)
        if step % self.log_interval == 0 or step == self.total_steps:
            self.text(self._progress_line(step, values))

    def _progress_line(self, step: int, values: dict) -> str:
        recent = self._step_times[1:] or self._step_times  # the first step includes warm-up
        per_step = sum(recent[-20:]) / len(recent[-20:])
        eta = per_step * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {values['loss']:.4f}"]
        for name in ("lm_loss", "kd_loss"):
            if name in values and name != "loss":
                parts.append(f"{name.replace('_loss', '')} {values[name]:.4f}")
        if "alpha" in values:
            parts.append(f"alpha {values['alpha']:.2f} tau {values['tau']:.2f}")
        parts.append(f"lr {values.get('lr', 0.0):.2e}")
        if values.get("grad_norm") is not None:
            parts.append(f"gnorm {values['grad_norm']:.3f}")
        parts.append(f"{values.get('tokens_per_s', 0.0):,.0f} tok/s")
        if values.get("mfu") is not None:
            parts.append(f"mfu {100 * values['mfu']:.1f}%")
        if "teacher_time_share" in values:
            parts.append(f"teacher {100 * values['teacher_time_share']:.0f}%")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def log_eval(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        self._append({"split": split, "step": step, **values})
        if self._writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(_tb_name(split, name), value, step)
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        self.text(f"[{split} @ step {step}] {shown}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _tb_name(split: str, name: str) -> str:
    groups = {
        "loss": "loss",
        "lm_loss": "loss",
        "kd_loss": "loss",
        "lr": "optim",
        "grad_norm": "optim",
        "tokens_per_s": "throughput",
        "samples_per_s": "throughput",
        "mfu": "throughput",
        "tflops": "throughput",
        "step_time_s": "throughput",
    }
    return f"{split}/{groups.get(name, 'misc')}/{name}" if split == "train" else f"{split}/{name}"


class Stopwatch:
    """Wall time of a block, synchronising CUDA so GPU work is counted."""

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        return False
