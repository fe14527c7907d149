"""Load typed dataclasses from YAML with errors that name the file and the key.

Supported field types: bool, int, float, str, pathlib.Path, Literal[...], Optional[T] / T | None,
list[T], tuple[T, ...], dict[str, T] and nested dataclasses. Ints are accepted where floats are
expected; bools are never accepted as numbers (YAML's ``yes`` must not become 1).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A parameter file could not be turned into its typed config."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing file or a non-mapping document."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file}: parameter file not found")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path, section: str | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from the YAML file at ``path`` (optionally from one top-level ``section``).

    ``overrides`` are ``key.path=value`` strings (the command line's ``--set``) applied to the file's
    mapping before it is typed, so an override is parsed (YAML) and validated exactly like the file."""
    data: Any = load_yaml(path)
    where = str(path)
    if section is not None:
        if section not in data:
            raise ConfigError(f"{where}: missing section '{section}'")
        data = data[section]
        where = f"{where}:{section}"
    if overrides:
        data = apply_overrides(data if isinstance(data, Mapping) else {}, overrides, where)
        where = f"{where} with --set {' '.join(overrides)}"
    return from_mapping(cls, data, where)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"objective.optim.base_lr=0.002"`` -> (["objective", "optim", "base_lr"], 0.002); the value is YAML."""
    key, sep, raw = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. objective.optim.base_lr=0.002")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from exc
    return keys, value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], where: str = "<params>") -> dict[str, Any]:
    """A deep copy of ``data`` with every override set (later ones win); intermediate mappings are created."""
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        keys, value = parse_override(item)
        node: Any = out
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{where}: --set {item!r}: '{'.'.join(keys[:depth + 1])}' is a value, "
                                  "not a section")
            node = child
        node[keys[-1]] = value
    return out


def from_mapping(cls: type[T], data: Any, where: str = "<params>") -> T:
    """Validate ``data`` against dataclass ``cls``; ``where`` prefixes every error message."""
    return typing.cast(T, _convert(cls, data, where, ""))


def to_mapping(config: Any) -> Any:
    """The inverse of :func:`from_mapping`: plain dicts, lists and scalars (paths become strings)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_mapping(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_mapping(item) for item in config]
    if isinstance(config, dict):
        return {str(k): to_mapping(v) for k, v in config.items()}
    if isinstance(config, Path):
        return str(config)
    return config


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to scalar values, for logging params to MLflow (``pretrain.optim.lr``)."""
    plain = to_mapping(config)
    out: dict[str, Any] = {}
    if isinstance(plain, dict):
        for key, value in plain.items():
            out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, (dict,)) else
                       {f"{prefix}{key}": value})
        return out
    return {prefix.rstrip("."): plain}


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    label = f"{where}: key '{key}'" if key else where
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(tp, value, where, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{label}: expected {_describe(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{label}: expected one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        items = [_convert(item_type, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{label}: expected a mapping, got {type(value).__name__} {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _convert(value_type, v, where, f"{key}.{k}" if key else str(k))
                for k, v in value.items()}
    return _convert_scalar(tp, value, label)


def _convert_scalar(tp: Any, value: Any, label: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the float it means.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str):
            return Path(value)
    else:
        raise ConfigError(f"{label}: unsupported field type {_describe(tp)}")
    raise ConfigError(f"{label}: expected {_describe(tp)}, got {type(value).__name__} {value!r}")


def _convert_dataclass(cls: type, value: Any, where: str, key: str) -> Any:
    label = f"{where}: key '{key}'" if key else where
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label}: expected a mapping for {cls.__name__}, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    moved = getattr(cls, "__moved_keys__", {})
    for name in unknown:  # a key an older params layout had here: say where it lives now
        if name in moved:
            old = f"{key}.{name}" if key else name
            raise ConfigError(f"{where}: key '{old}' has moved to '{moved[name]}' (same value; see the "
                              "configuration docs)")
    if unknown:
        name = f"{key}.{unknown[0]}" if key else str(unknown[0])
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{where}: unknown key '{name}' (known keys here: {known})")
    kwargs = {}
    for name, field in fields.items():
        child = f"{key}.{name}" if key else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], where, child)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{child}'")
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from exc
    return instance
