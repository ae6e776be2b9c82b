"""JSON <-> frozen dataclass, checked field by field: the one codec every chapter result uses.

Why generic: each chapter's metrics file is a frozen dataclass whose field names *are* the JSON keys,
so writing and reading cannot drift apart, and a malformed file fails on load with one line naming
the file and the key path (``metrics/06_steering.json: rows[2].scale: expected float, got 'x'``)
instead of a ``KeyError`` deep inside the report. Keys the class does not know are ignored on read
(a file written by a newer version still renders); the round-trip tests catch a class that lacks a
key its chapter writes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Literal, TypeVar, Union

# A JSON value, for the few free-form sub-objects (a training config, formula strings).
Json = Union[None, bool, int, float, str, list["Json"], dict[str, "Json"]]  # noqa: UP007 (typing.Union turns the
# quoted "Json" into ForwardRefs that get_type_hints resolves; an X | Y union keeps them as plain strings)

T = TypeVar("T", bound="Record")
D = TypeVar("D")
_HINTS: dict[type, dict[str, object]] = {}  # resolved annotations per class

# field(metadata=OMIT_NONE): the key is left out of the file when the value is None (keys that only
# one code path writes, e.g. chapter 02's training counters, absent for a pretrained SAE).
OMIT_NONE = {"omit_none": True}


def read_also(*old_keys: str) -> dict[str, tuple[str, ...]]:
    """Field metadata: the key's former names, still read (files of older runs), never written."""
    return {"read_also": old_keys}


class ResultsError(ValueError):
    """A metrics file that does not hold what its chapter writes (the message names file and key)."""


def _type_name(tp: object) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Where:
    """Where a value sits: the file (or class) and the key path inside it, for error messages."""

    def __init__(self, source: str, keys: str = "") -> None:
        self.source, self.keys = source, keys

    def key(self, name: str) -> _Where:
        return _Where(self.source, f"{self.keys}.{name}" if self.keys else name)

    def item(self, i: int) -> _Where:
        return _Where(self.source, f"{self.keys}[{i}]")

    def error(self, message: str) -> ResultsError:
        return ResultsError(f"{self.source}: {self.keys}: {message}" if self.keys else f"{self.source}: {message}")

    def expected(self, what: object, value: object) -> ResultsError:
        return self.error(f"expected {_type_name(what)}, got {value!r:.60}")


def _convert(value: object, tp: object, where: _Where) -> object:
    """``value`` read from JSON, checked against (and converted to) the annotation ``tp``."""
    if tp is Json or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: the error is X's, with its key path
            return _convert(value, options[0], where)
        for option in options:
            try:
                return _convert(value, option, where)
            except ResultsError:
                continue
        raise where.expected(" | ".join("null" if a is type(None) else _type_name(a) for a in args), value)
    if origin is Literal:
        if value not in args:
            raise where.error(f"expected one of {list(args)}, got {value!r:.60}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise where.expected(tp, value)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise where.expected(tp, value)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise where.expected(tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise where.expected(tp, value)
        return value
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise where.expected("a list", value)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise where.error(f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, where.item(i)) for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(v, args[0], where.item(i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise where.expected("an object", value)
        return {str(k): _convert(v, args[1], where.key(str(k))) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a Record, or a domain dataclass such as SplicedLoss
        return _read_dataclass(tp, value, where)
    raise TypeError(f"{where.source}: no JSON conversion for annotation {tp!r}")  # a bug in a Record class


def _read_dataclass(cls: type[D], d: object, where: _Where) -> D:
    if not isinstance(d, Mapping):
        raise where.expected("a JSON object", d)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass (checked by the callers)
        key = next((k for k in (f.name, *f.metadata.get("read_also", ())) if k in d), None)
        if key is not None:
            values[f.name] = _convert(d[key], hints[f.name], where.key(key))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise where.key(f.name).error("missing key")
    return cls(**values)


def dump_dataclass(obj: object) -> dict[str, Json]:
    """One key per field of the dataclass ``obj`` (fields marked :data:`OMIT_NONE` left out when None)."""
    out: dict[str, Json] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if value is None and f.metadata.get("omit_none"):
            continue
        out[f.name] = _dump(value)
    return out


def _dump(value: object) -> Json:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump_dataclass(value)
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _dump(v) for k, v in value.items()}
    return value  # type: ignore[return-value]  # a JSON scalar (the annotations allow nothing else)


class Record:
    """Base of every result dataclass: ``to_json`` writes one key per field, ``from_json`` checks them."""

    def to_json(self) -> dict[str, Json]:
        return dump_dataclass(self)

    @classmethod
    def from_json(cls: type[T], d: Mapping[str, object], where: str = "") -> T:
        """``cls`` from a JSON object; ``where`` (the file) starts every error message."""
        return _read_dataclass(cls, d, _Where(where or cls.__name__))


def read_dataclass(cls: type[D], d: object, where: str) -> D:
    """Any dataclass ``cls`` (not only a :class:`Record`) from a JSON value, checked like ``from_json``."""
    return _read_dataclass(cls, d, _Where(where))


def copy_fields(cls: type[T], source: object, **values: object) -> T:
    """``cls`` from the same-named attributes of ``source`` (a domain dataclass such as
    :class:`mechlib.steering.SteeringRow`), with ``values`` given or overriding: no dict in between."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in values]  # type: ignore[arg-type]
    return cls(**{name: getattr(source, name) for name in names}, **values)
