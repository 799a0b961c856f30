"""A sweep's results: per run, per variant (over seeds), against baselines; tables, plots and
the findings report.

Per run (from its metrics.jsonl, wherever it ran): the final and best held-out LM loss - the
student's own next-token loss (``lm_loss``), never the mixed objective - its curve, tokens and
wall time. Per variant: mean and sample standard deviation over seeds; the paired delta
against its LM-only baseline (baseline - variant, per seed: positive means distillation
helped) in nats and in percent of the baseline's excess loss over the teacher (so small and
large students compare), each with its seed spread.

Claims (the spec's ``claims``; variants are ``axis/name``, ``axis/*`` for all of an axis):

    {claim: ..., gain: [refs]}          each beats its baseline (paired delta > 0)
    {claim: ..., hurt: [refs]}          each is worse than its baseline
    {claim: ..., better: [refs], worse: [refs]}   every better one has a lower final loss
    {claim: ..., best: ref, among: [refs]}        lowest final loss of the group
    {claim: ..., similar: [refs]}       indistinguishable: the range of their final losses is
                                        within max(2 x seed spread, a quarter of their gain)
    {claim: ..., increasing: [refs]}    the gain (percent of excess) grows along the list

Each claim reports whether it reproduced, the margin (nats, or percentage points for
``increasing``) and whether the margin exceeds twice the seed spread. Variants are compared
seed by seed, as the deltas are: seed s of two variants shares the student's initialisation
and data order, so the margin is the mean over seeds of their per-seed difference and its
spread is the standard deviation of those differences (what varies with the seed in both
runs cancels, as it does in a paired test).
"""

from __future__ import annotations

import csv
import fnmatch
import json
import math
import os

from megatron_pd.explore.spec import Plan


