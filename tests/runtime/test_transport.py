"""The boundary transport on two gloo ranks: changing shapes and dtypes through the pre-posted
capacity buffers, generations, control messages, a dead peer; and the capacity rule itself."""
import os
import time

import pytest
import torch

from lapdtr.runtime import transport as T

from runtime_helpers import init_gloo, spawn

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]


def _done(out, rank):
    """Mark that ``rank`` got through every assertion (a failed one ends its process)."""
    with open(f"{out}/{rank}", "w") as f:
        f.write("ok")


def _both_pass(worker, tmp_path):
    """Run ``worker`` on two gloo ranks; both must get through every assertion."""
    spawn(worker, 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["0", "1"]


def _tensors():
    """What rank 0 sends, in order: new shapes and dtypes, larger (grow) and smaller (fits),
    empty, scalar, 8-dim (these tiny ones inside their headers), then a run of medium ones long
    enough for the capacity to shrink."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, generator=g),                        # first message: inline
          torch.randn(4, 197, 192, generator=g),                 # larger: a grow
          torch.randn(1, 197, 192, generator=g),                 # smaller: fits
          torch.randint(-5, 5, (3, 7), generator=g, dtype=torch.int64),
          torch.rand(5, generator=g) > 0.5,                      # bool
          torch.randn(6, 4, generator=g).to(torch.bfloat16),
          torch.randn(4, 197, 192, generator=g).half(),          # half the capacity: 'small'
          torch.zeros(0, 3),                                      # empty
          torch.tensor(2.5),                                      # 0-dim
          torch.randn(*([2] * T.MAX_DIMS), generator=g)]          # the most dims a header holds
    xs += [torch.randn(T.INLINE_BYTES // 4 + 1, generator=g) for _ in range(T._SHRINK_AFTER + 2)]
    xs.append(torch.randn(4, 197, 192, generator=g))            # large again after the shrink
    return xs


def _transport_worker(rank, world_size, port, out):
    init_gloo(rank, world_size, port)
    tr = T.Transport(rank, torch.device("cpu"))
    xs = _tensors()
    if rank == 0:
        for i, x in enumerate(xs):
            tr.send(1, i, 7, x)
        tr.send_control(1, 42, 17)
        tr.set_generation(1)
        tr.send(1, 100, 0, torch.ones(2))
        assert tr.grows == 2, tr.grows  # the first large one, and large again after shrinking
        small = [x for x in xs if x.numel() * x.element_size() <= T.INLINE_BYTES]
        assert tr.inlined == len(small) + 1 == 8, tr.inlined  # and the generation-1 message
        assert tr._out[1].cap == 4 * 197 * 192 * 4
        while (m := tr.poll(timeout_s=30.0)) is None or m.kind != T.DATA:
            pass
        assert m.item == 1 and torch.equal(m.tensor, torch.full((3,), 1.0))
    else:
        got = []
        while len(got) < len(xs):
            m = tr.poll(timeout_s=30.0)
            assert m is not None, f"only {len(got)} of {len(xs)} messages arrived"
            got.append(m)
        for i, (m, x) in enumerate(zip(got, xs)):
            assert (m.kind, m.src, m.item, m.unit) == (T.DATA, 0, i, 7)
            assert m.tensor.dtype == x.dtype and m.tensor.shape == x.shape, i
            assert torch.equal(m.tensor, x), i
            assert m.nbytes == x.numel() * x.element_size()
        c = tr.poll(timeout_s=30.0)
        assert (c.kind, c.item, c.unit) == (T.CONTROL, 42, 17)
        # rank 0 moved to generation 1 first: its message waits until this rank does too
        assert tr.poll(timeout_s=1.0) is None and [m.item for m in tr.ahead] == [100]
        tr.set_generation(1)
        m = tr.poll()
        assert m.item == 100 and m.gen == 1 and torch.equal(m.tensor, torch.ones(2))
        recv, deadline = tr._receivers[0], time.monotonic() + 10
        while recv.cap.cap != tr_cap_after(xs) and time.monotonic() < deadline:
            time.sleep(0.01)  # the receiver thread updates it just after queueing the message
        assert recv.cap.cap == tr_cap_after(xs) == 4 * 197 * 192 * 4
        tr.send(0, 1, 0, torch.full((3,), 1.0))
    tr.close()
    _done(out, rank)


def tr_cap_after(xs):
    c = T._Capacity(True)
    for x in xs:  # payloads that travel inside their headers leave the capacity as it is
        if x.numel() * x.element_size() > T.INLINE_BYTES:
            c.update(x.numel() * x.element_size())
    return c.cap


def test_shapes_dtypes_generations_control(tmp_path):
    _both_pass(_transport_worker, tmp_path)


def _stale_worker(rank, world_size, port, out):
    init_gloo(rank, world_size, port)
    tr = T.Transport(rank, torch.device("cpu"))
    if rank == 1:
        tr.set_generation(3)  # rank 0 is still at generation 0: its messages are stale here
        m = tr.poll(timeout_s=30.0)
        assert m.kind == T.DATA and m.gen == 3 and torch.equal(m.tensor, torch.arange(4.0))
        assert tr.stale_dropped == 2 and tr.messages_received == 3
    else:
        tr.send(1, 0, 0, torch.randn(1000))
        tr.send(1, 1, 0, torch.randn(10))
        tr.set_generation(3)
        tr.send(1, 2, 0, torch.arange(4.0))
        for work, _ in tr.graveyard:  # every send completes: stale ones are received, dropped
            work.wait()
    tr.close()
    _done(out, rank)


def test_stale_generation_is_received_and_dropped(tmp_path):
    _both_pass(_stale_worker, tmp_path)


def _gone_worker(rank, world_size, port, out):
    init_gloo(rank, world_size, port)
    tr = T.Transport(rank, torch.device("cpu"))
    if rank == 1:
        tr.send(0, 0, 0, torch.ones(3))
        tr.release([0])
        os._exit(0)  # dies without a goodbye
    m = tr.poll(timeout_s=30.0)
    assert m.kind == T.DATA and torch.equal(m.tensor, torch.ones(3))
    g = tr.poll(timeout_s=30.0)
    assert g is not None and (g.kind, g.src) == (T.GONE, 1) and g.error
    _done(out, rank)
    os._exit(0)  # the group cannot be torn down with a dead member


def test_dead_peer_gives_a_gone_message(tmp_path):
    import torch.multiprocessing as mp

    from runtime_helpers import free_port

    ctx = mp.start_processes(_gone_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    for p in ctx.processes:
        p.join(60)
    assert os.listdir(tmp_path) == ["0"]


def _reuse_worker(rank, world_size, port, out):
    init_gloo(rank, world_size, port)
    tr = T.Transport(rank, torch.device("cpu"))
    n = 40
    if rank == 0:
        for i in range(n):
            tr.send(1, i, 0, torch.full((1, 197, 192), float(i)))
            time.sleep(0.002)
        tr.release(range(n))
    else:
        for i in range(n):
            m = tr.poll(timeout_s=30.0)
            assert m.item == i and torch.equal(m.tensor, torch.full((1, 197, 192), float(i)))
            if i == 5:
                kept = m.tensor  # a consumer keeps this payload: its buffer must not be reused
            del m
        assert torch.equal(kept, torch.full((1, 197, 192), 5.0))
        # payload buffers come back once their consumer dropped the payload: a handful of
        # buffers for 40 messages, not one each
        assert tr._receivers[0].made <= 5, tr._receivers[0].made
    tr.close()
    _done(out, rank)


def test_receive_buffers_are_reused(tmp_path):
    _both_pass(_reuse_worker, tmp_path)


def test_a_buffer_is_unshared_only_without_views():
    b = torch.empty(432, dtype=torch.uint8)
    assert T._unshared(b)
    x = b[32:].view(torch.float32).view(10, 10)
    assert not T._unshared(b)
    y = x.clone()
    del x
    assert T._unshared(b) and y.shape == (10, 10)


def test_capacity_rule_grows_fits_and_shrinks():
    c = T._Capacity(True)
    assert c.cap == 0 and c.kind_for(1) == T._GROW
    c.update(1000)
    assert c.cap == 1000 and c.kind_for(1000) == T._DATA and c.kind_for(1001) == T._GROW
    for _ in range(T._SHRINK_AFTER - 1):
        c.update(400)
    assert c.cap == 1000  # not yet
    c.update(501)  # more than half: the run of small ones starts again
    for _ in range(T._SHRINK_AFTER - 1):
        c.update(300)
    c.update(450)
    assert c.cap == 450  # the largest of the run
    off = T._Capacity(False)  # NCCL: no pre-posted payloads, every message sized exactly
    off.update(10**6)
    assert off.cap == 0 and off.kind_for(10**6) == T._DATA


def test_bad_dtype_and_too_many_dims_are_named():
    with pytest.raises(ValueError, match="complex64.*allowed"):
        T._header(T._DATA, 0, 0, 0, 0, torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=f"9 dims; at most {T.MAX_DIMS}"):
        T._header(T._DATA, 0, 0, 0, 0, torch.zeros([1] * 9))
