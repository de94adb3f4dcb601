"""Elastic attention heads and MLP widths for timm's ``Eva`` (RoPE ViTs, DINOv3, EVA / EVA-02,
Perception Encoder, Sapiens2, LingBot).

``convert(model)`` swaps, in every block, timm's ``EvaAttention`` for
:class:`ElasticEvaAttention` and ``timm.layers.AttentionRope`` (``attn_type='rope'``) for
:class:`ElasticRopeAttention`, and the MLP (``Mlp``, ``GluMlp``, ``SwiGLU``) for
:class:`ElasticEvaMlp`, :class:`ElasticGluMlp`, :class:`ElasticSwiGLU`: subclasses of timm's
own, so parameter names and ``state_dict`` keys are unchanged. The attention pooling of
``global_pool='map'`` models (Perception Encoder) stays at full width: it belongs to the head.

At full width every layer runs timm's own forward (``torch.equal`` to the original). Below it,
the weights are sliced on every call, as views of the parameters:

* heads: the first ``k`` heads are the first ``k·head_dim`` rows of each of q, k and v (a fused
  ``qkv``'s three row ranges, with EvaAttention's ``q_bias`` / ``k_bias`` / ``v_bias`` rows, or
  ``q_proj`` / ``k_proj`` / ``v_proj``), a gate's rows, and ``proj``'s first ``k·head_dim``
  columns. The rotary table is per position and shared by the heads (``(N, 2·head_dim)``),
  except RoPE-Mixed's, which is per head (``(heads, N, 2·head_dim)``, the block's slice of
  ``rope.get_embed()``): its first ``k`` head tables are taken. The class and register tokens
  (``num_prefix_tokens``) stay unrotated, as in timm. Grouped-query attention (Sapiens2's
  middle blocks) keeps the ``ceil(k / groups)`` key/value heads the first ``k`` query heads
  read.
* MLP hidden units: ``fc1``'s rows and ``fc2``'s columns; GluMlp's fused ``fc1`` holds the
  activated half and the gating half, so a unit is a row of each half; SwiGLU's is a row of
  ``fc1_g`` and of ``fc1_x``.

Dropping heads ``k..h-1`` this way equals zeroing their outputs before ``proj`` (before the
gate multiplies them, which is per channel), and dropping hidden units equals zeroing them
before ``fc2``, up to float summation order. Not exact, so refused below full width by
``set_width`` (``exact_below_full()`` False): an attention with a norm over all heads' outputs
(``scale_attn_inner``: EVA-02 CLIP, ``eva02_*_clip_*``) and an MLP with a norm over all its
hidden units (``scale_mlp``: ``eva02_base_*`` / ``eva02_large_*`` and the EVA-02 CLIP models).

Which heads come first is set by ``order_by_magnitude_`` / ``order_by_importance_``: a head's
q, k, v rows, gate rows, ``proj`` columns, its channels of a norm over the heads, and (RoPE-
Mixed) its learnable frequencies in the shared ``rope.freqs`` move together, so the full-width
output is unchanged up to summation order. Grouped-query attention is not reordered by them
(``reorderable`` False: query heads are tied to the key/value head of their group);
``reorder_`` accepts the permutations that keep each group together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, GluMlp, Mlp, SwiGLU, apply_rot_embed_cat
from timm.layers import maybe_add_mask, resolve_self_attn_mask
from timm.models.eva import EvaAttention
from torch import nn

from .base import ElasticError, ElasticHeads, ElasticHidden, check_permutation
from .vit import ElasticMlp

__all__ = ["ElasticEvaAttention", "ElasticRopeAttention", "ElasticEvaMlp", "ElasticGluMlp",
           "ElasticSwiGLU", "convert"]


def _rows(t: torch.Tensor | None, a: int, b: int):
    return None if t is None else t[a:b]


def _permute_rows_(t: torch.Tensor | None, n: int, order: torch.Tensor) -> None:
    """Permute, in place, the ``n`` equal row blocks of ``t`` (a weight's rows or a vector)."""
    if t is not None:
        t.copy_(t.reshape(n, -1)[order].reshape(t.shape))


def _permute_cols_(w: torch.Tensor, n: int, order: torch.Tensor) -> None:
    """Permute, in place, the ``n`` equal column blocks of a linear weight."""
    w.copy_(w.view(w.shape[0], n, -1)[:, order].reshape(w.shape))


def _permute_norm_(norm: nn.Module, n: int, order: torch.Tensor) -> None:
    """A norm over the permuted channels (statistics over all of them, so permutation-invariant)
    keeps its function when its per-channel affine parameters move with the channels."""
    for name in ("weight", "bias"):
        t = getattr(norm, name, None)
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            _permute_rows_(t, n, order)


class _ParamRows:
    """Rows ``[a, b)`` of a parameter, read by :func:`lapdtr.elastic.importance` as a
    parameter (``detach()`` and ``grad`` are the rows'): GluMlp's fused ``fc1`` holds two rows
    per hidden unit, one in each half."""

    def __init__(self, param: torch.Tensor, a: int, b: int):
        self.param, self.a, self.b = param, a, b

    def detach(self) -> torch.Tensor:
        return self.param.detach()[self.a:self.b]

    @property
    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g[self.a:self.b]


class _ElasticRopeHeads(ElasticHeads):
    """What EvaAttention and AttentionRope share: the first ``active_heads`` heads with RoPE."""

    reason_inexact = ("an attention with a norm over all heads' outputs (scale_attn_inner / "
                      "scale_norm) cannot run part of its heads exactly")

    # -- layout -------------------------------------------------------------------------------
    @property
    def _kv_heads(self) -> int:
        return getattr(self, "num_kv_heads", self.num_heads)

    @property
    def _groups(self) -> int:
        return self.num_heads // self._kv_heads

    @property
    def _attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    def _fused_bias(self):
        """``(q, k, v)`` biases of a fused ``qkv``, or ``None``."""
        raise NotImplementedError(type(self).__name__)

    @property
    def reorderable(self) -> bool:  # grouped-query heads are tied to their key/value head
        return self._groups == 1

    def exact_below_full(self) -> bool:
        return isinstance(self.norm, nn.Identity)

    # -- forward ------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, d: int, dkv: int):
        """q of the first ``d`` channels, k and v of the first ``dkv``, as three matmuls on row
        views of the weights."""
        if self.qkv is not None:
            A, w = self._attn_dim, self.qkv.weight
            qb, kb, vb = self._fused_bias() or (None, None, None)
            return (F.linear(x, w[:d], _rows(qb, 0, d)),
                    F.linear(x, w[A:A + dkv], _rows(kb, 0, dkv)),
                    F.linear(x, w[2 * A:2 * A + dkv], _rows(vb, 0, dkv)))
        return (F.linear(x, self.q_proj.weight[:d], _rows(self.q_proj.bias, 0, d)),
                F.linear(x, self.k_proj.weight[:dkv], _rows(self.k_proj.bias, 0, dkv)),
                F.linear(x, self.v_proj.weight[:dkv], _rows(self.v_proj.bias, 0, dkv)))

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        k = self.heads_now
        if k == self.num_heads:
            return super().forward(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        hd, g = self.head_dim, self._groups
        kv = -(-k // g)  # key/value heads the first k query heads read
        d, dkv = k * hd, kv * hd
        q, kk, v = self._project(x, d, dkv)
        q = q.view(B, N, k, hd).transpose(1, 2)
        kk = kk.view(B, N, kv, hd).transpose(1, 2)
        v = v.view(B, N, kv, hd).transpose(1, 2)
        q, kk = self.q_norm(q), self.k_norm(kk)
        if rope is not None:
            if rope.dim() >= 3 and rope.shape[-3] != 1:  # per-head tables (RoPE-Mixed)
                rope = rope[..., :k, :, :]
            npt = self.num_prefix_tokens
            half = getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)],
                          dim=2).type_as(v)
            kk = torch.cat([kk[:, :, :npt], apply_rot_embed_cat(kk[:, :, npt:], rope, half=half)],
                           dim=2).type_as(v)
        if g > 1:
            kk = kk.repeat_interleave(g, dim=1)[:, :k]
            v = v.repeat_interleave(g, dim=1)[:, :k]
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] != 1:
            attn_mask = attn_mask[:, :k]  # a mask per head
        if self.fused_attn:
            y = F.scaled_dot_product_attention(
                q, kk, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.0)
        else:  # timm's explicit path
            attn = (q * self.scale) @ kk.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask,
                                                               is_causal=is_causal))
            y = self.attn_drop(attn.softmax(dim=-1)) @ v
        y = y.transpose(1, 2).reshape(B, N, d)
        if self.gate is not None:
            y = y * F.linear(x, self.gate.weight[:d], _rows(self.gate.bias, 0, d)).sigmoid()
        y = F.linear(y, self.proj.weight[:, :d], self.proj.bias)
        return self.proj_drop(y)

    # -- importance and order -----------------------------------------------------------------
    def head_site(self):
        return self.proj, -1, self.head_dim

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance of each head: the norm of its value rows (its group's, under
        grouped-query attention) times the norm of its ``proj`` columns."""
        H, A = self.num_heads, self._attn_dim
        vw = self.qkv.weight[2 * A:] if self.qkv is not None else self.v_proj.weight
        v = vw.reshape(self._kv_heads, -1).norm(dim=1).repeat_interleave(self._groups)
        p = self.proj.weight.view(self.proj.weight.shape[0], H, -1).permute(1, 0, 2)
        return v * p.reshape(H, -1).norm(dim=1)

    def _kv_order(self, order: torch.Tensor) -> torch.Tensor:
        g = self._groups
        if g == 1:
            return order
        groups = order.view(self._kv_heads, g) // g
        if not bool((groups == groups[:, :1]).all()):
            raise ElasticError(
                f"{type(self).__name__}.reorder_: {order.tolist()} splits a group of {g} query "
                f"heads that share one key/value head (grouped-query attention); allowed: "
                f"permutations that move each group of {g} heads together")
        return groups[:, 0].contiguous()

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the heads in place (``order[i]``: the old head that becomes head ``i``): q,
        k, v rows and biases, gate rows, the channels of a norm over the heads, ``proj`` columns
        and, for RoPE-Mixed, the block's per-head frequencies in ``rope.freqs``."""
        H, A = self.num_heads, self._attn_dim
        order = check_permutation(order, H, "reorder_")
        kv_order, nkv = self._kv_order(order), self._kv_heads
        if self.qkv is not None:
            w = self.qkv.weight
            for j in range(3):
                _permute_rows_(w[j * A:(j + 1) * A], H, order)
            for b in self._fused_bias() or ():
                _permute_rows_(b, H, order)
        else:
            for lin, n, o in ((self.q_proj, H, order), (self.k_proj, nkv, kv_order),
                              (self.v_proj, nkv, kv_order)):
                _permute_rows_(lin.weight, n, o)
                _permute_rows_(lin.bias, n, o)
        if self.gate is not None:
            _permute_rows_(self.gate.weight, H, order)
            _permute_rows_(self.gate.bias, H, order)
        _permute_norm_(self.norm, H, order)
        _permute_cols_(self.proj.weight, H, order)
        mixed = getattr(self, "_mixed_rope", None)
        if mixed is not None:  # (rope, block index): freqs is (2, depth, heads, head_dim // 2)
            rope, i = mixed
            f = rope.freqs
            f[:, i].copy_(f[:, i][:, order])


