"""The student side of a sweep plan: variant runs, their LM-only baselines and shared dumps.

Called by spec.build_plan; see spec.py for the spec's keys. A student run's config is
base + spec ``set`` (+ quick ``set``) + data paths + ``defaults`` + the variant's overrides +
its teacher wiring + ``train.seed``; runs are keyed by a digest of that config (without the
seed and run directory), so a point shared by several axes is one run per seed.
"""

from __future__ import annotations

import os

from megatron_pd.explore.spec import (
    SOURCES,
    SPECIAL,
    Job,
    Variant,
    _as_dict,
    _cost,
    _fail,
    _slug,
    config_digest,
    flatten,
    variants_of,
)


def add_students(builder, spec: dict, teachers: dict, seeds: list) -> dict:
    """{axis: [Variant]}; adds student, baseline and dump jobs to ``builder.jobs``."""
    common = builder._set(spec.get("set"), "set")
    if builder.quick:
        common.update(builder._set(builder.quick_spec.get("set"), "quick.set"))
    common.update(builder._data_overrides())
    defaults = flatten(spec.get("defaults") or {})
    named = {k: flatten(v or {}) for k, v in (spec.get("baselines") or {}).items()}
    axes_spec = spec.get("axes") or {}
    if not isinstance(axes_spec, dict) or not axes_spec:
        _fail("axes", "the spec needs at least one axis")
    chosen = list(axes_spec)
    if builder.quick:
        chosen = builder.quick_spec.get("axes") or chosen
        unknown = [a for a in chosen if a not in axes_spec]
        if unknown:
            _fail("quick.axes", f"{unknown} are not axes of the spec ({', '.join(axes_spec)})")
    state = _State(builder, teachers, common)
    axes = {}
    for axis in chosen:
        for name, overrides in variants_of(axis, axes_spec[axis]):
            where = f"axis {axis}, variant {name}"
            merged = {**defaults, **overrides}
            _check_special(merged, teachers, named, where)
            runs, baseline = {}, {}
            for seed in seeds:
                runs[seed] = state.student(merged, seed, f"{axis}-{name}", where)
                choice = merged.get("baseline", "auto")
                if choice == "none":
                    continue
                if choice == "auto":
                    wanted = {
                        k: v
                        for k, v in merged.items()
                        if not k.startswith("distill.") and k not in SPECIAL
                    }
                    if "student" in merged:
                        wanted["student"] = merged["student"]
                else:
                    wanted = dict(named[choice])
                baseline[seed] = state.student(wanted, seed, "baseline", f"{where} (baseline)")
            axes.setdefault(axis, []).append(
                Variant(axis, name, overrides, runs, baseline, merged.get("teacher"))
            )
    state.add_dumps()
    return axes


def _check_special(merged: dict, teachers: dict, named: dict, where: str) -> None:
    teacher = merged.get("teacher")
    source = merged.get("source", "live")
    if teacher is not None and teacher not in teachers:
        _fail(where, f"teacher {teacher!r} is not in teachers ({', '.join(teachers) or 'none'})")
    if source not in SOURCES:
        _fail(where, f"source {source!r} must be one of {', '.join(SOURCES)}")
    if teacher is not None and source != "live" and teachers[teacher]["job"] is None:
        if source == "recorded":
            _fail(where, f"source recorded needs teacher {teacher} trained by the sweep")
    if source == "recorded":
        if teacher is None or not teachers[teacher].get("record"):
            _fail(where, f"source recorded needs a teacher with record: (teacher {teacher!r})")
        window = merged.get("window")
        if not (isinstance(window, list) and len(window) == 2):
            _fail(where, f"source recorded needs window: [first, last] teacher steps ({window!r})")
    choice = merged.get("baseline", "auto")
    if choice not in ("auto", "none") and choice not in named:
        known = ", ".join(["auto", "none", *named])
        _fail(where, f"baseline {choice!r} is not defined (known: {known})")


