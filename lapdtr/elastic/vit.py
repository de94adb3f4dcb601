"""Elastic attention heads and MLP widths for the DeiT/ViT family (timm ``VisionTransformer``).

``lapdtr.elastic.make_elastic(model)`` swaps each block's ``timm.layers.Attention`` for
:class:`ElasticAttention` and its ``timm.layers.Mlp`` for :class:`ElasticMlp`: subclasses of
timm's own, so parameter names, ``state_dict`` keys, checkpoints and ``RankModel.load_units`` are
unchanged. ``set_width(model, r)`` (or ``set_width(model, r, mlp_ratio=s)``) then runs every block with
``k = max(1, round(r·h))`` of its ``h`` heads and the matching share of its MLP hidden units.

At full width each layer runs timm's own forward (``torch.equal`` to the original). Below it,
the layers slice their weights on every call, as views of the parameters (no copies: a re-plan
replaces Parameters, so nothing is cached across calls):

* timm's ``qkv`` rows are ``[q | k | v]``, each ``heads × head_dim``: the first ``k`` heads are
  three contiguous row ranges, run as three matmuls instead of one fused one, then SDPA, then
  ``proj`` on the first ``k·head_dim`` columns (a strided view BLAS reads in place).
  ``W.view(3, H, hd, C)[:, :k].reshape(...)`` would copy on every call.
* the MLP runs ``fc1``'s first ``m`` rows and ``fc2``'s first ``m`` columns.

Dropping heads ``k..h-1`` this way equals zeroing their outputs before ``proj`` (heads are
independent), and dropping hidden units equals zeroing them before ``fc2``, up to float
summation order. Which heads come first is set once by ``order_by_magnitude_`` (a
permutation that leaves the full-width output unchanged up to summation order).
Attention with a gate or a norm over all heads (``scale_norm``), and an MLP with a norm over its
hidden units, cannot drop part of them exactly: ``set_width`` below full width refuses them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import nn

from .base import ElasticHeads, ElasticHidden, check_permutation

__all__ = ["ElasticAttention", "ElasticMlp", "convert"]


def _rows(t: torch.Tensor | None, a: int, b: int):
    return None if t is None else t[a:b]


class ElasticAttention(ElasticHeads, Attention):
    """timm's ``Attention`` that runs its first ``active_heads`` heads."""

    reason_inexact = ("a gated attention or one with a norm over all heads (scale_norm) cannot "
                      "run part of its heads exactly")

    def exact_below_full(self) -> bool:
        return self.gate is None and isinstance(self.norm, nn.Identity)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        k = self.heads_now
        if k == self.num_heads:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        hd, A = self.head_dim, self.attn_dim
        d = k * hd
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:d], _rows(b, 0, d)).view(B, N, k, hd).transpose(1, 2)
        kk = F.linear(x, w[A:A + d], _rows(b, A, A + d)).view(B, N, k, hd).transpose(1, 2)
        v = F.linear(x, w[2 * A:2 * A + d], _rows(b, 2 * A, 2 * A + d)).view(B, N, k, hd) \
            .transpose(1, 2)
        q, kk = self.q_norm(q), self.k_norm(kk)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, kk, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.0)
        else:  # timm's explicit path
            attn = (q * self.scale) @ kk.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, d)
        x = F.linear(x, self.proj.weight[:, :d], self.proj.bias)
        return self.proj_drop(x)

    def head_site(self):
        return self.proj, -1, self.head_dim

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance of each head: the norm of its value rows times the norm of its
        ``proj`` columns (how much it can move the block's output)."""
        H, hd, A = self.num_heads, self.head_dim, self.attn_dim
        v = self.qkv.weight[2 * A:].reshape(H, -1).norm(dim=1)
        p = self.proj.weight.view(self.proj.weight.shape[0], H, hd).permute(1, 0, 2).reshape(H, -1)
        return v * p.norm(dim=1)

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the heads (``order[i]``: the old head that becomes head ``i``), in place:
        ``qkv`` rows within each of q, k, v, ``proj`` columns (and a gate's rows)."""
        H, hd, A = self.num_heads, self.head_dim, self.attn_dim
        order = check_permutation(order, H, "reorder_")
        w = self.qkv.weight
        w.copy_(w.view(3, H, hd, -1)[:, order].reshape(3 * A, -1))
        if self.qkv.bias is not None:
            self.qkv.bias.copy_(self.qkv.bias.view(3, H, hd)[:, order].reshape(-1))
        p = self.proj.weight
        p.copy_(p.view(p.shape[0], H, hd)[:, order].reshape(p.shape[0], A))
        if self.gate is not None:
            g = self.gate.weight
            g.copy_(g.view(H, hd, -1)[order].reshape(A, -1))
            if self.gate.bias is not None:
                self.gate.bias.copy_(self.gate.bias.view(H, hd)[order].reshape(-1))


class ElasticMlp(ElasticHidden, Mlp):
    """timm's ``Mlp`` that runs its first ``active_hidden`` hidden units."""

    def exact_below_full(self) -> bool:  # a norm over the hidden units sees all of them
        return isinstance(self.norm, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.hidden_now
        if m == self.hidden_features:
            return super().forward(x)
        return self.hidden_forward(x, m)


def convert(model: nn.Module) -> None:
    """Swap, in place, every ``timm.layers.Attention`` and linear ``timm.layers.Mlp``."""
    for mod in model.modules():
        if type(mod) is Attention:
            mod.__class__ = ElasticAttention
            mod.active_heads = mod.num_heads
        elif type(mod) is Mlp and isinstance(mod.fc1, nn.Linear):
            mod.__class__ = ElasticMlp
            mod.active_hidden = mod.fc1.out_features
