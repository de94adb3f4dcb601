"""Token importance from attention, recomputed from q and k (timm's ViTs attend through fused
SDPA, so no attention probabilities exist to read).

* ``"cls"`` (models with a class token): row 0 of softmax(q k^T · scale), the attention the
  class token pays each token, averaged over heads; O(N·C).
* ``"received"`` (models without one): the attention each token receives, averaged over queries
  and heads; streamed over blocks of queries, so at most ``block × N`` scores exist at once.

Both return (B, N) float32 (float64 for float64 inputs), one value per token of the attention's
input, prefix tokens included; each row sums to 1. The ops dispatch to Triton kernels
(:mod:`lapdtr.summarize.dispatch`); ``*_ref`` are the PyTorch references.

Sources: :func:`attention_source` names the module of a unit whose attention ranks that unit's
output tokens (supported: the ``blocks.i`` units of the ``vit`` adapter, i.e. timm
``Attention``, and of the ``eva`` adapter); :class:`AttentionProbe`
captures its q and k while the unit runs (a hook on ``attn.qkv``), :func:`attention_importance`
computes them from the attention's input. :class:`RopeAttentionProbe` does the same for
``EvaAttention`` / ``AttentionRope`` (the ``eva`` adapter): it captures q and k after ``q_norm`` / ``k_norm`` (hooks on both, so fused and
separate q/k/v projections alike) and the rotary table the block was called with (a pre-hook on
the attention), and rotates the patch tokens' q and k with timm's ``apply_rot_embed_cat`` as the
attention does, so the scores are those the block attended with. :func:`probe_for` picks the
probe for an attention module.
"""
from __future__ import annotations

import torch
from torch import nn

from . import dispatch

__all__ = ["IMPORTANCE_KINDS", "SOURCE_FAMILIES", "cls_importance", "cls_importance_ref",
           "received_attention", "received_attention_ref", "attention_source", "importance_kind",
           "qk_from_qkv", "qk", "attention_importance", "importance", "AttentionProbe",
           "RopeAttentionProbe", "WindowAttentionProbe", "window_received_attention",
           "LinearAttentionProbe", "linear_received_attention", "linear_received_attention_ref",
           "probe_for"]

IMPORTANCE_KINDS = ("cls", "received")
# adapters whose units offer an attention source
SOURCE_FAMILIES = ("vit", "eva", "tiny_vit", "efficientvit_b")
_COMPUTE = {torch.float64: torch.float64}


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, heads, N, head_dim); got {list(q.shape)} and "
                         f"{list(k.shape)}")


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def cls_importance_ref(q: torch.Tensor, k: torch.Tensor, scale: float, row: int = 0) -> torch.Tensor:
    """PyTorch reference of :func:`cls_importance`."""
    ct = _COMPUTE.get(q.dtype, torch.float32)
    s = (q[:, :, row:row + 1].to(ct) * scale) @ k.to(ct).transpose(-2, -1)  # (B, H, 1, N)
    return s.softmax(-1).mean(1).squeeze(1)


def received_attention_ref(q: torch.Tensor, k: torch.Tensor, scale: float,
                           block: int = 64) -> torch.Tensor:
    """PyTorch reference of :func:`received_attention`: ``block`` queries at a time."""
    B, H, N, _ = q.shape
    ct = _COMPUTE.get(q.dtype, torch.float32)
    kt = k.to(ct).transpose(-2, -1)
    acc = torch.zeros(B, H, N, dtype=ct, device=q.device)
    for s in range(0, N, block):
        acc = acc + ((q[:, :, s:s + block].to(ct) * scale) @ kt).softmax(-1).sum(2)
    return acc.sum(1) / (H * N)


