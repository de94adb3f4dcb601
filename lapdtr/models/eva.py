"""RoPE ViTs, DINOv3, EVA / EVA-02, Perception Encoder, Sapiens2, LingBot (timm ``Eva``).

Units: ``embed`` (patch embedding, class and register tokens, absolute position embedding,
``pos_drop``, ``patch_drop``, ``norm_pre``), one unit per block, ``head`` (final norm, pooling or
attention pooling, ``fc_norm``, ``head_drop``, classifier). Tokens ``(B, N, C)`` pass between
units, as between ViT units.

timm computes the rotary table once per forward (in ``Eva._pos_embed``) and hands it to every
block. Here each block unit rebuilds it from the host's ``rope`` module with the call
``_pos_embed`` makes (``rope.get_embed()`` for a fixed grid, ``rope.get_embed(shape=(H, W))``
for ``dynamic_img_size``, the block's slice ``[i]`` for RoPE-Mixed), so nothing but the tokens
crosses a unit boundary; the table is a function of the grid (and RoPE-Mixed's ``freqs``) only,
so the rebuilt one is the same tensor. ``rope`` is listed among the modules of the embed unit
(``_pos_embed`` calls it) and of every block unit: a stage of blocks carries it to its device.
Its state is non-persistent buffers, except RoPE-Mixed's learnable ``rope.freqs``, which is
therefore owned by every unit that lists ``rope`` (shared, as the blocks share it in timm).

With ``dynamic_img_size`` the block units read the patch grid off the token count: a square
grid when ``N - num_prefix_tokens`` is a square, else the model's own ``patch_embed.grid_size``
when the count matches it (lapdtr feeds square images; a rectangular image of another aspect
than the model's own grid cannot be told apart from its token count and is refused).

Summarized boundaries (:mod:`lapdtr.summarize`): a block's tokens are ranked by its attention
with RoPE applied (``RopeAttentionProbe``), and the next stage takes the full sequence back
(``restore_rule``: ``dense``), so each block unit's rotary table still matches its tokens.

Not supported through units, each a ``ValueError`` naming it: patch dropout (``patch_drop_rate
> 0``) in training mode with RoPE (the random kept patches select rows of the table that only
``_pos_embed`` knows), and RoPE coordinate augmentation (``rope_shift_coords`` /
``rope_jitter_coords`` / ``rope_rescale_coords``, Sapiens2's default) in training mode (timm
draws one random transform per forward shared by all blocks; units would draw one per block).
Both run in eval mode.
"""
from __future__ import annotations

import math

import torch
from timm.models.eva import Eva

from .base import UnitSpec, register_adapter
from ._util import present


def _embed(m, x):
    pd = m.patch_drop
    if m.rope is not None and pd is not None and pd.training and pd.prob > 0:
        raise ValueError(
            "Eva with patch dropout (patch_drop_rate > 0) and RoPE cannot run as units in "
            "training mode: the randomly kept patches select rows of the rotary table that only "
            "timm's _pos_embed knows; allowed: eval mode, or patch_drop_rate=0")
    x, _ = m._pos_embed(m.patch_embed(x))
    return m.norm_pre(x)


def _grid(m, tokens: torch.Tensor) -> tuple[int, int]:
    """The patch grid ``(H, W)`` of a dynamic-size Eva's tokens (see the module docstring)."""
    n = tokens.shape[1] - m.num_prefix_tokens
    s = math.isqrt(max(n, 0))
    if n > 0 and s * s == n:
        return s, s
    own = tuple(int(v) for v in m.patch_embed.grid_size)
    if n == own[0] * own[1]:
        return own
    raise ValueError(
        f"Eva block unit: {tokens.shape[1]} tokens ({m.num_prefix_tokens} prefix tokens and {n} "
        f"patches) are neither a square patch grid nor the model's own grid {own[0]}x{own[1]}; "
        f"allowed: square images, or images of the model's own size")


def _rope_table(m, tokens: torch.Tensor, i: int):
    """Block ``i``'s rotary table, as ``Eva._pos_embed`` and ``forward_features`` give it."""
    rope = m.rope
    if rope is None:
        return None
    if rope.training and getattr(rope, "aug_active", False):
        raise ValueError(
            "Eva with RoPE coordinate augmentation (rope_shift_coords / rope_jitter_coords / "
            "rope_rescale_coords) cannot run as units in training mode: timm draws one random "
            "transform per forward for all blocks, a block unit would draw its own; allowed: "
            "eval mode, or a model built without those arguments")
    if m.dynamic_img_size:
        table = rope.get_embed(shape=_grid(m, tokens))
    elif hasattr(rope, "feat_shape"):
        table = rope.get_embed()
    else:  # RoPE modules without a feat_shape (MRoPE) take the grid shape
        table = rope.get_embed(shape=m.patch_embed.grid_size)
    return table[i] if getattr(m, "rope_mixed", False) else table


def _block(i):
    def fn(m, x):
        return m.blocks[i](x, rope=_rope_table(m, x, i))
    return fn


def _head(m, x):
    return m.forward_head(m.norm(x))


@register_adapter(
    "eva", model_types=[Eva],
    patterns=["eva_*", "eva02_*", "vit_*rope*", "vit_*dinov3*", "vit_pe_*", "vit_*sapiens2*",
              "vit_*lingbot*"],
    examples=["vit_small_patch16_rope_224", "eva02_tiny_patch14_224", "vit_small_patch16_dinov3"],
    img_size_kwarg=True,
)
def eva_units(model):
    """Eva (RoPE ViT, DINOv3, EVA-02 ...): embed, one unit per block (rotary table rebuilt), head."""
    rope = present(model, "rope")
    specs = [UnitSpec("embed", "embed",
                      present(model, "patch_embed", "cls_token", "reg_token", "pos_embed",
                              "pos_drop", "patch_drop", "rope", "norm_pre"),
                      _embed, "tokens")]
    for i in range(len(model.blocks)):
        specs.append(UnitSpec(f"blocks.{i}", "block", (f"blocks.{i}", *rope), _block(i),
                              "tokens", attention=f"blocks.{i}.attn"))
    specs.append(UnitSpec("head", "head",
                          present(model, "norm", "attn_pool", "fc_norm", "head_drop", "head"),
                          _head, "logits"))
    return specs
