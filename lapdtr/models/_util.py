"""Small helpers shared by the family adapters."""
from __future__ import annotations

from torch import nn


def present(model: nn.Module, *names: str) -> tuple[str, ...]:
    """The names among ``names`` that the model holds as a module, parameter or buffer (not None)."""
    out = []
    for n in names:
        obj = model
        ok = True
        for part in n.split("."):
            if part in obj._modules:
                obj = obj._modules[part]
            elif part in obj._parameters:
                obj = obj._parameters[part]
            elif part in obj._buffers:
                obj = obj._buffers[part]
            else:
                ok = False
                break
            if obj is None:
                ok = False
                break
        if ok:
            out.append(n)
    return tuple(out)


def indexed(seq: nn.Module, i: int):
    """``seq[i]`` for a Sequential / ModuleList, as a constant for a unit function."""
    return seq[i]
