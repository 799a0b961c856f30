"""Schedules equal their closed forms and megatron-core's own LR scheduler."""

import math

import pytest
import torch

from megatron_pd.config import ScheduleConfig
from megatron_pd.engine.schedules import schedule_value, wsd_phase

TOTAL = 200
EXACT = 1e-12  # the same float formula evaluated two ways


def values(cfg, total=TOTAL):
    return [schedule_value(cfg, step, total) for step in range(total + 1)]


def test_constant_with_warmup():
    cfg = ScheduleConfig(style="constant", value=0.9, initial=0.1, warmup_steps=10)
    actual = values(cfg)
    assert actual[0] == pytest.approx(0.1, abs=EXACT)
    assert actual[5] == pytest.approx(0.1 + 0.8 * 5 / 10, abs=EXACT)
    assert all(v == 0.9 for v in actual[10:])


def test_linear_increase_and_decrease():
    up = ScheduleConfig(style="linear", value=0.1, final=1.0)
    down = ScheduleConfig(style="linear", value=1.0, final=0.5)
    for step in (0, 37, 100, 200):
        assert schedule_value(up, step, TOTAL) == pytest.approx(0.1 + 0.9 * step / TOTAL, abs=EXACT)
        assert schedule_value(down, step, TOTAL) == pytest.approx(
            1.0 - 0.5 * step / TOTAL, abs=EXACT
        )


def test_cosine_closed_form():
    cfg = ScheduleConfig(style="cosine", value=3e-4, final=3e-5, warmup_steps=20)
    for step in (20, 50, 110, 200):
        p = (step - 20) / 180
        expected = 3e-5 + (3e-4 - 3e-5) * (1 + math.cos(math.pi * p)) / 2
        assert schedule_value(cfg, step, TOTAL) == pytest.approx(expected, abs=EXACT)


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt", "exponential"])
def test_wsd_phases_and_shapes(shape):
    cfg = ScheduleConfig(
        style="wsd",
        value=0.9,
        final=0.1,
        initial=0.0,
        warmup_fraction=0.1,
        decay_fraction=0.25,
        decay_shape=shape,
    )
    start = TOTAL - 50
    assert wsd_phase(cfg, 10, TOTAL) == "warmup"
    assert wsd_phase(cfg, 100, TOTAL) == "stable"
    assert wsd_phase(cfg, start, TOTAL) == "decay"
    assert all(schedule_value(cfg, s, TOTAL) == 0.9 for s in range(20, start + 1))
    q = 30 / 50
    expected = {
        "linear": 0.9 - 0.8 * q,
        "cosine": 0.1 + 0.8 * (1 + math.cos(math.pi * q)) / 2,
        "sqrt": 0.9 - 0.8 * math.sqrt(q),
        "exponential": 0.9 * (0.1 / 0.9) ** q,
    }[shape]
    assert schedule_value(cfg, start + 30, TOTAL) == pytest.approx(expected, abs=EXACT)
    assert schedule_value(cfg, TOTAL, TOTAL) == pytest.approx(0.1, abs=EXACT)


def test_periodic():
    cfg = ScheduleConfig(style="periodic", value=1.0, final=0.5, period_steps=40)
    assert schedule_value(cfg, 0, TOTAL) == pytest.approx(1.0)
    assert schedule_value(cfg, 20, TOTAL) == pytest.approx(0.5)
    assert schedule_value(cfg, 40, TOTAL) == pytest.approx(1.0)
    assert schedule_value(cfg, 10, TOTAL) == pytest.approx(0.75)


def megatron_lrs(style, wsd_style=None, warmup=10, decay_steps=None, total=TOTAL):
    """Learning rates of megatron-core's OptimizerParamScheduler for steps 0..total."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=3e-4,
        min_lr=3e-5,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=style,
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=decay_steps,
        lr_wsd_decay_style=wsd_style,
    )
    lrs = []
    for step in range(total + 1):
        scheduler.num_steps = step
        lrs.append(scheduler.get_lr(optimizer.param_groups[0]))
    return lrs


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_lr_matches_megatron(style):
    ours = ScheduleConfig(style=style, value=3e-4, final=3e-5, warmup_steps=10)
    assert values(ours) == pytest.approx(megatron_lrs(style), abs=1e-15)


@pytest.mark.parametrize(
    "ours_shape, theirs", [("linear", "linear"), ("cosine", "cosine"), ("sqrt", "minus_sqrt")]
)
def test_wsd_lr_matches_megatron(ours_shape, theirs):
    ours = ScheduleConfig(
        style="wsd",
        value=3e-4,
        final=3e-5,
        warmup_steps=10,
        decay_fraction=0.2,
        decay_shape=ours_shape,
    )
    expected = megatron_lrs("WSD", wsd_style=theirs, decay_steps=40)
    assert values(ours) == pytest.approx(expected, abs=1e-15)


def test_wsd_alpha_aligned_with_wsd_lr():
    from megatron_pd.config import load_config

    cfg = load_config(
        None,
        [
            "--lr_schedule.style=wsd",
            "--lr_schedule.warmup_steps=10",
            "--lr_schedule.decay_fraction=0.25",
            "--lr_schedule.decay_shape=sqrt",
            "--distill.preset=pd_star",
        ],
    )
    alpha = cfg.alpha_schedule()
    assert (alpha.style, alpha.warmup_steps, alpha.decay_fraction, alpha.decay_shape) == (
        "wsd",
        10,
        0.25,
        "sqrt",
    )
    assert schedule_value(alpha, 0, TOTAL) == 0.0
    assert schedule_value(alpha, 5, TOTAL) == pytest.approx(0.45)
    assert schedule_value(alpha, 100, TOTAL) == pytest.approx(0.9)
    # Decays exactly when (and like) the learning rate does.
    for step in (150, 160, 180, 200):
        lr_fraction = (schedule_value(cfg.lr_schedule, step, TOTAL) - cfg.lr_schedule.final) / (
            cfg.lr_schedule.value - cfg.lr_schedule.final
        )
        assert schedule_value(alpha, step, TOTAL) == pytest.approx(0.9 * lr_fraction)
