"""Checks that can fail: weights on which every unit shows in the output, tolerances relative to
the values compared, and a sensitivity check that the same comparison rejects a model with one
unit skipped or perturbed.

timm zero-initialises the last norm scale of residual branches (``zero_init_last``), so at
default init a ResNet or EfficientViT-M block can be dropped and the logits stay bit-identical;
layer scales start near zero in some ViTs. An equivalence test on those weights cannot see a
missing unit. :func:`informative_weights_` redraws every conv / linear weight, every norm scale,
shift and statistic, and every other parameter that is constant, so no unit is invisible.

    model = lapdtr.create_model("resnet18")
    informative_weights_(model, seed=1, probe=x)
    ref = model(x)
    assert_close_scaled(stages_output, ref)                         # the equivalence
    assert_sees_every_unit(model, x, ref)                           # and that it could fail
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["informative_weights_", "write_informative_checkpoint", "scaled_atol",
           "assert_close_scaled", "unit_ablations", "assert_sees_every_unit", "REL_TOL"]

# fp32, relative to the largest value compared. 1e-5 was exceeded by 1.006x on an AMD EPYC host:
# efficientvit_m0 on 3 gloo ranks (tests/runtime/test_pipeline.py), one logit of 1000 off by
# 4.71e-6 where the largest is 0.468 (the same model in one process, 1 or 2 threads, is
# bit-identical: the ranks' receive buffers change the kernels' summation order). Every unit's
# skip or perturbation still fails the check at this tolerance (assert_sees_every_unit).
REL_TOL = 2e-5


@torch.no_grad()
def informative_weights_(model: nn.Module, *, seed: int = 0,
                         probe: torch.Tensor | None = None) -> nn.Module:
    """Redraw ``model``'s weights in place so that no unit is invisible; returns ``model``.

    Every conv weight N(0, 2/fan_in) (He: the signal keeps its size through ReLUs), every linear
    weight N(0, 1/fan_in) (with 2/fan_in, TinyViT's attention and MLP branches amplified an fp32
    rounding of its input 20-50 times by the logits, against 7-9 times this way);
    norm scales U(0.5, 1.5), shifts N(0, 0.1);
    batch-norm running mean N(0, 0.1) and variance U(0.5, 1.5); then every floating parameter
    still constant (layer scales, zero biases, zero-init gates) redrawn: U(0.5, 1.5) if nonzero,
    N(0, 0.1) if zero. With ``probe``, batch-norm statistics are measured on it (then moved by
    up to 10%) and the last conv / linear is scaled so the largest output on ``probe`` is 1 in
    size (the model is put in eval mode for that)."""
    g = torch.Generator().manual_seed(seed)

    def draw(shape, kind):
        if kind == "scale":
            return 0.5 + torch.rand(shape, generator=g)
        return 0.1 * torch.randn(shape, generator=g)

    last = None
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            fan_in = w[0].numel()
            w.copy_(torch.randn(w.shape, generator=g) * ((1.0 if isinstance(m, nn.Linear) else 2.0) / fan_in) ** 0.5)
            last = m
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
                            nn.RMSNorm)):
            if isinstance(w, torch.Tensor):
                w.copy_(draw(w.shape, "scale"))
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor):
                b.copy_(draw(b.shape, "shift"))
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(draw(m.running_mean.shape, "shift"))
                m.running_var.copy_(draw(m.running_var.shape, "scale"))
    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            p.copy_(draw(p.shape, "shift" if float(p.flatten()[0]) == 0.0 else "scale"))
    # timm's EfficientViT-M and TinyViT attentions cache their bias tables in eval mode (keyed by
    # device); switching to train mode clears those caches, which now hold the old biases
    was_training = model.training
    model.train(True)
    model.train(was_training)
    if probe is not None:
        _calibrate_batch_norms(model, probe, g)
    if probe is not None and last is not None:
        model.eval()
        scale = 1.0 / float(_first_tensor(model(probe)).detach().abs().max())
        last.weight.mul_(scale)
        if last.bias is not None:
            last.bias.mul_(scale)
    return model


def _calibrate_batch_norms(model: nn.Module, probe: torch.Tensor, g: torch.Generator) -> None:
    """Batch-norm statistics measured on a calibration batch made from ``probe`` (then moved by
    up to 10%): with random statistics a deep CNN's activations grow layer by layer and fp32
    rounding alone moves its logits by 1e-4 relative between batch sizes; with measured ones
    every layer sees unit-sized inputs, as a trained model's do.

    One train-mode pass with cumulative averages. (Setting each norm's statistics from its
    eval-mode input was tried: it fits the calibration batch exactly but left TinyViT's fp32
    logits 4e-5 relative off float64, against 5e-6 this way, which the 1e-5 equivalence across
    ranks cannot absorb.)"""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    try:
        model.train(True)
        model(_calibration_batch(probe, g))
    finally:
        model.train(was_training)
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    for m in bns:
        n = m.running_mean.shape
        m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(n, generator=g))
        m.running_var.mul_(0.9 + 0.2 * torch.rand(n, generator=g))


def _calibration_batch(probe: torch.Tensor, g: torch.Generator, size: int = 16) -> torch.Tensor:
    """``probe``, its mirror images, and draws of its per-channel mean and spread, ``size``
    inputs in all: statistics of a two-image probe at a 2x2 map fit those two images only, and
    other inputs then meet channels of near-zero variance (EfficientViT-M's logits reached 5e17
    on a second random input)."""
    x = probe.detach().float()
    parts = [x, x.flip(-1)]
    dims = [d for d in range(x.dim()) if d != 1]
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    n = max(0, size - 2 * x.shape[0])
    if n:
        parts.append(mean + std * torch.randn((n, *x.shape[1:]), generator=g).to(x.device))
    return torch.cat(parts).to(probe.dtype)


def write_informative_checkpoint(path: str | Path, model_name: str, *,
                                 model_kwargs: dict | None = None, seed: int = 0,
                                 img_size: int | None = None) -> Path:
    """A safetensors checkpoint of ``model_name`` with :func:`informative_weights_` (the largest
    logit on a seeded probe image of ``img_size`` is 1 in size)."""
    from safetensors.torch import save_file

    from .models.base import create_model, default_img_size

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model(model_name, **(model_kwargs or {}))
    size = img_size or default_img_size(model)
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    informative_weights_(model, seed=seed, probe=probe)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"model": model_name, "seed": str(seed),
                                      "weights": "informative"})
    tmp.replace(path)
    return path


def scaled_atol(expected: torch.Tensor, rel: float = REL_TOL) -> float:
    """An absolute tolerance of ``rel`` times the largest value of ``expected`` (fp32 sums
    reordered across ranks differ by a few ulps of the largest terms, not of each element)."""
    return rel * max(float(expected.detach().abs().max()), 1e-30)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, *, rel: float = REL_TOL,
                        msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=scaled_atol(expected, rel), rtol=0,
                               msg=(lambda m: f"{msg}\n{m}") if msg else None)


def _first_tensor(y):
    return y[0] if isinstance(y, (tuple, list)) else y


def unit_ablations(model: nn.Module, unit_list: Sequence | None = None, *,
                   seed: int = 0) -> Iterator[tuple[str, str, Callable]]:
    """For each unit: ``(unit name, "skipped" | "perturbed", fn)`` where ``fn(x)`` runs the units
    in order with that one changed. A unit whose output has its input's shape and format is
    skipped (its input passed on); any other has fixed positive noise of half its output's
    spread added (positive, so global pooling does not average it away).
    """
    from .models.base import partition, units

    ul = list(unit_list) if unit_list is not None else units(model)
    stages = partition(model, list(range(1, len(ul))), unit_list=ul)

    for i, u in enumerate(ul):
        skip = u.in_shape == u.out_shape and u.in_format == u.out_format

        def fn(x, i=i, skip=skip):
            y = x
            for j, s in enumerate(stages):
                if j != i:
                    y = s(y)
                elif not skip:
                    y = s(y)
                    g = torch.Generator().manual_seed(seed + j)
                    noise = torch.randn(y.shape, generator=g, dtype=y.dtype)
                    y = y + 0.5 * y.detach().std() * noise.abs()
            return y

        yield u.name, "skipped" if skip else "perturbed", fn


def assert_sees_every_unit(model: nn.Module, x: torch.Tensor, expected: torch.Tensor | None = None,
                           *, unit_list: Sequence | None = None, rel: float = REL_TOL,
                           margin: float = 100.0) -> dict[str, float]:
    """The comparison ``assert_close_scaled(·, expected, rel=rel)`` would reject the output of
    ``model`` with any one unit skipped or perturbed, by ``margin`` times its tolerance.
    Returns each unit's largest deviation over the tolerance."""
    with torch.no_grad():
        if expected is None:
            expected = model(x)
        tol = scaled_atol(expected, rel)
        seen, blind = {}, []
        for name, how, fn in unit_ablations(model, unit_list):
            dev = float((fn(x) - expected).abs().max()) / tol
            seen[name] = dev
            if not dev > margin:
                blind.append(f"{name} ({how}: off by {dev:.3g} x tol)")
    if blind:
        raise AssertionError(f"the comparison cannot see unit(s) {', '.join(blind)}: "
                             f"redraw the weights (informative_weights_) or lower the tolerance")
    return seen
