"""Make a model elastic, set its widths, order its heads: the same calls for every family.

``make_elastic(model)`` swaps the family's attention and MLP layers for elastic subclasses of
timm's own (``FAMILIES``: which families have them); every elastic layer is an
``ElasticHeads`` or ``ElasticHidden`` (``lapdtr.elastic.base``), so the rest works on any family.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from .base import ElasticError, ElasticHeads, ElasticHidden, count_for

__all__ = ["FAMILIES", "apply_elastic", "make_elastic", "set_width", "widths",
           "order_by_magnitude_", "elastic_layers", "inexact_layers"]

#: adapter family -> the ``lapdtr.elastic`` module whose ``convert(model)`` swaps its layers
FAMILIES = {"vit": "vit", "tiny_vit": "tiny_vit", "efficientvit_m": "efficientvit_m",
            "efficientvit_b": "efficientvit_b", "edgevit": "edgevit", "eva": "eva"}


def _family(model: nn.Module) -> str:
    from ..models.base import get_adapter

    try:
        return get_adapter(model).name
    except ValueError:
        return type(model).__name__


def make_elastic(model: nn.Module) -> nn.Module:
    """Swap the family's attention and MLP layers for elastic ones, in place (full width:
    unchanged; ``state_dict`` keys unchanged). Returns ``model``."""
    family = _family(model)
    if family not in FAMILIES:
        raise ElasticError(f"make_elastic: {family!r} has no elastic layers; allowed: "
                           f"{sorted(FAMILIES)}")
    importlib.import_module(f"{__package__}.{FAMILIES[family]}").convert(model)
    return model


apply_elastic = make_elastic


def elastic_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (ElasticHeads, ElasticHidden))]


def inexact_layers(model: nn.Module) -> list[str]:
    """Names of the elastic layers that run below full width only approximately (their
    ``exact_below_full()`` is False but ``approximate`` lets them run: EdgeViT's attention
    where ``sr_ratio > 1``); a model with such layers relies on elastic training there."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (ElasticHeads, ElasticHidden)) and not m.exact_below_full()]


def set_width(model: nn.Module, ratio: float = 1.0, *, mlp_ratio: float | None = None) -> dict:
    """Run every elastic layer at width ratio ``ratio`` (attention heads) and ``mlp_ratio``
    (MLP hidden units; default: ``ratio``), each in (0, 1], rounded per layer to a count it has
    (``count_for``). Every layer is checked before any changes. Returns the realised widths,
    what :func:`widths` returns."""
    heads = ratio
    hidden = ratio if mlp_ratio is None else mlp_ratio
    layers = elastic_layers(model)
    if not layers:
        raise ElasticError("set_width: the model has no elastic layers; call "
                           "lapdtr.elastic.make_elastic(model) first")
    chosen = []
    for mod in layers:
        if isinstance(mod, ElasticHeads):
            chosen.append((mod, "active_heads",
                           mod.check_heads(count_for(heads, mod.num_heads, "heads"))))
        else:
            chosen.append((mod, "active_hidden",
                           mod.check_hidden(count_for(hidden, mod.hidden_features, "hidden"))))
    for mod, attr, n in chosen:
        setattr(mod, attr, n)
    return widths(model)


def widths(model: nn.Module) -> dict:
    """``{"heads": [(active, total)...], "hidden": [(active, total)...]}`` per elastic layer."""
    out = {"heads": [], "hidden": []}
    for mod in elastic_layers(model):
        if isinstance(mod, ElasticHeads):
            out["heads"].append((mod.heads_now, mod.num_heads))
        else:
            out["hidden"].append((mod.hidden_now, mod.hidden_features))
    return out


@torch.no_grad()
def order_by_magnitude_(model: nn.Module) -> dict:
    """Order every elastic layer's heads and hidden units by their data-free magnitude, most
    important first (the fallback of the calibration-data importance); the full-width output is
    unchanged up to float summation order. Returns the permutations, by module name."""
    applied = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (ElasticHeads, ElasticHidden)) and mod.reorderable:
            order = mod.magnitude().argsort(descending=True)
            mod.reorder_(order)
            applied[name] = order.tolist()
    if not elastic_layers(model):
        raise ElasticError("order_by_magnitude_: the model has no elastic layers; call "
                           "lapdtr.elastic.make_elastic(model) first")
    return applied
