"""The fault-injection spec (MEGATRON_PD_FAULTS): which calls of a point fire."""

import pytest

from megatron_pd.platform import faults


def fired(monkeypatch, text, calls, rank="0"):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(faults, "_FAULTS", faults._parse(text))
    return [faults.fault("nan_loss", step) for step in calls]


def test_step_rank_skip_and_times_select_the_calls(monkeypatch):
    assert fired(monkeypatch, "nan_loss:step=3", [1, 3, 3]) == [False, True, True]
    assert fired(monkeypatch, "nan_loss:step=3:times=1", [3, 3]) == [True, False]
    assert fired(monkeypatch, "nan_loss:skip=2", [1, 2, 3, 4]) == [False, False, True, True]
    assert fired(monkeypatch, "nan_loss:skip=1:times=1", [1, 2, 3]) == [False, True, False]
    # skip counts only the calls that match the step and rank
    assert fired(monkeypatch, "nan_loss:step=5:skip=1", [5, 1, 5]) == [False, False, True]
    assert fired(monkeypatch, "nan_loss:rank=1", [1, 2]) == [False, False]
    assert fired(monkeypatch, "nan_loss:rank=1", [1], rank="1") == [True]


def test_bad_entries_are_named():
    with pytest.raises(ValueError, match="unknown point 'nan_los'"):
        faults._parse("nan_los:step=1")
    with pytest.raises(ValueError, match="unknown field 'after'"):
        faults._parse("nan_loss:after=1")
