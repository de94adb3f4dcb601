"""Which heads and hidden units matter, measured on calibration data (DynaBERT, Hou et al. 2020,
§3.1), and the once-only reordering that puts them first so that slicing keeps them.

* A head's importance is ``Σ |∂L/∂m_h|`` over the calibration batches, where ``m_h`` is a mask
  of ones multiplying head ``h``'s output where the heads' outputs meet (``head_site()``:
  ``(module, dim, per_head[, repeats])``, the heads side by side ``repeats`` times over, as
  EfficientViT-B's multi-scale branches lay them), so the forward is unchanged and the
  gradient says how much the loss moves if the head goes.
* A hidden unit's importance is ``Σ |w · ∂L/∂w|`` over its weights (``hidden_params()``: ``fc1``
  row and bias, ``fc2`` column, or a family's convs and norms), the first-order estimate of the
  loss change when the unit is removed.

``L`` is the cross entropy against the calibration targets, as DynaBERT uses the task loss on
its development set. Given inputs without targets, the model's own full-width top-1 is the
target (a KL divergence to its own predictions would have zero gradient where it is evaluated).
Layers whose unit order is part of their function (``reorderable = False``) are scored but not
reordered. :func:`lapdtr.elastic.order_by_magnitude_` is the data-free fallback.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .base import ElasticError, ElasticHeads, ElasticHidden

__all__ = ["importance", "order_by_importance_"]


def _batches(data) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(data, torch.Tensor):
        data = [data]
    for item in data:
        if isinstance(item, (tuple, list)):
            yield item[0], (item[1] if len(item) > 1 else None)
        else:
            yield item, None


def _mask_hook(mask: torch.Tensor, dim: int, per_head: int, repeats: int = 1):
    def hook(module, args):
        x = args[0]
        d = dim % x.dim()
        shape = [1] * x.dim()
        shape[d] = x.shape[d]
        m = mask.repeat_interleave(per_head).repeat(repeats).view(shape)
        if x.shape[d] != m.numel():
            raise ElasticError(f"head_site of {type(module).__name__}: {x.shape[d]} channels "
                               f"at dim {dim}, not {m.numel()} (heads x per_head)")
        return (x * m.to(x.dtype),) + tuple(args[1:])
    return hook


def importance(model: nn.Module, data, *, max_batches: int | None = None) -> dict:
    """Importance per elastic layer on ``data`` (a tensor, or an iterable of tensors or
    ``(inputs, targets)``): ``{module name: tensor of one score per head / hidden unit}``,
    computed at full width with the model's parameters left as they were (gradients are taken
    and discarded; the model's mode and ``requires_grad`` flags are restored)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (ElasticHeads, ElasticHidden))}
    if not layers:
        raise ElasticError("importance: the model has no elastic layers; call "
                           "lapdtr.elastic.make_elastic(model) first")
    saved_widths = [(m, m.heads_now if isinstance(m, ElasticHeads) else m.hidden_now)
                    for m in layers.values()]
    for m in layers.values():
        if isinstance(m, ElasticHeads):
            m.active_heads = m.num_heads
        else:
            m.active_hidden = m.hidden_features
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    was_training = model.training
    model.eval()
    score = {}
    hooks, masks = [], {}
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        for name, m in layers.items():
            if isinstance(m, ElasticHeads):
                site, dim, per, *rep = m.head_site()
                ref = next(site.parameters(), None)
                mask = torch.ones(m.num_heads, requires_grad=True,
                                  device=None if ref is None else ref.device)
                masks[name] = mask
                hooks.append(site.register_forward_pre_hook(_mask_hook(mask, dim, per, *rep)))
            score[name] = None
        n = 0
        for x, y in _batches(data):
            if max_batches is not None and n >= max_batches:
                break
            out = model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            target = out.argmax(-1).detach() if y is None else y
            F.cross_entropy(out, target, reduction="sum").backward()
            n += 1
        if n == 0:
            raise ElasticError("importance: the calibration data gave no batches")
        for name, m in layers.items():
            if isinstance(m, ElasticHeads):
                score[name] = masks[name].grad.abs().detach().clone()
            else:
                total = torch.zeros(m.hidden_features)
                for p, d in m.hidden_params():
                    if p.grad is None:
                        continue
                    s = (p.detach() * p.grad).abs()
                    other = [i for i in range(s.dim()) if i != d]
                    total += (s.sum(other) if other else s).cpu().float()
                score[name] = total
    finally:
        for h in hooks:
            h.remove()
        for p, f, g in zip(params, flags, grads):
            p.grad = g
            p.requires_grad_(f)
        model.train(was_training)
        for m, k in saved_widths:
            if isinstance(m, ElasticHeads):
                m.active_heads = k
            else:
                m.active_hidden = k
    return score


@torch.no_grad()
def order_by_importance_(model: nn.Module, data, *, max_batches: int | None = None) -> dict:
    """Reorder every reorderable elastic layer's heads and hidden units by :func:`importance`
    on ``data``, most important first (the full-width output is unchanged up to float summation
    order). Returns ``{module name: the permutation applied}``."""
    with torch.enable_grad():
        scores = importance(model, data, max_batches=max_batches)
    applied = {}
    for name, mod in model.named_modules():
        if name in scores and mod.reorderable:
            order = scores[name].argsort(descending=True, stable=True)
            mod.reorder_(order)
            applied[name] = order.tolist()
    return applied
