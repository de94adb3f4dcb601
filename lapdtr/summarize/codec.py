"""A boundary codec: what one stage sends the next, summarized and in a wire format.

:class:`BoundaryCodec` is static per boundary (the per-item shape, keep ratio, wire format,
layout, restore rule), so every packet of a boundary has the same shapes and the receiver needs
nothing but the packet. ``encode(x, importance) -> packet`` (a tuple of tensors, for
:func:`lapdtr.runtime.wire.pack_packet`) and ``decode(packet) -> tensor``.

Packets:

* every token kept (``k == N_patch``, e.g. keep 1): the boundary tensor itself in the wire
  format: ``(x,)``, or ``(codes, scales)`` for int8 (per token: over channels, for maps too);
* otherwise the tokens ``[prefix, kept..., fused]`` (B, P + k + 1, C) in the wire format, then
  the kept tokens' sorted positions among the patch tokens (B, k), int16 (int32 beyond 32767
  patch tokens).

fp32 at keep 1 sends ``x`` unchanged, so decoding returns it bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .summarizer import (LAYOUTS, Summary, check_keep, keep_count, map_to_tokens, restore_dense,
                         size_bias, summarize, tokens_to_map)
from .wire import check_wire, decode_tensor, encode_tensor, parts_nbytes, wire_parts

__all__ = ["BoundaryCodec", "RESTORES", "codec_for_unit", "restore_rule"]

RESTORES = ("tokens", "dense")
_WIRE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
               "int8": torch.int8}
_LAYOUT_OF_FORMAT = {"tokens": "tokens", "map": "map", "map_nhwc": "map_nhwc"}


@dataclass(frozen=True)
class BoundaryCodec:
    """Encoder and decoder of one boundary.

    ``shape``: one item's boundary tensor without the batch dim ((N, C) tokens, (C, H, W) map,
    (H, W, C) map_nhwc, as ``layout`` says); ``keep`` in (0, 1]; ``wire`` one of
    ``WIRE_FORMATS``; ``num_prefix``: leading tokens always kept (class, distillation,
    register tokens; 0 for maps); ``restore``: ``"tokens"`` (the shorter sequence, for plain
    ViT blocks) or ``"dense"`` (the full grid); ``dtype``: what :meth:`decode` returns."""

    shape: tuple[int, ...]
    keep: float = 1.0
    wire: str = "fp32"
    layout: str = "tokens"
    num_prefix: int = 0
    restore: str = "tokens"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "keep", check_keep(self.keep))
        check_wire(self.wire)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not supported; supported: "
                             f"{', '.join(LAYOUTS)}")
        want = 2 if self.layout == "tokens" else 3
        if len(self.shape) != want or min(self.shape) < 1:
            raise ValueError(f"a {self.layout} boundary has a per-item shape of {want} positive "
                             f"dims; got {list(self.shape)}")
        if self.restore not in RESTORES:
            raise ValueError(f"restore rule {self.restore!r} is not supported; supported: "
                             f"{', '.join(RESTORES)}")
        if self.layout != "tokens" and self.num_prefix != 0:
            raise ValueError(f"a {self.layout} boundary has no prefix tokens; got "
                             f"num_prefix={self.num_prefix}")
        if not 0 <= self.num_prefix < self.n_tokens:
            raise ValueError(f"num_prefix={self.num_prefix} must lie in 0..{self.n_tokens - 1} "
                             f"for {self.n_tokens} tokens")
        if self.summarizes and self.layout != "tokens" and self.restore != "dense":
            raise ValueError(f"a {self.layout} boundary's next stage takes the full grid, not "
                             f"fewer tokens: keep={self.keep} needs restore='dense' there")

    # static facts -------------------------------------------------------------------------
    @property
    def hw(self) -> tuple[int, int]:
        if self.layout == "map":
            return self.shape[1], self.shape[2]
        if self.layout == "map_nhwc":
            return self.shape[0], self.shape[1]
        return (0, 0)

    @property
    def n_tokens(self) -> int:
        if self.layout == "tokens":
            return self.shape[0]
        h, w = self.hw
        return h * w

    @property
    def channels(self) -> int:
        return self.shape[0] if self.layout == "map" else self.shape[-1]

    @property
    def n_patch(self) -> int:
        return self.n_tokens - self.num_prefix

    @property
    def k(self) -> int:
        """Patch tokens kept."""
        return keep_count(self.keep, self.n_patch)

    @property
    def summarizes(self) -> bool:
        """Whether tokens are dropped (``k < N_patch``)."""
        return self.k < self.n_patch

    @property
    def fused_size(self) -> int:
        return self.n_patch - self.k

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.int16 if self.n_patch <= torch.iinfo(torch.int16).max else torch.int32

    def out_shape(self) -> tuple[int, ...]:
        """One item's shape after :meth:`decode`."""
        if self.summarizes and self.restore == "tokens":
            return (self.num_prefix + self.k + 1, self.channels)
        return self.shape

    def attn_bias(self, *, dtype=torch.float32, device=None) -> torch.Tensor | None:
        """ToMe's proportional-attention bias for the decoded sequence (``log(size)`` per key,
        (1, 1, 1, T)), to pass as the next blocks' ``attn_mask``; ``None`` where no token stands
        for more than one."""
        if not self.summarizes or self.restore != "tokens":
            return None
        return size_bias(self.num_prefix, self.k, self.fused_size, dtype=dtype, device=device)

    def packet_specs(self, batch: int = 1) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """``(dtype, shape)`` of each tensor of a packet of ``batch`` items."""
        if self.summarizes:
            body = (batch, self.num_prefix + self.k + 1, self.channels)
        elif self.wire == "int8":
            body = (batch, self.n_tokens, self.channels)
        else:
            body = (batch, *self.shape)
        specs = [(_WIRE_DTYPE[self.wire], body)]
        if self.wire == "int8":
            specs.append((torch.float32, (*body[:-1], 1)))
        if self.summarizes:
            specs.append((self.index_dtype, (batch, self.k)))
        return specs

    def nbytes(self, batch: int = 1) -> int:
        """Payload bytes of a packet of ``batch`` items (exact: what :meth:`encode` makes)."""
        total = 0
        for dtype, shape in self.packet_specs(batch):
            n = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                n *= d
            total += n
        return total

    def packet_nbytes(self, batch: int = 1) -> int:
        """Bytes of the ``pack_packet`` message of a packet of ``batch`` items."""
        return parts_nbytes(self.packet_specs(batch))

    def dense_nbytes(self, batch: int = 1) -> int:
        """Bytes of the unsummarized boundary in fp32, the yardstick."""
        n = 4 * batch
        for d in self.shape:
            n *= d
        return n

    # encode / decode ---------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"boundary tensor has shape {list(x.shape)}; this codec takes "
                             f"[B, {', '.join(map(str, self.shape))}] ({self.layout})")

    def encode(self, x: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The packet of ``x`` (B, *shape); ``importance`` (B, N) or (B, N_patch) per token, in
        the token order of :func:`lapdtr.summarize.map_to_tokens` (needed when tokens are
        dropped)."""
        self._check_input(x)
        if not self.summarizes:
            if self.wire == "int8":
                return encode_tensor(map_to_tokens(x, self.layout), "int8")
            return encode_tensor(x, self.wire)
        s = summarize(map_to_tokens(x, self.layout), importance, self.keep,
                      num_prefix=self.num_prefix)
        tokens = torch.cat([s.prefix, s.kept, s.fused], dim=1)
        return (*encode_tensor(tokens, self.wire), s.indices.to(self.index_dtype))

    def _check_packet(self, packet: Sequence[torch.Tensor]) -> None:
        specs = self.packet_specs(packet[0].shape[0] if len(packet) and packet[0].dim() else 1)
        got = [(t.dtype, tuple(t.shape)) for t in packet]
        if got != specs:
            def words(ss):
                return ", ".join(f"{str(d).removeprefix('torch.')} {list(s)}" for d, s in ss)
            raise ValueError(f"packet ({words(got)}) is not one of this codec's ({words(specs)}: "
                             f"keep={self.keep}, wire={self.wire}, layout={self.layout})")

    def summary(self, packet: Sequence[torch.Tensor]) -> Summary:
        """The :class:`Summary` a packet carries, in ``dtype`` (tokens layout)."""
        self._check_packet(packet)
        n = wire_parts(self.wire)
        if not self.summarizes:
            t = map_to_tokens(self._decode_full(packet), self.layout)
            B, _, C = t.shape
            idx = torch.arange(self.n_patch, device=t.device).expand(B, self.n_patch)
            return Summary(t[:, :self.num_prefix], t[:, self.num_prefix:], idx,
                           t.new_zeros(B, 0, C), self.n_patch)
        t = decode_tensor(packet[:n], self.wire, self.dtype)
        P, k = self.num_prefix, self.k
        return Summary(t[:, :P], t[:, P:P + k], packet[n].long(), t[:, P + k:], self.n_patch)

    def _decode_full(self, packet) -> torch.Tensor:
        t = decode_tensor(packet, self.wire, self.dtype)
        if self.wire == "int8":
            t = tokens_to_map(t, self.layout, self.hw)
        return t

    def decode(self, packet: Sequence[torch.Tensor]) -> torch.Tensor:
        """The tensor the next stage takes: (B, *out_shape())."""
        self._check_packet(packet)
        if not self.summarizes:
            return self._decode_full(packet)
        if self.restore == "tokens":
            return decode_tensor(packet[:wire_parts(self.wire)], self.wire, self.dtype)
        return tokens_to_map(restore_dense(self.summary(packet)), self.layout, self.hw)


def restore_rule(model: nn.Module, layout: str) -> str:
    """How the next stage of ``model`` takes a summarized boundary of ``layout``: ``"tokens"``
    (the shorter sequence) for token boundaries of plain ViTs; ``"dense"`` (every position back,
    the fused token at the dropped ones) for maps and for models whose blocks take a rotary
    table per position (timm ``Eva`` with RoPE: each block unit rebuilds the table for the full
    grid, and a kept token keeps the rotation of its own position)."""
    if layout != "tokens" or getattr(model, "rope", None) is not None:
        return "dense"
    return "tokens"


def codec_for_unit(model: nn.Module, unit, *, keep: float = 1.0, wire: str = "fp32",
                   restore: str | None = None,
                   dtype: torch.dtype = torch.float32) -> BoundaryCodec:
    """The codec of the boundary after ``unit`` (a :class:`lapdtr.models.Unit`: its
    ``out_format`` and ``out_shape`` give layout and shape; ``model.num_prefix_tokens`` the
    prefix tokens of a token boundary); ``restore`` defaults to :func:`restore_rule`."""
    fmt = unit.out_format
    if fmt not in _LAYOUT_OF_FORMAT:
        raise ValueError(f"unit {unit.name!r} outputs {fmt}; boundaries that can be encoded: "
                         f"{', '.join(_LAYOUT_OF_FORMAT)}")
    layout = _LAYOUT_OF_FORMAT[fmt]
    prefix = int(getattr(model, "num_prefix_tokens", 0)) if layout == "tokens" else 0
    return BoundaryCodec(tuple(unit.out_shape[1:]), keep=keep, wire=wire, layout=layout,
                         num_prefix=prefix, restore=restore or restore_rule(model, layout),
                         dtype=dtype)
