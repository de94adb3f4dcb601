"""Elastic attention heads and MLP widths for EfficientViT-M (timm ``efficientvit_msra``,
``efficientvit_m0..m5``).

``lapdtr.elastic.make_elastic(model)`` swaps every ``CascadedGroupAttention`` (the ``attn`` of
each block's ``LocalWindowAttention`` mixer) for :class:`ElasticCascadedGroupAttention` and
every ``ConvMlp`` (each block's ``ffn0`` / ``ffn1`` and the ``res1`` / ``res2`` of each
downsampling) for :class:`ElasticConvMlp`, subclasses of timm's own, so ``state_dict`` keys are
unchanged. The ``ResidualDrop`` wrappers around them, and the window partition of
``LocalWindowAttention``, stay timm's: only the inner layers change class. Full width runs
timm's own forward (``torch.equal`` to the original model).

Layout facts:

* Cascaded group attention splits its input (B, C, H, W) into ``num_heads`` channel chunks of
  ``C / num_heads`` (by the *original* head count, whatever runs). Head ``i`` has its own
  ``qkvs[i]`` (a ConvNorm: 1x1 conv + BatchNorm, rows ``[q | k | v]``), its own depthwise
  ``dws[i]`` on ``q`` and its own attention-bias table ``get_attention_biases(device)[i]``
  (timm caches the gathered tables in eval mode, keyed by device). Head ``i``'s input is chunk
  ``i`` *plus head i-1's output* (``val_dim == C / num_heads``), so heads are a cascade: the
  first ``k`` heads run exactly as at full width, and running only them equals zeroing the
  outputs of heads ``k..h-1`` before ``proj``. Any other subset or order would change what
  each head reads: the head order is part of the function, so the class is not reorderable
  (``reorder_`` accepts the identity only) and width always keeps *the first* heads.
* ``proj`` is ``Sequential(ReLU, ConvNorm)`` on the heads' outputs side by side
  (``val_dim`` channels each). Below full width it runs ReLU, then the conv's first
  ``k·val_dim`` input channels as a matmul on the strided view of the 1x1 weight (``F.conv2d``
  would copy a non-contiguous weight on every call), then the ConvNorm's own BatchNorm, which
  is over the output channels and so unaffected by the slice.
* ``ConvMlp`` is ``pw1`` (ConvNorm, C -> 2C) -> ReLU -> ``pw2`` (ConvNorm, 2C -> C). A hidden
  unit is a row of ``pw1.conv``, the matching channel of ``pw1.bn`` (weight, bias, running
  statistics) and a column of ``pw2.conv``. BatchNorm normalizes each channel on its own (in
  eval mode with its running statistics, in training mode with the batch's), so the first
  ``m`` units slice exactly: ``pw1.conv``'s first ``m`` rows (contiguous, ``F.conv2d``),
  ``F.batch_norm`` on the first ``m`` entries of ``pw1.bn`` (in training mode updating only
  those running statistics), ReLU, ``pw2.conv``'s first ``m`` columns (matmul on the strided
  view), then ``pw2``'s BatchNorm module.

Both are exact below full width (equal to zeroing the dropped heads / hidden units before
``proj`` / ``pw2`` up to float summation order), in eval and in training mode.
``set_width`` rounds per layer (``count_for``): efficientvit_m0 has 4 heads in every stage, so
ratios 0.75 / 0.5 / 0.25 give 3 / 2 / 1 heads; models with 2 or 3 heads per stage
(m1, m2, m5) reach fewer distinct head counts (round half to even: 0.75 of 2 heads is 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.efficientvit_msra import CascadedGroupAttention, ConvMlp
from torch import nn

from .base import batch_norm_first, ElasticError, ElasticHeads, ElasticHidden, check_permutation

__all__ = ["ElasticCascadedGroupAttention", "ElasticConvMlp", "convert"]


def _conv1x1_first_inputs(conv: nn.Conv2d, x: torch.Tensor, d: int) -> torch.Tensor:
    """``conv`` (1x1, stride 1, no groups, no bias) on ``x``'s ``d`` channels, as if the conv
    had only its first ``d`` input channels: a matmul on the strided weight view (no copy)."""
    B, _, H, W = x.shape
    w = conv.weight[:, :d, 0, 0]  # (out, d), row stride = in_channels: read in place by BLAS
    return torch.matmul(w, x.flatten(2)).view(B, conv.out_channels, H, W)  # bmm, w expanded


def _bn_scale(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode BatchNorm as ``x * s + t`` per channel (what ``ConvNorm.fuse`` folds)."""
    s = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight
    t = -bn.running_mean * s
    if bn.bias is not None:
        t = t + bn.bias
    return s, t


