"""Hyperparameter sweeps: lists of arg dicts (what XManager's open-source release lacks).

    >>> product(sweep('lr', [0.1, 0.01]), sweep('bs', [32, 64]))
    [{'lr': 0.1, 'bs': 32}, {'lr': 0.1, 'bs': 64}, {'lr': 0.01, 'bs': 32}, {'lr': 0.01, 'bs': 64}]
    >>> zipit(sweep('lr', [0.1, 0.01]), sweep('bs', [32, 64]))
    [{'lr': 0.1, 'bs': 32}, {'lr': 0.01, 'bs': 64}]
    >>> chainit(sweep('lr', [0.1]), sweep('bs', [32]))
    [{'lr': 0.1}, {'bs': 32}]
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Sequence

Sweep = list[dict[str, Any]]


def _as_sweep(s: Iterable[Mapping[str, Any]], where: str) -> Sweep:
    if isinstance(s, Mapping):
        return [dict(s)]
    out = []
    for item in s:
        if not isinstance(item, Mapping):
            raise TypeError(f"{where}: expected a sweep (a list of dicts), got an item {item!r}")
        out.append(dict(item))
    return out


def sweep(name: str, values: Iterable[Any]) -> Sweep:
    """[{name: v} for v in values]."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"sweep: name must be a non-empty string, got {name!r}")
    if isinstance(values, (str, bytes)):
        raise ValueError(f"sweep({name!r}): values must be a list, not the string {values!r}")
    return [{name: v} for v in values]


def _merge(dicts: Sequence[Mapping[str, Any]], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if k in out:
                raise ValueError(f"{where}: parameter {k!r} appears in more than one sweep")
            out[k] = v
    return out


def product(*sweeps: Iterable[Mapping[str, Any]]) -> Sweep:
    """Cartesian product; the last sweep varies fastest (like itertools.product)."""
    parts = [_as_sweep(s, "product") for s in sweeps]
    return [_merge(combo, "product") for combo in itertools.product(*parts)]


def zipit(*sweeps: Iterable[Mapping[str, Any]]) -> Sweep:
    """Element-wise union of sweeps of equal length."""
    parts = [_as_sweep(s, "zipit") for s in sweeps]
    lengths = {len(p) for p in parts}
    if len(lengths) > 1:
        raise ValueError(f"zipit: sweeps have different lengths {[len(p) for p in parts]}")
    return [_merge(combo, "zipit") for combo in zip(*parts)]


def chainit(*sweeps: Iterable[Mapping[str, Any]]) -> Sweep:
    """Concatenation of sweeps."""
    return [d for s in sweeps for d in _as_sweep(s, "chainit")]


def fixed(name: str, value: Any) -> Sweep:
    """A one-point sweep: [{name: value}]."""
    return [{name: value}]


__all__ = ["sweep", "product", "zipit", "chainit", "fixed"]
