"""ViT / DeiT / DeiT III (timm ``VisionTransformer``, distilled variants included).

Units: ``embed`` (patch embedding, class/distillation/register tokens, position embedding),
one unit per transformer block, ``head`` (final norm, pooling, classifier(s)). Tokens ``(B, N, C)``
pass between units.
"""
from __future__ import annotations

from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from .base import UnitSpec, register_adapter
from ._util import present


def _embed(m, x):
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def _block(i):
    def fn(m, x):
        return m.blocks[i](x)
    return fn


def _head(m, x):
    return m.forward_head(m.norm(x))


@register_adapter(
    "vit", model_types=[VisionTransformer, VisionTransformerDistilled],
    patterns=["vit_*", "deit_*", "deit3_*"],
    examples=["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224",
              "vit_tiny_patch16_224"],
    img_size_kwarg=True,
)
def vit_units(model):
    """ViT / DeiT / DeiT III: embed, one unit per block, head."""
    specs = [UnitSpec("embed", "embed",
                      present(model, "patch_embed", "cls_token", "dist_token", "reg_token",
                              "pos_embed", "pos_drop", "patch_drop", "norm_pre"),
                      _embed, "tokens")]
    for i in range(len(model.blocks)):
        specs.append(UnitSpec(f"blocks.{i}", "block", (f"blocks.{i}",), _block(i), "tokens",
                              attention=f"blocks.{i}.attn"))
    specs.append(UnitSpec("head", "head",
                          present(model, "norm", "attn_pool", "fc_norm", "head_drop", "head",
                                  "head_dist"),
                          _head, "logits"))
    return specs
