"""Reading a params file strictly: the YAML loader, and a value's test against its field's type hint.

Why: two of PyYAML's defaults would run something other than what the file says without a word.
It lets the *last* of two ``layer:`` lines win, and it implements YAML 1.1, where ``lr: 1e-3`` is a
*string* (then refused as "must be float"). :class:`ParamsLoader` refuses the first and reads YAML
1.2 floats; :func:`read_yaml` turns every way a file can fail to parse into one :class:`ParamsError`
line that names the file. None of this needs the schema: :mod:`mechlib.params` holds
:class:`~mechlib.params.BookParams` and its ranges, checks the values with :func:`type_ok`, and
re-exports these names (``from mechlib.params import ParamsError, ParamsLoader`` as before).
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = ["ParamsError", "ParamsLoader", "read_yaml", "type_name", "type_ok"]


class ParamsError(ValueError):
    """A params file or value the book cannot run with. The message says what and where."""


def type_ok(value: object, hint: Any) -> bool:  # hint: a typing form (Union, list[...], Literal[...], a class)
    """Whether ``value``, as YAML or papermill gives it, fits the field hint ``hint``.

    An int passes as a float (``lr: 1``); a bool never passes as a number (``k: yes`` is no 1).
    """
    origin = typing.get_origin(hint)
    if origin is Literal:  # the type here; a value outside the choices: mechlib.params' range check
        return isinstance(value, tuple(type(a) for a in typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(type_ok(v, inner) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def type_name(hint: Any) -> str:  # hint: a typing form, as in type_ok
    """The hint's name in an error message: ``float``, ``int | None``, a Literal's value type (``str``)."""
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0]).__name__
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: object, line: int, first_line: int):
        super().__init__(f"duplicate key {key!r} on line {line} (first on line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


# YAML 1.2 floats: PyYAML implements YAML 1.1, whose float pattern needs a dot and a signed
# exponent, so ``lr: 1e-3`` or ``2e5`` arrive as *strings* and are refused as "must be float".
# ``_FLOAT_12`` also takes ``1e-3``, ``1E-3``, ``2e5``, ``1.5e3``; integers still resolve as ints.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT_12 = re.compile(
    r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class ParamsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys and reads YAML 1.2 floats.

    Why: plain PyYAML lets the *last* of two ``layer:`` lines win without a word, so a params file
    edited by appending an override runs something other than what its first line says.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` overrides on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class names that error itself
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _DuplicateKey(key, line, first)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParamsLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_12, list("-+0123456789."))


def read_yaml(path: Path) -> Any:  # whatever the file holds: a mapping, if it is a params file at all
    """The parsed contents of the params file ``path`` (``None`` when empty); each failure a :class:`ParamsError`."""
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=ParamsLoader)  # a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ParamsError(
            f"{path}:{exc.line}: duplicate key '{exc.key}' (first set on line {exc.first_line}); "
            f"each parameter may appear once"
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
