"""Which path a summarization op takes: a Triton kernel (:mod:`lapdtr.kernels`) or its PyTorch
reference, as ``LAPDTR_KERNELS`` says.

* unset (or empty): the kernel where Triton can run on the tensor's device, else the reference;
* ``0``: the reference always;
* ``1``: the kernel, and an error where Triton cannot run.

Triton can run on a CUDA tensor when CUDA is available, and on a CPU tensor under Triton's
interpreter (``TRITON_INTERPRET=1``, which Triton reads when the kernels are defined, so it must
be set before :mod:`lapdtr.kernels.summarize` is first imported). Kernel calls that need a
gradient run the kernel forward and the reference's backward (:func:`run`).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

import torch

__all__ = ["ENV", "kernels_mode", "triton_can_run", "use_kernels", "run"]

ENV = "LAPDTR_KERNELS"
_MODULE = "lapdtr.kernels.summarize"


def kernels_mode() -> str | None:
    """``"0"``, ``"1"`` or ``None`` (unset: automatic); another value is a ``ValueError``."""
    v = os.environ.get(ENV, "").strip()
    if v == "":
        return None
    if v not in ("0", "1"):
        raise ValueError(f"{ENV}={v!r} is not allowed: set {ENV}=0 (PyTorch reference), "
                         f"{ENV}=1 (Triton kernels) or leave it unset (kernels where Triton can run)")
    return v


def _interpret() -> bool:
    mod = sys.modules.get(_MODULE)
    if mod is not None:
        return bool(mod.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _triton_installed() -> bool:
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_can_run(device: torch.device | str) -> tuple[bool, str]:
    """``(can, why_not)``: whether the kernels can run on tensors of ``device``."""
    device = torch.device(device)
    if not _triton_installed():
        return False, "Triton is not installed"
    if _interpret():
        return True, ""
    if device.type == "cuda":
        if torch.cuda.is_available():
            return True, ""
        return False, "CUDA is not available"
    mod = sys.modules.get(_MODULE)
    if mod is not None and os.environ.get("TRITON_INTERPRET", "") == "1":
        return False, (f"TRITON_INTERPRET=1 was set after {_MODULE} was imported (Triton reads it "
                       "when the kernels are defined)")
    return False, (f"Triton runs no kernel on a {device.type} tensor without its interpreter "
                   "(TRITON_INTERPRET=1)")


def use_kernels(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` takes the Triton kernel (see the module docstring)."""
    mode = kernels_mode()
    if mode == "0":
        return False
    can, why = triton_can_run(t.device)
    if mode == "1" and not can:
        raise RuntimeError(f"{ENV}=1 asks for the Triton kernels, but they cannot run on this "
                           f"{t.device.type} tensor: {why}; set {ENV}=0 for the PyTorch reference, "
                           "or TRITON_INTERPRET=1 (before lapdtr.kernels is imported) to run them "
                           "on the CPU through Triton's interpreter")
    return can


class _KernelFn(torch.autograd.Function):
    """The kernel's forward; the backward is the reference's, recomputed."""

    @staticmethod
    def forward(ctx, kernel, reference, kwargs, *tensors):
        ctx.reference, ctx.kwargs = reference, kwargs
        ctx.save_for_backward(*tensors)
        out = kernel(*tensors, **kwargs)
        ctx.multi = isinstance(out, tuple)
        return out

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[3:]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(saved, need)]
        with torch.enable_grad():
            out = ctx.reference(*inputs, **ctx.kwargs)
        outs = out if ctx.multi else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wanted = [t for t, n in zip(inputs, need) if n]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                  allow_unused=True) if pairs and wanted else [None] * len(wanted)
        it = iter(got)
        return (None, None, None, *[next(it) if n else None for n in need])


def run(name: str, reference: Callable, *tensors: torch.Tensor, **kwargs):
    """``reference(*tensors, **kwargs)`` or the kernel ``lapdtr.kernels.<name>`` with the same
    arguments, as :func:`use_kernels` decides for ``tensors[0]``."""
    if not use_kernels(tensors[0]):
        return reference(*tensors, **kwargs)
    from lapdtr import kernels

    kernel = getattr(kernels, name)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _KernelFn.apply(kernel, reference, kwargs, *tensors)
    return kernel(*tensors, **kwargs)
