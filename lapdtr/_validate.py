"""Checks shared by the strictly validated configs (``RunConfig``, ``DataConfig``): an error
names the key and what is allowed."""
from __future__ import annotations

import dataclasses

__all__ = ["check_fields", "check_int", "check_float"]


def check_fields(cls, d, where: str) -> None:
    """``d`` is a mapping whose keys are all fields of the dataclass ``cls``."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping of keys to values, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")


def check_int(key, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")


def check_float(key, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
        raise ValueError(f"{key}: expected a number >= {lo}, got {v!r}")
