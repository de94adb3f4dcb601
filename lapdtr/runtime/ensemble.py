"""Ensemble mode: a (sub-)model on every rank, outputs aggregated by a configurable G.

Each rank runs its own model on the same input (a DeiT-Ti on a weak device, a ResNet on another;
any models whose outputs have the same shape, e.g. ``(B, num_classes)`` logits), the outputs are
gathered, and an aggregator G combines them. Aggregators live in a registry
(:func:`register_aggregator`, :func:`list_aggregators`); built-ins:

* ``mean``: mean of the logits.
* ``weighted``: ``sum_r w_r * out_r / sum_r w_r`` with one weight per rank (e.g. device gflops
  from :func:`weights_from_devices`, or validation accuracies).
* ``vote``: majority vote over each rank's argmax class (each vote counts ``w_r`` if weights are
  given, else 1); ties between classes with equally many votes go to the one whose *summed* logits
  are larger. It returns a ``(B, K)`` float one-hot tensor of the winning class, so code that
  takes ``argmax`` of logits (accuracy, top-1) works unchanged; ``.argmax(-1)`` gives class ids.

:func:`ensemble_reference` is the single-process definition the distributed run must equal.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .tensor import broadcast_tensor
from .wire import NO_CODE, describe_header, dtype_code, pack_header

__all__ = ["register_aggregator", "list_aggregators", "get_aggregator", "aggregate",
           "ensemble_reference", "run_ensemble", "check_outputs_agree", "weights_from_devices"]

Aggregator = Callable[[list[torch.Tensor], "list[float] | None"], torch.Tensor]
_AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(name: str):
    """Decorator: register ``fn(outputs: list[Tensor], weights: list[float] | None) -> Tensor``
    as aggregator ``name``. ``outputs`` holds one tensor per rank, in rank order, all of one
    shape."""

    def deco(fn):
        if name in _AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is registered twice")
        _AGGREGATORS[name] = fn
        return fn

    return deco


def list_aggregators() -> list[str]:
    return sorted(_AGGREGATORS)


def get_aggregator(name: str) -> Aggregator:
    if name not in _AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; allowed: {', '.join(list_aggregators())}")
    return _AGGREGATORS[name]


def _check_weights(weights, n: int, name: str) -> list[float]:
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: weights must be a list of numbers, got {weights!r}") from None
    if len(w) != n:
        raise ValueError(f"{name}: {len(w)} weights {w} for {n} ensemble members; give one per "
                         f"member")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"{name}: weights {w} must be finite, >= 0 and not all 0")
    return w


@register_aggregator("mean")
def _mean(outputs: list[torch.Tensor], weights=None) -> torch.Tensor:
    """Mean of the members' logits."""
    if weights is not None:
        raise ValueError("aggregator 'mean' takes no weights; use 'weighted'")
    return torch.stack(outputs).mean(0)


@register_aggregator("weighted")
def _weighted(outputs: list[torch.Tensor], weights=None) -> torch.Tensor:
    """Weighted mean of the members' logits, one weight per member."""
    if weights is None:
        raise ValueError("aggregator 'weighted' needs weights=[one per rank], e.g. device gflops")
    w = _check_weights(weights, len(outputs), "weighted")
    s = sum(w)
    out = outputs[0] * (w[0] / s)
    for o, wi in zip(outputs[1:], w[1:]):
        out = out + o * (wi / s)
    return out


@register_aggregator("vote")
def _vote(outputs: list[torch.Tensor], weights=None) -> torch.Tensor:
    """Majority vote of the members' argmax classes; ties broken by the summed logits.

    Returns a float one-hot ``(..., K)`` tensor of the winning class.
    """
    w = [1.0] * len(outputs) if weights is None else _check_weights(weights, len(outputs), "vote")
    stacked = torch.stack(outputs)  # (R, ..., K)
    num_classes = stacked.shape[-1]
    votes = torch.zeros_like(stacked[0], dtype=torch.float64)
    for o, wi in zip(outputs, w):
        votes += nn.functional.one_hot(o.argmax(-1), num_classes).to(torch.float64) * wi
    top = votes == votes.amax(-1, keepdim=True)
    summed = stacked.sum(0).to(torch.float64).masked_fill(~top, -math.inf)
    winner = summed.argmax(-1)
    return nn.functional.one_hot(winner, num_classes).to(stacked.dtype)


def aggregate(outputs: Sequence[torch.Tensor], *, aggregator: str,
              weights: Sequence[float] | None = None) -> torch.Tensor:
    """Apply aggregator ``aggregator`` to per-member outputs (all of one shape)."""
    fn = get_aggregator(aggregator)
    outputs = list(outputs)
    if not outputs:
        raise ValueError("aggregate needs at least one output")
    shapes = {tuple(o.shape) for o in outputs}
    if len(shapes) != 1:
        raise ValueError(f"ensemble members' outputs differ in shape: "
                         f"{[tuple(o.shape) for o in outputs]}; they must all be the same")
    return fn(outputs, None if weights is None else list(weights))


