"""TinyViT (timm ``TinyVit``).

Units: ``patch_embed``, stage 0 (conv blocks), then for stages 1..3 the downsampling and one unit
per attention block, and ``head``. ``TinyVitStage.forward`` is downsample -> NCHW->NHWC -> blocks ->
NHWC->NCHW; the two permutes are applied at the stage's first and last unit, so block units pass
``(B, H, W, C)`` maps. The equivalence tests pin this to timm's forward.
"""
from __future__ import annotations

from timm.models.tiny_vit import TinyVit, TinyVitStage

from .base import UnitSpec, register_adapter


def _patch_embed(m, x):
    return m.patch_embed(x)


def _whole_stage(i):
    def fn(m, x):
        return m.stages[i](x)
    return fn


def _downsample(i):
    def fn(m, x):
        return m.stages[i].downsample(x).permute(0, 2, 3, 1)
    return fn


def _block(i, j, last):
    def fn(m, x):
        x = m.stages[i].blocks[j](x)
        return x.permute(0, 3, 1, 2) if last else x
    return fn


def _head(m, x):
    return m.forward_head(x)


@register_adapter("tiny_vit", model_types=[TinyVit], patterns=["tiny_vit_*"],
                  examples=["tiny_vit_5m_224"])
def tiny_vit_units(model):
    """TinyViT: patch embed, conv stage, downsample + block units per attention stage, head."""
    specs = [UnitSpec("patch_embed", "embed", ("patch_embed",), _patch_embed, "map")]
    for i, stage in enumerate(model.stages):
        if not isinstance(stage, TinyVitStage):
            specs.append(UnitSpec(f"stages.{i}", "stage", (f"stages.{i}",), _whole_stage(i), "map"))
            continue
        specs.append(UnitSpec(f"stages.{i}.downsample", "stage", (f"stages.{i}.downsample",),
                              _downsample(i), "map_nhwc"))
        n = len(stage.blocks)
        for j in range(n):
            specs.append(UnitSpec(f"stages.{i}.blocks.{j}", "block", (f"stages.{i}.blocks.{j}",),
                                  _block(i, j, j == n - 1), "map" if j == n - 1 else "map_nhwc",
                                  attention=f"stages.{i}.blocks.{j}"))  # window attention
    specs.append(UnitSpec("head", "head", ("head",), _head, "logits"))
    return specs
