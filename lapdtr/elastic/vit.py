"""Elastic attention heads and MLP widths for the DeiT/ViT family (timm ``VisionTransformer``).

``make_elastic(model)`` swaps each block's ``timm.layers.Attention`` for :class:`ElasticAttention`
and its ``timm.layers.Mlp`` for :class:`ElasticMlp`: subclasses of timm's own, so parameter names,
``state_dict`` keys, checkpoints and ``RankModel.load_units`` are unchanged. ``set_width(model,
heads=r, hidden=r)`` then runs every block with ``k = max(1, round(r·h))`` of its ``h`` heads and
the matching share of its MLP hidden units.

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
summation order. Which heads come first is set once by :func:`order_by_magnitude_` (a
permutation that leaves the full-width output unchanged up to summation order).
Attention with a gate or a norm over all heads (``scale_norm``), and an MLP with a norm over its
hidden units, cannot drop part of them exactly: ``set_width`` below full width refuses them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import nn

from .base import ElasticError, check_count, count_for

__all__ = ["ElasticAttention", "ElasticMlp", "make_elastic", "set_width", "widths",
           "order_by_magnitude_", "order_heads_", "order_hidden_"]


def _rows(t: torch.Tensor | None, a: int, b: int):
    return None if t is None else t[a:b]


class ElasticAttention(Attention):
    """timm's ``Attention`` that runs its first ``active_heads`` heads."""

    active_heads: int

    def _exact_below_full(self) -> bool:
        return self.gate is None and isinstance(self.norm, nn.Identity)

    def check_heads(self, k: int) -> int:
        """``k`` if this layer can run ``k`` heads, else an ``ElasticError`` naming the allowed."""
        check_count(k, self.num_heads, "heads", "ElasticAttention")
        if k < self.num_heads and not self._exact_below_full():
            raise ElasticError("ElasticAttention: a gated attention or one with a norm over all "
                               "heads (scale_norm) cannot run part of its heads exactly; "
                               f"allowed: heads={self.num_heads} only")
        return k

    def set_heads(self, k: int) -> None:
        self.active_heads = self.check_heads(k)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        k = getattr(self, "active_heads", self.num_heads)
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


class ElasticMlp(Mlp):
    """timm's ``Mlp`` that runs its first ``active_hidden`` hidden units."""

    active_hidden: int

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_features

    def check_hidden(self, m: int) -> int:
        """``m`` if this layer can run ``m`` hidden units, else an ``ElasticError``."""
        check_count(m, self.hidden_features, "hidden", "ElasticMlp")
        if m < self.hidden_features and not isinstance(self.norm, nn.Identity):
            raise ElasticError("ElasticMlp: a norm over all hidden units cannot run part of them "
                               f"exactly; allowed: hidden={self.hidden_features} only")
        return m

    def set_hidden(self, m: int) -> None:
        self.active_hidden = self.check_hidden(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = getattr(self, "active_hidden", self.hidden_features)
        if m == self.hidden_features:
            return super().forward(x)
        x = F.linear(x, self.fc1.weight[:m], _rows(self.fc1.bias, 0, m))
        x = self.drop1(self.act(x))
        x = F.linear(x, self.fc2.weight[:, :m], self.fc2.bias)
        return self.drop2(x)


def _elastic_layers(model: nn.Module):
    for mod in model.modules():
        if isinstance(mod, (ElasticAttention, ElasticMlp)):
            yield mod


def make_elastic(model: nn.Module) -> nn.Module:
    """Swap, in place, every ``timm.layers.Attention`` and linear ``timm.layers.Mlp`` of a
    DeiT/ViT model for its elastic subclass (full width: unchanged). Returns ``model``."""
    from ..models.base import get_adapter

    try:
        family = get_adapter(model).name
    except ValueError:
        family = type(model).__name__
    if family != "vit":
        raise ElasticError(f"make_elastic: {family!r} has no elastic layers here yet; allowed: "
                           "the 'vit' family (timm VisionTransformer: deit_*, deit3_*, vit_*)")
    for mod in model.modules():
        if type(mod) is Attention:
            mod.__class__ = ElasticAttention
            mod.active_heads = mod.num_heads
        elif type(mod) is Mlp and isinstance(mod.fc1, nn.Linear):
            mod.__class__ = ElasticMlp
            mod.active_hidden = mod.fc1.out_features
    return model


def set_width(model: nn.Module, heads: float = 1.0, hidden: float | None = None) -> dict:
    """Run every elastic layer of ``model`` at width ratios ``heads`` (attention) and ``hidden``
    (MLP; default: ``heads``), each in (0, 1]. Returns what :func:`widths` returns."""
    hidden = heads if hidden is None else hidden
    layers = list(_elastic_layers(model))
    if not layers:
        raise ElasticError("set_width: the model has no elastic layers; call "
                           "lapdtr.elastic.make_elastic(model) first")
    chosen = []  # every layer checked first, so a width one cannot run changes nothing
    for mod in layers:
        if isinstance(mod, ElasticAttention):
            chosen.append((mod, "active_heads",
                           mod.check_heads(count_for(heads, mod.num_heads, "heads"))))
        else:
            chosen.append((mod, "active_hidden",
                           mod.check_hidden(count_for(hidden, mod.hidden_features, "hidden"))))
    for mod, attr, n in chosen:
        setattr(mod, attr, n)
    return widths(model)


def widths(model: nn.Module) -> dict:
    """``{"heads": [(active, total)...], "hidden": [(active, total)...]}`` per elastic layer."""
    out = {"heads": [], "hidden": []}
    for mod in _elastic_layers(model):
        if isinstance(mod, ElasticAttention):
            out["heads"].append((mod.active_heads, mod.num_heads))
        else:
            out["hidden"].append((mod.active_hidden, mod.hidden_features))
    return out


@torch.no_grad()
def order_heads_(attn: Attention, order: torch.Tensor) -> None:
    """Reorder ``attn``'s heads (``order[i]``: the old head that becomes head ``i``), in place:
    ``qkv`` rows within each of q, k, v and ``proj`` columns; the full-width output is unchanged
    up to float summation order."""
    H, hd, A = attn.num_heads, attn.head_dim, attn.attn_dim
    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(H)):
        raise ElasticError(f"order_heads_: {order.tolist()} is not a permutation of 0..{H - 1}")
    w = attn.qkv.weight
    w.copy_(w.view(3, H, hd, -1)[:, order].reshape(3 * A, -1))
    if attn.qkv.bias is not None:
        attn.qkv.bias.copy_(attn.qkv.bias.view(3, H, hd)[:, order].reshape(-1))
    p = attn.proj.weight
    p.copy_(p.view(p.shape[0], H, hd)[:, order].reshape(p.shape[0], A))
    if attn.gate is not None:
        g = attn.gate.weight
        g.copy_(g.view(H, hd, -1)[order].reshape(A, -1))
        if attn.gate.bias is not None:
            attn.gate.bias.copy_(attn.gate.bias.view(H, hd)[order].reshape(-1))


