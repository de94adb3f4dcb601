"""Bring-your-own-blocks nets (timm ``ByobNet``), built by timm's ``byobnet`` (GENet ``gernet_*``,
RepVGG, MobileOne, RegNetZ, ``resnet*ts``, the CLIP ResNets ``resnet*_clip*`` ...), ``byoanet``
(BoTNet, HaloNet, LambdaNet) and ``mobilevit`` modules.

Units: ``stem``, one unit per block of every stage (``stages.i.j``; a stage is a ``Sequential``
of blocks), ``head``: ``final_conv`` (an ``Identity`` where the config has no final width) and
the head (a classifier head, an MLP head, or the CLIP attention pool). Maps ``(B, C, H, W)`` pass
between units.
"""
from __future__ import annotations

from timm.models.byobnet import ByobNet

from .base import UnitSpec, register_adapter
from ._util import present


def _stem(m, x):
    return m.stem(x)


def _block(i, j):
    def fn(m, x):
        return m.stages[i][j](x)
    return fn


def _head(m, x):
    return m.forward_head(m.final_conv(x))


@register_adapter(
    "byobnet", model_types=[ByobNet],
    # names built by timm's byoanet and mobilevit modules (those of byobnet are candidates anyway)
    patterns=["botnet*", "sebotnet*", "eca_botnext*", "halonet*", "sehalonet*", "eca_halonext*",
              "halo2botnet*", "haloregnetz*", "lambda_resnet*", "lamhalobotnet*", "mobilevit*"],
    examples=["gernet_s", "resnet32ts", "resnet50_clip_gap"],
    img_size_kwarg=True,  # attention blocks and the CLIP attention pool are sized at creation
)
def byobnet_units(model):
    """ByobNet (GENet, RepVGG, RegNetZ, CLIP ResNets, BoTNet, HaloNet, MobileViT ...): stem, one
    unit per block, head (final conv, head)."""
    specs = [UnitSpec("stem", "embed", ("stem",), _stem, "map")]
    for i, stage in enumerate(model.stages):
        for j in range(len(stage)):
            name = f"stages.{i}.{j}"
            specs.append(UnitSpec(name, "block", (name,), _block(i, j), "map"))
    specs.append(UnitSpec("head", "head", present(model, "final_conv", "head"), _head, "logits"))
    return specs