def ensemble_reference(models: Sequence[nn.Module], inputs: torch.Tensor, aggregator: str, *,
                       weights: Sequence[float] | None = None) -> torch.Tensor:
    """Single-process definition of ensemble mode: every model on ``inputs``, then G."""
    get_aggregator(aggregator)
    with torch.no_grad():
        return aggregate([m(inputs) for m in models], aggregator=aggregator, weights=weights)


def weights_from_devices(devices: Sequence) -> list[float]:
    """Ensemble weights proportional to each device's measured ``gflops`` (rank order)."""
    gf = [float(getattr(d, "gflops", float("nan"))) for d in devices]
    if not gf or any(not math.isfinite(g) or g <= 0 for g in gf):
        raise ValueError(f"device gflops {gf} must all be finite and > 0 to give weights")
    return gf


def run_ensemble(models_or_model_for_rank, inputs: torch.Tensor | None, *, aggregator: str,
                 rank: int, world_size: int, weights: Sequence[float] | None = None,
                 dst: int | None = None, src: int | None = None, group=None
                 ) -> torch.Tensor | None:
    """Run this rank's model on ``inputs``, gather every rank's output and aggregate.

    ``models_or_model_for_rank``: this rank's ``nn.Module``, or a sequence of one model per rank
    (this rank runs ``[rank]``). Every rank must get the same input: pass it everywhere, or on
    rank ``src`` only (``None`` elsewhere) to broadcast it. ``dst=None``: ``all_gather``, and every
    rank returns the aggregate; ``dst=r``: ``gather`` to rank ``r``, which returns the aggregate,
    the others return ``None``. Output shapes and dtypes are exchanged first, so members that
    disagree raise the same ``ValueError`` on every rank instead of hanging.
    """
    get_aggregator(aggregator)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} must be an integer in 0..{world_size - 1}")
    if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
        raise ValueError(f"rank={rank}, world_size={world_size} do not match the process group "
                         f"(rank {dist.get_rank(group)} of {dist.get_world_size(group)})")
    if dst is not None and not (isinstance(dst, int) and 0 <= dst < world_size):
        raise ValueError(f"dst {dst!r} must be None (all ranks) or a rank in 0..{world_size - 1}")
    if weights is not None:
        weights = _check_weights(weights, world_size, aggregator)
    if isinstance(models_or_model_for_rank, nn.Module):
        model = models_or_model_for_rank
    else:
        models = list(models_or_model_for_rank)
        if len(models) != world_size:
            raise ValueError(f"{len(models)} models for {world_size} ranks; give one per rank or "
                             f"this rank's model")
        model = models[rank]
    if src is not None:
        device = next(model.parameters()).device
        inputs = broadcast_tensor(inputs, src=src, group=group, device=device)
    elif not isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs must be a tensor on every rank (or pass src=), got {type(inputs)}")
    with torch.no_grad():
        out = model(inputs).contiguous()

    check_outputs_agree(out, rank=rank, world_size=world_size, group=group)
    if dst is None:
        parts = [torch.empty_like(out) for _ in range(world_size)]
        dist.all_gather(parts, out, group=group)
    else:
        parts = [torch.empty_like(out) for _ in range(world_size)] if rank == dst else None
        dist.gather(out, parts, dst=dst, group=group)
        if rank != dst:
            return None
    return aggregate(parts, aggregator=aggregator, weights=weights)


def check_outputs_agree(out: torch.Tensor, *, rank: int, world_size: int, group=None) -> None:
    """All-gather every rank's output header (:mod:`lapdtr.runtime.wire`); outputs that differ
    in dtype or shape, or a dtype that cannot be sent, raise a ``ValueError`` on every rank
    (naming each rank's output) instead of leaving the gather to hang or fail on some."""
    values = pack_header(out.dtype, out.shape, strict=False)
    header = torch.tensor(values, dtype=torch.int64, device=out.device)
    headers = [torch.empty_like(header) for _ in range(world_size)]
    dist.all_gather(headers, header, group=group)
    rows = [h.tolist() for h in headers]
    if any(r != rows[0] for r in rows) or rows[0][0] == NO_CODE:
        desc = [f"rank {r}: {describe_header(v)}" for r, v in enumerate(rows)]
        try:
            dtype_code(out.dtype)
        except ValueError as e:
            desc.append(f"on rank {rank}: {e}")
        raise ValueError("ensemble members' outputs must have one shape and dtype; got "
                         + "; ".join(desc))
