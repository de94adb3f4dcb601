"""JSON round-trip for the plain dataclasses handed from one step to the next."""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def from_jsonable(cls, data):
    """Build dataclass ``cls`` from ``data``; unknown keys are an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kw[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kw)


def _convert(tp, v):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if v is None:
        return None
    if dataclasses.is_dataclass(tp):
        return from_jsonable(tp, v)
    if origin in (list, typing.List):
        return [_convert(args[0], x) for x in v] if args else list(v)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], x) for x in v)
        return tuple(v)
    if origin in (dict, typing.Dict):
        return {k: _convert(args[1], x) for k, x in v.items()} if args else dict(v)
    if origin is typing.Union or str(origin) == "types.UnionType":
        for a in args:
            if a is type(None):
                continue
            if dataclasses.is_dataclass(a):
                return from_jsonable(a, v)
        return v
    return v


def save_json(obj, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2))
    tmp.replace(path)
    return path


def load_json(cls, path: str | os.PathLike, build=None):
    """``cls`` from the JSON file at ``path`` (``build(data)`` if given, else
    ``from_jsonable``); a missing file or bad JSON is a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{cls.__name__}: no such file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cls.__name__}: {str(path)!r} is not valid JSON: {e}") from e
    return build(data) if build is not None else from_jsonable(cls, data)
