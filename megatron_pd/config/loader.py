"""Build a typed Config from a YAML file plus command-line overrides, and write it back.

Precedence (lowest first): dataclass defaults, the model preset, the YAML file, then
``--section.field=value`` overrides in command-line order. Override values are parsed as YAML
scalars/lists (``--data.blend='[a, b]'``, ``--train.train_steps=null``). The resolved config is
written as YAML; loading that file alone reproduces the same Config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import typing
from collections.abc import Iterable
from typing import Any

import yaml

from megatron_pd.config.presets import preset_fields
from megatron_pd.config.schema import Config


def parse_overrides(args: Iterable[str]) -> list:
    """Turn ``["--a.b=1", "--c.d", "2"]`` into ``[("a.b", 1), ("c.d", 2)]``."""
    args = list(args)
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(
                f"unexpected argument {arg!r}: overrides look like --section.field=value"
            )
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override --{key} has no value")
            i += 1
            text = args[i]
        pairs.append((key, yaml.safe_load(text) if text != "" else ""))
        i += 1
    return pairs


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _unknown(path: str, key: str, known: list) -> ValueError:
    hint = difflib.get_close_matches(key, known, n=1)
    where = f"{path}.{key}" if path else key
    tip = f" (did you mean {path + '.' if path else ''}{hint[0]}?)" if hint else ""
    return ValueError(f"unknown config field {where}{tip}; known: {', '.join(sorted(known))}")


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, options[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{path}={value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ValueError(f"{path}={value!r}: expected an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={value!r}: expected a number")
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ValueError(f"{path}={value!r}: expected a string")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{path}={value!r}: expected a list")
        (item_type,) = typing.get_args(annotation)
        if item_type is str:  # YAML reads blend weights such as 0.7 as numbers
            value = [v if isinstance(v, str) else str(v) for v in value]
        return [_coerce(f"{path}[{i}]", v, item_type) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, value, path)
    return value


def build_section(cls, raw: Any, path: str = ""):
    """Instantiate dataclass ``cls`` from a nested dict, checking names and types."""
    if raw is None:
        raw = {}
    if dataclasses.is_dataclass(raw):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping of fields, got {raw!r}")
    raw = dict(raw)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    if "preset" in names and raw.get("preset"):
        merged = preset_fields(raw["preset"], cls.__name__)
        for key, value in raw.items():  # a section given alongside a preset refines it
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        raw = merged
    for key in raw:
        if key not in names:
            raise _unknown(path, key, names)
    kwargs = {
        key: _coerce(f"{path}.{key}" if path else key, value, hints[key])
        for key, value in raw.items()
    }
    return cls(**kwargs)


def load_config(path: str | None = None, overrides: Iterable = (), cls=Config):
    """Config from an optional YAML file and override pairs or ``--a.b=v`` strings."""
    tree: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path} does not exist")
        with open(path) as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"config file {path}: top level must be a mapping of sections")
    overrides = list(overrides)
    if overrides and isinstance(overrides[0], str):
        overrides = parse_overrides(overrides)
    for key, value in overrides:
        _set_path(tree, key, value)
    return build_section(cls, tree)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: str) -> None:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def describe_fields(cls=Config, prefix: str = "", instance=None, subject: str = "") -> list:
    """(dotted name, type, default, docstring) of every field, for ``--help-config``.

    A nested section's defaults are those of its parent's default (``distill.tau`` is a
    ScheduleConfig whose defaults are tau's, not the class's), and its fields' docs start
    with what the section is (``subject``: the parent field's doc), so the shared schedule
    fields read as the learning rate's, alpha's or tau's."""
    import ast
    import inspect

    docs: dict = {}
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(klass))
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr):
                if isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                    docs.setdefault(node.target.id, " ".join(after.value.value.split()))
    rows = []
    hints = typing.get_type_hints(cls)
    instance = cls() if instance is None else instance
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        name = prefix + f.name
        if dataclasses.is_dataclass(value):
            what = docs.get(f.name, "").split(". ")[0].rstrip(".")
            rows.extend(describe_fields(type(value), name + ".", value, what))
        else:
            type_name = getattr(hints[f.name], "__name__", str(hints[f.name]))
            doc = docs.get(f.name, "")
            if subject:
                doc = f"[{subject}] {doc}"
            rows.append((name, type_name.replace("typing.", ""), value, doc))
    return rows