@torch.no_grad()
def order_hidden_(mlp: Mlp, order: torch.Tensor) -> None:
    """Reorder ``mlp``'s hidden units in place (``fc1`` rows, ``fc2`` columns)."""
    m = mlp.fc1.out_features
    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(m)):
        raise ElasticError(f"order_hidden_: not a permutation of 0..{m - 1}")
    mlp.fc1.weight.copy_(mlp.fc1.weight[order])
    if mlp.fc1.bias is not None:
        mlp.fc1.bias.copy_(mlp.fc1.bias[order])
    mlp.fc2.weight.copy_(mlp.fc2.weight[:, order])


@torch.no_grad()
def head_magnitude(attn: Attention) -> torch.Tensor:
    """Data-free importance of each head: the norm of its value rows times the norm of its
    ``proj`` columns (how much it can move the block's output)."""
    H, hd, A = attn.num_heads, attn.head_dim, attn.attn_dim
    v = attn.qkv.weight[2 * A:].reshape(H, -1).norm(dim=1)
    p = attn.proj.weight.view(attn.proj.weight.shape[0], H, hd).permute(1, 0, 2).reshape(H, -1)
    return v * p.norm(dim=1)


@torch.no_grad()
def hidden_magnitude(mlp: Mlp) -> torch.Tensor:
    """Data-free importance of each hidden unit: ``|fc1 row| · |fc2 column|``."""
    return mlp.fc1.weight.norm(dim=1) * mlp.fc2.weight.norm(dim=0)


@torch.no_grad()
def order_by_magnitude_(model: nn.Module) -> dict:
    """Order every elastic layer's heads and hidden units by :func:`head_magnitude` /
    :func:`hidden_magnitude`, most important first (the data-free fallback of the
    calibration-data importance). Returns the permutations applied, by module name."""
    applied = {}
    for name, mod in model.named_modules():
        if isinstance(mod, ElasticAttention):
            order = head_magnitude(mod).argsort(descending=True)
            order_heads_(mod, order)
            applied[name] = order.tolist()
        elif isinstance(mod, ElasticMlp):
            order = hidden_magnitude(mod).argsort(descending=True)
            order_hidden_(mod, order)
            applied[name] = order.tolist()
    if not applied:
        raise ElasticError("order_by_magnitude_: the model has no elastic layers; call "
                           "lapdtr.elastic.make_elastic(model) first")
    return applied
