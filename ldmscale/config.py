"""Typed configs: dataclasses that round-trip through JSON, strictly.

- `from_dict(Cls, data)` rejects unknown keys, naming the key and the valid ones;
- `apply_overrides(cfg, ["train.lr=1e-4", ...])` parses each value against the field's type;
- numbers are finite, and a field annotated `Annotated[int, Range(1, 10**6)]` is checked against its range
  whenever a config is built (a `Config` subclass validates itself in __post_init__);
- every problem raises `UserError`, which the CLI prints on one line with exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from ldmscale.errors import UserError
from ldmscale.io import atomic_write_json

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric field: lo <= x <= hi (lo < x with lo_open)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def check(self, value: float, where: str) -> None:
        ok = (self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)) and (
            self.hi is None or value <= self.hi
        )
        if not ok:
            lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
            hi = "" if self.hi is None else f"<= {_num(self.hi)}"
            raise UserError(f"{where} must be {' and '.join(x for x in (lo, hi) if x)}, got {_num(value)}")


def _num(v: float) -> str:
    if float(v).is_integer() and abs(v) < 1e16:
        return f"{int(v):,}"
    return format(v, ".10g")


# the usual ranges
Positive = Annotated[int, Range(1, 10**15)]
NonNegative = Annotated[int, Range(0, 10**15)]
Fraction = Annotated[float, Range(0.0, 1.0)]


def _check_value(tp: Any, value: Any, where: str) -> None:
    """Finite numbers everywhere; ranges where the annotation gives one; into tuples, lists and dicts."""
    ranges = []
    while get_origin(tp) is Annotated:
        ranges += [m for m in tp.__metadata__ if isinstance(m, Range)]
        tp = get_args(tp)[0]
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value}")
        for r in ranges:
            r.check(value, where)
        return
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if arg is not type(None):
                try:
                    _check_value(arg, value, where)
                    return
                except UserError as e:
                    err = e
        raise err
    if isinstance(value, (list, tuple)):
        args = get_args(tp)
        for i, v in enumerate(value):
            inner = args[i] if args and args[-1] is not Ellipsis and i < len(args) else (args[0] if args else Any)
            _check_value(inner, v, f"{where}[{i}]")
    elif isinstance(value, dict):
        args = get_args(tp)
        for k, v in value.items():
            _check_value(args[1] if len(args) == 2 else Any, v, f"{where}.{k}")


def validate(cfg: Any) -> Any:
    """Check every field of a config dataclass against its annotation (finite, in range); returns cfg."""
    hints = get_type_hints(type(cfg), include_extras=True)
    for f in dataclasses.fields(cfg):
        _check_value(hints[f.name], getattr(cfg, f.name), f.name)
    return cfg


class Config:
    """Base of the config dataclasses: a config that is built is valid (see validate)."""

    def __post_init__(self) -> None:
        validate(self)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert a JSON value against a type annotation."""
    origin = get_origin(tp)
    if origin is Annotated:
        value = _coerce(get_args(tp)[0], value, where)
        _check_value(tp, value, where)
        return value
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UserError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table/object, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    raise UserError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type[T], data: Any, where: str | None = None) -> T:
    """Build a dataclass from a dict, strictly: unknown keys and wrong types are UserErrors."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected an object, got {data!r}")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise UserError(f"{where}: {e}") from None


def _parse_text(tp: Any, text: str, where: str) -> Any:
    """Parse a command-line string into a JSON value fitting `tp` (JSON first, bare strings allowed)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if text.lower() in ("none", "null"):
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, _parse_text(arg, text, where), where)
            except UserError:
                continue
        raise UserError(f"{where}: cannot parse {text!r} as {_type_name(tp)}")
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{where}: expected true or false, got {text!r}")
    if tp is str or (origin is Literal and all(isinstance(c, str) for c in get_args(tp))):
        return text
    if origin in (tuple, list) and not text.lstrip().startswith("["):
        inner = get_args(tp)[0] if get_args(tp) else str
        return [_parse_text(inner, t.strip(), where) for t in text.split(",") if t.strip()]
    if tp is float and text.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        raise UserError(f"{where} must be a finite number, got {text.strip()}")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{where}: cannot parse {text!r} as {_type_name(tp)}") from None


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Return a copy of `cfg` with `key=value` (dotted keys for nested configs) applied. Each value is parsed and
    checked against its field's type; the whole config is built (and cross-checked) once, after all of them."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        _set_path(type(cfg), data, key.strip().split("."), text, key.strip())
    return from_dict(type(cfg), data, where=type(cfg).__name__) if overrides else cfg


def _set_path(cls: type, data: dict, parts: list[str], text: str, full: str) -> None:
    if not dataclasses.is_dataclass(cls):
        raise UserError(f"override {full!r}: {'.'.join(parts)} is not a config section")
    names = {f.name for f in dataclasses.fields(cls)}
    head = parts[0]
    if head not in names:
        raise UserError(f"override {full!r}: unknown key {head!r}; valid keys: {', '.join(sorted(names))}")
    hints = get_type_hints(cls, include_extras=True)
    if len(parts) == 1:
        data[head] = to_dict(_coerce(hints[head], _parse_text(hints[head], text, full), full))
    else:
        _set_path(hints[head], data[head], parts[1:], text, full)


def load_json(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return from_dict(cls, data, where=path.name)


def save_json(cfg: Any, path: str | Path, **extra: Any) -> None:
    data = to_dict(cfg)
    data.update(extra)
    atomic_write_json(path, data)


def route_overrides(sections: dict[str, type], items: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """One override list for several configs (a verb's `--set`, a study task's `set`): KEY=VALUE goes to the section
    whose config has KEY; a key two sections share needs its section's name (`train.seed=1`, `task.seed=1`)."""
    out: dict[str, list[str]] = {name: [] for name in sections}
    fields = {name: {f.name for f in dataclasses.fields(cls)} for name, cls in sections.items()}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        section, _, rest = key.partition(".")
        if not eq:
            raise UserError(f"override {item!r} is not of the form KEY=VALUE")
        if section in sections and rest:
            out[section].append(f"{rest}={value}")
            continue
        owners = [name for name in sections if key in fields[name]]
        if len(owners) == 1:
            out[owners[0]].append(item.strip())
        elif owners:
            raise UserError(
                f"override {item!r}: {key!r} is a field of "
                + " and ".join(owners)
                + "; name one: "
                + " or ".join(f"{o}.{key}=..." for o in owners)
            )
        else:
            known = "; ".join(f"{name}: {', '.join(sorted(fields[name]))}" for name in sections)
            raise UserError(f"override {item!r}: unknown key {key!r} ({known})")
    return out


__all__ = [
    "Config",
    "Fraction",
    "NonNegative",
    "Positive",
    "Range",
    "UserError",
    "apply_overrides",
    "from_dict",
    "load_json",
    "route_overrides",
    "save_json",
    "to_dict",
    "validate",
]
