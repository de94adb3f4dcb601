"""Elastic attention heads and MLP widths for TinyViT (timm ``tiny_vit``).

TinyViT's window attention lays ``qkv``'s rows out per head (``[q | k | v]`` of head 0, then head
1, ...), so the first ``k`` heads are one contiguous row range of ``qkv`` and the first
``k·val_dim`` columns of ``proj``; each head has its own attention-bias table, whose first ``k``
rows are sliced from timm's cached bias (``get_attention_biases``). Reordering heads permutes the
tables too and clears that eval-mode cache, which timm keys by device and nothing else clears
when parameters are replaced. The MLP (``NormMlp``) normalizes its *input*, so its hidden units
slice exactly. Full width runs timm's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.tiny_vit import Attention, NormMlp
from torch import nn

from .base import ElasticHeads, ElasticHidden, check_permutation

__all__ = ["ElasticTinyAttention", "ElasticNormMlp", "convert"]


class ElasticTinyAttention(ElasticHeads, Attention):
    """TinyViT's window ``Attention`` that runs its first ``active_heads`` heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.heads_now
        if k == self.num_heads:
            return super().forward(x)
        bias = self.get_attention_biases(x.device)[:k]
        B, N, _ = x.shape
        x = self.norm(x)
        per = 2 * self.key_dim + self.val_dim
        w, b = self.qkv.weight, self.qkv.bias
        qkv = F.linear(x, w[:k * per], None if b is None else b[:k * per])
        q, kk, v = qkv.view(B, N, k, per).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, kk, v = q.permute(0, 2, 1, 3), kk.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, kk, v, attn_mask=bias)
        else:  # timm's explicit path
            attn = ((q * self.scale) @ kk.transpose(-2, -1) + bias).softmax(dim=-1)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, k * self.val_dim)
        return F.linear(x, self.proj.weight[:, :k * self.val_dim], self.proj.bias)

    def head_site(self):
        return self.proj, -1, self.val_dim

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance per head: norm of its value rows times norm of its proj columns."""
        H, per, vd = self.num_heads, 2 * self.key_dim + self.val_dim, self.val_dim
        v = self.qkv.weight.view(H, per, -1)[:, 2 * self.key_dim:].reshape(H, -1).norm(dim=1)
        p = self.proj.weight.view(self.proj.weight.shape[0], H, vd).permute(1, 0, 2)
        return v * p.reshape(H, -1).norm(dim=1)

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the heads in place: ``qkv`` row blocks, ``proj`` columns, bias tables; the
        eval-mode bias cache is cleared."""
        H, per, vd = self.num_heads, 2 * self.key_dim + self.val_dim, self.val_dim
        order = check_permutation(order, H, "reorder_")
        w = self.qkv.weight
        w.copy_(w.view(H, per, -1)[order].reshape(H * per, -1))
        if self.qkv.bias is not None:
            self.qkv.bias.copy_(self.qkv.bias.view(H, per)[order].reshape(-1))
        p = self.proj.weight
        p.copy_(p.view(p.shape[0], H, vd)[:, order].reshape(p.shape[0], H * vd))
        self.attention_biases.copy_(self.attention_biases[order])
        self.attention_bias_cache = {}


class ElasticNormMlp(ElasticHidden, NormMlp):
    """TinyViT's ``NormMlp`` (a norm on its input) that runs its first ``active_hidden`` units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.hidden_now
        if m == self.hidden_features:
            return super().forward(x)
        return self.hidden_forward(self.norm(x), m)


def convert(model: nn.Module) -> None:
    """Swap, in place, every TinyViT ``Attention`` and ``NormMlp`` for its elastic subclass."""
    for mod in model.modules():
        if type(mod) is Attention:
            mod.__class__ = ElasticTinyAttention
            mod.active_heads = mod.num_heads
        elif type(mod) is NormMlp:
            mod.__class__ = ElasticNormMlp
            mod.active_hidden = mod.fc1.out_features