class _State:
    """Student jobs by digest and the offline runs waiting for their dump."""

    def __init__(self, builder, teachers: dict, common: dict):
        self.b, self.teachers, self.common = builder, teachers, common
        self.by_digest: dict = {}
        self.offline: dict = {}  # dump key -> [(job name, overrides, cfg)]

    def student(self, merged: dict, seed: int, label: str, where: str) -> str:
        overrides = {**self.common, **{k: v for k, v in merged.items() if k not in SPECIAL}}
        if "student" in merged:
            overrides["model.preset"] = merged["student"]
        teacher, source = merged.get("teacher"), merged.get("source", "live")
        teacher_cfg, depends, dump_key = None, ["data"] if self.b.data else [], None
        if teacher is None:
            overrides.update({"distill.teacher.load": None, "distill.store": None})
        else:
            info = self.teachers[teacher]
            if info["job"]:
                depends.append(info["job"])
            if source == "live":
                overrides.update({"distill.teacher.load": info["dir"], "distill.store": None})
                teacher_cfg = info["cfg"].model if "cfg" in info else None
            elif source == "recorded":
                overrides.update(
                    {
                        "distill.teacher.load": None,
                        "distill.store": os.path.join(info["dir"], "recorded_logits"),
                        "distill.store_steps": list(merged["window"]),
                    }
                )
            else:  # offline: a dump shared by the runs of this teacher and data
                probe = self.b._resolve(
                    self.b.base, {**overrides, "distill.teacher.load": None}, where
                )
                if probe.distill.truncation is None:
                    _fail(where, "source offline needs distill.truncation (a store is top-p-k)")
                data = _as_dict(probe)["data"]
                batch = {"global_batch_size": probe.train.global_batch_size}
                dump_key = (teacher, config_digest({"data": data, "train": batch}))
                store = os.path.join(self.b.workdir, "stores", f"{_slug(teacher)}-{dump_key[1]}")
                overrides.update({"distill.teacher.load": None, "distill.store": store})
        overrides["train.seed"] = seed
        cfg = self.b._resolve(self.b.base, overrides, where)
        if not cfg.train.eval_interval:
            _fail(where, "train.eval_interval is 0: the sweep compares held-out losses")
        config = _as_dict(cfg)
        config.pop("run_dir")
        digest = config_digest(
            {k: v for k, v in config.items() if k != "train"}
            | {"train": {k: v for k, v in config["train"].items() if k != "seed"}}
        )
        name = f"{_slug(label)}-{digest}-s{seed}"
        if digest in self.by_digest and seed in self.by_digest[digest]:
            return self.by_digest[digest][seed]
        run_dir = os.path.join(self.b.workdir, "runs", f"{_slug(label)}-{digest}", f"seed{seed}")
        cfg.run_dir = run_dir
        job = Job(
            "student",
            name,
            run_dir,
            _as_dict(cfg),
            depends,
            _cost(cfg, teacher_cfg),
            f"{label} seed {seed}",
        )
        self.b.jobs[name] = job
        self.by_digest.setdefault(digest, {})[seed] = name
        if dump_key is not None:
            self.offline.setdefault(dump_key, []).append((name, overrides, cfg))
        return name

    def add_dumps(self) -> None:
        """One dump per (teacher, data): the widest truncation of its users, for the most
        steps; each user depends on it. Dumps come before the students in the job order."""
        from megatron_pd.logits.truncation import TruncationSpec

        students = {n: j for n, j in self.b.jobs.items() if j.kind == "student"}
        for name in students:
            del self.b.jobs[name]
        for (teacher, key), users in self.offline.items():
            specs = [
                TruncationSpec.parse(c.distill.truncation, c.distill.min_k, c.distill.k_cap)
                for _, _, c in users
            ]
            top_k = None if any(s.top_k is None for s in specs) else max(s.top_k for s in specs)
            widest = TruncationSpec(
                max(s.top_p for s in specs),
                top_k,
                max(s.min_k for s in specs),
                max(s.k_cap for s in specs),
            )
            longest = max(users, key=lambda u: u[2].total_steps())
            store = longest[1]["distill.store"]
            info = self.teachers[teacher]
            overrides = {
                **longest[1],
                "distill.store": None,
                "distill.store_steps": None,
                "distill.teacher.load": info["dir"],
                "distill.truncation": widest.name,
                "distill.min_k": widest.min_k,
                "distill.k_cap": widest.k_cap,
                "distill.loss": "forward_kl",
                "run_dir": store,
            }
            cfg = self.b._resolve(self.b.base, overrides, f"dump of teacher {teacher}")
            depends = (["data"] if self.b.data else []) + ([info["job"]] if info["job"] else [])
            teacher_model = info["cfg"].model if "cfg" in info else cfg.model
            tokens = cfg.total_steps() * cfg.train.global_batch_size * cfg.data.seq_length
            cost = _flops(teacher_model, cfg, tokens)
            label = f"dump {teacher} {widest.name}"
            job = Job(
                "dump", f"dump-{_slug(teacher)}-{key}", store, _as_dict(cfg), depends, cost, label
            )
            self.b.jobs[job.name] = job
            for name, _, _ in users:
                students[name].depends.append(job.name)
        self.b.jobs.update(students)


def _flops(model_cfg, cfg, tokens: float) -> float:
    """Forward FLOPs of ``model_cfg`` over ``tokens`` (a dump runs the teacher once)."""
    from megatron_pd.engine.flops import forward_flops_per_token

    vocab = cfg.model.vocab_size or 4096
    return forward_flops_per_token(model_cfg, vocab, cfg.data.seq_length) * tokens
