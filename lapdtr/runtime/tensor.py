"""Tensor mode: one layer's heads, hidden units or channels split *unevenly* across ranks.

DTensor / ``torch.distributed.tensor.parallel`` split a dimension evenly; a heterogeneous plan
gives rank ``r`` a share ``p_r`` of every layer instead (a fast device takes 5 of 12 heads, a
slow one 3). This module shards the *weights* of the supported layers by such proportions, once,
and replaces each layer with a wrapper whose forward runs the rank's share and a collective:

* ViT attention (timm ``Attention``: ``qkv`` Linear, heads, ``proj`` Linear): rank ``r`` keeps
  heads ``[a_r, b_r)`` -- the ``qkv`` rows of those heads and the matching ``proj`` input
  columns -- computes its heads with :func:`torch.nn.functional.scaled_dot_product_attention`
  (the call timm's ``Attention`` makes on its fused path), its partial ``proj`` output, then
  ``all_reduce(SUM)``; the ``proj`` bias is added once, after the reduction.
* ViT MLP (timm ``Mlp``): ``fc1`` rows / ``fc2`` columns of the rank's hidden units,
  ``all_reduce(SUM)``, ``fc2`` bias once.
* ``Conv2d`` / ``Linear`` (the CNN "Meta" / horizontal split): the rank's output channels (for a
  grouped or depthwise conv, whole groups), outputs all-gathered and concatenated in rank order.
  Gloo's ``all_gather`` needs equal sizes, so every rank pads its slice to the largest slice
  along the channel axis, gathers, and cuts each peer's padding off again
  (:func:`all_gather_uneven`); the padding costs ``max_r c_r - c_r`` channels of traffic per rank.

The sharded layers keep the host's parameter names (``qkv.weight``, ``proj.bias``, ``weight``),
holding only the rank's slice. They are differentiable the Megatron way: the layer input passes an
identity whose backward all-reduces the input gradient, the output reduction's backward is the
identity and the gather's backward keeps the rank's slice, so with the same loss on every rank
each rank's weight gradient is the slice of the unsharded gradient.

Every function here expects an initialized process group (gloo on CPU, NCCL on GPU) whose rank
and size equal the ``rank`` / ``world_size`` passed; :func:`reference_tensor_split` runs the same
shards in one process (no collectives) for testing the math.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .wire import HEADER_LEN, NO_CODE, pack_header, unpack_header

__all__ = [
    "split_counts", "split_ranges", "ShardedAttention", "ShardedMlp", "ShardedConv2d",
    "ShardedLinear", "shard_module", "apply_tensor_split", "run_tensor", "proportions_from_plan",
    "proportions_from_devices", "list_tensor_shards", "get_tensor_comm_stats",
    "reference_tensor_split", "all_gather_uneven", "broadcast_tensor", "TENSOR_FAMILIES",
]

# adapter families apply_tensor_split handles: ViT blocks (attention + MLP), CNN convs / linears
_VIT_FAMILIES = ("vit",)
_CNN_FAMILIES = ("resnet", "vgg", "mobilenet")
TENSOR_FAMILIES = _VIT_FAMILIES + _CNN_FAMILIES


# ---------------------------------------------------------------------------- proportions


def _check_proportions(proportions: Sequence[float], world_size: int) -> list[float]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    try:
        props = [float(p) for p in proportions]
    except (TypeError, ValueError):
        raise ValueError(f"proportions must be a list of numbers, got {proportions!r}") from None
    if len(props) != world_size:
        raise ValueError(f"proportions {props} give {len(props)} ranks but world_size is "
                         f"{world_size}: give one proportion per rank")
    bad = [p for p in props if not math.isfinite(p) or p < 0]
    if bad:
        raise ValueError(f"proportions {props} contain {bad}: every proportion must be a finite "
                         f"number >= 0")
    if sum(props) <= 0:
        raise ValueError(f"proportions {props} sum to 0: at least one must be > 0")
    return props


def split_counts(total: int, proportions: Sequence[float], *, what: str = "units") -> list[int]:
    """Whole units per rank, as close to ``total * p_r / sum(p)`` as rounding allows.

    Every rank gets at least one unit (every rank takes part in every collective, and an empty
    shard would buy nothing), so a rank with proportion 0 still gets one. Raises ``ValueError``
    for bad proportions or when there are fewer units than ranks; ``what`` names the layer in it.
    """
    try:
        props = list(proportions)
    except TypeError:
        props = []
    if not props:
        raise ValueError(f"proportions must be a non-empty list of numbers, got {proportions!r}")
    props = _check_proportions(props, len(props))
    world = len(props)
    if total < world:
        raise ValueError(f"{what}: {total} units cannot be split over {world} ranks (every rank "
                         f"needs at least one); use at most {total} ranks for this layer")
    s = sum(props)
    ideal = [total * p / s for p in props]
    counts = [max(1, int(math.floor(x))) for x in ideal]
    # largest remainder, ties to the lower rank; only a rank with > 1 unit gives one back
    while sum(counts) < total:
        r = max(range(world), key=lambda i: (ideal[i] - counts[i], -i))
        counts[r] += 1
    while sum(counts) > total:
        r = max((i for i in range(world) if counts[i] > 1), key=lambda i: (counts[i] - ideal[i], -i))
        counts[r] -= 1
    return counts


def split_ranges(total: int, proportions: Sequence[float], *, what: str = "units"
                 ) -> list[tuple[int, int]]:
    """``[(a_r, b_r), ...]``: contiguous unit ranges per rank, in rank order (see
    :func:`split_counts`)."""
    out, a = [], 0
    for c in split_counts(total, proportions, what=what):
        out.append((a, a + c))
        a += c
    return out


def proportions_from_devices(devices: Sequence) -> list[float]:
    """Proportions proportional to each device's measured ``gflops`` (``DeviceProfile`` list in
    rank order)."""
    gf = [float(getattr(d, "gflops", float("nan"))) for d in devices]
    if not gf or any(not math.isfinite(g) or g <= 0 for g in gf):
        raise ValueError(f"device gflops {gf} must all be finite and > 0 to give proportions")
    s = sum(gf)
    return [g / s for g in gf]


def proportions_from_plan(plan, *, unit: str | None = None, devices: Sequence | None = None
                          ) -> list[float]:
    """Per-rank proportions for tensor mode, from a :class:`~lapdtr.plan.types.Plan`.

    With ``axis='channels'`` shards in ``plan.shards``, rank ``r``'s proportion is its share
    ``(stop - start) / width`` of each unit's channel axis (``width`` = the largest ``stop`` of
    that unit), averaged over the units (or of ``unit`` only, if given). Without channel shards
    it falls back to ``devices`` (device profiles in rank order: proportional to ``gflops``), then
    to the planner's per-rank ``predictions[*].flops``. ``ValueError`` if none of these is there.
    """
    shards = [s for s in plan.shards if s.axis == "channels"]
    if unit is not None:
        shards = [s for s in shards if s.unit == unit]
        if not shards:
            have = sorted({s.unit for s in plan.shards if s.axis == "channels"})
            raise ValueError(f"plan has no 'channels' shards of unit {unit!r}; it has: {have}")
    if shards:
        world = max(s.rank for s in shards) + 1
        per_unit: dict[str, list[float]] = {}
        width: dict[str, int] = {}
        for s in shards:
            if s.stop <= s.start or s.start < 0:
                raise ValueError(f"shard of unit {s.unit!r} on rank {s.rank} has an empty or "
                                 f"negative range [{s.start}, {s.stop})")
            width[s.unit] = max(width.get(s.unit, 0), s.stop)
        for s in shards:
            per_unit.setdefault(s.unit, [0.0] * world)[s.rank] += (s.stop - s.start) / width[s.unit]
        props = [sum(v[r] for v in per_unit.values()) / len(per_unit) for r in range(world)]
        return _check_proportions(props, world)
    if devices is not None:
        return proportions_from_devices(devices)
    preds = sorted(plan.predictions, key=lambda p: p.rank)
    if preds and all(p.flops > 0 for p in preds):
        if [p.rank for p in preds] != list(range(len(preds))):
            raise ValueError(f"plan predictions cover ranks {[p.rank for p in preds]}, not "
                             f"0..{len(preds) - 1}")
        s = sum(p.flops for p in preds)
        return [p.flops / s for p in preds]
    raise ValueError("plan has no 'channels' shards and no per-rank flops predictions; pass "
                     "devices=[DeviceProfile, ...] (proportional to gflops) or explicit proportions")


# ---------------------------------------------------------------------------- collectives


class _CopyIn(torch.autograd.Function):
    """Identity forward; backward sums the input gradient over ranks (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceOut(torch.autograd.Function):
    """``all_reduce(SUM)`` forward; identity backward (Megatron's ``g``)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def all_gather_uneven(x: torch.Tensor, sizes: Sequence[int], *, dim: int, group=None
                      ) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim``, where rank ``r``'s has ``sizes[r]`` there.

    Gloo's ``all_gather`` needs equal sizes: each rank pads to ``max(sizes)``, gathers, and the
    padding is cut off before concatenating in rank order. Not differentiable (see
    :class:`_GatherOut`).
    """
    dim = dim % x.dim()
    m = max(sizes)
    if x.shape[dim] != m:
        pad_shape = list(x.shape)
        pad_shape[dim] = m - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


class _GatherOut(torch.autograd.Function):
    """Uneven all-gather forward; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, sizes, dim, rank, group):
        ctx.dim, ctx.start, ctx.size = dim, sum(sizes[:rank]), sizes[rank]
        return all_gather_uneven(x, sizes, dim=dim, group=group)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(ctx.dim, ctx.start, ctx.size).contiguous(), None, None, None, None


def broadcast_tensor(x: torch.Tensor | None, *, src: int, group=None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Broadcast ``x`` from rank ``src``; other ranks pass ``None`` (or anything) and get a copy.

    The tensor header of :mod:`lapdtr.runtime.wire` (dtype code, dims, shape) goes first, so
    receivers need not know the shape; no pickle crosses the wire. The payload goes as raw
    bytes, so every wire dtype crosses every backend. A source with nothing it can send (not a
    tensor, a dtype outside the wire table, too many dims) says so in the header, and every rank
    raises a ``ValueError`` instead of the others waiting for a payload.
    """
    me = dist.get_rank(group)
    values, problem = [0] * HEADER_LEN, ""
    if me == src:
        if not isinstance(x, torch.Tensor):
            problem = f"rank {src} is the source and must pass a tensor, got {type(x)}"
            values[0] = NO_CODE
        else:
            try:
                values = pack_header(x.dtype, x.shape)
            except ValueError as e:
                problem = f"rank {src} cannot broadcast its tensor: {e}"
                values = pack_header(x.dtype, x.shape, strict=False)
    header = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(header, src=src, group=group)
    values = header.tolist()
    try:
        dtype, shape = unpack_header(values)
    except ValueError as e:
        raise ValueError(problem or f"broadcast from rank {src}: {e}") from None
    buf = x.to(device).contiguous() if me == src else torch.empty(shape, dtype=dtype, device=device)
    if buf.numel():
        dist.broadcast(buf.reshape(-1).view(torch.uint8), src=src, group=group)
    return buf


# ---------------------------------------------------------------------------- sharded layers


def _slice_param(p: torch.Tensor | None, index, dim: int = 0) -> nn.Parameter | None:
    if p is None:
        return None
    if isinstance(index, slice):
        w = p.detach().narrow(dim, index.start, index.stop - index.start)
    else:
        w = p.detach().index_select(dim, index)
    return nn.Parameter(w.clone(), requires_grad=p.requires_grad)


def _linear_like(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device="meta", dtype=weight.dtype)
    lin.weight = weight
    lin.bias = bias
    return lin


class _Sharded(nn.Module):
    """Common part: which units of how many this rank holds, the group, and traffic counters."""

    kind = ""

    def __init__(self, total: int, ranges: Sequence[tuple[int, int]], rank: int, group):
        super().__init__()
        self.total = int(total)
        self.ranges = [tuple(r) for r in ranges]
        self.rank = int(rank)
        self.world_size = len(self.ranges)
        self.start, self.stop = self.ranges[self.rank]
        self.group = group
        self.bytes_sent = 0
        self.num_collectives = 0

    def _count(self, t: torch.Tensor, dim: int | None = None) -> None:
        n = t.numel() if dim is None else t.numel() // max(t.shape[dim], 1) * max(self.out_sizes)
        self.bytes_sent += n * t.element_size()
        self.num_collectives += 1

    def _reduced(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """partial -> all_reduce(SUM) -> finish; a group of one needs no collective."""
        if self.world_size == 1:
            return self.finish(self.partial(x, **kwargs))
        y = self.partial(_CopyIn.apply(x, self.group), **kwargs)
        self._count(y)
        return self.finish(_ReduceOut.apply(y, self.group))

    def _gathered(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """partial -> uneven all-gather along ``dim``; a group of one needs no collective."""
        if self.world_size == 1:
            return self.partial(x)
        y = self.partial(_CopyIn.apply(x, self.group))
        self._count(y, dim)
        return _GatherOut.apply(y, self.out_sizes, dim, self.rank, self.group)

    def extra_repr(self) -> str:
        return (f"{self.kind}, rank={self.rank}/{self.world_size}, "
                f"units=[{self.start}, {self.stop}) of {self.total}")


def _check_world(rank: int, world_size: int, group) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} must be an integer in 0..{world_size - 1}")
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size(group) != world_size or dist.get_rank(group) != rank:
            raise ValueError(f"rank={rank}, world_size={world_size} do not match the process "
                             f"group (rank {dist.get_rank(group)} of "
                             f"{dist.get_world_size(group)})")


def _attention_class():
    from timm.layers import Attention
    return Attention


def _mlp_class():
    from timm.layers import Mlp
    return Mlp


class ShardedAttention(_Sharded):
    """Heads ``[a_r, b_r)`` of a timm ``Attention``; forward = all-reduced full attention output.

    Keeps the host's ``q_norm`` / ``k_norm`` (per-head, so they apply to a head subset),
    ``attn_drop``, ``proj_drop`` and an optional ``gate`` (sliced like ``qkv``). A ``norm`` over the
    whole attention output (``scale_norm=True``) needs every head and is rejected. The per-head
    math is :func:`torch.nn.functional.scaled_dot_product_attention`, as on timm's fused path
    (the non-fused path differs only by rounding).
    """

    kind = "attention heads"

    def __init__(self, attn: nn.Module, *, ranges: Sequence[tuple[int, int]], rank: int,
                 group=None, name: str = "attn"):
        Attention = _attention_class()
        if not isinstance(attn, Attention):
            raise ValueError(f"{name}: tensor mode splits timm Attention modules, got "
                             f"{type(attn).__module__}.{type(attn).__name__}")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise ValueError(f"{name}: attention with scale_norm (a norm over all heads) cannot be "
                             f"split by heads")
        super().__init__(attn.num_heads, ranges, rank, group)
        a, b = self.start, self.stop
        hd, attn_dim = attn.head_dim, attn.attn_dim
        self.num_heads = b - a
        self.head_dim = hd
        self.scale = attn.scale
        rows = torch.cat([torch.arange(s * attn_dim + a * hd, s * attn_dim + b * hd)
                          for s in range(3)])
        self.qkv = _linear_like(_slice_param(attn.qkv.weight, rows), _slice_param(attn.qkv.bias, rows))
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.attn_drop = attn.attn_drop
        gate = getattr(attn, "gate", None)
        self.gate = None if gate is None else _linear_like(
            _slice_param(gate.weight, slice(a * hd, b * hd)),
            _slice_param(gate.bias, slice(a * hd, b * hd)))
        # proj: this rank's input columns; its bias is added once, after the reduction
        self.proj = _linear_like(_slice_param(attn.proj.weight, slice(a * hd, b * hd), dim=1), None)
        self.proj.register_parameter("bias", _slice_param(attn.proj.bias, slice(0, attn.proj.out_features)))
        self.proj_drop = attn.proj_drop

    def partial(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """This rank's heads through ``proj`` (no bias): the term it adds to the full output."""
        B, N, _ = x.shape
        k_heads, hd = self.num_heads, self.head_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, k_heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] == self.total:
            attn_mask = attn_mask[:, self.start:self.stop]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, N, k_heads * hd)
        if gate is not None:
            y = y * gate
        return F.linear(y, self.proj.weight)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.proj.bias is not None:
            y = y + self.proj.bias
        return self.proj_drop(y)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        return self._reduced(x, attn_mask=attn_mask, is_causal=is_causal)


class ShardedMlp(_Sharded):
    """Hidden units ``[a_r, b_r)`` of a timm ``Mlp`` (``fc1`` rows, ``fc2`` columns); forward =
    all-reduced full MLP output, ``fc2`` bias added once."""

    kind = "mlp hidden units"

    def __init__(self, mlp: nn.Module, *, ranges: Sequence[tuple[int, int]], rank: int,
                 group=None, name: str = "mlp"):
        Mlp = _mlp_class()
        if not (isinstance(mlp, Mlp) and isinstance(mlp.fc1, nn.Linear)
                and isinstance(mlp.fc2, nn.Linear)):
            raise ValueError(f"{name}: tensor mode splits timm Mlp modules with Linear fc1/fc2, "
                             f"got {type(mlp).__module__}.{type(mlp).__name__}")
        if not isinstance(mlp.norm, nn.Identity):
            raise ValueError(f"{name}: an Mlp with a norm over the hidden units cannot be split")
        super().__init__(mlp.fc1.out_features, ranges, rank, group)
        sl = slice(self.start, self.stop)
        self.fc1 = _linear_like(_slice_param(mlp.fc1.weight, sl), _slice_param(mlp.fc1.bias, sl))
        self.act, self.drop1, self.norm = mlp.act, mlp.drop1, mlp.norm
        self.fc2 = _linear_like(_slice_param(mlp.fc2.weight, sl, dim=1), None)
        self.fc2.register_parameter("bias", _slice_param(mlp.fc2.bias, slice(0, mlp.fc2.out_features)))
        self.drop2 = mlp.drop2

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(self.drop1(self.act(self.fc1(x)))), self.fc2.weight)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        if self.fc2.bias is not None:
            y = y + self.fc2.bias
        return self.drop2(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduced(x)


class ShardedConv2d(_Sharded):
    """Output channels of a ``Conv2d`` on this rank; forward = all channels, gathered.

    The split unit is one output channel for an ungrouped conv and one group (its
    ``out_channels / groups`` outputs, reading its ``in_channels / groups`` inputs) for a grouped
    or depthwise conv. Holds ``weight`` / ``bias`` under the host's names, sliced.
    """

    kind = "conv output channels"

    def __init__(self, conv: nn.Conv2d, *, ranges: Sequence[tuple[int, int]], rank: int,
                 group=None, name: str = "conv"):
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
            raise ValueError(f"{name}: tensor mode splits nn.Conv2d with zero padding, got "
                             f"{type(conv).__name__}")
        g = conv.groups
        super().__init__(conv.out_channels if g == 1 else g, ranges, rank, group)
        per_out = 1 if g == 1 else conv.out_channels // g
        self.out_sizes = [(b - a) * per_out for a, b in self.ranges]
        o0, o1 = self.start * per_out, self.stop * per_out
        self.weight = _slice_param(conv.weight, slice(o0, o1))
        self.bias = _slice_param(conv.bias, slice(o0, o1))
        self.in_per_group = conv.in_channels // g
        self.groups = 1 if g == 1 else self.stop - self.start
        self.in_slice = None if g == 1 else (self.start * self.in_per_group,
                                             self.stop * self.in_per_group)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation = conv.dilation
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_slice is not None:
            x = x[:, self.in_slice[0]:self.in_slice[1]]
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gathered(x, 1)


class ShardedLinear(_Sharded):
    """Output features ``[a_r, b_r)`` of a ``Linear``; forward = all features, gathered."""

    kind = "linear output features"

    def __init__(self, linear: nn.Linear, *, ranges: Sequence[tuple[int, int]], rank: int,
                 group=None, name: str = "linear"):
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name}: expected nn.Linear, got {type(linear).__name__}")
        super().__init__(linear.out_features, ranges, rank, group)
        sl = slice(self.start, self.stop)
        self.weight = _slice_param(linear.weight, sl)
        self.bias = _slice_param(linear.bias, sl)
        self.out_sizes = [b - a for a, b in self.ranges]
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gathered(x, -1)


