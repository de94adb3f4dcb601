"""ViT with relative position biases (timm ``VisionTransformerRelPos``: ``vit_relpos_*`` with a
bias module in every block's attention, ``vit_srelpos_*`` with one bias module shared by all
blocks).

Units: ``embed`` (patch embedding and class token), one unit per transformer block, ``head``
(final norm, pooling, classifier). Tokens ``(B, N, C)`` pass between units.

timm's ``forward_features`` computes the shared bias once (``shared_rel_pos.get_bias()``) and
passes it to every block; here each block unit computes it with the host's own module, so a block
runs on its own. The shared module is listed among the modules of every block unit (a rank that
holds any block holds it; its tensors are owned by several units).
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer_relpos import VisionTransformerRelPos

from .base import UnitSpec, register_adapter
from ._util import present


def _embed(m, x):
    x = m.patch_embed(x)
    if m.cls_token is not None:  # the class token is a parameter, prepended to the patches
        x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    return x


def _block(i):
    def fn(m, x):
        shared = m.shared_rel_pos.get_bias() if m.shared_rel_pos is not None else None
        return m.blocks[i](x, shared_rel_pos=shared)
    return fn


def _head(m, x):
    return m.forward_head(m.norm(x))


@register_adapter(
    "vit_relpos", model_types=[VisionTransformerRelPos],
    patterns=["vit_relpos_*", "vit_srelpos_*"],
    examples=["vit_relpos_small_patch16_224", "vit_relpos_small_patch16_rpn_224"],
    img_size_kwarg=True,
)
def vit_relpos_units(model):
    """ViT with relative position biases (shared or per block): embed, one unit per block, head."""
    shared = present(model, "shared_rel_pos")
    specs = [UnitSpec("embed", "embed", present(model, "patch_embed", "cls_token"), _embed,
                      "tokens")]
    for i in range(len(model.blocks)):
        specs.append(UnitSpec(f"blocks.{i}", "block", (f"blocks.{i}", *shared), _block(i),
                              "tokens"))
    specs.append(UnitSpec("head", "head", present(model, "norm", "fc_norm", "head_drop", "head"),
                          _head, "logits"))
    return specs
