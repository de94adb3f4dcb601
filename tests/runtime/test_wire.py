"""The one dtype table and tensor header of ``lapdtr.runtime.wire``, and every dtype in it
through each wire format built on it (transport, broadcast_tensor, the ensemble output check)
on two gloo ranks."""
import os

import pytest
import torch
import torch.distributed as dist

from lapdtr.runtime import transport as T
from lapdtr.runtime import wire
from lapdtr.runtime.ensemble import check_outputs_agree
from lapdtr.runtime.tensor import broadcast_tensor

from runtime_helpers import init_gloo, spawn

SHAPES = [(), (0,), (5,), (2, 3), (3, 0, 2), (1, 197, 7), tuple([2] * wire.MAX_DIMS)]


def sample(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Values that would show a truncated or reinterpreted element: the dtype's extremes, signs,
    infinities for floats."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    if dtype == torch.bool:
        x = torch.rand(n, generator=g) > 0.5
    elif dtype.is_floating_point:
        x = (torch.randn(n, generator=g) * 1e3).to(dtype)
        if n >= 3:
            x[:3] = torch.tensor([float("inf"), -float("inf"), torch.finfo(dtype).max])
    else:
        info = torch.iinfo(dtype)
        x = torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, (n,), generator=g,
                          dtype=dtype)
        if n >= 2:
            x[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return x.reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# ------------------------------------------------------------------------------ the table

def test_table_codes_and_itemsizes():
    assert len(set(wire.WIRE_DTYPES)) == len(wire.WIRE_DTYPES)
    for code, dtype in enumerate(wire.WIRE_DTYPES):
        assert wire.dtype_code(dtype) == code and wire.code_dtype(code) is dtype
        assert wire.itemsize(dtype) == torch.empty((), dtype=dtype).element_size()
    # the dtypes lapdtr's boundaries and inputs carry
    assert {torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool} <= \
        set(wire.WIRE_DTYPES)


@pytest.mark.parametrize("dtype", wire.WIRE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_header_round_trips(dtype, shape):
    h = wire.pack_header(dtype, torch.Size(shape))
    assert len(h) == wire.HEADER_LEN and all(isinstance(v, int) for v in h)
    assert wire.unpack_header(h) == (dtype, list(shape))
    # through an int64 tensor, as every format sends it
    assert wire.unpack_header(torch.tensor(h, dtype=torch.int64).tolist()) == (dtype, list(shape))
    assert wire.describe_header(h) == f"{str(dtype)[6:]} {list(shape)}"


@pytest.mark.parametrize("call", [lambda: wire.dtype_code(torch.complex64),
                                  lambda: wire.itemsize(torch.complex64),
                                  lambda: wire.pack_header(torch.complex64, (2,))])
def test_unsupported_dtype_names_it_and_the_allowed(call):
    with pytest.raises(ValueError, match=r"torch.complex64 cannot be sent.*allowed: float32, "
                                         r"float16, bfloat16, .*bool"):
        call()


def test_bad_headers():
    with pytest.raises(ValueError, match=f"9 dims; at most {wire.MAX_DIMS}"):
        wire.pack_header(torch.float32, [1] * 9)
    h = wire.pack_header(torch.complex64, [1] * 9, strict=False)  # says so to a peer
    assert h[:2] == [wire.NO_CODE, 9] and len(h) == wire.HEADER_LEN
    with pytest.raises(ValueError, match="no tensor of a dtype that can be sent; allowed: float32"):
        wire.unpack_header(h)
    assert wire.describe_header(h) == f"a dtype that cannot be sent {[1] * 8} and 1 more dims"
    with pytest.raises(ValueError, match="9 dims; at most 8"):
        wire.unpack_header(wire.pack_header(torch.float32, [1] * 9, strict=False))
    with pytest.raises(ValueError, match=r"dtype code 99 is not in the wire table"):
        wire.code_dtype(99)


def _packets():
    """Packets of several tensors: every dtype, odd sizes (alignment), empty members."""
    out = [tuple(sample(d, s, i) for i, (d, s) in enumerate(zip(wire.WIRE_DTYPES, SHAPES * 2)))]
    out.append((sample(torch.float32, (1, 5, 7), 1), torch.arange(3), sample(torch.bool, (3,))))
    out.append((sample(torch.float16, (0,)), sample(torch.int8, (7,)), sample(torch.float64, ())))
    return out


@pytest.mark.parametrize("k", range(3))
def test_packets_round_trip_as_aligned_views(k):
    ts = _packets()[k]
    raw = wire.pack_packet(ts)
    assert raw.dtype == torch.uint8 and raw.numel() % wire.ALIGN == 0
    got = wire.unpack_packet(raw)
    assert len(got) == len(ts) and all(same(a, b) for a, b in zip(got, ts))
    assert all(g.numel() == 0 or g.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()
               for g in got)  # views of the payload, no copy
    assert ts[-1].numel()  # the last member has bytes: cutting the payload's tail loses them
    with pytest.raises(ValueError, match=f"too short for tensor {len(ts) - 1}"):
        wire.unpack_packet(raw[:-wire.ALIGN])
    with pytest.raises(ValueError, match=f"cannot hold {len(ts)} tensors"):
        wire.unpack_packet(raw[:8 + 8 * wire.HEADER_LEN * len(ts) - 8])
    with pytest.raises(ValueError, match="a packet's"):
        wire.unpack_header(wire.packet_header(64))


# ------------------------------------------------------------------- across two gloo ranks

def _wire_worker(rank, world_size, port, out):
    init_gloo(rank, world_size, port)
    cases = [(d, s) for d in wire.WIRE_DTYPES for s in SHAPES]
    # transport: every dtype and shape, payload as bytes, dtype and shape from the header
    tr = T.Transport(rank, torch.device("cpu"))
    from lapdtr.runtime.steps import Packet

    packets = _packets()
    if rank == 0:
        for i, (d, s) in enumerate(cases):
            assert tr.send(1, i, 3, sample(d, s, i)) == wire.itemsize(d) * sample(d, s, i).numel()
        for j, ts in enumerate(packets):  # several tensors in one message
            assert tr.send(1, len(cases) + j, 4, Packet(ts)) >= sum(t.nbytes for t in ts)
        tr.release(range(len(cases) + len(packets)))
    else:
        for i, (d, s) in enumerate(cases):
            m = tr.poll(timeout_s=30.0)
            assert m is not None and (m.kind, m.item, m.unit) == (T.DATA, i, 3), i
            assert same(m.tensor, sample(d, s, i)), (i, d, s)
        for j, ts in enumerate(packets):
            m = tr.poll(timeout_s=30.0)
            assert m is not None and (m.item, m.unit) == (len(cases) + j, 4), j
            assert isinstance(m.tensor, Packet) and len(m.tensor.tensors) == len(ts)
            assert all(same(a, b) for a, b in zip(m.tensor.tensors, ts)), j
    tr.close()
    dist.barrier()
    # broadcast_tensor: every dtype and shape, from either rank
    for i, (d, s) in enumerate(cases):
        src = i % 2
        got = broadcast_tensor(sample(d, s, i) if rank == src else None, src=src)
        assert same(got, sample(d, s, i)), (i, d, s)
    # a source with nothing it can send fails on both ranks alike, and the group still works
    for bad in (torch.zeros(2, dtype=torch.complex64), torch.zeros([1] * 9), "not a tensor"):
        with pytest.raises(ValueError, match="complex64 cannot be sent|9 dims|must pass a tensor"
                           if rank == 0 else "broadcast from rank 0: "):
            broadcast_tensor(bad if rank == 0 else None, src=0)
    assert same(broadcast_tensor(torch.arange(3) if rank == 0 else None, src=0), torch.arange(3))
    # the ensemble's output check: every dtype and shape agrees with itself ...
    for i, (d, s) in enumerate(cases):
        check_outputs_agree(sample(d, s, i), rank=rank, world_size=world_size)
    # ... and names both outputs where they differ, or the dtype that cannot be sent
    with pytest.raises(ValueError, match=r"rank 0: float32 \[2, 3\]; rank 1: bfloat16 \[2, 3\]"):
        check_outputs_agree(torch.zeros(2, 3, dtype=torch.float32 if rank == 0 else torch.bfloat16),
                            rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match=r"rank 0: a dtype that cannot be sent \[2\]; rank 1: "
                                         r"a dtype that cannot be sent \[2\]; on rank \d: dtype "
                                         r"torch.complex64 cannot be sent"):
        check_outputs_agree(torch.zeros(2, dtype=torch.complex64), rank=rank, world_size=world_size)
    check_outputs_agree(torch.zeros(2), rank=rank, world_size=world_size)
    dist.destroy_process_group()
    with open(f"{out}/{rank}", "w") as f:
        f.write("ok")


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_every_wire_dtype_round_trips_through_every_format(tmp_path):
    spawn(_wire_worker, 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["0", "1"]