def _units_of(module: nn.Module) -> tuple[type, int]:
    """The wrapper class for ``module`` and how many split units it has."""
    if isinstance(module, _attention_class()):
        return ShardedAttention, module.num_heads
    if isinstance(module, _mlp_class()) and isinstance(getattr(module, "fc1", None), nn.Linear):
        return ShardedMlp, module.fc1.out_features
    if isinstance(module, nn.Conv2d):
        return ShardedConv2d, module.out_channels if module.groups == 1 else module.groups
    if isinstance(module, nn.Linear):
        return ShardedLinear, module.out_features
    raise ValueError(f"tensor mode cannot split {type(module).__name__}; it splits timm Attention "
                     f"and Mlp, nn.Conv2d and nn.Linear")


def shard_module(module: nn.Module, *, proportions: Sequence[float], rank: int,
                 group=None, name: str = "module") -> _Sharded:
    """The sharded wrapper of one layer for ``rank`` (proportions rounded to whole units)."""
    cls, total = _units_of(module)
    ranges = split_ranges(total, proportions, what=f"{name} ({cls.kind}: {total})")
    _check_world(rank, len(ranges), group)
    return cls(module, ranges=ranges, rank=rank, group=group, name=name)


def reference_tensor_split(module: nn.Module, x: torch.Tensor, *, proportions: Sequence[float],
                           **kwargs) -> torch.Tensor:
    """One process, no collectives: build every rank's shard of ``module`` and combine their
    partial outputs as the collectives would (sum for attention / MLP, concatenation for conv /
    linear). Tests the slicing math against ``module(x)``."""
    cls, total = _units_of(module)
    ranges = split_ranges(total, proportions, what=f"{type(module).__name__}")
    shards = [cls(module, ranges=ranges, rank=r) for r in range(len(ranges))]
    parts = [s.partial(x, **kwargs) for s in shards]
    if cls in (ShardedAttention, ShardedMlp):
        return shards[0].finish(torch.stack(parts).sum(0))
    return torch.cat(parts, dim=1 if cls is ShardedConv2d else -1)


