"""ResNet (timm ``ResNet``): stem, one unit per residual block, head. Maps ``(B, C, H, W)``."""
from __future__ import annotations

from timm.models.resnet import ResNet

from .base import UnitSpec, register_adapter
from ._util import present


def _stem(m, x):
    return m.maxpool(m.act1(m.bn1(m.conv1(x))))


def _block(layer, j):
    def fn(m, x):
        return getattr(m, layer)[j](x)
    return fn


def _head(m, x):
    return m.forward_head(x)


@register_adapter("resnet", model_types=[ResNet], patterns=["resnet*"],
                  examples=["resnet18", "resnet50"])
def resnet_units(model):
    """ResNet: stem, one unit per residual block, head."""
    specs = [UnitSpec("stem", "embed", present(model, "conv1", "bn1", "act1", "maxpool"), _stem,
                      "map")]
    for layer in ("layer1", "layer2", "layer3", "layer4"):
        for j in range(len(getattr(model, layer))):
            specs.append(UnitSpec(f"{layer}.{j}", "block", (f"{layer}.{j}",), _block(layer, j),
                                  "map"))
    specs.append(UnitSpec("head", "head", present(model, "global_pool", "fc"), _head, "logits"))
    return specs
