"""Which timm class a model name builds, found by building it on the meta device (no weights
allocated, no initialization computed), cached per process and on disk.

lapdtr supports a name when an adapter handles the class the name builds — never because the name
matches a pattern: timm's ``vit_*`` names build ``VisionTransformer``, ``Eva`` (RoPE ViTs,
DINOv3) and ``VisionTransformerRelPos``, and ``resnet*`` names build ``ResNet``, ``ResNetV2`` or
``ByobNet``. The candidates an adapter is asked about are the names timm registers in the
modules that define its classes, and the names matching its patterns; each is built once.

The disk cache (``$LAPDTR_CACHE/models/classes-timm<version>.json``, default
``~/.cache/lapdtr``) is keyed by the timm and lapdtr versions: another version is built afresh.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

__all__ = ["model_class_name", "timm_module_of", "classes_cache_path"]


def classes_cache_path() -> Path:
    import timm

    from .. import __version__

    root = Path(os.environ.get("LAPDTR_CACHE", Path.home() / ".cache" / "lapdtr"))
    return root / "models" / f"classes-timm{timm.__version__}-lapdtr{__version__}.json"


def timm_module_of(name: str) -> str | None:
    """The timm model module that registers ``name`` (``eva``, ``resnetv2`` ...)."""
    from timm.models import _registry

    return _registry._model_to_module.get(name)


@functools.lru_cache(maxsize=1)
def _disk() -> dict:
    path = classes_cache_path()
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save() -> None:
    path = classes_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_disk(), sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: the per-process cache still holds


def model_class_name(name: str, *, save: bool = True) -> str:
    """``module.QualName`` of the class ``timm.create_model(name)`` builds (built on the meta
    device; ``"!error: ..."`` when timm cannot build it without weights or arguments)."""
    cache = _disk()
    if name in cache:
        return cache[name]
    import timm
    import torch

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = type(timm.create_model(name, pretrained=False))
        found = f"{cls.__module__}.{cls.__qualname__}"
    except Exception as e:  # noqa: BLE001 - any failure: the name is not buildable as is
        found = f"!error: {type(e).__name__}: {str(e)[:200]}"
    cache[name] = found
    if save:
        _save()
    return found


def save_classes() -> None:
    """Write the per-process cache to disk (after many ``model_class_name(save=False)``)."""
    _save()
