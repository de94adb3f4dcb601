"""Elastic attention heads and MLP widths for EdgeViT (lapdtr's ``lapdtr.models.edgevit``).

``lapdtr.elastic.make_elastic(model)`` swaps, inside EdgeViT's own modules only:

* each ``GlobalSparseAttn`` for :class:`ElasticGlobalSparseAttn` (sampling ratio r = 1, the last
  stage) or :class:`ElasticPropagatedSparseAttn` (r > 1, stages 1-3);
* each ``GlobalSparseBlock``'s token MLP (exactly ``timm.layers.Mlp`` over linears) for
  :class:`lapdtr.elastic.vit.ElasticMlp`;
* each ``LocalAgg``'s conv MLP (``timm.layers.ConvMlp``: 1x1 conv, norm, GELU, 1x1 conv) for
  :class:`ElasticConvMlp`; its hidden units are the mid channels.

Subclasses of the model's own classes, so ``state_dict`` keys are unchanged. At full width each
layer runs its own forward (``torch.equal`` to the original); below it the weights are sliced
on every call as views of the parameters (nothing cached).

Layout facts:

* ``qkv`` rows are ``[q | k | v]``, each ``heads x head_dim`` (as timm's ``Attention``): the
  first ``k`` heads are three contiguous row ranges; their outputs are the first ``k·head_dim``
  channels of the attention output, and ``proj``'s first ``k·head_dim`` columns read them.
* r = 1: the attention output goes straight into ``proj``, so running ``k`` heads equals zeroing
  the other heads' outputs before ``proj`` (heads are independent): EXACT.
* r > 1: the delegate tokens' attention output goes through a depthwise transposed conv
  (``local_prop``, kernel = stride = r; channel c only reads channel c) and then a LayerNorm
  over ALL ``dim`` channels before ``proj``. Slicing runs ``local_prop``'s first ``k·head_dim``
  channels and a LayerNorm over those channels only (its first ``k·head_dim`` scales and
  shifts), then ``proj``'s first columns: the kept channels are normalized by statistics of
  the kept channels, which is not what zeroing the dropped heads gives (there the norm still
  sees all channels). These layers are APPROXIMATE (``approximate = True``,
  ``exact_below_full()`` False): ``set_width`` runs them below full width all the same, and
  the model relies on elastic (sandwich) training there. :func:`inexact_layers` names them.
* Token MLP: timm's ``Mlp`` (fc1, GELU, fc2, no hidden norm): slicing ``fc1`` rows and ``fc2``
  columns equals zeroing hidden units before ``fc2``: EXACT.
* LocalAgg's ``ConvMlp``: ``fc1`` 1x1 conv's first ``m`` output channels (contiguous), its norm
  (Identity in EdgeViT; a BatchNorm2d is sliced per channel with its running statistics, train
  and eval as ``torch.nn.BatchNorm2d`` does), GELU, and ``fc2``'s first ``m`` input columns
  applied as a matmul on the strided view (``F.conv2d`` would copy a column-sliced weight):
  EXACT (equals zeroing the mid channels ``m:`` before ``fc2``).

The first stage has one head (nothing to drop). Which heads / units come first is set once by
``order_by_magnitude_`` or calibration importance (``reorder_`` leaves the full-width output
unchanged up to float summation order; a LayerNorm is invariant to a channel permutation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvMlp, Mlp
from torch import nn

from ..models.edgevit import GlobalSparseAttn, GlobalSparseBlock, LocalAgg, _delegate_grid
from .base import batch_norm_first, ElasticHeads, ElasticHidden, check_permutation
from .vit import ElasticMlp

__all__ = ["ElasticGlobalSparseAttn", "ElasticPropagatedSparseAttn", "ElasticConvMlp",
           "convert"]


def _rows(t: torch.Tensor | None, a: int, b: int):
    return None if t is None else t[a:b]


class ElasticGlobalSparseAttn(ElasticHeads, GlobalSparseAttn):
    """EdgeViT's ``GlobalSparseAttn`` that runs its first ``active_heads`` heads; exact where
    ``sr_ratio == 1`` (r > 1 layers are :class:`ElasticPropagatedSparseAttn`)."""

    reason_inexact = ("EdgeViT attention with sr_ratio > 1: the LayerNorm after local "
                      "propagation normalizes over all heads' channels")

    def exact_below_full(self) -> bool:
        return self.sr_ratio == 1

    def forward(self, x: torch.Tensor, size) -> torch.Tensor:
        k = self.heads_now
        if k == self.num_heads:
            return super().forward(x, size)
        B, N, C = x.shape
        H, W = size
        r = self.sr_ratio
        Hr, Wr = H, W
        if r > 1:
            Hr, Wr = _delegate_grid(H, W, r)
            x = self.sampler(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
        hd, A = self.head_dim, self.qkv.out_features // 3
        d = k * hd
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:d], _rows(b, 0, d)).view(B, -1, k, hd).transpose(1, 2)
        kk = F.linear(x, w[A:A + d], _rows(b, A, A + d)).view(B, -1, k, hd).transpose(1, 2)
        v = F.linear(x, w[2 * A:2 * A + d], _rows(b, 2 * A, 2 * A + d)).view(B, -1, k, hd) \
            .transpose(1, 2)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, kk, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:  # the model's explicit path
            attn = (q * self.scale) @ kk.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, -1, d)
        if r > 1:  # approximate: local propagation and the norm over the kept channels only
            lp, n = self.local_prop, self.norm
            x = x.transpose(1, 2).reshape(B, d, Hr, Wr)
            x = F.conv_transpose2d(x, lp.weight[:d], _rows(lp.bias, 0, d), lp.stride, lp.padding,
                                   lp.output_padding, d, lp.dilation)
            x = F.layer_norm(x.flatten(2).transpose(1, 2), (d,), _rows(n.weight, 0, d),
                             _rows(n.bias, 0, d), n.eps)
        return self.proj_drop(F.linear(x, self.proj.weight[:, :d], self.proj.bias))

    def head_site(self):
        """r = 1: ``proj``'s input (tokens, last dim); r > 1: ``local_prop``'s input, the heads'
        outputs on the delegate grid ``(B, C, Hr, Wr)`` before the norm mixes channels."""
        if self.sr_ratio > 1:
            return self.local_prop, 1, self.head_dim
        return self.proj, -1, self.head_dim

    def _channel_gain(self) -> torch.Tensor:
        """Per attention-output channel, how much of it reaches the block: ``proj`` column norm,
        times (r > 1) the local-propagation kernel norm and the norm's scale."""
        g = self.proj.weight.norm(dim=0)
        if self.sr_ratio > 1:
            g = g * self.local_prop.weight.flatten(1).norm(dim=1)
            if self.norm.weight is not None:
                g = g * self.norm.weight.abs()
        return g

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance per head: norm of its value rows times the norm of its channels'
        gains (:meth:`_channel_gain`)."""
        H, hd, A = self.num_heads, self.head_dim, self.qkv.out_features // 3
        v = self.qkv.weight[2 * A:].reshape(H, -1).norm(dim=1)
        return v * self._channel_gain().view(H, hd).norm(dim=1)

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the heads in place: ``qkv`` rows within each of q, k, v, ``proj`` columns,
        and (r > 1) ``local_prop``'s channels and the norm's scales and shifts."""
        H, hd, A = self.num_heads, self.head_dim, self.qkv.out_features // 3
        order = check_permutation(order, H, "reorder_")
        ch = (order[:, None] * hd + torch.arange(hd)).reshape(-1)
        w = self.qkv.weight
        w.copy_(w.view(3, H, hd, -1)[:, order].reshape(3 * A, -1))
        if self.qkv.bias is not None:
            self.qkv.bias.copy_(self.qkv.bias.view(3, H, hd)[:, order].reshape(-1))
        p = self.proj.weight
        p.copy_(p[:, ch])
        if self.sr_ratio > 1:
            for t in (self.local_prop.weight, self.local_prop.bias, self.norm.weight,
                      self.norm.bias):
                if t is not None:
                    t.copy_(t[ch])