class ElasticEvaAttention(_ElasticRopeHeads, EvaAttention):
    """timm's ``EvaAttention`` (fused ``qkv`` with ``q_bias``/``v_bias``, or ``q_proj`` /
    ``k_proj`` / ``v_proj``) that runs its first ``active_heads`` heads."""

    def _fused_bias(self):
        if self.q_bias is None:
            return None
        return self.q_bias, self.k_bias, self.v_bias


class ElasticRopeAttention(_ElasticRopeHeads, AttentionRope):
    """timm's ``AttentionRope`` (``attn_type='rope'``, grouped-query attention included) that
    runs its first ``active_heads`` heads."""

    def _fused_bias(self):
        b = self.qkv.bias
        return None if b is None else tuple(b.split(self._attn_dim))


_MLP_INEXACT = ("an MLP with a norm over all its hidden units (scale_mlp) cannot run part of "
                "them exactly")


class ElasticEvaMlp(ElasticMlp):
    """timm's ``Mlp`` in an Eva block; reordering also moves a hidden-unit norm's affine
    parameters (``scale_mlp``), so the full-width output is kept with one."""

    reason_inexact = _MLP_INEXACT

    @torch.no_grad()
    def reorder_(self, order) -> None:
        order = check_permutation(order, self.hidden_features, "reorder_")
        super().reorder_(order)
        _permute_norm_(self.norm, self.hidden_features, order)