def cls_importance(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                   row: int = 0) -> torch.Tensor:
    """The attention token ``row`` (the class token) pays every token, mean over heads: (B, N).

    ``q``, ``k``: (B, heads, N, head_dim) as the attention uses them (after q/k norms);
    ``scale`` defaults to head_dim ** -0.5."""
    _check_qk(q, k)
    if not 0 <= row < q.shape[2]:
        raise ValueError(f"row {row} is not a token index (0..{q.shape[2] - 1})")
    return dispatch.run("cls_importance", cls_importance_ref, q, k, scale=_scale(q, scale),
                        row=int(row))


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The attention every token receives, mean over queries and heads: (B, N), without the
    N×N matrix."""
    _check_qk(q, k)
    return dispatch.run("received_attention", received_attention_ref, q, k, scale=_scale(q, scale))


def _unit_name(unit) -> str:
    name = getattr(unit, "name", unit)
    if isinstance(name, int) and not isinstance(name, bool):
        return f"#{name}"
    return str(name)


def attention_source(model: nn.Module, unit) -> nn.Module:
    """The module whose attention scores rank the output tokens of ``unit`` (a :class:`Unit`, a
    unit name or index), as its adapter names it (``Unit.attention``): for a ``vit`` or ``eva``
    block unit ``blocks.i``, ``model.blocks[i].attn``; for a ``tiny_vit`` block unit
    ``stages.i.blocks.j``, the block itself (its window attention,
    :class:`WindowAttentionProbe`); for an ``efficientvit_b`` EfficientViT block, its
    ``LiteMLA`` (:class:`LinearAttentionProbe`)."""
    from lapdtr.models import get_adapter, units as list_units

    family = get_adapter(model).name
    if family not in SOURCE_FAMILIES:
        raise ValueError(f"the {family} adapter offers no attention source for token importance; "
                         f"families that do: {', '.join(SOURCE_FAMILIES)}")
    if isinstance(unit, int) and not isinstance(unit, bool):
        names = [u.name for u in list_units(model)]
        if not 0 <= unit < len(names):
            raise ValueError(f"unit index {unit} is out of range 0..{len(names) - 1}")
        unit = names[unit]
    name = _unit_name(unit)
    specs = None
    attention = getattr(unit, "attention", None)
    if not hasattr(unit, "attention"):  # a name: the adapter's unit of that name
        specs = get_adapter(model).build(model)
        attention = next((s.attention for s in specs if s.name == name), None)
    if attention is not None:
        return model.get_submodule(attention)
    have = [s.name for s in (specs or get_adapter(model).build(model)) if s.attention is not None]
    raise ValueError(f"unit {name!r} of the {family} model has no attention; units with one: "
                     f"{_span(have)}")


def _span(names: list[str]) -> str:
    """``blocks.0 .. blocks.11`` for a ViT's blocks; the names, up to 8; else the first and
    the last, and how many."""
    if len(names) > 1 and names == [f"blocks.{i}" for i in range(len(names))]:
        return f"{names[0]} .. {names[-1]}"
    if len(names) <= 8:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)} units)"


def importance_kind(model: nn.Module) -> str:
    """``"cls"`` for a model with a class token, else ``"received"``."""
    return "cls" if getattr(model, "cls_token", None) is not None else "received"


def _check_attn(attn: nn.Module) -> None:
    missing = [a for a in ("qkv", "num_heads", "head_dim") if not hasattr(attn, a)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise ValueError(f"{type(attn).__name__} is not a timm-style attention (a qkv Linear, "
                         f"num_heads, head_dim); missing: {', '.join(missing) or 'qkv Linear'}")


def qk_from_qkv(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, k)`` (B, heads, N, head_dim) from the output of ``attn.qkv``, as ``attn`` uses them
    (``q_norm`` / ``k_norm`` applied)."""
    _check_attn(attn)
    B, N, _ = qkv.shape
    t = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = t[0], t[1]
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k


