"""Typed configs: dataclasses loaded from YAML (or dicts) that reject unknown keys and wrong types.

``load_config(PretrainConfig, "configs/pretrain.yaml", overrides=["train.epochs=3"])`` returns a frozen
dataclass; every problem is a :class:`~equiray.errors.ConfigError` whose message names the key (with its dotted
path) and what would be accepted.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from equiray.errors import ConfigError

T = TypeVar("T")

__all__ = ["load_config", "from_dict", "to_dict", "flatten", "apply_overrides"]


def load_config(cls: type[T], source: str | os.PathLike | Mapping | None = None, *,
                overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from a YAML file (or a mapping, or its defaults when ``source`` is None), then apply
    ``key.sub=value`` overrides (values parsed as YAML)."""
    import yaml

    if source is None:
        raw: dict = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, "
                              f"got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    return from_dict(cls, raw)


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict (copy); values are parsed as YAML scalars/lists."""
    import copy

    import yaml

    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.epochs=3)")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], *, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` recursively, checking keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {_join(path, key)!r}{hint}; "
                          f"known keys{' of ' + path if path else ''}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    data = {name: _with_section_default(fields[name], value) for name, value in data.items()}
    kwargs = {name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path or cls.__name__}: {exc}") from None


def _with_section_default(f: dataclasses.Field, value: Any) -> Any:
    """A partial section fills its gaps from the parent's default for that section, not from the section class's
    own defaults: ``DistillConfig.tracking`` defaults to ``registered_model="equiray-student"``, so
    ``tracking: {experiment: x}`` must keep that name rather than fall back to ``TrackingConfig``'s."""
    default = f.default
    return _merge(default, value) if isinstance(value, Mapping) and _is_instance(default) else value


def _is_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _merge(default: Any, over: Mapping) -> dict:
    """``default`` (a dataclass instance) as a dict, with ``over`` on top; sections merge, plain values (and
    plain dicts such as model kwargs) are replaced."""
    out = {f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}
    for k, v in over.items():
        sub = out.get(k)
        out[k] = _merge(sub, v) if isinstance(v, Mapping) and _is_instance(sub) else v
    return {k: to_dict(v) for k, v in out.items()}


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; for MLflow params, which are flat."""
    data = to_dict(data)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return from_dict(tp, value, path=path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(m.value) for m in tp)}") from None
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value
