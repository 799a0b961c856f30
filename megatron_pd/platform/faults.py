"""Fault injection for the fault-tolerance tests: a process kills itself (or poisons a value)
at a named point of a run when ``MEGATRON_PD_FAULTS`` asks for it.

    MEGATRON_PD_FAULTS="checkpoint_before_latest:step=4:rank=1"
    MEGATRON_PD_FAULTS="nan_loss:step=3,nan_loss:step=4"

Entries are comma-separated
``point[:step=N][:rank=R][:restart=K][:skip=S][:times=T][:action=kill|nan]`` (``skip``: let the
first S matching calls in this process pass, e.g. to die at the third shard a dump writes;
``times``: fire at most T times in this process, e.g. once for a step a rollback repeats); the
action defaults to kill (SIGKILL of this process, nothing flushed) for the points that name a
moment and to nan for the ``nan_*`` and ``spike_loss`` points (the value there is poisoned:
NaN, or the reported loss x 1000). A point fires when the step, rank and torchrun restart
count (TORCHELASTIC_RESTART_COUNT; so a restarted job does not die again) match, each may be
left out. Unset, as in every normal run, each call is one
dictionary lookup. The points:

    forward_backward           a train step, after the micro-batches' forward/backward
    checkpoint_before_latest   a checkpoint written and renamed, ``latest`` not yet moved
    async_save                 an asynchronous checkpoint save scheduled, not finished
    store_shard_write          a logits-store shard's bytes written, before its rename
    record_flush               recorded logits buffered, their shard not yet written
    teacher_load               the teacher's weights half loaded
    nan_loss                   the loss of a train step (every micro-batch of that step)
    nan_grad                   one gradient of a train step (before the finiteness check)
    spike_loss                 the loss a train step reports (x 1000), not its gradient
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "forward_backward",
    "checkpoint_before_latest",
    "async_save",
    "store_shard_write",
    "record_flush",
    "teacher_load",
    "nan_loss",
    "nan_grad",
    "spike_loss",
)


def _parse(text: str) -> dict:
    faults: dict = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        point, *fields = entry.split(":")
        if point not in POINTS:
            raise ValueError(f"MEGATRON_PD_FAULTS: unknown point {point!r}; known: {POINTS}")
        spec = {"action": "nan" if point.startswith(("nan_", "spike_")) else "kill"}
        for field in fields:
            key, _, value = field.partition("=")
            if key not in ("step", "rank", "restart", "skip", "times", "action"):
                raise ValueError(f"MEGATRON_PD_FAULTS: {entry!r}: unknown field {key!r}")
            spec[key] = value if key == "action" else int(value)
        faults.setdefault(point, []).append(spec)
    return faults


_FAULTS = _parse(os.environ.get("MEGATRON_PD_FAULTS", ""))


def fault(point: str, step: int | None = None) -> bool:
    """At ``point`` (of train step ``step``): kill this process if asked to; True when a
    ``nan`` fault fires here (the caller poisons its value)."""
    specs = _FAULTS.get(point)
    if not specs:
        return False
    rank = int(os.environ.get("RANK", "0"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for spec in specs:
        if spec.get("step") not in (None, step) or spec.get("rank") not in (None, rank):
            continue
        if spec.get("restart") not in (None, restart):
            continue
        if spec.get("skip", 0) > 0:
            spec["skip"] -= 1
            continue
        if "times" in spec:
            if spec["times"] <= 0:
                continue
            spec["times"] -= 1
        if spec["action"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return True
    return False
