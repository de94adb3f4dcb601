"""The one table of dtypes lapdtr puts on the wire, and the tensor header every wire format uses.

A *tensor header* is ``HEADER_LEN`` int64 values: the dtype's code (its index in
``WIRE_DTYPES``), the number of dims, then the shape padded with zeros to ``MAX_DIMS``. The wire
formats built on it:

* ``transport``: point-to-point boundary messages, ``[kind, gen, src, item, unit, nbytes]``
  followed by the tensor header, the payload sent as raw bytes;
* ``tensor.broadcast_tensor``: the tensor header broadcast, then the tensor;
* ``ensemble.run_ensemble``: every rank's output header all-gathered, so members whose outputs
  differ fail alike on every rank.

A header can carry ``NO_CODE`` for a dtype outside the table (``pack_header(..., strict=False)``),
so that the rank holding such a tensor can tell its peers instead of leaving them waiting;
``unpack_header`` then raises. Every rank of a run uses the same table: codes are not stable
across lapdtr versions.

A *packet* (several tensors in one message: a summarized boundary's kept tokens, their indices
and the fused token, say) travels as one uint8 payload whose tensor header carries
``PACKET_CODE`` and the payload's length: :func:`pack_packet` writes the number of tensors, each
one's tensor header, then their bytes, each started on an ``ALIGN``-byte boundary so the receiver
views them without a copy (:func:`unpack_packet`).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["WIRE_DTYPES", "MAX_DIMS", "HEADER_LEN", "NO_CODE", "PACKET_CODE", "ALIGN",
           "dtype_code", "code_dtype", "itemsize", "pack_header", "unpack_header",
           "describe_header", "pack_packet", "unpack_packet", "packet_header"]

# (dtype, bytes per element); the code of a dtype is its row
_TABLE: tuple[tuple[torch.dtype, int], ...] = (
    (torch.float32, 4),
    (torch.float16, 2),
    (torch.bfloat16, 2),
    (torch.float64, 8),
    (torch.int64, 8),
    (torch.int32, 4),
    (torch.int16, 2),
    (torch.int8, 1),
    (torch.uint8, 1),
    (torch.bool, 1),
)
WIRE_DTYPES: tuple[torch.dtype, ...] = tuple(d for d, _ in _TABLE)
MAX_DIMS = 8
HEADER_LEN = 2 + MAX_DIMS  # code, ndim, shape[MAX_DIMS]
NO_CODE = -1
PACKET_CODE = -2  # the payload is a packet of tensors (pack_packet)
ALIGN = 16  # bytes: where each tensor of a packet starts

_CODE = {d: i for i, d in enumerate(WIRE_DTYPES)}
_ITEMSIZE = dict(_TABLE)
_PAD = [0] * MAX_DIMS
_ALLOWED = ", ".join(str(d).removeprefix("torch.") for d in WIRE_DTYPES)


def _unsupported(dtype) -> ValueError:
    return ValueError(f"dtype {dtype} cannot be sent between ranks; allowed: {_ALLOWED}")


def dtype_code(dtype: torch.dtype) -> int:
    """The code of a wire dtype; another dtype is a ``ValueError`` naming it and the allowed."""
    code = _CODE.get(dtype)
    if code is None:
        raise _unsupported(dtype)
    return code


def code_dtype(code: int) -> torch.dtype:
    """The wire dtype of ``code``."""
    if not 0 <= code < len(WIRE_DTYPES):
        raise ValueError(f"dtype code {code} is not in the wire table (0..{len(WIRE_DTYPES) - 1}: "
                         f"{_ALLOWED})")
    return WIRE_DTYPES[code]


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of a wire dtype."""
    size = _ITEMSIZE.get(dtype)
    if size is None:
        raise _unsupported(dtype)
    return size


def pack_header(dtype: torch.dtype, shape: Sequence[int], *, strict: bool = True) -> list[int]:
    """The tensor header of a tensor of ``dtype`` and ``shape``, as ``HEADER_LEN`` ints.

    ``strict``: a dtype outside the table or more than ``MAX_DIMS`` dims is a ``ValueError``.
    Otherwise the header carries ``NO_CODE`` / the true number of dims with the shape cut at
    ``MAX_DIMS``, for a peer to learn that this rank has nothing it can send."""
    ndim = len(shape)
    code = _CODE.get(dtype)
    if code is not None and ndim <= MAX_DIMS:  # the common case first: transport's hot path
        return [code, ndim, *shape, *_PAD[ndim:]]
    if strict:
        if code is None:
            raise _unsupported(dtype)
        if ndim > MAX_DIMS:
            raise ValueError(f"tensor has {ndim} dims; at most {MAX_DIMS} allowed on the wire")
    elif code is None:
        code = NO_CODE
    return [code, ndim, *shape[:MAX_DIMS], *_PAD[min(ndim, MAX_DIMS):]]


