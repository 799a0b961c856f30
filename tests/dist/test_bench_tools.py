"""The benchmark scripts run end to end at toy shapes, and their rows compute the same thing.

tools/bench_peers.py and tools/bench_fused_output.py carry the fused output layer's speed and
memory claims; they are run by hand on real shapes. Here they run at toy shapes (no timing is
asserted), so that a change to the loss or to a peer's API cannot leave them broken, and every
row's loss and gradients are held against the reference row (megatron_pd's logits path,
itself tested against torch's kl_div / cross_entropy elsewhere) and eager torch.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def _tool(name: str, args: list, tmp_path, out_flag: str = "--json") -> tuple:
    """Run tools/<name>.py with ``args``; (the JSON it wrote through ``out_flag``, stdout)."""
    out = tmp_path / f"{name}.json"
    command = [sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *args, out_flag, str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_bench_peers_rows_agree_and_compare_side_by_side(tmp_path):
    rows = ["mpd_logits", "mpd_fused", "mpd_fused_hidden", "mpd_fused_hidden_compiled", "eager"]
    peers = {"liger": "liger_kernel", "modelopt_ce": "modelopt", "modelopt": "modelopt"}
    rows += [row for row, module in peers.items() if importlib.util.find_spec(module)]
    args = ["--tokens", "96", "--hidden", "32", "--vocab", "512", "--repeats", "1"]
    record, stdout = _tool("bench_peers", args + ["--tp", "1", "2", "--rows", *rows], tmp_path)
    by_key = {f"{r['impl']}-tp{r['tp']}-a{r['alpha']}": r for r in record["rows"]}
    # every megatron_pd path at TP=1 and 2, eager torch at TP=1, KL-only and mixed objectives
    assert len(by_key) == len(record["rows"]) >= 11
    for key, row in by_key.items():
        assert "error" not in row, (key, row.get("traceback") or row["error"])
        if row.get("reference"):
            assert row["impl"] == "mpd_logits" and row["tp"] == 1
            continue
        assert row["loss_diff"] / row["num_valid"] < 1e-5, key
        assert max(row["grad_h_diff"], row["grad_w_diff"]) < 1e-5, key
        assert row["time_s"] > 0 and row["peak_extra_mb"] >= 0
        if row["impl"].startswith("mpd") and row["tp"] == 1:
            assert row["collectives"] == {}, key  # one rank: nothing to exchange
        if row["impl"].startswith("mpd") and row["tp"] == 2:
            assert sum(row["collectives"].values()) > 0, key
    # the eager row is held against both megatron_pd rows that take teacher logits at TP=1
    pairs = [p for p in record["side_by_side"] if p["peer"] == "eager-tp1-a0.9"]
    assert sorted(p["ours"] for p in pairs) == ["mpd_fused-tp1-a0.9", "mpd_logits-tp1-a0.9"]
    for pair in record["side_by_side"]:
        assert math.isfinite(pair["time_ratio"]) and pair["time_ratio"] > 0
        assert math.isfinite(pair["memory_ratio"]) and pair["memory_ratio"] >= 0
    assert "Side by side: megatron_pd / peer" in stdout
    assert "peer rows with a megatron_pd row both faster and smaller" in stdout


def test_bench_peers_reports_a_peer_that_cannot_run(tmp_path):
    """A row that fails is a result of the run ("Rows that could not run"), not a crash."""
    missing = [
        row
        for row, module in (("liger", "liger_kernel"), ("modelopt", "modelopt"))
        if not importlib.util.find_spec(module)
    ]
    if not missing:
        pytest.skip("the bench extra is installed: every peer runs here")
    args = ["--tokens", "32", "--hidden", "16", "--vocab", "128", "--repeats", "1", "--tp", "1"]
    record, stdout = _tool("bench_peers", args + ["--rows", "mpd_logits", *missing], tmp_path)
    failed = [r for r in record["rows"] if "error" in r]
    assert {r["impl"] for r in failed} == set(missing)
    assert "Rows that could not run" in stdout
    assert all("ModuleNotFoundError" in r["error"] or "ImportError" in r["error"] for r in failed)


def test_bench_fused_output_paths_agree(tmp_path):
    args = ["--tokens", "64", "--hidden", "32", "--vocab", "512,320", "--tp", "1,2"]
    rows, stdout = _tool("bench_fused_output", args + ["--rounds", "1"], tmp_path)
    assert [(r["vocab"], r["tp"]) for r in rows] == [(512, 1), (512, 2), (320, 1), (320, 2)]
    for row in rows:
        assert row["loss_fused"] == pytest.approx(row["loss_logits"], rel=1e-5), row
        assert row["time_ratio"] > 0 and row["memory_ratio"] > 0, row
    assert "targets: memory ratio <= 0.15" in stdout


def test_gpu_check_smoke_runs_every_check(tmp_path):
    """tools/gpu_check.sh is run when a GPU is lent, with minutes to spare: its logic (every
    check at toy shapes, on CPU, Triton interpreted) must not first fail there."""
    report, _ = _tool("gpu_check", ["--smoke"], tmp_path, out_flag="--out")
    checks = report["checks"]
    assert set(checks) >= {"gpu_tests", "triton_vs_torch", "roofline", "fused_output", "online_pd"}
    assert not [name for name, result in checks.items() if "error" in result]
    assert checks["gpu_tests"] == {
        "skipped": "smoke run (no GPU)",
        "seconds": checks["gpu_tests"]["seconds"],
    }