def qk(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, k)`` of ``attn`` for its input ``x`` (B, N, C) (a ViT block's ``norm1(x)``)."""
    _check_attn(attn)
    return qk_from_qkv(attn, attn.qkv(x))


def importance(q: torch.Tensor, k: torch.Tensor, kind: str, scale: float | None = None) -> torch.Tensor:
    """:func:`cls_importance` or :func:`received_attention`, by ``kind``."""
    if kind == "cls":
        return cls_importance(q, k, scale)
    if kind == "received":
        return received_attention(q, k, scale)
    raise ValueError(f"importance kind {kind!r} is not supported; supported: "
                     f"{', '.join(IMPORTANCE_KINDS)}")


def attention_importance(attn: nn.Module, x: torch.Tensor, kind: str = "cls") -> torch.Tensor:
    """Token importance of ``attn`` for its input ``x``: (B, N)."""
    q, k = qk(attn, x)
    return importance(q, k, kind, getattr(attn, "scale", None))


class AttentionProbe:
    """Captures ``q`` and ``k`` of a timm attention whenever it runs (a forward hook on its
    ``qkv``); :meth:`importance` ranks the tokens of the last call. Use as a context manager or
    call :meth:`remove`."""

    def __init__(self, attn: nn.Module, kind: str = "cls"):
        _check_attn(attn)
        if kind not in IMPORTANCE_KINDS:
            raise ValueError(f"importance kind {kind!r} is not supported; supported: "
                             f"{', '.join(IMPORTANCE_KINDS)}")
        self.attn, self.kind = attn, kind
        self._qkv: torch.Tensor | None = None
        self._handle = attn.qkv.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        self._qkv = out

    def importance(self) -> torch.Tensor:
        """(B, N) importance of the tokens the attention last saw."""
        if self._qkv is None:
            raise RuntimeError(f"the probed {type(self.attn).__name__} has not run since the probe "
                               "was attached (or since clear())")
        q, k = qk_from_qkv(self.attn, self._qkv)
        return importance(q, k, self.kind, getattr(self.attn, "scale", None))

    def clear(self) -> None:
        self._qkv = None

    def remove(self) -> None:
        self._handle.remove()
        self._qkv = None

    def __enter__(self) -> "AttentionProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class RopeAttentionProbe:
    """:class:`AttentionProbe` for the attentions of timm's ``Eva`` (``EvaAttention``: DINOv3,
    EVA-02; ``AttentionRope``: RoPE ViTs, Perception Encoder, Sapiens2): q and k as the attention
    uses them (after ``q_norm`` / ``k_norm``, the patch tokens rotated by the block's rotary
    table, prefix tokens not rotated; grouped kv heads repeated per query head, as in timm)."""

    def __init__(self, attn: nn.Module, kind: str = "cls"):
        missing = [a for a in ("q_norm", "k_norm", "num_heads", "num_prefix_tokens")
                   if not hasattr(attn, a)]
        if missing:
            raise ValueError(f"{type(attn).__name__} is not a timm EvaAttention; missing: "
                             f"{', '.join(missing)}")
        if kind not in IMPORTANCE_KINDS:
            raise ValueError(f"importance kind {kind!r} is not supported; supported: "
                             f"{', '.join(IMPORTANCE_KINDS)}")
        self.attn, self.kind = attn, kind
        self._q = self._k = self._rope = None
        self._handles = [
            attn.register_forward_pre_hook(self._pre, with_kwargs=True),
            attn.q_norm.register_forward_hook(lambda m, a, out: setattr(self, "_q", out)),
            attn.k_norm.register_forward_hook(lambda m, a, out: setattr(self, "_k", out)),
        ]

    def _pre(self, module, args, kwargs):
        self._rope = kwargs["rope"] if "rope" in kwargs else (args[1] if len(args) > 1 else None)

    def qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, k)`` (B, heads, N, head_dim) of the last call, rotated as the attention did."""
        if self._q is None or self._k is None:
            raise RuntimeError(f"the probed {type(self.attn).__name__} has not run since the probe "
                               "was attached (or since clear())")
        q, k = self._q, self._k
        rope = self._rope
        if rope is not None:
            from timm.layers import apply_rot_embed_cat

            npt, half = self.attn.num_prefix_tokens, getattr(self.attn, "rotate_half", False)

            def rotate(t):
                r = rope
                if r.dim() >= 3 and r.shape[-3] != 1:  # per-head tables (RoPE-Mixed); an
                    r = r[..., :t.shape[1], :, :]      # elastic attention runs its first heads
                return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], r, half=half)],
                                 dim=2)
            q, k = rotate(q), rotate(k)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: query head h reads kv head
            g = -(-q.shape[1] // k.shape[1])  # h // groups, as in timm (and its first heads)
            k = k.repeat_interleave(getattr(self.attn, "num_kv_groups", g), dim=1)[:, :q.shape[1]]
        return q, k

    def importance(self) -> torch.Tensor:
        """(B, N) importance of the tokens the attention last saw."""
        q, k = self.qk()
        return importance(q, k, self.kind, getattr(self.attn, "scale", None))

    def clear(self) -> None:
        self._q = self._k = self._rope = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "RopeAttentionProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def window_received_attention(q: torch.Tensor, k: torch.Tensor, scale: float,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The attention each token of a window receives, averaged over the window's queries and the
    heads: ``q``, ``k`` (windows, heads, N, d), ``bias`` (heads, N, N) added to the logits (a
    TinyViT window's relative-position bias); (windows, N). PyTorch only: a window's N x N
    scores (49 x 49 for TinyViT) are small, no kernel needed."""
    ct = _COMPUTE.get(q.dtype, torch.float32)
    s = (q.to(ct) * scale) @ k.to(ct).transpose(-2, -1)
    if bias is not None:
        s = s + bias.to(ct)
    return s.softmax(-1).mean(2).mean(1)


