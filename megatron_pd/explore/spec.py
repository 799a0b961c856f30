"""A sweep spec (YAML) turned into a plan: the jobs to run and the variants to compare.

    name: study                  # workdir defaults to runs/explore/<name>
    base: ../configs/quickstart_pd.yaml   # a megatron_pd.train config (relative to the spec)
    set: {train.train_steps: 150}         # overrides of every student run
    data: {stdlib: true, vocab_size: 4096}  # or {input: DIR, pattern: "*.txt"}; or none:
                                          # then base/set give data.tokenizer_model and blend
    nproc: 2                     # ranks per run (torchrun --nproc_per_node)
    seeds: [1, 2]                # train.seed of every student run
    teachers:                    # trained by the sweep (config + set), or given (load:)
      small: {config: ../configs/quickstart_teacher.yaml, record: top-0.95-100}
      hub: {load: /models/glm-4-9b-hf}
    defaults: {teacher: small, source: offline, distill.truncation: top-0.95-100}
    axes:
      tau: {distill.tau.value: [0.5, 1, 2, 5]}        # a grid: one line per axis
      loss:                                           # explicit variants
        NLL: {distill.loss: soft_ce}
        KLD: {distill.loss: forward_kl}
    baselines: {lm_wsd: {lr_schedule.style: wsd}}     # named LM-only runs (optional)
    claims: [...]                # directional claims for the findings report (results.py)
    quick: {axes: [tau], seeds: [1], set: {train.train_steps: 40}}

Variant keys are config fields (dotted; a nested mapping sets several) plus: ``teacher`` (a
name in teachers), ``source`` (live: the teacher runs beside the student; offline: a store
dumped from it; recorded: the logits it recorded during its own pre-training, with
``window: [first, last]`` teacher steps), ``student`` (model.preset), ``baseline`` (auto: the
same run with distillation off - learning rate, model and data as the variant's; a name in
baselines; or none). Runs are deduplicated by their resolved config, so a point shared by
several axes trains once. Offline variants of one teacher share one dump: the widest
truncation they need (each student cuts its own narrower one from it), sized to the longest
of them. Every error names the axis and variant and comes before any job starts.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field

import yaml

SPECIAL = ("teacher", "source", "window", "student", "baseline")
SOURCES = ("live", "offline", "recorded")
TOP = ("name", "workdir", "base", "set", "data", "nproc", "seeds", "teachers", "defaults")
TOP += ("axes", "baselines", "claims", "quick", "torchrun")


@dataclass
class Job:
    """One command of a sweep: data preparation, a teacher run, a dump or a student run."""

    kind: str  # data, teacher, dump, student
    name: str
    out_dir: str
    config: dict | None  # the resolved megatron_pd Config as a dict (None for data)
    depends: list = field(default_factory=list)
    cost: float = 0.0  # relative compute (FLOPs) for the ETA
    label: str = ""


@dataclass
class Variant:
    """One point of one axis: its student runs (by seed) and their baselines."""

    axis: str
    name: str
    overrides: dict
    runs: dict  # seed -> job name
    baseline: dict  # seed -> job name (empty: no baseline)
    teacher: str | None


@dataclass
class Plan:
    name: str
    workdir: str
    nproc: int
    seeds: list
    jobs: dict  # name -> Job, in dependency order
    axes: dict  # axis -> [Variant]
    claims: list
    teachers: dict  # name -> {"job": job name or None, "dir": run dir or load path}
    data: dict | None
    spec_path: str
    quick: bool
    torchrun: list = field(default_factory=list)


def flatten(mapping: dict, prefix: str = "") -> dict:
    """{"a.b": 1} from {"a": {"b": 1}} (dotted keys pass through; special keys kept)."""
    out = {}
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and key not in ("window",):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _fail(where: str, message: str):
    raise ValueError(f"{where}: {message}")


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"sweep spec {path} does not exist")
    with open(path) as f:
        try:
            spec = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"sweep spec {path} is not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"sweep spec {path}: the top level must be a mapping")
    unknown = sorted(set(spec) - set(TOP))
    if unknown:
        raise ValueError(f"sweep spec {path}: unknown key(s) {unknown}; known: {', '.join(TOP)}")
    return spec


def _path(spec_dir: str, value: str | None) -> str | None:
    if value is None:
        return None
    value = os.path.expanduser(str(value))
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(spec_dir, value))


def variants_of(axis: str, entry) -> list:
    """[(variant name, overrides)] of one axis: a grid (every key maps to a list: their
    product) or explicit variants (every key maps to a mapping)."""
    if not isinstance(entry, dict) or not entry:
        _fail(f"axis {axis}", "must map fields to value lists, or names to override mappings")
    values = list(entry.values())
    if all(isinstance(v, list) for v in values):
        out = [("", {})]
        for key, options in entry.items():
            if not options:
                _fail(f"axis {axis}", f"{key} has no values")
            out = [
                (f"{name},{_shown(value)}" if name else _shown(value), {**o, key: value})
                for name, o in out
                for value in options
            ]
        return out
    if all(isinstance(v, dict) for v in values):
        return [(str(name), flatten(o)) for name, o in entry.items()]
    _fail(f"axis {axis}", "mixes value lists and variant mappings; use one form per axis")


def _shown(value) -> str:
    """A grid value as a variant name, spelled as YAML spells it (true, null, 0.5)."""
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).splitlines()[0]
    return str(value)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def config_digest(config: dict) -> str:
    """8 hex digits naming a resolved config (a dict of sections) by the values in which it
    differs from megatron_pd's defaults: a newer version that adds fields with defaults names
    the same runs the same, so --collect and resumed sweeps still find them. A changed default
    changes the names of the runs it changes."""
    return _digest(_changed(config, _default_config()))


@functools.lru_cache(maxsize=1)
def _default_config() -> dict:
    from megatron_pd.config.loader import config_to_dict, load_config

    return config_to_dict(load_config(None, []))


def _changed(value, default):
    """The parts of ``value`` that differ from ``default`` (dicts compared key by key)."""
    if not (isinstance(value, dict) and isinstance(default, dict)):
        return value
    return {
        key: _changed(item, default[key]) if key in default else item
        for key, item in value.items()
        if key not in default or item != default[key]
    }


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return keep.strip("-")[:48] or "run"


class _Builder:
    """Resolves configs and collects jobs (see build_plan)."""

    def __init__(self, spec: dict, spec_path: str, quick: bool):
        from megatron_pd.config.loader import load_config

        self.load_config = load_config
        self.spec, self.quick = spec, quick
        self.spec_dir = os.path.dirname(os.path.abspath(spec_path))
        self.quick_spec = spec.get("quick") or {}
        self.name = str(spec.get("name") or os.path.splitext(os.path.basename(spec_path))[0])
        default_dir = os.path.join("runs", "explore", self.name + ("_quick" if quick else ""))
        self.workdir = os.path.abspath(_path(self.spec_dir, spec.get("workdir")) or default_dir)
        if quick and spec.get("workdir"):
            self.workdir += "_quick"
        self.base = _path(self.spec_dir, spec.get("base"))
        self.jobs: dict = {}
        self.data = self._data()

    # -------------------------------------------------------------- common pieces
    def _data(self) -> dict | None:
        data = self.spec.get("data")
        if data is None:
            return None
        if not isinstance(data, dict):
            _fail("data", "must be a mapping (stdlib: true, or input: DIR)")
        known = {"stdlib", "input", "pattern", "json_key", "vocab_size", "tokenizer"}
        unknown = sorted(set(data) - known)
        if unknown:
            _fail("data", f"unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
        if not data.get("stdlib") and not data.get("input"):
            _fail("data", "give stdlib: true or input: a corpus directory or file")
        root = os.path.join(self.workdir, "data")
        tokenizer = _path(self.spec_dir, data.get("tokenizer")) or os.path.join(root, "tokenizer")
        out = {
            "stdlib": bool(data.get("stdlib")),
            "input": _path(self.spec_dir, data.get("input")),
            "pattern": data.get("pattern", "*"),
            "json_key": data.get("json_key", "text"),
            "vocab_size": int(data.get("vocab_size", 4096)),
            "tokenizer": tokenizer,
            "train_tokenizer": data.get("tokenizer") is None,
            "prefix": os.path.join(root, "corpus_text_document"),
            "cache": os.path.join(root, "cache"),
        }
        self.jobs["data"] = Job("data", "data", root, None, [], 1.0, "data")
        return out

    def _data_overrides(self) -> dict:
        if self.data is None:
            return {}
        return {
            "data.tokenizer_model": self.data["tokenizer"],
            "data.blend": [self.data["prefix"]],
            "data.cache_dir": self.data["cache"],
        }

    def _set(self, section: dict | None, where: str) -> dict:
        if section is None:
            return {}
        if not isinstance(section, dict):
            _fail(where, "must be a mapping of config fields to values")
        return flatten(section)

    def _resolve(self, base: str | None, overrides: dict, where: str):
        """The Config of ``base`` + overrides; ValueError names ``where``."""
        pairs = [(k, v) for k, v in overrides.items() if k not in SPECIAL]
        try:
            return self.load_config(base, pairs)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    # -------------------------------------------------------------- teachers
    def teachers(self) -> dict:
        out = {}
        raw = self.spec.get("teachers") or {}
        if not isinstance(raw, dict):
            _fail("teachers", "must map names to {config: ..., set: ...} or {load: ...}")
        quick_sets = (self.quick_spec.get("teachers") or {}) if self.quick else {}
        for name, entry in raw.items():
            where = f"teacher {name}"
            if not isinstance(entry, dict):
                _fail(where, "must be a mapping")
            unknown = sorted(set(entry) - {"config", "set", "load", "record"})
            if unknown:
                _fail(where, f"unknown key(s) {unknown}; known: config, set, load, record")
            if entry.get("load"):
                out[name] = {
                    "job": None,
                    "dir": _path(self.spec_dir, entry["load"]),
                    "record": None,
                }
                continue
            config = _path(self.spec_dir, entry.get("config"))
            if config is None:
                _fail(where, "needs config: (a teacher training config) or load: (a model)")
            overrides = {**self._set(entry.get("set"), f"{where}.set")}
            overrides.update(self._set((quick_sets.get(name) or {}).get("set"), where))
            overrides.update(self._data_overrides())
            run_dir = os.path.join(self.workdir, "teachers", _slug(name))
            overrides["run_dir"] = run_dir
            record = entry.get("record")
            if record:
                overrides["train.record_logits"] = os.path.join(run_dir, "recorded_logits")
                overrides["train.record_truncation"] = record
            cfg = self._resolve(config, overrides, where)
            if not cfg.train.eval_interval:
                _fail(where, "train.eval_interval is 0: the sweep needs its held-out loss")
            job = Job("teacher", f"teacher-{_slug(name)}", run_dir, _as_dict(cfg), [], 0.0, name)
            job.depends = ["data"] if self.data else []
            job.cost = _cost(cfg, None, train=True)
            self.jobs[job.name] = job
            out[name] = {"job": job.name, "dir": run_dir, "record": record, "cfg": cfg}
        return out


def _as_dict(cfg) -> dict:
    from megatron_pd.config.loader import config_to_dict

    return config_to_dict(cfg)


def _cost(cfg, teacher_cfg, train: bool = True, tokens: float | None = None) -> float:
    """FLOPs of a run: training (3x forward) of the model, plus a live teacher's forward."""
    from megatron_pd.engine.flops import forward_flops_per_token

    vocab = cfg.model.vocab_size or 4096
    seq = cfg.data.seq_length
    tokens = tokens if tokens is not None else cfg.total_steps() * cfg.train.global_batch_size * seq
    per_token = forward_flops_per_token(cfg.model, vocab, seq) * (3.0 if train else 1.0)
    if teacher_cfg is not None:
        per_token += forward_flops_per_token(teacher_cfg, vocab, seq)
    return per_token * tokens