# ---------------------------------------------------------------------------- whole models


@dataclass
class _SplitInfo:
    proportions: tuple[float, ...]
    rank: int
    world_size: int


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(dotted name, module) of every layer apply_tensor_split replaces in ``model``."""
    from ..models import get_adapter

    family = get_adapter(model).name
    if family in _VIT_FAMILIES:
        out = []
        for i, blk in enumerate(model.blocks):
            for part, cls in (("attn", _attention_class()), ("mlp", _mlp_class())):
                mod = getattr(blk, part)
                if not isinstance(mod, cls):
                    raise ValueError(f"blocks.{i}.{part}: tensor mode splits timm {cls.__name__}, "
                                     f"got {type(mod).__module__}.{type(mod).__name__}")
                out.append((f"blocks.{i}.{part}", mod))
        return out
    if family in _CNN_FAMILIES:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    raise ValueError(f"tensor mode does not support the {family!r} family; supported: "
                     f"{', '.join(TENSOR_FAMILIES)}")


def _set(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, last = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, last, new)


def apply_tensor_split(model: nn.Module, *, proportions: Sequence[float], rank: int,
                       world_size: int, group=None) -> nn.Module:
    """Shard ``model`` in place for ``rank`` of ``world_size`` and return it.

    ViT family: every block's ``attn`` (by heads) and ``mlp`` (by hidden units). CNN families
    (ResNet, VGG, MobileNet): every ``Conv2d`` (by output channels or groups) and ``Linear`` (by
    output features). Each layer is split in ``proportions`` (one per rank, rounded to whole units
    per layer, every rank at least one). The model's forward then needs every rank of the group
    to run it on the same input, and returns the full output on every rank.
    """
    props = _check_proportions(proportions, world_size)
    _check_world(rank, world_size, group)
    info = _SplitInfo(tuple(props), rank, world_size)
    done = getattr(model, "_lapdtr_tensor_split", None)
    if done is not None:
        if done != info:
            raise ValueError(f"model is already split with proportions {list(done.proportions)} "
                             f"for rank {done.rank} of {done.world_size}; build a fresh model to "
                             f"split it as {props} for rank {rank} of {world_size}")
        return model
    targets = _targets(model)
    # size-check every layer before touching any, so a bad split leaves the model intact
    for name, mod in targets:
        cls, total = _units_of(mod)
        split_counts(total, props, what=f"{name} ({cls.kind}: {total})")
    for name, mod in targets:
        _set(model, name, shard_module(mod, proportions=props, rank=rank, group=group, name=name))
    model._lapdtr_tensor_split = info
    return model


def list_tensor_shards(model: nn.Module) -> list:
    """This rank's shards of a split model as plan :class:`~lapdtr.plan.types.Shard` records
    (``unit`` = the layer's module name, ``axis='channels'``, ``[start, stop)`` in heads, hidden
    units, channels or groups)."""
    from ..plan.types import Shard

    return [Shard(unit=n, rank=m.rank, axis="channels", start=m.start, stop=m.stop)
            for n, m in model.named_modules() if isinstance(m, _Sharded)]


def get_tensor_comm_stats(model: nn.Module, *, reset: bool = False) -> dict:
    """``{'bytes_sent': ..., 'num_collectives': ...}`` summed over the sharded layers: the bytes of
    the tensors this rank handed to collectives (padded, for uneven gathers)."""
    layers = [m for m in model.modules() if isinstance(m, _Sharded)]
    out = {"bytes_sent": sum(m.bytes_sent for m in layers),
           "num_collectives": sum(m.num_collectives for m in layers)}
    if reset:
        for m in layers:
            m.bytes_sent = m.num_collectives = 0
    return out


def run_tensor(model: nn.Module, inputs: torch.Tensor | None, *, proportions: Sequence[float],
               rank: int, world_size: int, src: int | None = None, group=None) -> torch.Tensor:
    """Run ``model`` split across the group in tensor mode; the full output on every rank.

    Splits ``model`` on first use (:func:`apply_tensor_split`; later calls with the same split
    reuse it). Every rank must call this with the same input: pass it on every rank, or pass it
    on rank ``src`` only (``None`` elsewhere) and it is broadcast first.
    """
    apply_tensor_split(model, proportions=proportions, rank=rank, world_size=world_size,
                       group=group)
    if src is not None:
        device = next(model.parameters()).device
        inputs = broadcast_tensor(inputs, src=src, group=group, device=device)
    elif not isinstance(inputs, torch.Tensor):
        raise ValueError(f"inputs must be a tensor on every rank (or pass src=), got {type(inputs)}")
    with torch.no_grad():
        return model(inputs)
