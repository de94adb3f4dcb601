"""ResNet v2 (timm ``ResNetV2``: ``resnetv2_*``, BiT ``resnetv2_*_bit*``; pre-activation and
post-activation variants).

Units: ``stem``, one unit per block of every stage (``stages.i.blocks.j``; a stage holds nothing
but its blocks, the stage's projection shortcut lives in its first block), ``head``: the final
norm (in a pre-activation net the only norm after the last block, an ``Identity`` otherwise),
pooling and classifier. Maps ``(B, C, H, W)`` pass between units.
"""
from __future__ import annotations

from timm.models.resnetv2 import ResNetV2

from .base import UnitSpec, register_adapter
from ._util import present


def _stem(m, x):
    return m.stem(x)


def _block(i, j):
    def fn(m, x):
        return m.stages[i].blocks[j](x)
    return fn


def _head(m, x):
    return m.forward_head(m.norm(x))


@register_adapter("resnetv2", model_types=[ResNetV2], patterns=["resnetv2_*"],
                  examples=["resnetv2_18", "resnetv2_50x1_bit"])
def resnetv2_units(model):
    """ResNet v2 / BiT: stem, one unit per block, head (final norm, pooling, classifier)."""
    specs = [UnitSpec("stem", "embed", ("stem",), _stem, "map")]
    for i, stage in enumerate(model.stages):
        extra = [k for k in stage._modules if k != "blocks"] + list(stage._parameters)
        if extra:
            raise ValueError(f"ResNetV2 stage {i} holds {extra} besides its blocks; the resnetv2 "
                             f"adapter splits a stage into its blocks only")
        for j in range(len(stage.blocks)):
            name = f"stages.{i}.blocks.{j}"
            specs.append(UnitSpec(name, "block", (name,), _block(i, j), "map"))
    specs.append(UnitSpec("head", "head", present(model, "norm", "head"), _head, "logits"))
    return specs
