"""Command-line arguments with XManager's semantics.

Args reach the program as an argv list, never through a shell:

- a mapping becomes keyword flags, in insertion order: ``{'lr': 0.1}`` -> ``--lr=0.1``;
  ``True`` -> ``--flag``, ``False`` -> ``--noflag``, ``None`` -> omitted, a list or a
  tuple -> the flag repeated once per item;
- a list or tuple becomes positional arguments, each ``str()``-ed;
- :class:`SequentialArgs` mixes both; merging overrides keyword values in place and
  appends positional ones;
- a :class:`ShellSafeArg` reaches the program as its text, unsubstituted (see there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, Union

UserArgs = Union[Mapping[str, Any], Sequence[Any], "SequentialArgs", None]

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def validate_env_vars(env_vars: Mapping[str, Any], field: str = "env_vars") -> dict[str, str]:
    """Returns env vars as a str->str dict; names must match [A-Za-z_][A-Za-z0-9_]*."""
    if env_vars is None:
        return {}
    if not isinstance(env_vars, Mapping):
        raise TypeError(f"{field} must be a mapping of names to values, got {env_vars!r}")
    result: dict[str, str] = {}
    for key, value in env_vars.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise ValueError(
                f"{field}: environment variable names must match [A-Za-z_][A-Za-z0-9_]*, got {key!r}"
            )
        if value is None:
            raise ValueError(f"{field}: environment variable {key!r} has value None")
        result[key] = value if isinstance(value, str) else str(value)
        if "\0" in result[key]:
            raise ValueError(f"{field}: environment variable {key!r} contains a NUL byte")
    return result


@dataclass(frozen=True)
class ShellSafeArg:
    """XManager's argument that its shell-based backends leave unquoted, so that the
    shell substitutes in it (`$HOME/data`). prefect-xm hands arguments to programs as
    argv and never through a shell, as XManager's argv backends do: there the text
    reaches the program as it is, with nothing substituted. Read what you need from the
    environment in the program, or pass the value itself."""

    arg: str

    def __str__(self) -> str:
        # as XManager's: an f-string would silently drop what the wrapper says
        raise RuntimeError(f"Converting {self!r} to a string would strip the ShellSafe semantics.")


def _to_str(value: Any) -> str:
    if isinstance(value, ShellSafeArg):
        value = value.arg
    if isinstance(value, bool):
        return "true" if value else "false"
    s = value if isinstance(value, str) else str(value)
    if "\0" in s:
        raise ValueError(f"argument {value!r} contains a NUL byte, which argv cannot carry")
    return s


class SequentialArgs:
    """An ordered mix of positional and keyword arguments (XManager's SequentialArgs).

    Prefer :func:`merge_args` to build one. Keyword values given again override the
    earlier value at its original position; positional values are appended.
    """

    __slots__ = ("_items", "_kwvalues")

    def __init__(self) -> None:
        # items: ("pos", value) or ("kw", name)
        self._items: list[tuple[str, Any]] = []
        self._kwvalues: dict[str, Any] = {}

    def _add_positional(self, value: Any) -> None:
        self._items.append(("pos", value))

    def _add_keyword(self, name: str, value: Any) -> None:
        if not isinstance(name, str):
            name = str(name)
        if not name:
            raise ValueError("args: keyword argument names must be non-empty")
        if name not in self._kwvalues:
            self._items.append(("kw", name))
        self._kwvalues[name] = value

    def _merge_from(self, other: "SequentialArgs") -> None:
        for kind, item in other._items:
            if kind == "pos":
                self._add_positional(item)
            else:
                self._add_keyword(item, other._kwvalues[item])

    @staticmethod
    def from_collection(collection: UserArgs) -> "SequentialArgs":
        result = SequentialArgs()
        if collection is None:
            return result
        if isinstance(collection, SequentialArgs):
            result._merge_from(collection)
        elif isinstance(collection, (str, bytes)):
            raise ValueError(
                f"args must be a dict, a list or SequentialArgs, not a string: {collection!r}. "
                f"Wrap it in a list: [{collection!r}] to make it a single argument."
            )
        elif isinstance(collection, Mapping):
            for key, value in collection.items():
                result._add_keyword(str(key), value)
        elif isinstance(collection, Iterable):
            for value in collection:
                result._add_positional(value)
        else:
            raise TypeError(f"args must be a dict, a list or SequentialArgs, got {collection!r}")
        return result

    def to_list(self, escaper=_to_str, kwargs_joiner=None) -> list[str]:
        """The argv tail: one string per argument, in order."""
        out: list[str] = []
        for kind, item in self._items:
            if kind == "pos":
                out.append(escaper(item))
                continue
            value = self._kwvalues[item]
            if value is None:
                continue
            if isinstance(value, bool):
                out.append(f"--{item}" if value else f"--no{item}")
            elif isinstance(value, (list, tuple)):
                for v in value:
                    if v is None:
                        continue
                    if isinstance(v, bool):
                        out.append(f"--{item}" if v else f"--no{item}")
                    else:
                        out.append(self._join(item, escaper(v), kwargs_joiner))
            else:
                out.append(self._join(item, escaper(value), kwargs_joiner))
        return out

    @staticmethod
    def _join(name: str, value: str, kwargs_joiner) -> str:
        if kwargs_joiner is not None:
            return kwargs_joiner(f"--{name}", value)
        return f"--{name}={value}"

    def to_dict(self, kwargs_only: bool = False) -> dict[str, Any]:
        if kwargs_only:
            return dict(self._kwvalues)
        out: dict[str, Any] = {}
        for kind, item in self._items:
            if kind == "pos":
                out[str(item)] = True
            else:
                out[item] = self._kwvalues[item]
        return out

    def to_json(self) -> Any:
        """A JSON-friendly view for Prefect parameters: a dict if keyword-only, else a list."""
        if all(kind == "kw" for kind, _ in self._items):
            return {k: _jsonable(v) for k, v in self._kwvalues.items()}
        return self.to_list()

    def __bool__(self) -> bool:
        return bool(self._items)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SequentialArgs)
            and self._items == other._items
            and self._kwvalues == other._kwvalues
        )

    def __repr__(self) -> str:
        return f"SequentialArgs({self.to_list(repr)!r})"


def merge_args(*operands: UserArgs) -> SequentialArgs:
    """Merges argument collections left to right into a new SequentialArgs."""
    result = SequentialArgs()
    for operand in operands:
        if not isinstance(operand, SequentialArgs):
            operand = SequentialArgs.from_collection(operand)
        result._merge_from(operand)
    return result


def to_argv(args: UserArgs) -> list[str]:
    """The argv tail for `args` (see the module docstring for the rules)."""
    return SequentialArgs.from_collection(args).to_list()


def _jsonable(value: Any) -> Any:
    if isinstance(value, ShellSafeArg):
        return value.arg
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, SequentialArgs):
        return value.to_json()
    return str(value)


jsonable = _jsonable
