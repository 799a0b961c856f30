"""Scalar schedules over training steps (learning rate, distillation alpha and temperature).

One pure function, ``schedule_value(cfg, step, total_steps)``, so a resumed run recomputes the
exact value of any step and tests can compare against closed forms. Phases:

    warmup  [0, W):            initial + (value - initial) * step / W
    main    [W, total_steps]:  by style (p = progress through the main phase in [0, 1])
        constant   value
        linear     value + (final - value) * p
        cosine     final + (value - final) * (1 + cos(pi * p)) / 2
        wsd        value until the decay phase (the last decay_fraction of the run), then
                   decays to final with decay_shape over it
        periodic   final + (value - final) * (1 + cos(2 * pi * (step - W) / period)) / 2

WSD decay shapes (q = progress through the decay phase in [0, 1]):
    linear       value + (final - value) * q
    cosine       final + (value - final) * (1 + cos(pi * q)) / 2
    sqrt         value + (final - value) * sqrt(q)          (the "1 - sqrt" cool-down)
    exponential  value * (final / value) ** q
"""

from __future__ import annotations

import math

from megatron_pd.config.schema import ScheduleConfig


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return int(round(cfg.warmup_fraction * total_steps))


def decay_start(cfg: ScheduleConfig, total_steps: int) -> int:
    """First step of the WSD decay phase."""
    return max(
        warmup_steps(cfg, total_steps), total_steps - int(round(cfg.decay_fraction * total_steps))
    )


def _decay(cfg: ScheduleConfig, q: float) -> float:
    q = min(max(q, 0.0), 1.0)
    start, end = cfg.value, cfg.final
    if cfg.decay_shape == "linear":
        return start + (end - start) * q
    if cfg.decay_shape == "cosine":
        return end + (start - end) * (1.0 + math.cos(math.pi * q)) / 2.0
    if cfg.decay_shape == "sqrt":
        return start + (end - start) * math.sqrt(q)
    return start * (end / start) ** q  # exponential


def schedule_value(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Value of the schedule at ``step`` (0-based optimizer step) of a ``total_steps`` run."""
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return cfg.initial + (cfg.value - cfg.initial) * step / warm
    if cfg.style == "constant":
        return cfg.value
    if cfg.style == "periodic":
        phase = 2.0 * math.pi * (step - warm) / cfg.period_steps
        return cfg.final + (cfg.value - cfg.final) * (1.0 + math.cos(phase)) / 2.0
    main = max(total_steps - warm, 1)
    progress = min((step - warm) / main, 1.0)
    if cfg.style == "linear":
        return cfg.value + (cfg.final - cfg.value) * progress
    if cfg.style == "cosine":
        return cfg.final + (cfg.value - cfg.final) * (1.0 + math.cos(math.pi * progress)) / 2.0
    # wsd
    start = decay_start(cfg, total_steps)
    if step < start:
        return cfg.value
    length = max(total_steps - start, 1)
    return _decay(cfg, (step - start) / length)


def wsd_phase(cfg: ScheduleConfig, step: int, total_steps: int) -> str:
    """'warmup', 'stable' or 'decay' for a wsd schedule (for logging)."""
    if step < warmup_steps(cfg, total_steps):
        return "warmup"
    if cfg.style == "wsd" and step >= decay_start(cfg, total_steps):
        return "decay"
    return "stable"
