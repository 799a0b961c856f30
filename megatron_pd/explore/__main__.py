"""The design-space explorer: a sweep of ordinary megatron_pd runs from one spec.

    python -m megatron_pd.explore SPEC.yaml              # run locally (resumable), report
    python -m megatron_pd.explore SPEC.yaml --quick      # the spec's quick subset
    python -m megatron_pd.explore SPEC.yaml --dry-run    # validate, list the jobs
    python -m megatron_pd.explore SPEC.yaml --emit-slurm DIR [--partition P --account A]
    python -m megatron_pd.explore SPEC.yaml --collect    # results of finished runs

Outputs go to the spec's workdir: configs/, runs/, teachers/, stores/, logs/, results.csv,
results.md, curves_<axis>.png, deltas.png and (with claims) findings.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_pd.explore", description=__doc__.split("\n")[0]
    )
    parser.add_argument("spec", help="the sweep spec (YAML)")
    parser.add_argument("--quick", action="store_true", help="the spec's quick subset")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the jobs")
    parser.add_argument("--collect", action="store_true", help="only gather results")
    parser.add_argument("--emit-slurm", metavar="DIR", help="write sbatch job arrays to DIR")
    parser.add_argument("--stage", choices=("data",), help="run one stage (SLURM's data job)")
    parser.add_argument("--report-dir", help="where the reports go (default: the workdir)")
    parser.add_argument("--data", help="another corpus (a file or directory) for the spec's data")
    parser.add_argument("--pattern", help="with --data: which files of the directory (e.g. *.txt)")
    parser.add_argument("--workdir", help="another working directory than the spec's")
    for name in ("partition", "account", "time"):
        parser.add_argument(f"--{name}", help=f"sbatch --{name} (with --emit-slurm)")
    args = parser.parse_args(argv)
    from megatron_pd.platform import quiet_known_warnings

    quiet_known_warnings()
    from megatron_pd.explore import results, runner
    from megatron_pd.explore.spec import build_plan

    try:
        changes = {}
        if args.data:
            changes["data"] = {"input": os.path.abspath(args.data), "pattern": args.pattern or "*"}
        if args.workdir:
            changes["workdir"] = os.path.abspath(args.workdir)
        plan = build_plan(args.spec, quick=args.quick, changes=changes)
        if args.stage == "data":
            if plan.data is not None:
                runner.prepare_data(plan.data)
            return 0
        if args.dry_run:
            _describe(plan, runner)
            return 0
        if args.emit_slurm:
            options = {k: getattr(args, k) for k in ("partition", "account", "time")}
            written = runner.emit_slurm(
                plan, args.emit_slurm, {k: v for k, v in options.items() if v}
            )
            for kind, (script, _, tasks) in written.items():
                print(f"{kind}: {script} ({tasks} task{'s' if tasks != 1 else ''})")
            print(f"submit with: bash {os.path.join(args.emit_slurm, 'submit.sh')}")
            return 0
        if not args.collect:
            runner.run_local(plan)
        collected = results.collect(plan)
        paths = results.write_reports(plan, collected, args.report_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    pending = sum(1 for r in collected["runs"].values() if r is None)
    print(
        f"results: {', '.join(paths.values())}" + (f" ({pending} runs pending)" if pending else "")
    )
    return 0


def _describe(plan, runner) -> None:
    done = {n for n, j in plan.jobs.items() if runner.job_done(plan, j)}
    kinds = {}
    for job in plan.jobs.values():
        kinds.setdefault(job.kind, []).append(job)
    print(f"sweep {plan.name}{' (quick)' if plan.quick else ''}: workdir {plan.workdir}")
    for kind, jobs in kinds.items():
        finished = sum(1 for j in jobs if j.name in done)
        print(f"  {kind}: {len(jobs)} job(s), {finished} finished")
    for axis, variants in plan.axes.items():
        names = ", ".join(v.name for v in variants)
        print(f"  axis {axis}: {names}")
    total = sum(j.cost for j in plan.jobs.values())
    print(f"  compute: {total / 1e12:.1f} TFLOP in {len(plan.jobs)} jobs")


if __name__ == "__main__":
    sys.exit(main())