class ElasticCascadedGroupAttention(ElasticHeads, CascadedGroupAttention):
    """timm's ``CascadedGroupAttention`` that runs its first ``active_heads`` heads of the
    cascade (exactly: later heads never feed earlier ones)."""

    reorderable = False  # head i reads head i-1's output: the order is part of the function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.heads_now
        if k == self.num_heads:
            return super().forward(x)
        B, C, H, W = x.shape
        feats_in = x.chunk(self.num_heads, dim=1)  # chunks of the full head count
        attn_bias = self.get_attention_biases(x.device)
        feats_out = []
        feat = feats_in[0]
        for i in range(k):  # timm's per-head step, for the first k heads only
            if i > 0:
                feat = feat + feats_in[i]
            feat = self.qkvs[i](feat)
            q, kk, v = feat.view(B, -1, H, W).split([self.key_dim, self.key_dim, self.val_dim],
                                                    dim=1)
            q = self.dws[i](q)
            q, kk, v = q.flatten(2), kk.flatten(2), v.flatten(2)
            q = q * self.scale
            attn = (q.transpose(-2, -1) @ kk + attn_bias[i]).softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.val_dim, H, W)
            feats_out.append(feat)
        act, conv_norm = self.proj[0], self.proj[1]
        x = act(torch.cat(feats_out, 1))
        x = _conv1x1_first_inputs(conv_norm.conv, x, k * self.val_dim)
        return conv_norm.bn(x)

    def head_site(self):
        return self.proj, 1, self.val_dim

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance per head: the norm of its value rows of ``qkvs[i]`` (BatchNorm
        folded) times the norm of its ``val_dim`` columns of ``proj`` (BatchNorm folded). Given
        for inspection: the cascade cannot be reordered by it."""
        kd, vd, H = self.key_dim, self.val_dim, self.num_heads
        v = []
        for qkv in self.qkvs:
            s, _ = _bn_scale(qkv.bn)
            v.append((qkv.conv.weight.flatten(1) * s[:, None])[2 * kd:].norm())
        conv, bn = self.proj[1].conv, self.proj[1].bn
        s, _ = _bn_scale(bn)
        p = (conv.weight.flatten(1) * s[:, None]).view(conv.out_channels, H, vd)
        return torch.stack(v) * p.permute(1, 0, 2).reshape(H, -1).norm(dim=1)

    def reorder_(self, order) -> None:
        """Only the identity order: head ``i`` adds head ``i-1``'s output to its input chunk,
        so permuting heads changes the function (an ``ElasticError`` says so)."""
        order = check_permutation(order, self.num_heads, "reorder_")
        if order.tolist() != list(range(self.num_heads)):
            raise ElasticError(
                f"{type(self).__name__}: reorder_({order.tolist()}): cascaded heads cannot be "
                f"reordered (head i adds head i-1's output to its input chunk, so the order is "
                f"part of the function); allowed: the identity order "
                f"{list(range(self.num_heads))} only")


class ElasticConvMlp(ElasticHidden, ConvMlp):
    """timm's ``ConvMlp`` (pw1 ConvNorm -> ReLU -> pw2 ConvNorm) that runs its first
    ``active_hidden`` hidden units."""

    @property
    def hidden_features(self) -> int:
        return self.pw1.conv.out_channels

    def hidden_params(self):
        out = [(self.pw1.conv.weight, 0), (self.pw2.conv.weight, 1)]
        bn = self.pw1.bn
        out += [(p, 0) for p in (bn.weight, bn.bias) if p is not None]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.hidden_now
        if m == self.hidden_features:
            return super().forward(x)
        c1 = self.pw1.conv
        x = F.conv2d(x, c1.weight[:m], None, c1.stride, c1.padding, c1.dilation, c1.groups)
        x = self.act(batch_norm_first(self.pw1.bn, x, m))
        return self.pw2.bn(_conv1x1_first_inputs(self.pw2.conv, x, m))

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance per hidden unit: the norm of its folded ``pw1`` row (conv row
        times the BatchNorm scale, with the folded shift as one more entry) times the norm of
        its folded ``pw2`` column (BatchNorm scale per output channel)."""
        s1, t1 = _bn_scale(self.pw1.bn)
        row = torch.cat([self.pw1.conv.weight.flatten(1) * s1[:, None], t1[:, None]], 1)
        s2, _ = _bn_scale(self.pw2.bn)
        col = self.pw2.conv.weight.flatten(1) * s2[:, None]
        return row.norm(dim=1) * col.norm(dim=0)

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the hidden units in place: ``pw1.conv`` rows, ``pw1.bn``'s weight, bias and
        running statistics, ``pw2.conv`` columns."""
        order = check_permutation(order, self.hidden_features, "reorder_")
        w1 = self.pw1.conv.weight
        w1.copy_(w1[order])
        bn = self.pw1.bn
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if t is not None:
                t.copy_(t[order])
        w2 = self.pw2.conv.weight
        w2.copy_(w2[:, order])


def _check_1x1(conv: nn.Conv2d, where: str) -> None:
    if (conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0)
            or conv.groups != 1 or conv.bias is not None):
        raise ElasticError(f"{where}: expected timm's 1x1 ConvNorm conv (stride 1, no padding, "
                           f"groups 1, no bias); got {conv}")


def convert(model: nn.Module) -> None:
    """Swap, in place, every ``CascadedGroupAttention`` and ``ConvMlp`` for its elastic
    subclass (an unfused model: ``ConvNorm.fuse`` replaces the ConvNorms these slice)."""
    for name, mod in model.named_modules():
        if type(mod) is CascadedGroupAttention:
            _check_1x1(mod.proj[1].conv, name)
            mod.__class__ = ElasticCascadedGroupAttention
            mod.active_heads = mod.num_heads
        elif type(mod) is ConvMlp:
            _check_1x1(mod.pw2.conv, name)
            mod.__class__ = ElasticConvMlp
            mod.active_hidden = mod.pw1.conv.out_channels