def load_spec(path: str) -> dict:
    return _load_yaml(path)


def build_plan(spec_path: str, quick: bool = False, changes: dict | None = None) -> Plan:
    """Every job and variant of a spec, each config resolved and validated (no job runs).

    ``changes``: top-level keys replaced (the command line's --data and --workdir): another
    corpus keeps the spec's vocab_size and gets its own tokenizer and default workdir."""
    from megatron_pd.explore.plan_students import add_students

    spec = _load_yaml(spec_path)
    changes = dict(changes or {})
    if "data" in changes:
        data = {k: v for k, v in (spec.get("data") or {}).items() if k == "vocab_size"}
        spec["data"] = {**data, **changes.pop("data")}
        if "workdir" not in changes and "workdir" not in spec:  # another corpus, elsewhere
            corpus = os.path.basename(os.path.normpath(spec["data"]["input"]))
            base_name = spec.get("name") or os.path.splitext(os.path.basename(spec_path))[0]
            spec["name"] = f"{base_name}_{_slug(corpus)}"
    spec.update(changes)
    builder = _Builder(spec, spec_path, quick)
    teachers = builder.teachers()
    seeds = spec.get("seeds", [1])
    if quick and "seeds" in builder.quick_spec:
        seeds = builder.quick_spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        _fail("seeds", f"{seeds!r} must be a non-empty list of integers")
    axes = add_students(builder, spec, teachers, seeds)
    used = {d for job in builder.jobs.values() for d in job.depends}
    for name, info in list(teachers.items()):  # a teacher no chosen variant uses is not trained
        if info["job"] and info["job"] not in used:
            del builder.jobs[info["job"]]
            del teachers[name]
    nproc = int(spec.get("nproc", 2))
    if nproc < 1:
        _fail("nproc", f"{nproc} must be >= 1")
    claims = spec.get("claims") or []
    if not isinstance(claims, list):
        _fail("claims", "must be a list")
    from megatron_pd.explore.results import check_claims

    all_axes = {a: [n for n, _ in variants_of(a, e)] for a, e in (spec.get("axes") or {}).items()}
    check_claims(claims, all_axes)
    return Plan(
        name=builder.name,
        workdir=builder.workdir,
        nproc=nproc,
        seeds=seeds,
        jobs=builder.jobs,
        axes=axes,
        claims=copy.deepcopy(claims),
        teachers={k: {"job": v["job"], "dir": v["dir"]} for k, v in teachers.items()},
        data=builder.data,
        spec_path=os.path.abspath(spec_path),
        quick=quick,
        torchrun=list(spec.get("torchrun") or []),
    )