def _stats(values: list) -> tuple:
    """(mean, sample standard deviation; 0 for one value)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def run_result(plan: Plan, job) -> dict | None:
    """Held-out LM loss curve, final and best, tokens and wall time of a finished run."""
    from megatron_pd.engine.metrics import read_metrics
    from megatron_pd.explore.runner import _total_steps, job_done

    if not job_done(plan, job):
        return None
    path = os.path.join(job.out_dir, "metrics.jsonl")
    valid = read_metrics(path, "valid")
    train = read_metrics(path, "train")
    curve = [(r["step"], r.get("lm_loss", r["loss"])) for r in valid]
    teacher = [r["loss"] for r in read_metrics(path, "teacher_valid")]
    cfg = job.config
    steps = _total_steps(cfg)
    tokens = steps * cfg["train"]["global_batch_size"] * cfg["data"]["seq_length"]
    times = os.path.join(plan.workdir, "state", "times.json")
    recorded = json.load(open(times)).get(job.name, {}) if os.path.isfile(times) else {}
    seconds = recorded.get("seconds") or sum(r.get("step_time_s", 0.0) for r in train)
    return {
        "final": curve[-1][1],
        "best": min(v for _, v in curve),
        "curve": curve,
        "tokens": tokens,
        "seconds": seconds,
        "teacher_valid": teacher[-1] if teacher else None,
        "tokens_per_step": cfg["train"]["global_batch_size"] * cfg["data"]["seq_length"],
    }


def teacher_losses(plan: Plan) -> dict:
    """Final held-out LM loss of each teacher the sweep trained."""
    out = {}
    for name, info in plan.teachers.items():
        job = plan.jobs.get(info["job"]) if info["job"] else None
        result = run_result(plan, job) if job else None
        out[name] = result["final"] if result else None
    return out


def collect(plan: Plan) -> dict:
    """{"runs": {job: result}, "variants": [row], "teachers": {name: loss}}."""
    runs = {}
    for name, job in plan.jobs.items():
        if job.kind == "student":
            runs[name] = run_result(plan, job)
    teachers = teacher_losses(plan)
    rows = []
    for variants in plan.axes.values():
        for variant in variants:
            rows.append(_variant_row(variant, runs, teachers))
    return {"runs": runs, "variants": rows, "teachers": teachers}


def _variant_row(variant, runs: dict, teachers: dict) -> dict:
    finals, bests, deltas, percents, base_finals, seconds, tokens = [], [], [], [], [], [], 0
    by_seed, pct_by_seed = {}, {}
    teacher_loss = teachers.get(variant.teacher) if variant.teacher else None
    for seed, name in variant.runs.items():
        result = runs.get(name)
        if result is None:
            continue
        finals.append(result["final"])
        by_seed[seed] = result["final"]
        bests.append(result["best"])
        seconds.append(result["seconds"])
        tokens = result["tokens"]
        if teacher_loss is None and result["teacher_valid"] is not None:
            teacher_loss = result["teacher_valid"]
        base = runs.get(variant.baseline.get(seed)) if variant.baseline else None
        if base is not None:
            delta = base["final"] - result["final"]
            deltas.append(delta)
            base_finals.append(base["final"])
            if teacher_loss is not None and base["final"] - teacher_loss > 0:
                percents.append(100.0 * delta / (base["final"] - teacher_loss))
                pct_by_seed[seed] = percents[-1]
    final, final_sd = _stats(finals)
    delta, delta_sd = _stats(deltas)
    percent, percent_sd = _stats(percents)
    return {
        "axis": variant.axis,
        "variant": variant.name,
        "seeds": len(finals),
        "expected_seeds": len(variant.runs),
        "final": final,
        "final_sd": final_sd,
        "best": _stats(bests)[0],
        "baseline": _stats(base_finals)[0],
        "delta": delta,
        "delta_sd": delta_sd,
        "delta_pct": percent,
        "delta_pct_sd": percent_sd,
        "teacher": teacher_loss,
        "tokens": tokens,
        "seconds": sum(seconds),
        "runs": list(variant.runs.values()),
        "baseline_runs": list(variant.baseline.values()),
        "final_by_seed": by_seed,
        "delta_pct_by_seed": pct_by_seed,
    }


def _paired(low: dict, high: dict, key: str = "final_by_seed") -> tuple:
    """(mean, sd, seeds) over the seeds both rows ran of high[seed] - low[seed]."""
    seeds = sorted(set(low[key]) & set(high[key]))
    mean, sd = _stats([high[key][s] - low[key][s] for s in seeds])
    return mean, sd, len(seeds)


CSV_FIELDS = [
    "axis",
    "variant",
    "seeds",
    "final",
    "final_sd",
    "best",
    "baseline",
    "delta",
    "delta_sd",
    "delta_pct",
    "delta_pct_sd",
    "teacher",
    "tokens",
    "seconds",
]


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def write_reports(plan: Plan, results: dict, out_dir: str | None = None) -> dict:
    """results.csv, results.md, curves_<axis>.png, deltas.png and findings.md."""
    out_dir = out_dir or plan.workdir
    os.makedirs(out_dir, exist_ok=True)
    rows = results["variants"]
    paths = {"csv": os.path.join(out_dir, "results.csv"), "md": os.path.join(out_dir, "results.md")}
    with open(paths["csv"] + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_FIELDS})
    os.replace(paths["csv"] + ".tmp", paths["csv"])
    lines = [f"# {plan.name}{' (quick)' if plan.quick else ''}: held-out LM loss (nats/token)", ""]
    lines += [
        "Final held-out LM loss of the student (mean +- seed standard deviation), its paired "
        "delta against the LM-only baseline (baseline - variant: positive = distillation "
        "helped) in nats and in percent of the baseline's excess loss over the teacher.",
        "",
    ]
    for axis in plan.axes:
        lines += [
            f"## {axis}",
            "",
            "| variant | seeds | final | best | LM-only | delta (nats) "
            "| delta (% of excess) | teacher | wall |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["axis"] == axis):
            seeds = f"{row['seeds']}/{row['expected_seeds']}"
            lines.append(
                f"| {row['variant']} | {seeds} | {_fmt(row['final'])} +- {_fmt(row['final_sd'])} "
                f"| {_fmt(row['best'])} | {_fmt(row['baseline'])} | {_fmt(row['delta'])} +- "
                f"{_fmt(row['delta_sd'])} | {_fmt(row['delta_pct'], 1)} +- "
                f"{_fmt(row['delta_pct_sd'], 1)} | {_fmt(row['teacher'])} | "
                f"{row['seconds'] / 60:.1f} min |"
            )
        lines.append("")
    with open(paths["md"] + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(paths["md"] + ".tmp", paths["md"])
    paths.update(_plots(plan, results, out_dir))
    if plan.claims:
        paths["findings"] = write_findings(plan, results, out_dir)
    return paths


def _plots(plan: Plan, results: dict, out_dir: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    runs = results["runs"]
    for axis, variants in plan.axes.items():
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        drawn_baselines = set()
        for variant in variants:
            curve = _mean_curve([runs.get(n) for n in variant.runs.values()])
            if curve:
                ax.plot(*zip(*curve), "o-", ms=3, label=variant.name)
            key = tuple(variant.baseline.values())
            base = _mean_curve([runs.get(n) for n in key])
            if base and key not in drawn_baselines:
                drawn_baselines.add(key)
                ax.plot(
                    *zip(*base),
                    "k--",
                    lw=1,
                    alpha=0.6,
                    label="LM-only" if len(drawn_baselines) == 1 else None,
                )
        ax.set_xlabel("tokens")
        ax.set_ylabel("held-out LM loss (nats/token)")
        ax.set_title(f"{plan.name}: {axis} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"curves_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[f"curves_{axis}"] = path
    rows = [r for r in results["variants"] if not math.isnan(r["delta"])]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
        labels = [f"{r['axis']}/{r['variant']}" for r in rows]
        values = [r["delta"] for r in rows]
        errors = [r["delta_sd"] for r in rows]
        colors = ["tab:green" if v > 0 else "tab:red" for v in values]
        ax.barh(range(len(rows)), values, xerr=errors, color=colors, alpha=0.8, capsize=3)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="k", lw=0.8)
        ax.set_xlabel("held-out LM loss gain over LM-only (nats; error bar: seed sd)")
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        out["deltas"] = os.path.join(out_dir, "deltas.png")
        fig.savefig(out["deltas"], dpi=110)
        plt.close(fig)
    return out


def _mean_curve(results: list) -> list:
    """(tokens, mean held-out loss) at the steps every given run evaluated."""
    results = [r for r in results if r]
    if not results:
        return []
    common = set.intersection(*[{s for s, _ in r["curve"]} for r in results])
    per_step = results[0]["tokens_per_step"]
    return [
        (step * per_step, sum(dict(r["curve"])[step] for r in results) / len(results))
        for step in sorted(common)
    ]


# ------------------------------------------------------------------------------ claims
def _resolve(refs, rows: list, where: str) -> list:
    refs = [refs] if isinstance(refs, str) else list(refs or [])
    out = []
    for ref in refs:
        axis, _, name = str(ref).partition("/")
        matched = [r for r in rows if r["axis"] == axis and fnmatch.fnmatch(r["variant"], name)]
        if not matched:
            raise ValueError(f"{where}: {ref} names no variant of the sweep")
        out.extend(matched)
    return out


def evaluate_claim(claim: dict, rows: list) -> dict:
    """{claim, reproduced, margin, spread, significant, detail} (see module doc)."""
    text = claim.get("claim", "?")
    where = f"claim {text!r}"
    ok = lambda r: not math.isnan(r["final"])  # noqa: E731
    if "gain" in claim or "hurt" in claim:
        sign = 1.0 if "gain" in claim else -1.0
        chosen = [r for r in _resolve(claim.get("gain") or claim.get("hurt"), rows, where)]
        pending = [r for r in chosen if math.isnan(r["delta"])]
        if pending:
            return _pending(text, pending)
        worst = min(chosen, key=lambda r: sign * r["delta"])
        margin, spread = sign * worst["delta"], worst["delta_sd"]
        detail = ", ".join(f"{r['variant']} {r['delta']:+.4f}" for r in chosen)
        return _verdict(text, margin > 0, margin, spread, detail, min(r["seeds"] for r in chosen))
    if "better" in claim:
        better = _resolve(claim["better"], rows, where)
        worse = _resolve(claim.get("worse"), rows, where)
        if not all(map(ok, better + worse)):
            return _pending(text, [r for r in better + worse if not ok(r)])
        pairs = [(b, w, *_paired(b, w)) for b in better for w in worse]
        pairs = [p for p in pairs if p[4] > 0]  # no seed in common: nothing to compare
        if not pairs:
            return _pending(text, better + worse)
        b, w, margin, spread, seeds = min(pairs, key=lambda p: p[2])
        detail = f"closest: {b['variant']} {b['final']:.4f} vs {w['variant']} {w['final']:.4f}"
        return _verdict(text, margin > 0, margin, spread, detail, seeds)
    if "best" in claim:
        (best,) = _resolve(claim["best"], rows, where)[:1]
        others = [r for r in _resolve(claim.get("among"), rows, where) if r is not best]
        if not all(map(ok, [best] + others)):
            return _pending(text, [r for r in [best] + others if not ok(r)])
        margins = [(*_paired(best, r), r) for r in others]  # rival - best, seed by seed
        margins = [m for m in margins if m[2] > 0]
        if not margins:
            return _pending(text, [best] + others)
        margin, spread, seeds, rival = min(margins, key=lambda m: m[0])
        detail = (
            f"{best['variant']} {best['final']:.4f}, next {rival['variant']} {rival['final']:.4f}"
        )
        return _verdict(text, margin > 0, margin, spread, detail, seeds)
    if "similar" in claim:
        chosen = _resolve(claim["similar"], rows, where)
        if not all(map(ok, chosen)):
            return _pending(text, [r for r in chosen if not ok(r)])
        finals = [r["final"] for r in chosen]
        pairs = [_paired(a, b) for i, a in enumerate(chosen) for b in chosen[i + 1 :]]
        spread = max((sd for _, sd, n in pairs if n >= 2), default=0.0)
        gains = [r["delta"] for r in chosen if not math.isnan(r["delta"])]
        gain = abs(sum(gains) / len(gains)) if gains else 0.0
        spread_range = max(finals) - min(finals)
        allowed = max(2 * spread, 0.25 * gain)
        detail = f"range {spread_range:.4f} nats (allowed {allowed:.4f}: 2 x sd or gain / 4)"
        result = _verdict(
            text,
            spread_range <= allowed,
            spread_range,
            spread,
            detail,
            min((n for _, _, n in pairs), default=0),
        )
        result["significant"] = "n/a (a similarity claim)"
        return result
    if "increasing" in claim:
        chosen = _resolve(claim["increasing"], rows, where)
        if any(math.isnan(r["delta_pct"]) for r in chosen):
            return _pending(text, [r for r in chosen if math.isnan(r["delta_pct"])])
        steps = [_paired(a, b, "delta_pct_by_seed") for a, b in zip(chosen, chosen[1:])]
        if any(n == 0 for _, _, n in steps):
            return _pending(text, chosen)
        margin, spread, seeds = min(steps, key=lambda step: step[0])
        detail = ", ".join(f"{r['variant']} {r['delta_pct']:+.1f}%" for r in chosen)
        result = _verdict(text, margin > 0, margin, spread, detail, seeds)
        result["unit"] = "percentage points"
        return result
    raise ValueError(
        f"{where}: needs one of gain, hurt, better/worse, best/among, similar, increasing"
    )


def _verdict(text, reproduced, margin, spread, detail, seeds) -> dict:
    if seeds < 2:
        significant = "n/a (1 seed)"
    else:
        significant = "yes" if abs(margin) > 2 * spread else "no"
    return {
        "claim": text,
        "reproduced": "yes" if reproduced else "no",
        "margin": margin,
        "spread": spread,
        "significant": significant,
        "detail": detail,
        "unit": "nats",
    }


def _pending(text, rows, why: str = "pending") -> dict:
    names = ", ".join(f"{r['axis']}/{r['variant']}" for r in rows[:3])
    detail = f"runs not finished: {names}" if why == "pending" else "axes not in this sweep"
    return {
        "claim": text,
        "reproduced": why,
        "margin": math.nan,
        "spread": math.nan,
        "significant": "-",
        "detail": detail,
        "unit": "nats",
    }


CLAIM_KEYS = ("gain", "hurt", "better", "worse", "best", "among", "similar", "increasing")


def claim_refs(claim: dict) -> list:
    """Every variant reference of a claim (``axis/name`` patterns)."""
    refs = []
    for key in CLAIM_KEYS:
        value = claim.get(key)
        refs.extend([value] if isinstance(value, str) else list(value or []))
    return [str(r) for r in refs]


def check_claims(claims: list, axes: dict) -> None:
    """ValueError naming a claim that refers to no variant of the spec's axes ({axis:
    [variant names]}), before anything runs."""
    for claim in claims:
        if not isinstance(claim, dict) or not any(k in claim for k in CLAIM_KEYS):
            raise ValueError(f"claims: {claim!r} needs claim: and one of {', '.join(CLAIM_KEYS)}")
        for ref in claim_refs(claim):
            axis, _, name = ref.partition("/")
            if not any(fnmatch.fnmatch(n, name) for n in axes.get(axis, [])):
                raise ValueError(
                    f"claim {claim.get('claim')!r}: {ref} names no variant of the spec"
                )


def write_findings(plan: Plan, results: dict, out_dir: str) -> str:
    rows = results["variants"]
    present = {(r["axis"], r["variant"]) for r in rows}

    def in_sweep(claim):  # a --quick subset runs some axes only
        return all(
            any(
                a == ref.partition("/")[0] and fnmatch.fnmatch(v, ref.partition("/")[2])
                for a, v in present
            )
            for ref in claim_refs(claim)
        )

    verdicts = [
        evaluate_claim(c, rows) if in_sweep(c) else _pending(c.get("claim", "?"), [], "not run")
        for c in plan.claims
    ]
    lines = [
        f"# Findings: {plan.name}{' (quick)' if plan.quick else ''}",
        "",
        "Generated by `python -m megatron_pd.explore` from the runs' held-out LM losses (see "
        "results.md). A claim reproduced when the measured direction matches the paper's; "
        "the margin is how far it holds (nats unless stated; negative: the other way), and "
        "it counts as significant when it exceeds twice the seed standard deviation. Variants "
        "are compared seed by seed (paired: margin = mean of the per-seed differences, sd = "
        "their standard deviation), as each variant's delta is against its own seed's "
        "LM-only run.",
        "",
        "| claim (paper) | reproduced | margin | paired seed sd | margin > 2 sd | detail |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        unit = " pp" if v["unit"] == "percentage points" else ""
        lines.append(
            f"| {v['claim']} | {v['reproduced']} | {_fmt(v['margin'])}{unit} | "
            f"{_fmt(v['spread'])} | {v['significant']} | {v['detail']} |"
        )
    path = os.path.join(out_dir, "findings.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    return path
