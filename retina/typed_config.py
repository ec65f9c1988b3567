"""Typed configuration: YAML files and ``--set section.key=value`` overrides merged onto dataclasses, every key
checked against its field's type. The one loader every layer uses; it knows no section.

An unknown key or a value of the wrong type is a ``ConfigError`` naming the dotted key, raised before anything
expensive starts. A config class may define ``check()``: the loader calls it on the top-level object once it is
built, and a composed config's ``check()`` calls its sections' own, so the range rules of a section live with the
section (the layer that reads it declares it: `retina.config.ModelConfig`, `pipelines.data.settings.DataConfig`,
`pipelines.training.settings`, `pipelines.tracking.settings`, `tuning.config`).

    cfg = load_config("configs/demo.yaml", ["train.max_steps=100"], cls=pipelines.config.Config)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

# Exponent floats (1e-4, 2.5E3): PyYAML follows YAML 1.1 and reads them as strings unless they hold a dot.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or out of range; the message names the dotted key."""


def require(ok: bool, key: str, message: str) -> None:
    """The one form of a range rule: ConfigError('<dotted key>: <message>') unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_union(value: Any, tp: Any, key: str) -> Any:
    # The first member that accepts the value wins; the error names the whole union, not one member.
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _check_type(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {tp}, got {value!r}")


def _check_list(value: Any, tp: Any, key: str) -> list[Any]:
    (item_tp,) = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return [_check_type(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _check_dict(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    key_tp, value_tp = typing.get_args(tp) or (Any, Any)
    return {_check_type(k, key_tp, key): _check_type(v, value_tp, f"{key}.{k}") for k, v in value.items()}


def _check_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    return value


def _check_int(value: Any, key: str) -> int:
    # bool is an int subclass, but `true` for a count is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return value


def _check_float(value: Any, key: str) -> float:
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-4 as a string; YAML 1.2 and users read a number
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    return float(value)


def _check_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


# Matched by identity (`tp is bool`), in this order, like the field annotations they check.
_SCALAR_CHECKS: tuple[tuple[type, Any], ...] = (
    (bool, _check_bool),
    (int, _check_int),
    (float, _check_float),
    (str, _check_str),
)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Return `value` coerced to `tp` (int → float allowed), or raise ConfigError naming `key`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(value, tp, key)
    if origin is list:
        return _check_list(value, tp, key)
    if origin is dict:
        return _check_dict(value, tp, key)
    for scalar, check in _SCALAR_CHECKS:
        if tp is scalar:
            return check(value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _from_dict(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _check_type(value, hints[name], key)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def config_from_dict(data: dict[str, Any], overrides: Sequence[str] = (), *, cls: type) -> Any:
    """Build a typed config of class `cls` from a plain mapping plus dotted overrides; run its ``check()``."""
    merged = dict(data or {})
    for text in overrides:
        path, value = parse_override(text)
        merged = _merge(merged, _nest(path, value))
    cfg = _from_dict(cls, merged)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping; ConfigError naming the file when it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return data


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *, cls: type) -> Any:
    """Load a YAML config file (or the defaults when `path` is None) as `cls` and apply overrides."""
    data = read_yaml(path) if path is not None else {}
    try:
        return config_from_dict(data, overrides, cls=cls)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested sections to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def load_section(path: str | Path, section: str, overrides: Sequence[str] = (), *, cls: type) -> Any:
    """One section of a config file as `cls`, checked (e.g. the model section of a run config, for code that builds
    a model without Ray or MLflow). `overrides` are dotted keys inside the section (``head.prior=0.5``); errors
    name ``<section>.<key>`` and the file."""
    merged = dict(read_yaml(path).get(section) or {})
    try:
        for text in overrides:
            key, value = parse_override(text)
            merged = _merge(merged, _nest(key, value))
        cfg = _from_dict(cls, merged, section)
        if hasattr(cfg, "check"):
            cfg.check()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg
