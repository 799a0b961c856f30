"""The README's quickstart command, at a few steps per run: every stage still works."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quickstart_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "quickstart.py"), "--workdir",
         str(tmp_path), "--seeds", "1", "--steps-scale", "0.03"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "| teacher (3.2M params) | - |" in out
    assert "| student, online PD (0.6M) | 1 |" in out
    assert "PD student vs LM-only baseline:" in out
    assert os.path.isfile(tmp_path / "loss_curves.png")
    for run in ("teacher", "pd_seed1", "baseline_seed1"):
        assert os.path.isfile(tmp_path / run / "checkpoints" / "latest"), run
        # a quiet console: no Python warnings, one line naming the stack
        log = (tmp_path / run / "train.log").read_text()
        assert "Warning" not in log and "warnings.warn" not in log, log[-3000:]
        assert log.count("stack: torch") == 1, log[-3000:]