class ElasticPropagatedSparseAttn(ElasticGlobalSparseAttn):
    """EdgeViT's ``GlobalSparseAttn`` with ``sr_ratio > 1``: runs fewer heads APPROXIMATELY
    (the LayerNorm after local propagation then sees only the kept heads' channels)."""

    approximate = True

    def exact_below_full(self) -> bool:
        return False


def _bn(mod) -> nn.modules.batchnorm._BatchNorm | None:
    return mod if isinstance(mod, nn.BatchNorm2d) else None


class ElasticConvMlp(ElasticHidden, ConvMlp):
    """timm's ``ConvMlp`` (LocalAgg's) that runs its first ``active_hidden`` mid channels."""

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_channels

    def exact_below_full(self) -> bool:
        pointwise = all(c.kernel_size == (1, 1) and c.groups == 1 and c.stride == (1, 1)
                        and c.padding == (0, 0) for c in (self.fc1, self.fc2))
        return pointwise and (isinstance(self.norm, nn.Identity) or _bn(self.norm) is not None)

    def hidden_params(self):
        out = [(self.fc1.weight, 0), (self.fc2.weight, 1)]
        for t in (self.fc1.bias, *((self.norm.weight, self.norm.bias)
                                    if _bn(self.norm) is not None else ())):
            if t is not None:
                out.append((t, 0))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.hidden_now
        if m == self.hidden_features:
            return super().forward(x)
        x = F.conv2d(x, self.fc1.weight[:m], _rows(self.fc1.bias, 0, m))
        if _bn(self.norm) is not None:
            x = batch_norm_first(self.norm, x, m)
        x = self.drop(self.act(x))
        # fc2 on its first m input columns: a (out, m) strided view of the 1x1 kernel, as a
        # matmul over channels (F.conv2d would copy the non-contiguous weight)
        x = F.linear(x.permute(0, 2, 3, 1), self.fc2.weight[:, :m, 0, 0], self.fc2.bias)
        return x.permute(0, 3, 1, 2)

    def _gain(self) -> torch.Tensor:
        g = torch.ones(self.hidden_features, device=self.fc1.weight.device)
        bn = _bn(self.norm)
        if bn is not None:
            if bn.weight is not None:
                g = g * bn.weight.abs()
            if bn.running_var is not None:
                g = g / (bn.running_var + bn.eps).sqrt()
        return g

    @torch.no_grad()
    def magnitude(self) -> torch.Tensor:
        """Data-free importance per mid channel: ``|fc1 row| · |fc2 column|`` (times the
        BatchNorm's scale where there is one)."""
        return (self.fc1.weight.flatten(1).norm(dim=1) * self._gain()
                * self.fc2.weight.transpose(0, 1).flatten(1).norm(dim=1))

    @torch.no_grad()
    def reorder_(self, order) -> None:
        """Reorder the mid channels in place: ``fc1`` output channels, the norm's per-channel
        parameters and running statistics, ``fc2`` input channels."""
        order = check_permutation(order, self.hidden_features, "reorder_")
        ts = [self.fc1.weight, self.fc1.bias]
        bn = _bn(self.norm)
        if bn is not None:
            ts += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        for t in ts:
            if t is not None:
                t.copy_(t[order])
        self.fc2.weight.copy_(self.fc2.weight[:, order])


def convert(model: nn.Module) -> None:
    """Swap, in place, the attention and MLPs inside every EdgeViT block (only there)."""
    for mod in model.modules():
        if type(mod) is GlobalSparseAttn:
            mod.__class__ = (ElasticPropagatedSparseAttn if mod.sr_ratio > 1
                             else ElasticGlobalSparseAttn)
            mod.active_heads = mod.num_heads
        elif isinstance(mod, GlobalSparseBlock):
            mlp = mod.mlp
            if type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear):
                mlp.__class__ = ElasticMlp
                mlp.active_hidden = mlp.fc1.out_features
        elif isinstance(mod, LocalAgg):
            mlp = mod.mlp
            if type(mlp) is ConvMlp:
                mlp.__class__ = ElasticConvMlp
                mlp.active_hidden = mlp.fc1.out_channels
