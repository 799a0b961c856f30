"""The explorer's spec, plan, SLURM emission and results, without training anything.

Results and findings are computed from metrics.jsonl files written here with known losses,
so every delta, percentage and claim verdict is checked against hand-computed values.
"""

import json
import math
import os
import re

import pytest
import yaml

from megatron_pd.explore import results, runner
from megatron_pd.explore.spec import build_plan


def write_spec(tmp_path, **changes):
    base = {
        "model": {"preset": "tiny"},
        "data": {
            "tokenizer_model": str(tmp_path / "tok"),
            "blend": [str(tmp_path / "d")],
            "seq_length": 32,
        },
        "train": {
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "train_steps": 10,
            "eval_interval": 5,
            "eval_batches": 1,
            "precision": "fp32",
        },
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "t",
        "workdir": str(tmp_path / "work"),
        "base": "base.yaml",
        "nproc": 1,
        "seeds": [1, 2],
        "teachers": {"big": {"load": str(tmp_path / "teacher")}},
        "defaults": {"teacher": "big", "source": "live"},
        "axes": {
            "tau": {"distill.tau.value": [1, 5]},
            "loss": {"NLL": {"distill.loss": "soft_ce"}, "MSE": {"distill.loss": "mse_probs"}},
        },
        "claims": [
            {"claim": "PD helps", "gain": ["tau/1"]},
            {"claim": "MSE worse", "better": ["loss/NLL"], "worse": ["loss/MSE"]},
            {"claim": "tau insensitive", "similar": ["tau/*"]},
        ],
        "quick": {"axes": ["tau"], "seeds": [1], "set": {"train.train_steps": 4}},
    }
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_plan_deduplicates_and_derives_baselines(tmp_path):
    plan = build_plan(write_spec(tmp_path))
    students = [j for j in plan.jobs.values() if j.kind == "student"]
    # tau=1 with forward_kl (the default loss) and loss=NLL differ; one baseline per seed
    assert len(students) == 2 * (4 + 1)
    baselines = {v.baseline[1] for variants in plan.axes.values() for v in variants}
    assert len(baselines) == 1
    base = plan.jobs[baselines.pop()].config
    assert base["distill"]["teacher"]["load"] is None and base["train"]["seed"] == 1
    tau5 = plan.axes["tau"][1]
    cfg = plan.jobs[tau5.runs[2]].config
    assert cfg["distill"]["tau"]["value"] == 5 and cfg["train"]["seed"] == 2
    assert cfg["distill"]["teacher"]["load"] == str(tmp_path / "teacher")
    quick = build_plan(write_spec(tmp_path), quick=True)
    assert list(quick.axes) == ["tau"] and quick.seeds == [1]
    assert quick.workdir.endswith("_quick")
    assert all(j.config["train"]["train_steps"] == 4 for j in quick.jobs.values())


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"axes": {"bad": {"model.bogus": [1]}}},
            r"axis bad, variant 1: unknown config field model.bogus",
        ),
        (
            {"axes": {"tau": {"distill.tau.value": [1, -2]}}},
            r"axis tau, variant -2: distill.tau.value=-2",
        ),
        (
            {"axes": {"x": {"a": {"baseline": "nope", "distill.loss": "soft_ce"}}}},
            r"axis x, variant a: baseline 'nope' is not defined",
        ),
        (
            {"axes": {"x": {"a": {"teacher": "huge"}}}},
            r"axis x, variant a: teacher 'huge' is not in teachers",
        ),
        (
            {"axes": {"x": {"a": {"source": "offline"}}}},
            r"axis x, variant a: source offline needs distill.truncation",
        ),
        ({"axes": {"x": {"a": [1], "b": {"c": 1}}}}, r"axis x: mixes value lists"),
        ({"seeds": []}, r"seeds: \[\] must be a non-empty list"),
        ({"bogus": 1}, r"unknown key\(s\) \['bogus'\]"),
        ({"claims": [{"claim": "c", "gain": ["tau/7"]}]}, r"claim 'c': tau/7 names no variant"),
    ],
)
def test_spec_errors_name_the_axis_and_value_before_any_run(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        build_plan(write_spec(tmp_path, **change))
    assert not (tmp_path / "work").exists()  # nothing written, nothing started


def test_offline_variants_share_one_dump_of_the_widest_truncation(tmp_path):
    spec = write_spec(
        tmp_path,
        teachers={"big": {"config": "base.yaml"}},
        axes={"k": {"distill.truncation": ["top-0.95-10", "top-0.9-50"], "source": ["offline"]}},
        claims=[],
        quick={},
    )
    plan = build_plan(spec)
    dumps = [j for j in plan.jobs.values() if j.kind == "dump"]
    assert len(dumps) == 1
    assert dumps[0].config["distill"]["truncation"] == "top-0.95-50"
    names = list(plan.jobs)
    for variant in plan.axes["k"]:
        for name in variant.runs.values():
            job = plan.jobs[name]
            assert job.config["distill"]["store"] == dumps[0].out_dir
            assert dumps[0].name in job.depends and names.index(dumps[0].name) < names.index(name)


def test_emit_slurm_runs_exactly_the_local_configs(tmp_path):
    plan = build_plan(write_spec(tmp_path))
    written = runner.emit_slurm(plan, str(tmp_path / "slurm"), {"partition": "gpu"})
    script, listing, tasks = written["student"]
    text = open(script).read()
    assert re.search(rf"^#SBATCH --array=0-{tasks - 1}$", text, re.M)
    assert "#SBATCH --partition=gpu" in text and "node_entry.sh" in text
    assert f"CONFIG_LIST={listing}" in text
    body = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(body) == 1 and body[0].startswith("srun ")  # sbatch lines + one srun
    lines = open(listing).read().splitlines()
    local = {runner.command(plan, j)[-1] for j in plan.jobs.values() if j.kind == "student"}
    assert set(lines) == local and len(lines) == tasks == 10
    for line in lines:  # each task's config is the job's resolved config, as run locally
        name = os.path.basename(line)[: -len(".yaml")]
        assert yaml.safe_load(open(line)) == plan.jobs[name].config
    submit = open(tmp_path / "slurm" / "submit.sh").read()
    assert "student.sbatch" in submit and "afterok" in submit


def fake_run(job, lm_losses, teacher=None):
    """metrics.jsonl of a finished run whose evaluations gave ``lm_losses``."""
    os.makedirs(job.out_dir, exist_ok=True)
    total = job.config["train"]["train_steps"]
    steps = [total * (i + 1) // len(lm_losses) for i in range(len(lm_losses))]
    with open(os.path.join(job.out_dir, "metrics.jsonl"), "w") as f:
        if teacher is not None:
            f.write(json.dumps({"split": "teacher_valid", "step": 0, "loss": teacher}) + "\n")
        for step, loss in zip(steps, lm_losses):
            f.write(
                json.dumps({"split": "train", "step": step, "loss": 9.0, "step_time_s": 1.5}) + "\n"
            )
            f.write(
                json.dumps({"split": "valid", "step": step, "loss": 9.0, "lm_loss": loss}) + "\n"
            )


def test_deltas_and_findings_from_known_metrics(tmp_path):
    plan = build_plan(write_spec(tmp_path))
    finals = {  # (variant or "baseline", seed) -> final held-out LM loss
        ("tau/1", 1): 4.0,
        ("tau/1", 2): 4.2,
        ("tau/5", 1): 4.05,
        ("tau/5", 2): 4.25,
        ("loss/NLL", 1): 3.9,
        ("loss/NLL", 2): 4.1,
        ("loss/MSE", 1): 5.0,
        ("baseline", 1): 4.5,
        ("baseline", 2): 4.5,
    }
    for axis, variants in plan.axes.items():
        for variant in variants:
            for seed, name in variant.runs.items():
                if (f"{axis}/{variant.name}", seed) in finals:
                    fake_run(
                        plan.jobs[name],
                        [6.0, finals[(f"{axis}/{variant.name}", seed)]],
                        teacher=3.5,
                    )
                fake_run(plan.jobs[variant.baseline[seed]], [6.0, finals[("baseline", seed)]])
    collected = results.collect(plan)
    rows = {f"{r['axis']}/{r['variant']}": r for r in collected["variants"]}
    tau1 = rows["tau/1"]
    assert tau1["final"] == pytest.approx(4.1) and tau1["final_sd"] == pytest.approx(0.1414, 1e-3)
    assert tau1["delta"] == pytest.approx(0.4)  # paired: (0.5 + 0.3) / 2
    assert tau1["delta_sd"] == pytest.approx(math.sqrt(0.02))
    assert tau1["delta_pct"] == pytest.approx((50.0 + 30.0) / 2)  # of the excess 4.5 - 3.5
    assert rows["loss/MSE"]["seeds"] == 1 and rows["loss/MSE"]["expected_seeds"] == 2
    paths = results.write_reports(plan, collected)
    assert os.path.getsize(paths["deltas"]) > 0 and os.path.getsize(paths["curves_tau"]) > 0
    csv_text = open(paths["csv"]).read().splitlines()
    assert csv_text[0].startswith("axis,variant,seeds,final") and len(csv_text) == 5
    findings = open(paths["findings"]).read()
    assert "| PD helps | yes | 0.4000 | 0.1414 | yes |" in findings
    # paired by seed: MSE ran seed 1 only, so the margin is 5.0 - 3.9 (not 5.0 - mean 4.0)
    assert "| MSE worse | yes | 1.1000 |" in findings and "n/a (1 seed)" in findings
    # tau/5 - tau/1 is 0.05 on both seeds: no paired spread, though each final has sd 0.14
    assert "| tau insensitive | yes | 0.0500 | 0.0000 |" in findings
    claim = {"claim": "tau 1 better", "better": ["tau/1"], "worse": ["tau/5"]}
    verdict = results.evaluate_claim(claim, collected["variants"])
    assert verdict["margin"] == pytest.approx(0.05) and verdict["spread"] == pytest.approx(0.0)
    assert verdict["significant"] == "yes"
    # gains 45% and 25% (tau/5), 50% and 30% (tau/1) of the excess: +5 pp on each seed
    claim = {"claim": "grows", "increasing": ["tau/5", "tau/1"]}
    verdict = results.evaluate_claim(claim, collected["variants"])
    assert verdict["margin"] == pytest.approx(5.0) and verdict["spread"] == pytest.approx(0.0)


def test_run_names_survive_new_config_fields(monkeypatch):
    """A run is named by the config values that differ from the defaults: a version of
    megatron_pd with one more field (at its default) names the same runs the same, a changed
    value gets a new name."""
    from megatron_pd.explore import spec as S

    defaults = S._default_config()
    config = {"model": dict(defaults["model"], hidden_size=96), "train": defaults["train"]}
    before = S.config_digest(config)
    grown = {k: dict(v) if isinstance(v, dict) else v for k, v in defaults.items()}
    grown["train"]["new_knob"] = 7
    monkeypatch.setattr(S, "_default_config", lambda: grown)
    assert S.config_digest(dict(config, train=dict(config["train"], new_knob=7))) == before
    assert S.config_digest(dict(config, train=dict(config["train"], new_knob=8))) != before
    other = {"model": dict(defaults["model"], hidden_size=128), "train": defaults["train"]}
    assert S.config_digest(other) != before
