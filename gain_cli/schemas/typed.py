"""Typed, documented config sections: dataclasses whose fields carry their default, help and checks.

A section is a ``@section("train")`` dataclass of ``setting(...)`` fields::

    @section("train")
    class TrainConfig(Section):
        steps: int = setting(40, "optimiser steps per stage", check=at_least(1))

``TrainConfig.of(node)`` reads a mapping (a plain dict, an OmegaConf node, or an instance, returned as it is):
unknown keys, values of the wrong type and values out of range are one line naming the dotted key, the value and
what is valid (``train.steps must be an integer, got 'ten'``); missing keys take their defaults; ``__post_init__``
adds the checks that involve several fields. ``to_dict()`` is the inverse (YAML names, nested sections as dicts),
``describe()`` the rows ``gain info`` prints. A field whose YAML name is not a Python name (``lambda``) names it
with ``key=``.

Why not OmegaConf's structured configs: their fields must be Python identifiers (the penalty strength is
``lambda`` in every config, recipe and saved run) and their type errors are not one line naming the valid values.
Composition stays Hydra's: the sections' defaults are ConfigStore entries the composition starts from
(``gain_cli.config``), and the composed config is read through the sections right after it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from gain_cli.errors import GainError, unknown_choice

Check = tuple[Callable[[Any], bool], str]  # (predicate on a non-null value, what the value must be)


def setting(default: Any = MISSING, help: str = "", *, key: str | None = None, choices: Sequence[Any] | None = None,
            check: Check | None = None, paper: bool = False) -> Any:
    """A documented field: its default (a list or dict default is copied per instance), one line of help, its YAML
    name where it differs from the attribute (``key``), its valid values (``choices``) or a range check; ``paper``
    marks a default that is the paper's value (every other default is ours)."""
    meta = {"help": help, "key": key, "choices": tuple(choices) if choices is not None else None, "check": check,
            "paper": paper}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --- checks -------------------------------------------------------------------------------------------------------
def at_least(n: int) -> Check:
    return (lambda v: v >= n), f"at least {n}"


def between(lo: float, hi: float, what: str, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    def ok(v):
        return math.isfinite(v) and (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    return ok, what


def positive(what: str = "a finite number > 0") -> Check:
    return (lambda v: math.isfinite(v) and v > 0), what


def non_negative(what: str = "a finite number >= 0") -> Check:
    return (lambda v: math.isfinite(v) and v >= 0), what


# --- sections -----------------------------------------------------------------------------------------------------
def section(prefix: str):
    """A config section: a keyword-only dataclass whose errors name keys under ``prefix`` (e.g. ``train``)."""

    def deco(cls):
        cls = dataclass(kw_only=True)(cls)
        cls.prefix = prefix
        return cls

    return deco


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "a mapping"}


def _strip_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Any), nullable
    return tp, False


