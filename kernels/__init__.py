"""Triton kernels of lapdtr, installed as ``lapdtr.kernels`` (setup.py ``package_dir``).

Importing this package never needs Triton: the kernels live in submodules (``summarize``: the
importance, gather-and-fuse and int8 kernels of :mod:`lapdtr.summarize`), imported on first use
of a name here. Each has a PyTorch reference in :mod:`lapdtr.summarize` and tests of one against
the other; :mod:`lapdtr.summarize.dispatch` chooses between them (``LAPDTR_KERNELS``).
"""
from __future__ import annotations

import importlib

__all__ = ["cls_importance", "received_attention", "gather_fuse", "quantize_int8"]

_WHERE = {name: "summarize" for name in __all__}


def __getattr__(name: str):
    sub = _WHERE.get(name)
    if sub is None:
        raise AttributeError(f"module 'lapdtr.kernels' has no attribute {name!r}; kernels: "
                             f"{', '.join(__all__)}")
    return getattr(importlib.import_module(f"{__name__}.{sub}"), name)
