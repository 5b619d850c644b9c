"""Plain data (parsed YAML) <-> the schema's dataclasses, with errors that name the key path.

Every value passes through `_coerce`, which checks it against the field's type hint; an unknown
key or name is answered with the nearest valid one. Errors are `_Invalid("train.lr", "...")`;
the loader prefixes the file and turns them into one-line ConfigErrors.

Why not pydantic, OmegaConf or jsonargparse: the messages are the interface here (tests assert
them) and none of the three gives them. Pydantic reports several lines per error
("1 validation error for TrainConfig / lr / Input should be a valid number ... [type=...]"),
never a nearest valid key, and coerces "1" to 1 unless strict; OmegaConf loses YAML line numbers,
adds `full_key:`/`object_type=` lines, and refuses `Literal` fields up to 2.3 (hydra#1332;
support merged in omegaconf#1272); jsonargparse targets command lines. Each would be a new
dependency standing in for ~150 lines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from factmem.data import get_source
from factmem.errors import ConfigError, quote


class _Invalid(ValueError):
    def __init__(self, path: str, msg: str):
        super().__init__(f"{path}: {msg}" if path else msg)


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _unknown_key(path: str, key: str, valid: list[str]) -> _Invalid:
    near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return _Invalid(_join(path, key), f"unknown key; {hint}valid keys: {', '.join(valid)}")


def _unknown_ref(path: str, name: str, valid: list[str], what: str) -> _Invalid:
    """A name that should refer to something (a set, a stage, a variant) and does not."""
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return _Invalid(path, f"no {what} named {name!r}{hint}; valid: {', '.join(valid) or 'none'}")


def _own_keys(cls: type) -> tuple[str, ...]:
    """The keys a section takes itself; `params` are the source's, written flat beside them."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "params")


def _as_list(value: Any, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(path, f"expected a list, got {quote(value)}")
    return value


# --------------------------------------------------------------------------------------------
# One value against one type hint


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, path)
    if origin is Literal:
        return _coerce_literal(value, tp, path)
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if origin in (list, tuple, dict):
        return _coerce_container(value, tp, path)
    return _coerce_scalar(value, tp, path)


def _coerce_union(value: Any, tp: Any, path: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, path)
        except _Invalid as e:
            errors.append(e)
    if len(errors) == 1:  # `X | None`: the error about X says more than "expected X or null"
        raise errors[0]
    raise _Invalid(path, f"expected {_type_name(tp)}, got {quote(value)}")


def _coerce_literal(value: Any, tp: Any, path: str) -> Any:
    allowed = typing.get_args(tp)
    if value not in allowed:
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise _Invalid(path, f"{quote(value)} is not one of {', '.join(map(repr, allowed))}{hint}")
    return value


def _coerce_container(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(path, f"expected a list, got {quote(value)}")
        (item,) = args
        return [_coerce(v, item, _join(path, i)) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _Invalid(path, f"expected a list of {len(args)} values, got {quote(value)}")
        return tuple(_coerce(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))
    if not isinstance(value, dict):
        raise _Invalid(path, f"expected a mapping, got {quote(value)}")
    _, vt = args
    return {str(k): _coerce(v, vt, _join(path, k)) for k, v in value.items()}


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(path, f"expected true/false, got {quote(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"expected an integer, got {quote(value)}")
        return value
    if tp is float:
        return _coerce_float(value, path)
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(path, f"expected a string, got {quote(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in factmem, not input


def _coerce_float(value: Any, path: str) -> float:
    if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(path, f"expected a number, got {quote(value)}")
    if not math.isfinite(value):  # `.nan`, `.inf`, `1e999`: no setting means anything there
        raise _Invalid(path, f"must be a finite number, got {quote(value)}")
    return float(value)


# --------------------------------------------------------------------------------------------
# A mapping into a dataclass


def parse(cls: type, data: Any, path: str = "", extra_ok: bool = False) -> Any:
    """Build dataclass `cls` from a mapping, checking keys, types and the class's own checks."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise _Invalid(path, f"expected a mapping, got {quote(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "params"}
    if not extra_ok:
        for key in data:
            if key not in fields:
                raise _unknown_key(path, key, list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(path, f"missing required key {name!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, _Invalid):
            raise
        msg = str(e)
        head, _, rest = msg.partition(": ")
        if head in fields and rest:  # "lr: must be > 0" -> "train.lr: must be > 0"
            raise _Invalid(_join(path, head), rest) from None
        raise _Invalid(path, msg) from None


def _parse_with_source_params(cls: type, data: Any, path: str,
                              common: tuple[str, ...] | None = None) -> Any:
    """Sets and mix components: common keys (default: all of `cls`'s own) plus the named
    source's own parameters, flat."""
    if common is None:
        common = _own_keys(cls)
    if not isinstance(data, dict):
        raise _Invalid(path, f"expected a mapping with a `source` key, got {quote(data)}")
    if "source" not in data:
        raise _Invalid(path, "missing required key 'source'")
    try:
        spec = get_source(str(data["source"]))
    except ConfigError as e:
        raise _Invalid(_join(path, "source"), str(e)) from None
    own = {k: v for k, v in data.items() if k not in common}
    param_keys = [f.name for f in dataclasses.fields(spec.params)]
    for key in own:
        if key not in param_keys:
            raise _unknown_key(path, key, [*common, *param_keys])
    obj = parse(cls, {k: v for k, v in data.items() if k in common}, path)
    obj.params = parse(spec.params, own, path)
    return obj


def to_dict(obj: Any) -> Any:
    """Resolved config -> plain data (sets and mix components written flat, as in YAML)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name == "params":
                out.update(to_dict(value) if value is not None else {})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