class ElasticGluMlp(ElasticHidden, GluMlp):
    """timm's ``GluMlp`` (EVA-02 tiny/small, Sapiens2: SwiGLU with a fused ``fc1``) that runs
    its first ``active_hidden`` hidden units: rows ``[0, m)`` and ``[h, h + m)`` of ``fc1``."""

    reason_inexact = _MLP_INEXACT

    @property
    def hidden_features(self) -> int:
        return self.fc2.in_features

    def exact_below_full(self) -> bool:  # a norm over the hidden units sees all of them
        return isinstance(self.norm, nn.Identity)

    def hidden_params(self):
        h, w, b = self.hidden_features, self.fc1.weight, self.fc1.bias
        out = [(_ParamRows(w, 0, h), 0), (_ParamRows(w, h, 2 * h), 0), (self.fc2.weight, 1)]
        if b is not None:
            out += [(_ParamRows(b, 0, h), 0), (_ParamRows(b, h, 2 * h), 0)]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.hidden_now
        h = self.hidden_features
        if m == h:
            return super().forward(x)
        w, b = self.fc1.weight, self.fc1.bias
        x1 = F.linear(x, w[:m], _rows(b, 0, m))
        x2 = F.linear(x, w[h:h + m], _rows(b, h, h + m))
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        x = self.drop1(x)
        return self.drop2(F.linear(x, self.fc2.weight[:, :m], self.fc2.bias))

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance of each hidden unit: the norms of its two ``fc1`` rows times
        the norm of its ``fc2`` column."""
        h, w = self.hidden_features, self.fc1.weight
        return w[:h].norm(dim=1) * w[h:].norm(dim=1) * self.fc2.weight.norm(dim=0)

    @torch.no_grad()
    def reorder_(self, order) -> None:
        h = self.hidden_features
        order = check_permutation(order, h, "reorder_")
        w, b = self.fc1.weight, self.fc1.bias
        for half in (slice(0, h), slice(h, 2 * h)):
            _permute_rows_(w[half], h, order)
            if b is not None:
                _permute_rows_(b[half], h, order)
        _permute_cols_(self.fc2.weight, h, order)
        _permute_norm_(self.norm, h, order)


class ElasticSwiGLU(ElasticHidden, SwiGLU):
    """timm's ``SwiGLU`` (EVA-02 base/large, DINOv3 ``*plus*``, ``vit_giant_patch16_lingbot``)
    that runs its first ``active_hidden`` hidden units: rows of ``fc1_g`` and ``fc1_x``."""

    reason_inexact = _MLP_INEXACT

    @property
    def hidden_features(self) -> int:
        return self.fc2.in_features

    def exact_below_full(self) -> bool:  # scale_mlp: a norm over the hidden units sees all
        return isinstance(self.norm, nn.Identity)

    def hidden_params(self):
        out = [(self.fc1_g.weight, 0), (self.fc1_x.weight, 0), (self.fc2.weight, 1)]
        out += [(t, 0) for t in (self.fc1_g.bias, self.fc1_x.bias) if t is not None]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.hidden_now
        if m == self.hidden_features:
            return super().forward(x)
        gate = F.linear(x, self.fc1_g.weight[:m], _rows(self.fc1_g.bias, 0, m))
        x = self.drop1(self.act(gate) * F.linear(x, self.fc1_x.weight[:m],
                                                 _rows(self.fc1_x.bias, 0, m)))
        return self.drop2(F.linear(x, self.fc2.weight[:, :m], self.fc2.bias))

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance of each hidden unit: the norms of its ``fc1_g`` and ``fc1_x``
        rows times the norm of its ``fc2`` column."""
        return (self.fc1_g.weight.norm(dim=1) * self.fc1_x.weight.norm(dim=1)
                * self.fc2.weight.norm(dim=0))

    @torch.no_grad()
    def reorder_(self, order) -> None:
        h = self.hidden_features
        order = check_permutation(order, h, "reorder_")
        for lin in (self.fc1_g, self.fc1_x):
            _permute_rows_(lin.weight, h, order)
            _permute_rows_(lin.bias, h, order)
        _permute_cols_(self.fc2.weight, h, order)
        _permute_norm_(self.norm, h, order)


_ATTENTIONS = {EvaAttention: ElasticEvaAttention, AttentionRope: ElasticRopeAttention}
_MLPS = {Mlp: ElasticEvaMlp, GluMlp: ElasticGluMlp, SwiGLU: ElasticSwiGLU}


def convert(model: nn.Module) -> None:
    """Swap, in place, every Eva block's attention and (linear) MLP for its elastic subclass;
    layers already elastic are left as they are."""
    mixed = model.rope if getattr(model, "rope_mixed", False) else None
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        cls = _ATTENTIONS.get(type(attn))
        if cls is not None:
            attn.__class__ = cls
            attn.active_heads = attn.num_heads
            if mixed is not None:  # a plain attribute: not a submodule, keys unchanged
                attn._mixed_rope = (mixed, i)
        mlp = blk.mlp
        cls = _MLPS.get(type(mlp))
        if cls is not None and isinstance(getattr(mlp, "fc2", None), nn.Linear):
            mlp.__class__ = cls
            mlp.active_hidden = mlp.hidden_features
