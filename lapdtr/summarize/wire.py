"""Wire formats of a boundary tensor, and the exact bytes of a packet.

* ``fp32`` / ``fp16`` / ``bf16``: the tensor cast to that dtype, one part;
* ``int8``: symmetric per-token codes, two parts: int8 codes of ``x``'s shape and float32 scales
  (..., 1), ``scale = max|x| / 127`` over the last dim (a token's channels), codes
  ``round(x / scale)``; a token of zeros has scale 0 and codes 0. Decoding multiplies back, so
  each element is off by at most ``scale / 2``.

:func:`nbytes` counts a packet's payload bytes; :func:`packet_nbytes` the bytes of the one uint8
message :func:`lapdtr.runtime.wire.pack_packet` makes of it (tensor headers and alignment
included).
"""
from __future__ import annotations

from typing import Sequence

import torch

from lapdtr.runtime import wire as _rw

from . import dispatch

__all__ = ["WIRE_FORMATS", "check_wire", "wire_parts", "wire_of_dtype", "encode_tensor", "decode_tensor",
           "quantize_int8", "quantize_int8_ref", "dequantize_int8", "nbytes", "packet_nbytes",
           "parts_nbytes"]

WIRE_FORMATS = ("fp32", "fp16", "bf16", "int8")
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_wire(wire: str) -> str:
    if wire not in WIRE_FORMATS:
        raise ValueError(f"wire format {wire!r} is not supported; supported: "
                         f"{', '.join(WIRE_FORMATS)}")
    return wire


def wire_of_dtype(dtype: torch.dtype) -> str | None:
    """The wire format whose (first) tensor has ``dtype`` (``None``: no wire format's)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.int8: "int8"}.get(dtype)


def wire_parts(wire: str) -> int:
    """How many tensors one encoded tensor takes in ``wire``."""
    return 2 if check_wire(wire) == "int8" else 1


def quantize_int8_ref(x: torch.Tensor):
    """PyTorch reference of :func:`quantize_int8`."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(scale > 0, xf / safe, torch.zeros_like(xf)).round().clamp_(-127, 127)
    return codes.to(torch.int8), scale


def quantize_int8(x: torch.Tensor):
    """``(codes, scales)``: int8 codes of ``x``'s shape and float32 scales (..., 1), per token
    over the last dim."""
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"int8 quantization takes a floating tensor with a channel dim; got "
                         f"{x.dtype} {list(x.shape)}")
    x = x.detach()  # codes carry no gradient
    if x.numel() == 0:
        return quantize_int8_ref(x)
    return dispatch.run("quantize_int8", quantize_int8_ref, x)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (codes.float() * scales).to(dtype)


def encode_tensor(x: torch.Tensor, wire: str) -> tuple[torch.Tensor, ...]:
    """``x`` in ``wire``: one tensor, or (codes, scales) for ``int8``."""
    check_wire(wire)
    if wire == "int8":
        return quantize_int8(x)
    return (x.to(_FLOAT[wire]),)


def decode_tensor(parts: Sequence[torch.Tensor], wire: str,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor :func:`encode_tensor` encoded, as ``dtype``."""
    n = wire_parts(wire)
    if len(parts) != n:
        raise ValueError(f"a {wire} tensor takes {n} part(s); got {len(parts)}")
    if wire == "int8":
        codes, scales = parts
        if codes.dtype != torch.int8 or scales.shape != (*codes.shape[:-1], 1):
            raise ValueError(f"int8 parts must be int8 codes and scales (..., 1); got "
                             f"{codes.dtype} {list(codes.shape)}, {scales.dtype} "
                             f"{list(scales.shape)}")
        return dequantize_int8(codes, scales, dtype)
    (t,) = parts
    if t.dtype != _FLOAT[wire]:
        raise ValueError(f"a {wire} tensor arrived as {t.dtype}")
    return t.to(dtype)


def nbytes(packet: Sequence[torch.Tensor]) -> int:
    """Payload bytes of a packet: the sum of its tensors' bytes."""
    return sum(t.numel() * _rw.itemsize(t.dtype) for t in packet)


def _aligned(n: int) -> int:
    return -(-n // _rw.ALIGN) * _rw.ALIGN


def parts_nbytes(specs: Sequence[tuple[torch.dtype, Sequence[int]]]) -> int:
    """Bytes of the :func:`lapdtr.runtime.wire.pack_packet` message of tensors with these
    ``(dtype, shape)``, without making it."""
    pos = _aligned(8 * (1 + len(specs) * _rw.HEADER_LEN))
    for dtype, shape in specs:
        n = _rw.itemsize(dtype)
        for d in shape:
            n *= int(d)
        pos = _aligned(pos + n)
    return pos


def packet_nbytes(packet: Sequence[torch.Tensor]) -> int:
    """Bytes of ``pack_packet(packet)``: the message that carries the packet between ranks."""
    return parts_nbytes([(t.dtype, tuple(t.shape)) for t in packet])
