"""MobileNetV2 (timm ``EfficientNet`` class) and MobileNetV3 (timm ``MobileNetV3``).

Units: stem (``conv_stem`` + ``bn1``), one unit per inverted-residual block, head (for V2 the
``conv_head``/``bn2`` that timm puts in ``forward_features``, then ``forward_head``).
"""
from __future__ import annotations

from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3

from .base import UnitSpec, register_adapter
from ._util import present


def _stem(m, x):
    return m.bn1(m.conv_stem(x))


def _block(i, j):
    def fn(m, x):
        return m.blocks[i][j](x)
    return fn


def _head_v2(m, x):
    return m.forward_head(m.bn2(m.conv_head(x)))


def _head_v3(m, x):
    return m.forward_head(x)


@register_adapter("mobilenet", model_types=[EfficientNet, MobileNetV3],
                  patterns=["mobilenetv2_*", "mobilenetv3_*"],
                  examples=["mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100"])
def mobilenet_units(model):
    """MobileNetV2/V3: stem, one unit per inverted-residual block, head."""
    specs = [UnitSpec("stem", "embed", ("conv_stem", "bn1"), _stem, "map")]
    for i, stage in enumerate(model.blocks):
        for j in range(len(stage)):
            specs.append(UnitSpec(f"blocks.{i}.{j}", "block", (f"blocks.{i}.{j}",), _block(i, j),
                                  "map"))
    if isinstance(model, MobileNetV3):
        head = present(model, "global_pool", "conv_head", "norm_head", "act2", "flatten",
                       "classifier")
        specs.append(UnitSpec("head", "head", head, _head_v3, "logits"))
    else:
        head = present(model, "conv_head", "bn2", "global_pool", "classifier")
        specs.append(UnitSpec("head", "head", head, _head_v2, "logits"))
    return specs
