"""YAML into typed dataclasses: the loading machinery under clipit/config.py (the schema).

Reading a YAML file as one error line, `--set key=value` overrides, coercion of every value to its
field's type (dataclasses, Optional/Union, Literal, list, dict, finite floats), the valid ranges written
on a field's type (`Annotated[int, Range(ge=1)]`, `Items(...)`, `OneOf(...)`: checked here, listed in docs/config.md)
and `${VAR}` expansion in path values. Knows nothing of clipit's sections.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from clipit.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a number; float keys are also finite (NaN and inf are never valid settings)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def text(self) -> str:
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1] if high else "any"


@dataclass(frozen=True)
class Items:
    """Constraints on a list: at least `min` items (at most `max`), and no repeats when `unique`."""

    min: int = 0
    unique: bool = False
    max: int | None = None

    def text(self) -> str:
        if self.max is not None and self.max == self.min:
            size = [f"exactly {self.min} items"]
        else:
            size = ["non-empty"] if self.min == 1 else [f">= {self.min} items"] if self.min else []
            size += [f"<= {self.max} items"] if self.max is not None else []
        return ", ".join(size + (["no repeats"] if self.unique else []))


@dataclass(frozen=True)
class OneOf:
    """A name from a registry that may grow after import (`names` is asked at each check)."""

    names: Callable[[], Iterable[str]]
    what: str = ""  # where the names are registered, for the reference

    def text(self) -> str:
        listed = ", ".join(f"`{n}`" for n in self.names())
        return f"one of {listed}" + (f" ({self.what})" if self.what else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def rules_of(tp) -> tuple:
    """The Range/Items rules written on a (possibly optional) field type."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return tuple(r for a in typing.get_args(tp) for r in rules_of(a))
    if typing.get_origin(tp) is Annotated:
        return tuple(a for a in typing.get_args(tp)[1:] if isinstance(a, (Range, Items, OneOf)))
    return ()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_path(value: str, key: str, where: str, config_dir: Path | None = None) -> str:
    """`value` with ${VAR} from the environment (${CONFIG_DIR}: the config file's folder) and ~ expanded;
    an unset variable is a ConfigError naming the key."""

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name == "CONFIG_DIR" and config_dir is not None:
            return str(config_dir)
        if name not in os.environ:
            raise ConfigError(
                f"{where}: {key} = {value!r} uses ${{{name}}}, which is not set; export {name}=... "
                "before the command (or write the path out)"
            )
        return os.environ[name]

    # $NAME or an unclosed ${ in what was written (not in a variable's value, which may hold a `$`) would
    # become a literal folder
    if re.search(r"\$[A-Za-z_{]", _VAR.sub("", value)):
        raise ConfigError(f"{where}: {key} = {value!r}: write environment variables as ${{NAME}}")
    out = _VAR.sub(sub, value)
    expanded = os.path.expanduser(out)
    if expanded.startswith("~"):  # ~name of a user this machine does not know: expanduser leaves it as it is
        user = expanded[1:].split("/", 1)[0]
        raise ConfigError(
            f"{where}: {key} = {value!r}: there is no user {user!r} here for ~{user}; write the path out "
            "(or ~/... for your own home)"
        )
    return expanded


def read_yaml(path: Path, what: str):
    """Parsed YAML of `path`; a missing, unreadable or malformed file is one ConfigError line naming it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: {what} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or type(err).__name__})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None


def apply_override(raw: dict, item: str, path: Path | str = "<overrides>") -> None:
    key, sep, value = item.partition("=")
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"{path}: override {item!r} must look like section.key=value")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{path}: override --set {item!r}: the value is not valid YAML ({problem}); write it as "
            "YAML, e.g. --set 'seeds=[0, 1]', and quote text that holds : [ ] { } or #"
        ) from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: override {key!r} goes through a non-mapping value")
    node[parts[-1]] = parsed


def from_dict(cls: type, data: Any, where: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key {_join(prefix, unknown[0])!r}; valid keys here: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, where, _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _float(value, where: str, key: str, valid: str = "") -> float:
    """A float key's value: a YAML number, or text that reads as one (YAML 1.1 reads `1e-3` as a string);
    never NaN or inf. `valid` is the key's range, for the message."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{where}: {key} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(number):
        raise ConfigError(f"{where}: {key} = {value!r} must be a finite number{' ' + valid if valid else ''}")
    return number


def _coerce(tp, value, where: str, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        if args[0] is float:
            out = _float(value, where, key, " and ".join(r.text() for r in args[1:] if isinstance(r, Range)))
        else:
            out = _coerce(args[0], value, where, key)
        for rule in args[1:]:
            if isinstance(rule, Range) and not rule.holds(out):
                raise ConfigError(f"{where}: {key} = {out!r} is out of range; it must be {rule.text()}")
            if isinstance(rule, Items) and len(out) < rule.min:
                raise ConfigError(
                    f"{where}: {key} = {out!r} must not be empty"
                    if rule.min == 1
                    else f"{where}: {key} = {out!r} must have at least {rule.min} items"
                )
            if isinstance(rule, Items) and rule.max is not None and len(out) > rule.max:
                raise ConfigError(f"{where}: {key} = {out!r} must have at most {rule.max} items")
            if isinstance(rule, Items) and rule.unique and len(set(out)) != len(out):
                raise ConfigError(f"{where}: {key} = {out!r} repeats an item; list each once")
            if isinstance(rule, OneOf) and out not in (names := list(rule.names())):
                raise ConfigError(f"{where}: {key} = {out!r} is not one of {names}")
        return out
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else ConfigError(f"{where}: {key} = {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key)
    if tp is float:
        return _float(value, where, key)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where}: {key} must be {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")