def _matches(base, value) -> bool:
    if base is Any:
        return True
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base in (list, dict, str):
        return isinstance(value, base)
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        return isinstance(value, list) and all(_matches(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, base)


def _kind(base) -> str:
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        return f"a list of {_KINDS.get(item, 'values').split(' ', 1)[1]}s" if item in _KINDS else "a list"
    return _KINDS.get(origin or base, f"a {getattr(base, '__name__', base)}")


def _plain(node: Any) -> Any:
    """A plain Python value of an OmegaConf node (resolved), else the value itself."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


class Section:
    """Base of every config section (see the module docstring)."""

    prefix: ClassVar[str] = ""

    @classmethod
    def fields_by_key(cls) -> dict[str, dataclasses.Field]:
        return {(f.metadata.get("key") or f.name): f for f in dataclasses.fields(cls)}

    @classmethod
    def of(cls, node: Any, prefix: str | None = None):
        """The section read from ``node`` (None or absent keys: the defaults); one line on a bad value."""
        if isinstance(node, cls):
            return node
        prefix = cls.prefix if prefix is None else prefix
        raw = _plain(node)
        if raw is None:
            raw = {}
        if isinstance(raw, Section):
            raw = raw.to_dict()
        if not isinstance(raw, Mapping):
            raise GainError(f"{prefix or 'the config'} must be a mapping of settings, got {raw!r}")
        fields = cls.fields_by_key()
        unknown = [k for k in raw if k not in fields]
        if unknown:
            raise unknown_choice(f"{prefix or 'config'} key", unknown[0], fields)
        hints = typing.get_type_hints(cls)
        values = {}
        for key, f in fields.items():
            if key not in raw:
                continue
            values[f.name] = _read(hints[f.name], f, raw[key], _join(prefix, key))
        try:
            return cls(**values)
        except GainError:
            raise
        except TypeError as exc:  # a required field (no default) is absent
            missing = [k for k, f in fields.items() if f.name not in values and f.default is MISSING
                       and f.default_factory is MISSING]
            if missing:
                raise GainError(f"{_join(prefix, missing[0])} must be set (no default)") from exc
            raise

    @classmethod
    def shared_with(cls, other: Section | Mapping[str, Any], prefix: str | None = None):
        """This section from the keys of ``other`` that it also has (the l2 / ewc methods: their base method's
        settings, their penalty's settings)."""
        own = cls.fields_by_key()
        items = other.to_dict() if isinstance(other, Section) else dict(other)
        return cls.of({k: v for k, v in items.items() if k in own}, prefix)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default under its YAML name, without checks (a required field is left out)."""
        out = {}
        for key, f in cls.fields_by_key().items():
            if f.default is not MISSING:
                v = f.default
            elif f.default_factory is not MISSING:
                v = f.default_factory()
            else:
                continue
            out[key] = v.to_dict() if isinstance(v, Section) else v
        return out

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data under its YAML names (nested sections as dicts)."""
        out = {}
        for key, f in self.fields_by_key().items():
            v = getattr(self, f.name)
            out[key] = v.to_dict() if isinstance(v, Section) else v
        return out

    @classmethod
    def describe(cls, prefix: str | None = None) -> list[tuple[str, str, str, str]]:
        """(dotted key, type, default, help) of every field, nested sections expanded."""
        prefix = cls.prefix if prefix is None else prefix
        hints = typing.get_type_hints(cls)
        rows = []
        for key, f in cls.fields_by_key().items():
            base, nullable = _strip_optional(hints[f.name])
            if isinstance(base, type) and issubclass(base, Section):
                rows.append((_join(prefix, key), "section" + (" | null" if nullable else ""), "", f.metadata["help"]))
                rows += base.describe(_join(prefix, key))
                continue
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else "(required)")
            kind = " | ".join(map(str, f.metadata["choices"])) if f.metadata.get("choices") else (
                "any" if base is Any else _kind(base).split(" ", 1)[1])
            help_ = f.metadata["help"] + (" (the paper's value)" if f.metadata.get("paper") else "")
            rows.append((_join(prefix, key), kind + (" | null" if nullable else ""), show(default), help_))
        return rows

    def fail(self, key: str, what: str, value: Any) -> GainError:
        """The one-line error of a ``__post_init__`` check on ``key`` of this section."""
        return GainError(f"{_join(self.prefix, key)} must be {what}, got {value!r}")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def show(v: Any) -> str:
    """A value as YAML writes it (null, true, false, [a, b], {k: v})."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {show(x)}" for k, x in v.items()) + "}"
    return str(v)


def _read(tp, f: dataclasses.Field, value: Any, where: str) -> Any:
    base, nullable = _strip_optional(tp)
    if value is None:
        if nullable or base is Any:
            return None
        raise GainError(f"{where} must be {_kind(base)}, got null")
    if isinstance(base, type) and issubclass(base, Section):
        return base.of(value, where)
    choices = f.metadata.get("choices")
    if choices is not None:
        if value not in choices:
            raise unknown_choice(where, value, [show(c) for c in choices])
        return value
    if not _matches(base, value):
        raise GainError(f"{where} must be {_kind(base)}, got {value!r}")
    check = f.metadata.get("check")
    if check is not None and not check[0](value):
        shown = value if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        raise GainError(f"{where} must be {check[1]}, got {shown}")
    return value
