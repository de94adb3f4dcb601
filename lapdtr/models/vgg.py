"""VGG (timm ``VGG``): one unit per conv (+ its ReLU) and per max-pool, then ``head``
(``pre_logits`` ConvMlp + classifier). Max-pools are units of their own so planners see them as
the natural (optional) split points they are.
"""
from __future__ import annotations

from torch import nn
from timm.models.vgg import VGG

from .base import UnitSpec, register_adapter


def _features(idx):
    def fn(m, x):
        for i in idx:
            x = m.features[i](x)
        return x
    return fn


def _head(m, x):
    return m.forward_head(x)


@register_adapter("vgg", model_types=[VGG], patterns=["vgg*"], examples=["vgg11", "vgg16"])
def vgg_units(model):
    """VGG: one unit per conv+ReLU and per max-pool, head."""
    specs, group = [], []
    layers = list(model.features)

    def flush():
        if group:
            kind = "embed" if not specs else "block"
            name = f"features.{group[0]}"
            specs.append(UnitSpec(name, kind, tuple(f"features.{i}" for i in group),
                                  _features(tuple(group)), "map"))
            group.clear()

    for i, layer in enumerate(layers):
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            flush()
        group.append(i)
    flush()
    specs.append(UnitSpec("head", "head", ("pre_logits", "head"), _head, "logits"))
    return specs
