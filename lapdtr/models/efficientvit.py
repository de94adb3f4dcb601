"""EfficientViT, both: the CVPR'23 cascaded-group-attention models (timm ``EfficientVitMsra``,
``efficientvit_m0..m5``, the one the LAP-DTR paper cites) and MIT's (timm ``EfficientVit``,
``efficientvit_b0..b3``).

Units: the patch embedding / stem, each stage's downsampling and each of its blocks, the head.
Feature maps ``(B, C, H, W)`` pass between units.
"""
from __future__ import annotations

from torch import nn
from timm.models.efficientvit_mit import EfficientVit
from timm.models.efficientvit_msra import EfficientVitMsra

from .base import UnitSpec, register_adapter
from ._util import present


def _call(path):
    parts = path.split(".")

    def fn(m, x):
        mod = m
        for p in parts:
            mod = mod[int(p)] if p.isdigit() else getattr(mod, p)
        return mod(x)
    return fn


def _stage_units(model, stem_name, attention=None):
    """Stem, downsample and block units; ``attention(block)``: the dotted name, under the block,
    of the module whose attention ranks its output (``None``: none)."""
    specs = [UnitSpec(stem_name, "embed", (stem_name,), _call(stem_name), "map")]
    for i, stage in enumerate(model.stages):
        ds = stage._modules.get("downsample")
        if ds is not None and not isinstance(ds, nn.Identity):
            name = f"stages.{i}.downsample"
            specs.append(UnitSpec(name, "stage", (name,), _call(name), "map"))
        for j in range(len(stage.blocks)):
            name = f"stages.{i}.blocks.{j}"
            sub = attention(stage.blocks[j]) if attention is not None else None
            specs.append(UnitSpec(name, "block", (name,), _call(name), "map",
                                  attention=f"{name}.{sub}" if sub else None))
    return specs


def _msra_head(m, x):
    return m.forward_head(x)


@register_adapter("efficientvit_m", model_types=[EfficientVitMsra], patterns=["efficientvit_m*"],
                  examples=["efficientvit_m0"], img_size_kwarg=True)
def efficientvit_msra_units(model):
    """EfficientViT-M (CVPR'23, cascaded group attention): patch embed, blocks, head."""
    specs = _stage_units(model, "patch_embed")
    specs.append(UnitSpec("head", "head", present(model, "global_pool", "head"), _msra_head,
                          "logits"))
    return specs


@register_adapter("efficientvit_b", model_types=[EfficientVit], patterns=["efficientvit_b*"],
                  examples=["efficientvit_b0"])
def efficientvit_mit_units(model):
    """EfficientViT-B (MIT): stem, blocks, head."""
    from timm.models.efficientvit_mit import EfficientVitBlock

    specs = _stage_units(model, "stem", lambda b: "context_module.main"  # LiteMLA
                         if isinstance(b, EfficientVitBlock) else None)
    specs.append(UnitSpec("head", "head", ("head",), _msra_head, "logits"))
    return specs