class WindowAttentionProbe:
    """:class:`AttentionProbe` for a TinyViT block (timm ``TinyVitBlock``): its window attention
    with the relative-position bias of each window (``attn.get_attention_biases``), ranked by the
    attention each token receives in its window (``"received"``: TinyViT has no class token),
    the windows put back on the block's ``H x W`` grid (padding cropped) in row-major order, the
    order of :func:`lapdtr.summarize.map_to_tokens`. Reads the attention's normalized input (a
    hook on ``attn.norm``), so an elastic attention at reduced width (its first heads) is ranked
    by the heads it ran."""

    def __init__(self, block: nn.Module, kind: str = "received"):
        if kind != "received":
            raise ValueError(f"importance kind {kind!r} is not supported for a TinyViT window "
                             "attention (no class token); supported: received")
        missing = [a for a in ("attn", "window_size") if not hasattr(block, a)]
        if missing:
            raise ValueError(f"{type(block).__name__} is not a timm TinyVitBlock; missing: "
                             f"{', '.join(missing)}")
        self.block, self.attn, self.kind = block, block.attn, kind
        self._x = self._shape = None
        self._handles = [
            block.register_forward_pre_hook(
                lambda m, args: setattr(self, "_shape", tuple(args[0].shape))),
            self.attn.norm.register_forward_hook(lambda m, a, out: setattr(self, "_x", out)),
        ]

    def qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, k)`` (windows, heads, N, key_dim) of the last call, over the heads it ran."""
        if self._x is None or self._shape is None:
            raise RuntimeError(f"the probed {type(self.block).__name__} has not run since the probe "
                               "was attached (or since clear())")
        a, x = self.attn, self._x
        heads = int(getattr(a, "heads_now", a.num_heads))
        per = 2 * a.key_dim + a.val_dim
        b = a.qkv.bias
        qkv = torch.nn.functional.linear(x, a.qkv.weight[:heads * per],
                                         None if b is None else b[:heads * per])
        q, k, _ = qkv.view(x.shape[0], x.shape[1], heads, per).split(
            [a.key_dim, a.key_dim, a.val_dim], dim=3)
        return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3)

    def importance(self) -> torch.Tensor:
        """(B, H * W) importance of the block's grid positions, row-major."""
        q, k = self.qk()
        bias = self.attn.get_attention_biases(q.device)[:q.shape[1]]
        imp = window_received_attention(q, k, self.attn.scale, bias)
        B, H, W = self._shape[:3]
        ws = self.block.window_size
        if H == ws and W == ws:
            return imp.reshape(B, H * W)
        pH, pW = H + (ws - H % ws) % ws, W + (ws - W % ws) % ws
        grid = imp.view(B, pH // ws, pW // ws, ws, ws).transpose(2, 3).reshape(B, pH, pW)
        return grid[:, :H, :W].reshape(B, H * W)

    def clear(self) -> None:
        self._x = self._shape = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "WindowAttentionProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def linear_received_attention_ref(q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference of :func:`linear_received_attention` with the explicit N x N attention."""
    q, k = q.double(), k.double()
    s = q @ k.transpose(-2, -1)
    return (s / (s.sum(-1, keepdim=True) + eps)).mean(2).mean(1).float()


def linear_received_attention(q: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """The attention each token receives in ReLU linear attention (EfficientViT-B's ``LiteMLA``:
    ``a_ij = q_i.k_j / (q_i.sum_j k_j + eps)`` with ``q``, ``k`` after the kernel function),
    averaged over queries and heads, in O(N d): ``sum_i a_ij = k_j . sum_i q_i / z_i``.
    ``q``, ``k``: (B, heads, N, d); returns (B, N) float32."""
    q, k = q.float(), k.float()
    z = q @ k.sum(-2).unsqueeze(-1)                       # (B, H, N, 1): q_i . sum_j k_j
    w = (q / (z + eps)).sum(-2)                            # (B, H, d)
    return (k @ w.unsqueeze(-1)).squeeze(-1).mean(1) / q.shape[-2]


class LinearAttentionProbe:
    """:class:`AttentionProbe` for EfficientViT-B's multi-scale ReLU linear attention (timm
    ``LiteMLA``): q and k after its kernel function (a hook on ``kernel_func``, which it calls
    on q, then on k), every scale's heads; importance ``"received"``
    (:func:`linear_received_attention`) per position of the block's map, row-major."""

    def __init__(self, attn: nn.Module, kind: str = "received"):
        if kind != "received":
            raise ValueError(f"importance kind {kind!r} is not supported for a linear attention "
                             "(no class token); supported: received")
        missing = [a for a in ("kernel_func", "eps", "qkv") if not hasattr(attn, a)]
        if missing:
            raise ValueError(f"{type(attn).__name__} is not a timm LiteMLA; missing: "
                             f"{', '.join(missing)}")
        self.attn, self.kind = attn, kind
        self._seen: list[torch.Tensor] = []
        self._handles = [
            attn.register_forward_pre_hook(lambda m, a: self._seen.clear()),
            attn.kernel_func.register_forward_hook(lambda m, a, out: self._seen.append(out)),
        ]

    def qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._seen) != 2:
            raise RuntimeError(f"the probed {type(self.attn).__name__} has not run since the probe "
                               "was attached (or since clear())")
        return self._seen[0], self._seen[1]

    def importance(self) -> torch.Tensor:
        """(B, H * W) importance of the block's map positions, row-major."""
        q, k = self.qk()
        return linear_received_attention(q, k, self.attn.eps)

    def clear(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "LinearAttentionProbe":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def probe_for(attn: nn.Module, kind: str = "cls"):
    """The probe of ``attn`` (an :func:`attention_source`): :class:`WindowAttentionProbe` for a
    TinyViT block, :class:`LinearAttentionProbe` for EfficientViT-B's ``LiteMLA``,
    :class:`RopeAttentionProbe` for the
    rotary attentions of timm's ``Eva`` (``EvaAttention``, ``AttentionRope``),
    :class:`AttentionProbe` for a timm ``Attention``."""
    from timm.layers.attention import AttentionRope
    from timm.models.eva import EvaAttention
    from timm.models.tiny_vit import TinyVitBlock

    if isinstance(attn, TinyVitBlock):
        return WindowAttentionProbe(attn, kind)
    from timm.models.efficientvit_mit import LiteMLA

    if isinstance(attn, LiteMLA):
        return LinearAttentionProbe(attn, kind)
    if isinstance(attn, (EvaAttention, AttentionRope)):
        return RopeAttentionProbe(attn, kind)
    return AttentionProbe(attn, kind)
