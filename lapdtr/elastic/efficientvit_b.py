"""Elastic attention heads and MBConv widths for EfficientViT-B (MIT's; timm
``efficientvit_mit.EfficientVit``, ``efficientvit_b0..b3``).

The stages with attention are the last two (``vit_stage``): after a downsampling ``MBConv`` each
block is an ``EfficientVitBlock``, a ``LiteMLA`` (``context_module.main``) then an ``MBConv``
(``local_module.main``). ``convert`` swaps exactly those two, for :class:`ElasticLiteMLA` and
:class:`ElasticMBConv`; the stem, the conv stages and each stage's downsampling ``MBConv`` stay
as they are (as TinyViT's conv stages do), since the width is that of the transformer blocks.

``LiteMLA`` is ReLU linear attention over ``num_heads = qkv channels / (3·dim)`` heads (timm does
not store the count; at build it is ``in_channels // dim · heads_ratio``). Its layout, from
timm's ``forward``:

* ``qkv`` (a 1x1 ``ConvNormAct``, no norm or act in EfficientViT-B) lays its rows out *per head*:
  ``[q | k | v]`` of head 0 (``dim`` rows each), then head 1, ...: the first ``k`` heads are the
  row prefix ``0:3·dim·k``.
* each ``aggreg`` op is a depthwise conv (``groups = 3·heads·dim``) then a grouped 1x1 conv with
  ``groups = 3·heads`` (group ``g`` reads and writes the ``dim`` channels ``g·dim..``, i.e. the
  q, k or v of one head): on the first ``k`` heads both are the row prefix ``0:3·dim·k`` of their
  (contiguous) weights with ``groups`` cut to ``3·dim·k`` and ``3·k``; the multi-scale head ``h``
  reads only ``qkv``'s head ``h``.
* ``[qkv, aggreg(qkv)...]`` is cut into ``(1 + scales)·heads`` groups of ``3·dim`` channels, each
  one attention (``q``, ``k``, ``v`` of ``dim``), normalised within itself: heads are
  independent. ``proj`` (1x1 conv + BatchNorm over its *output*) reads their outputs side by
  side: head ``h`` is proj's input channels ``s·heads·dim + h·dim ..+dim`` for every branch
  ``s`` (identity, then each scale): ``k`` heads are ``1 + scales`` column ranges of proj's
  weight, run as one matmul per range (each a strided view; one conv would need a copy).

So running the first ``k`` heads equals zeroing the other heads' channels, in every range, at
proj's input (up to float summation order), in eval and train mode (proj's BatchNorm is over its
outputs and runs as timm's module).

The ``MBConv`` is the block's MLP: ``inverted_conv`` (1x1 + bias, Hardswish) to ``mid``
channels, ``depth_conv`` (depthwise 3x3 + bias, Hardswish), ``point_conv`` (1x1, BatchNorm over
its output). Its ``mid`` channels are the hidden units: the first ``m`` are ``inverted_conv``'s
row prefix, ``depth_conv``'s row prefix (``groups = m``) and ``point_conv``'s first ``m``
columns (a strided view, run as a matmul). That equals zeroing the other mid channels at
``point_conv``'s input. Full width runs timm's own forwards (``torch.equal`` to the original).

A norm on ``qkv``'s output or on the mid channels (timm builds none in EfficientViT-B) is not
sliced here: such a layer refuses widths below full.

The heads' outputs meet at proj's input in ``1 + scales`` ranges, so ``head_site`` gives the
four-element form ``(proj, 1, dim, 1 + scales)`` the calibration-data importance masks with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.efficientvit_mit import EfficientVitBlock, LiteMLA, MBConv
from torch import nn

from .base import ElasticError, ElasticHeads, ElasticHidden, _check_part, check_permutation

__all__ = ["ElasticLiteMLA", "ElasticMBConv", "convert"]


def _rows(t: torch.Tensor | None, n: int):
    return None if t is None else t[:n]


def _conv_rows(conv: nn.Conv2d, x: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    """``conv`` with its first ``n`` output channels (a contiguous row prefix of its weight)."""
    return F.conv2d(x, conv.weight[:n], _rows(conv.bias, n), conv.stride, conv.padding,
                    conv.dilation, groups)


def _linear_cols(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """A 1x1 conv of channel-first ``x`` with a 2-D (strided) weight view: ``(B, out, H, W)``."""
    return F.linear(x.permute(0, 2, 3, 1), w, bias).permute(0, 3, 1, 2)


def _perm_rows_(t: torch.Tensor | None, idx: torch.Tensor) -> None:
    if t is not None:
        t.copy_(t[idx])


class ElasticLiteMLA(ElasticHeads, LiteMLA):
    """timm's ``LiteMLA`` (multi-scale ReLU linear attention) that runs its first
    ``active_heads`` heads."""

    reason_inexact = "a norm on qkv's output is not sliced by this layer"

    @property
    def num_heads(self) -> int:
        return self.qkv.conv.out_channels // (3 * self.dim)

    def exact_below_full(self) -> bool:
        return isinstance(self.qkv.norm, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.heads_now
        if k == self.num_heads:
            return super().forward(x)
        B, _, H, W = x.shape
        d, T = self.dim, self.num_heads * self.dim
        r = 3 * d * k  # qkv rows of the first k heads
        qkv = self.qkv
        qkv = qkv.act(qkv.norm(_conv_rows(qkv.conv, qkv.dropout(x), r, qkv.conv.groups)))
        multi_scale_qkv = [qkv]
        for dw, pw in self.aggreg:
            y = _conv_rows(dw, qkv, r, r)
            multi_scale_qkv.append(_conv_rows(pw, y, r, pw.groups * k // self.num_heads))
        multi_scale_qkv = torch.cat(multi_scale_qkv, dim=1)
        multi_scale_qkv = multi_scale_qkv.reshape(B, -1, 3 * d, H * W).transpose(-1, -2)
        q, kk, v = multi_scale_qkv.chunk(3, dim=-1)
        q, kk = self.kernel_func(q), self.kernel_func(kk)
        v = F.pad(v, (0, 1), mode="constant", value=1.0)
        if not torch.jit.is_scripting() and v.device.type != "meta":
            with torch.autocast(device_type=v.device.type, enabled=False):
                out = self._attn(q, kk, v)
        else:
            out = self._attn(q, kk, v)
        # out: (B, (1 + scales)·k, HW, d); branch s's heads meet proj's columns s·T .. s·T+k·d
        p = self.proj
        out = p.dropout(out)
        w = p.conv.weight[:, :, 0, 0]
        y = None
        for s in range(len(self.aggreg) + 1):
            xs = out[:, s * k:(s + 1) * k].permute(0, 2, 1, 3).reshape(B, H * W, k * d)
            ys = F.linear(xs, w[:, s * T:s * T + k * d], p.conv.bias if s == 0 else None)
            y = ys if y is None else y + ys
        y = y.transpose(1, 2).reshape(B, -1, H, W)
        return p.act(p.norm(y))

    def head_site(self):
        # proj's input: the identity branch's heads, then each scale's, dim channels per head
        return self.proj, 1, self.dim, 1 + len(self.aggreg)

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance per head: the norm of its value rows of ``qkv`` times the norm of
        its ``proj`` columns (in every range)."""
        Hn, d = self.num_heads, self.dim
        v = self.qkv.conv.weight.view(Hn, 3 * d, -1)[:, 2 * d:].reshape(Hn, -1).norm(dim=1)
        pw = self.proj.conv.weight
        p = pw.view(pw.shape[0], len(self.aggreg) + 1, Hn, d).permute(2, 0, 1, 3)
        return v * p.reshape(Hn, -1).norm(dim=1)

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the heads in place (``order[i]``: the old head that becomes head ``i``):
        ``qkv``'s row blocks, both ``aggreg`` convs' row blocks (a grouped conv's groups move
        with their heads), ``proj``'s columns in every range."""
        Hn, d = self.num_heads, self.dim
        order = check_permutation(order, Hn, "reorder_")
        rows = torch.arange(Hn * 3 * d).view(Hn, 3 * d)[order].reshape(-1)
        for conv in [self.qkv.conv] + [c for op in self.aggreg for c in op]:
            _perm_rows_(conv.weight, rows)
            _perm_rows_(conv.bias, rows)
        cols = torch.arange((len(self.aggreg) + 1) * Hn * d).view(-1, Hn, d)[:, order].reshape(-1)
        pw = self.proj.conv.weight
        pw.copy_(pw[:, cols])