def unpack_header(values: Sequence[int]) -> tuple[torch.dtype, list[int]]:
    """``(dtype, shape)`` from a tensor header (a list of ints, e.g. ``header.tolist()``)."""
    code, ndim = values[0], values[1]
    if code == PACKET_CODE:
        raise ValueError("the header is a packet's (several tensors): read it with unpack_packet")
    if code == NO_CODE:
        raise ValueError(f"the sender has no tensor of a dtype that can be sent; allowed: "
                         f"{_ALLOWED}")
    if not 0 <= ndim <= MAX_DIMS:
        raise ValueError(f"the sender's tensor has {ndim} dims; at most {MAX_DIMS} allowed on the "
                         "wire")
    return code_dtype(code), list(values[2:2 + ndim])


def describe_header(values: Sequence[int]) -> str:
    """A tensor header in words, for error messages: ``float32 [2, 10]``."""
    code, ndim = int(values[0]), int(values[1])
    name = (str(WIRE_DTYPES[code]).removeprefix("torch.") if 0 <= code < len(WIRE_DTYPES)
            else "a dtype that cannot be sent")
    shape = [int(s) for s in values[2:2 + min(max(ndim, 0), MAX_DIMS)]]
    if ndim > MAX_DIMS:
        return f"{name} {shape} and {ndim - MAX_DIMS} more dims"
    return f"{name} {shape}"


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def packet_header(nbytes: int) -> list[int]:
    """The tensor header of a packet payload of ``nbytes`` bytes."""
    return [PACKET_CODE, 1, int(nbytes), *_PAD[1:]]


def pack_packet(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several tensors (on the CPU, or all on one device) as one uint8 payload: ``[k, header x k]``
    as int64, then each tensor's bytes from an ``ALIGN``-byte offset."""
    if not tensors:
        raise ValueError("a packet needs at least one tensor")
    table = [len(tensors)]
    for t in tensors:
        table += pack_header(t.dtype, t.shape)
    offsets, pos = [], _aligned(8 * len(table))
    for t in tensors:
        offsets.append(pos)
        pos = _aligned(pos + t.numel() * itemsize(t.dtype))
    blob = torch.zeros(pos, dtype=torch.uint8, device=tensors[0].device)
    blob[:8 * len(table)] = torch.tensor(table, dtype=torch.int64).view(torch.uint8).to(blob.device)
    for t, o in zip(tensors, offsets):
        n = t.numel() * itemsize(t.dtype)
        if n:
            blob[o:o + n] = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return blob


def unpack_packet(raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors of a :func:`pack_packet` payload, as views of ``raw`` (uint8)."""
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() < 8:
        raise ValueError(f"a packet payload is a 1-d uint8 tensor of at least 8 bytes; got "
                         f"{raw.dtype} {list(raw.shape)}")
    k = int(raw[:8].view(torch.int64)[0])
    if not 1 <= k <= (raw.numel() - 8) // (8 * HEADER_LEN):
        raise ValueError(f"a packet payload of {raw.numel()} bytes cannot hold {k} tensors")
    table = raw[8:8 + 8 * k * HEADER_LEN].view(torch.int64).tolist()
    out, pos = [], _aligned(8 + 8 * k * HEADER_LEN)
    for i in range(k):
        dtype, shape = unpack_header(table[i * HEADER_LEN:(i + 1) * HEADER_LEN])
        n = itemsize(dtype)
        for d in shape:
            n *= d
        if pos + n > raw.numel():
            raise ValueError(f"a packet payload of {raw.numel()} bytes is too short for tensor "
                             f"{i} ({describe_header(table[i * HEADER_LEN:(i + 1) * HEADER_LEN])})")
        out.append(raw[pos:pos + n].view(dtype).view(shape))
        pos = _aligned(pos + n)
    return tuple(out)