class ElasticMBConv(ElasticHidden, MBConv):
    """timm's ``MBConv`` (an ``EfficientVitBlock``'s local module) that runs its first
    ``active_hidden`` mid channels."""

    @property
    def hidden_features(self) -> int:
        return self.inverted_conv.conv.out_channels

    def hidden_params(self):
        ic, dc, pc = self.inverted_conv.conv, self.depth_conv.conv, self.point_conv.conv
        out = [(ic.weight, 0), (dc.weight, 0), (pc.weight, 1)]
        out += [(b, 0) for b in (ic.bias, dc.bias) if b is not None]
        return out

    def exact_below_full(self) -> bool:
        return (isinstance(self.inverted_conv.norm, nn.Identity)
                and isinstance(self.depth_conv.norm, nn.Identity))

    def check_hidden(self, m: int) -> int:
        return _check_part(self, m, self.hidden_features, "hidden",
                           "a norm on the mid channels is not sliced by this layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.hidden_now
        if m == self.hidden_features:
            return super().forward(x)
        ic, dc, pc = self.inverted_conv, self.depth_conv, self.point_conv
        x = ic.act(ic.norm(_conv_rows(ic.conv, ic.dropout(x), m, 1)))
        x = dc.act(dc.norm(_conv_rows(dc.conv, dc.dropout(x), m, m)))
        x = _linear_cols(pc.dropout(x), pc.conv.weight[:, :m, 0, 0], pc.conv.bias)
        return pc.act(pc.norm(x))

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance per mid channel: the norms of its ``inverted_conv`` row, its
        depthwise kernel and its ``point_conv`` column, multiplied."""
        m = self.hidden_features
        ic, dc, pc = self.inverted_conv.conv, self.depth_conv.conv, self.point_conv.conv
        return (ic.weight.reshape(m, -1).norm(dim=1) * dc.weight.reshape(m, -1).norm(dim=1)
                * pc.weight.transpose(0, 1).reshape(m, -1).norm(dim=1))

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the mid channels in place: ``inverted_conv`` rows and bias, ``depth_conv``
        kernels and bias, ``point_conv`` columns."""
        order = check_permutation(order, self.hidden_features, "reorder_")
        for conv in (self.inverted_conv.conv, self.depth_conv.conv):
            _perm_rows_(conv.weight, order)
            _perm_rows_(conv.bias, order)
        pw = self.point_conv.conv.weight
        pw.copy_(pw[:, order])


def _sliceable_attn(attn: LiteMLA) -> bool:
    """Whether the convs are the plain ones the slicing assumes (timm builds them so)."""
    convs = [attn.qkv.conv, attn.proj.conv] + [c for op in attn.aggreg for c in op]
    return (all(type(c) is nn.Conv2d and c.padding_mode == "zeros" for c in convs)
            and attn.qkv.conv.groups == 1 and attn.proj.conv.groups == 1
            and attn.proj.conv.kernel_size == (1, 1)
            and all(len(op) == 2 and op[0].groups == op[0].in_channels for op in attn.aggreg))


def _sliceable_mlp(mlp: MBConv) -> bool:
    ic, dc, pc = mlp.inverted_conv.conv, mlp.depth_conv.conv, mlp.point_conv.conv
    return (all(type(c) is nn.Conv2d and c.padding_mode == "zeros" for c in (ic, dc, pc))
            and ic.groups == 1 and dc.groups == dc.in_channels == ic.out_channels
            and pc.kernel_size == (1, 1) and pc.groups == 1)


def convert(model: nn.Module) -> None:
    """Swap, in place, every ``EfficientVitBlock``'s ``LiteMLA`` and ``MBConv`` (its
    ``context_module.main`` and ``local_module.main``) for their elastic subclasses; the stem's,
    conv stages' and downsampling ``MBConv``s stay timm's."""
    for mod in model.modules():
        if not isinstance(mod, EfficientVitBlock):
            continue
        attn, mlp = mod.context_module.main, mod.local_module.main
        if type(attn) is LiteMLA and _sliceable_attn(attn):
            attn.__class__ = ElasticLiteMLA
            attn.active_heads = attn.num_heads
        if type(mlp) is MBConv and _sliceable_mlp(mlp):
            mlp.__class__ = ElasticMBConv
            mlp.active_hidden = mlp.hidden_features
