"""Boundary tensors rank to rank by ``torch.distributed`` point-to-point: header, then payload.

A message is (unless its payload is tiny: see below) two point-to-point sends on the same (source, destination) pair: a fixed-size int64
header (kind, generation, source rank, item, the unit the receiver starts at, payload bytes, then
the tensor header of ``lapdtr.runtime.wire``: dtype code, dims, shape) on ``HEADER_TAG``, then
the payload's bytes on ``PAYLOAD_TAG``. Per pair and tag, gloo delivers in order, so header
``i`` always goes with payload ``i``. Each rank runs one
receiver thread per peer rank, blocked in ``wait`` of that peer's next header (no polling, no
store round trip). So shapes and dtypes may change per message, nothing is pickled, and no rank
ever blocks its main loop on a peer that may have died: a dead peer only fails the receiver
thread that listens to it (a gloo process group survives a dead member for point-to-point
traffic between the others).

Pre-posted receives. A receive posted after its send costs gloo an extra round trip (the sender
waits for the receiver's "ready" before it writes the data), so a receiver thread keeps the next
header's receive *and* the next payload's receive posted. The payload receive is a byte buffer
of the pair's *capacity*: gloo fills a buffer larger than what was sent, and the header says how
many bytes are real, so a message of a new shape or dtype needs nothing special as long as it
fits. Both ends of a pair compute the capacity by the same rule from the same message sizes in
the same order (``_Capacity``), so they agree without exchanging it:

* a payload larger than the capacity is a *grow*: the sender first sends one byte to fill the
  posted buffer, then the payload, which the receiver takes into a buffer of exactly its size;
  the capacity becomes that size;
* after ``_SHRINK_AFTER`` payloads in a row of at most half the capacity, it shrinks to the
  largest of them, so one burst of large messages does not pin memory for ever.

A payload that fits the posted buffer is sent *before* its header: it is in the buffer by the
time the header wakes the receiver thread, which then hands the message on without a second
wait (a grow sends the header first, since the receiver must learn the size before taking the
payload). The payload is sent from the boundary tensor itself: copying it behind the header into
one frame was tried and cost more than the second send (on this project's 2-core VM, 40-110 us
to copy 150 KB into a cache-cold frame, then a slower send from it, against ~70 us for a
separate header send). With a backend that cannot receive into a larger buffer (NCCL), the
capacity stays 0, headers go first, and the payload's receive is posted when its header
arrives.

Tiny payloads inside the header (gloo). The posted header receive has room for ``INLINE_BYTES``
more: a payload that small (control-sized boundaries, a few logits) follows its header in one
send and one receive, leaving the pair's capacity untouched on both ends. Its bytes are packed
through numpy (a quarter of the time of torch slice copies). A receiver thread posts the next
header's receive, and the next payload's, before it hands a message on, so a peer's reply finds
them posted (NCCL, which matches receives in posting order, keeps the header-then-payload order).

Reused receive buffers. A message's tensor is a view of the buffer it was received into, handed
on without a copy. The receiver keeps the buffer and posts a later receive into it once no tensor
uses its storage any more (``torch._C._storage_Use_Count``): a fresh buffer costs page faults when
gloo first writes it, on the next message's path (~60 us of a 150 KB payload's wait, measured).
A buffer whose payload a consumer keeps (the coordinator's collected outputs, a stage output
that is a view of its input) is left to that consumer.

Control messages. ``send_control`` sends a header alone (kind ``control``: the sender's control
epoch and how far items are done), queued like data but never dropped as stale, so the
coordinator can wake its followers the moment something changes instead of each of them polling
the store. When a peer's stream ends without a ``bye`` (the peer died, or the group is gone),
its receiver thread queues one ``gone`` message for it.

Generations. After a re-plan the generation changes. Every message is received, so every send
completes; one of an older generation is then dropped, one of a newer generation (its sender
re-planned first) is held until this rank moves to that generation. On close, a rank sends a
``bye`` header to each peer (and a byte for its posted payload buffer), which ends that peer's
receiver thread for it.

A peer that never says ``bye`` while its process lives (SIGSTOPped, then declared dead and
re-planned around) leaves this rank's receiver thread for it blocked in a gloo receive that
cannot be cancelled. Such a process must not run the interpreter's teardown: the thread, woken
there when gloo's sockets close, aborts the process (``terminate called without an active
exception``, exit -6). ``close`` records those peers (:func:`stuck_peers`) and
:func:`exit_now_if_stuck` ends the process with ``os._exit`` once its work is done and flushed.
"""
from __future__ import annotations

import array
import queue
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

from .steps import Packet
from .wire import (HEADER_LEN, MAX_DIMS, PACKET_CODE, pack_header, pack_packet, packet_header,
                   unpack_header, unpack_packet)

__all__ = ["HEADER_TAG", "PAYLOAD_TAG", "MAX_DIMS", "Message", "Transport", "BoundaryCache",
           "DATA", "CONTROL", "GONE", "stuck_peers", "exit_now_if_stuck"]

_STUCK: set[int] = set()  # peers whose receiver thread outlived a close in this process


def stuck_peers() -> list[int]:
    """Peers whose stream this process's transports closed without their ``bye``: their
    receiver threads are still blocked in gloo (see the module docstring)."""
    return sorted(_STUCK)


def exit_now_if_stuck(code: int = 0) -> None:
    """End the process with ``code`` now (stdio flushed, no interpreter teardown) if a closed
    transport left a receiver thread blocked; otherwise return."""
    if not _STUCK:
        return
    import os
    import sys

    print(f"lapdtr: rank process {os.getpid()}: no goodbye from rank(s) {stuck_peers()} (declared "
          "dead while alive, or not responding); ending with os._exit so gloo's blocked receives "
          "do not abort the exit", file=sys.stderr)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    os._exit(code)

HEADER_TAG = 1 << 30
PAYLOAD_TAG = HEADER_TAG + 1
_HEADER_LEN = 6 + HEADER_LEN  # kind, gen, src, item, unit, nbytes, then the tensor header
_DATA, _BYE, _GROW, _CONTROL, _INLINE = 0, 1, 2, 3, 4
INLINE_BYTES = 4096  # gloo: a payload this small travels inside its header (one message)
_SHRINK_AFTER = 16
_SPARE = 8  # payload buffers a receiver keeps for reuse
_NO_TENSOR = [0] * (_HEADER_LEN - 5)  # nbytes and tensor header of a header without payload
DATA, CONTROL, GONE = "data", "control", "gone"  # Message.kind


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _uses(buf: torch.Tensor) -> int:
    """How many references the storage of ``buf`` has (``buf`` and the storage object held
    here included)."""
    s = buf.untyped_storage()
    return _use_count(s._cdata)


_ALONE = _uses(torch.empty(1)) if _use_count is not None else -1  # only the buffer refers to it


def _unshared(buf: torch.Tensor) -> bool:
    """Whether no tensor but ``buf`` uses its storage (no consumer holds a view of it)."""
    return _use_count is not None and _uses(buf) <= _ALONE


class Message:
    """A boundary tensor (``kind`` ``data``): ``item``'s input to ``unit``; a control message
    (``item`` = the sender's control epoch, ``unit`` = items done below); or ``gone`` (``src``'s
    stream ended without a goodbye; ``error`` says how)."""

    __slots__ = ("src", "item", "unit", "tensor", "nbytes", "gen", "kind", "error")

    def __init__(self, src, item, unit, tensor, nbytes=0, gen=0, kind=DATA, error=""):
        self.src, self.item, self.unit, self.tensor = src, item, unit, tensor
        self.nbytes, self.gen, self.kind, self.error = nbytes, gen, kind, error


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class _Capacity:
    """Payload receive-buffer size of one direction of one pair, in bytes; both ends keep one
    and update it identically (see the module docstring)."""

    __slots__ = ("cap", "run", "run_max", "enabled")

    def __init__(self, enabled: bool):
        self.cap, self.run, self.run_max, self.enabled = 0, 0, 0, enabled

    def kind_for(self, nbytes: int) -> int:
        return _GROW if self.enabled and nbytes > self.cap else _DATA

    def update(self, nbytes: int) -> None:
        if not self.enabled:
            return
        if nbytes > self.cap:  # a grow
            self.cap, self.run, self.run_max = nbytes, 0, 0
        elif 2 * nbytes > self.cap:
            self.run, self.run_max = 0, 0
        else:
            self.run += 1
            self.run_max = max(self.run_max, nbytes)
            if self.run >= _SHRINK_AFTER:
                self.cap, self.run, self.run_max = self.run_max, 0, 0


def _header(kind: int, gen: int, src: int, item: int = 0, unit: int = 0,
            x: torch.Tensor | None = None, packet: bool = False) -> torch.Tensor:
    if x is None:
        h = [kind, gen, src, item, unit, *_NO_TENSOR]
    elif packet:
        h = [kind, gen, src, item, unit, _nbytes(x), *packet_header(_nbytes(x))]
    else:
        h = [kind, gen, src, item, unit, _nbytes(x), *pack_header(x.dtype, x.shape)]
    # a tensor over an array's buffer: a third of torch.tensor(list)'s time, on the hot path
    return torch.frombuffer(array.array("q", h), dtype=torch.int64)


class Transport:
    """Send and receive boundary tensors of generation ``gen`` (see the module docstring)."""

    def __init__(self, rank: int, device: torch.device, *, world_size: int | None = None):
        """``world_size`` defaults to the default process group's."""
        self.rank, self.device = rank, device
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.pg = dist.distributed_c10d._get_default_group()
        adaptive = dist.get_backend() == "gloo"
        self.gen = 0
        self.local: deque[Message] = deque()
        self.ahead: list[Message] = []  # messages of a newer generation than this rank's
        self.works: dict[int, list] = {}
        self.graveyard: list = []  # sends of an old generation, or to a rank that died
        self.bytes_sent = 0
        self.bytes_received = 0
        self.comm_time_s = 0.0  # sending (the receiver threads keep recv_time_s)
        self.recv_time_s = 0.0
        self.messages_sent = 0
        self.messages_received = 0
        self.send_errors = 0
        self.stale_dropped = 0
        self.grows = 0
        self.inlined = 0  # messages whose payload travelled inside the header
        self.queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._lock = threading.Lock()  # counters written by several receiver threads
        self._out = {dst: _Capacity(adaptive) for dst in range(self.world_size) if dst != rank}
        self._receivers = [_Receiver(self, src, adaptive) for src in range(self.world_size)
                           if src != rank]
        for r in self._receivers:
            r.start()

    def set_generation(self, gen: int) -> None:
        for ws in self.works.values():
            self.graveyard.extend(ws)
        self.works.clear()
        self.local.clear()
        self.gen = gen
        keep = [m for m in self.ahead if m.gen > gen]
        for m in self.ahead:
            if m.gen == gen:
                self.local.append(m)
        self.ahead = keep

    def _post(self, dst: int, h: torch.Tensor, x: torch.Tensor | None, kind: int) -> list:
        """Send a header and its payload; the process group's own ``send`` (``dist.isend``'s
        argument checks cost ~25 us a call)."""
        pg = self.pg
        if kind == _DATA and self._out[dst].enabled and x is not None and x.numel():
            # it fits the posted buffer: payload first, so that it is there when the header
            # wakes the receiver thread (one wake-up, not two)
            b = x.reshape(-1).view(torch.uint8)
            return [(pg.send([b], dst, PAYLOAD_TAG), b), (pg.send([h], dst, HEADER_TAG), h)]
        works = [(pg.send([h], dst, HEADER_TAG), h)]
        if kind in (_GROW, _BYE) and self._out[dst].cap > 0:  # fill the posted buffer
            one = torch.zeros(1, dtype=torch.uint8, device=h.device)
            works.append((pg.send([one], dst, PAYLOAD_TAG), one))
        if x is not None and x.numel():
            b = x.reshape(-1).view(torch.uint8)
            works.append((pg.send([b], dst, PAYLOAD_TAG), b))
        return works

    def close(self, timeout_s: float = 2.0) -> None:
        """Say ``bye`` to every peer (ending its receiver thread for this rank) and wait a
        little for the peers' ``bye``; a dead peer's thread has already ended."""
        for dst in range(self.world_size):
            if dst == self.rank:
                continue
            h = _header(_BYE, self.gen, self.rank).to(self.device)
            try:
                self.graveyard.extend(self._post(dst, h, None, _BYE))
            except RuntimeError:
                pass
        deadline = time.monotonic() + timeout_s
        for r in self._receivers:
            r.join(max(0.0, deadline - time.monotonic()))
        _STUCK.update(r.src for r in self._receivers if r.is_alive())

    def send_control(self, dst: int, epoch: int, done: int) -> bool:
        """Tell ``dst`` the control epoch and that items below ``done`` are complete; ``False``
        if ``dst`` is gone."""
        h = _header(_CONTROL, self.gen, self.rank, epoch, done).to(self.device)
        try:
            self.graveyard.append((self.pg.send([h], dst, HEADER_TAG), h))
        except RuntimeError:
            return False
        if len(self.graveyard) > 256:  # control headers complete at once; keep the list short
            self.graveyard = [(w, b) for w, b in self.graveyard if not w.is_completed()]
        return True

    def send(self, dst: int, item: int, unit: int, x: torch.Tensor | Packet) -> int:
        """Send ``x`` (the input of ``unit`` for ``item``: a tensor, or a ``Packet`` of several,
        which arrives as a ``Packet``) to ``dst``; returns bytes sent."""
        if dst == self.rank:
            self.local.append(Message(self.rank, item, unit, x, gen=self.gen))
            return 0
        t0 = time.perf_counter()
        packet = isinstance(x, Packet)
        if packet:  # one payload: a table of the tensors, then their bytes (wire.pack_packet)
            x = pack_packet(x.tensors)
        x = x.contiguous()
        n = _nbytes(x)
        cap = self._out[dst]
        if cap.enabled and n <= INLINE_BYTES and x.device.type == "cpu":
            return self._send_inline(dst, item, unit, x, n, packet, t0)
        kind = cap.kind_for(n)
        h = _header(kind, self.gen, self.rank, item, unit, x, packet)
        if x.device.type != "cpu":
            h = h.to(x.device)
        try:
            works = self._post(dst, h, x, kind)
        except RuntimeError:  # dst died: the item is cached and resumes after re-planning
            self.send_errors += 1
            self.comm_time_s += time.perf_counter() - t0
            return 0
        cap.update(n)
        self.grows += kind == _GROW
        self.works.setdefault(item, []).extend(works)
        self.bytes_sent += n
        self.messages_sent += 1
        self.comm_time_s += time.perf_counter() - t0
        return n

    def _send_inline(self, dst, item, unit, x, n, packet, t0) -> int:
        """One message: the header with the payload's bytes after it (the receiver's posted
        header buffer has room for ``INLINE_BYTES``); the payload capacity is left as it is,
        on both ends."""
        tensor = packet_header(n) if packet else pack_header(x.dtype, x.shape)
        raw = bytearray(array.array("q", [_INLINE, self.gen, self.rank, item, unit, n, *tensor]))
        if n:  # bytes through numpy: a quarter of the time of torch slice copies
            raw += x.reshape(-1).view(torch.uint8).numpy().tobytes()
        buf = torch.frombuffer(raw, dtype=torch.uint8)
        try:
            w = self.pg.send([buf], dst, HEADER_TAG)
        except RuntimeError:  # dst died: the item is cached and resumes after re-planning
            self.send_errors += 1
            self.comm_time_s += time.perf_counter() - t0
            return 0
        self.works.setdefault(item, []).append((w, buf))
        self.inlined += 1
        self.bytes_sent += n
        self.messages_sent += 1
        self.comm_time_s += time.perf_counter() - t0
        return n

    def _accept(self, msg: Message) -> bool:
        if msg.kind != DATA or msg.gen == self.gen:
            return True
        if msg.gen > self.gen:
            self.ahead.append(msg)
        else:  # queued before this rank moved on: stale now
            self.drop_stale()
        return False

    def drop_stale(self) -> None:
        """Count a message of an older generation that this rank drops."""
        with self._lock:
            self.stale_dropped += 1

    def poll(self, timeout_s: float = 0.0) -> Message | None:
        """The next message for this rank, waiting up to ``timeout_s``; ``None`` if none came."""
        if self.local:
            return self.local.popleft()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                msg = self.queue.get(timeout=max(0.0, deadline - time.monotonic())) \
                    if timeout_s > 0 else self.queue.get_nowait()
            except queue.Empty:
                return None
            if self._accept(msg):
                return msg

    def release(self, items) -> None:
        """Complete the sends of items that are done end to end (their receivers have them)."""
        for k in items:
            for work, _ in self.works.pop(k, ()):
                try:
                    work.wait()
                except RuntimeError:  # sent to a rank that died; the item completed elsewhere
                    self.send_errors += 1


class _Receiver(threading.Thread):
    """Receives the headers and payloads one peer sends to this rank and queues them, with the
    next header's and payload's receives posted (see the module docstring)."""

    def __init__(self, t: Transport, src: int, adaptive: bool):
        super().__init__(daemon=True, name=f"lapdtr-recv-{src}")
        self.t, self.src = t, src
        self.cap = _Capacity(adaptive)
        self.spare: list[torch.Tensor] = []  # payload buffers handed on, for reuse
        self.made = 0  # payload buffers allocated

    def _recv(self, nbytes: int, tag: int, dtype=torch.uint8):
        buf = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device=self.t.device)
        return self.t.pg.recv([buf], self.src, tag), buf

    def _post_payload(self):
        """Post the next payload's receive into a buffer of the capacity: a spare one whose
        payload nobody uses any more, else a new one (a fresh buffer costs page faults when
        gloo first writes it, on the next message's path)."""
        if not self.cap.cap:
            return None, None
        size = self.cap.cap
        for i, b in enumerate(self.spare):
            if b.numel() == size and _unshared(b):
                del self.spare[i]
                return self.t.pg.recv([b], self.src, PAYLOAD_TAG), b
        self.made += 1
        return self._recv(size, PAYLOAD_TAG)

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # the peer died or the group is gone: nothing more from it
            self.t.queue.put(Message(self.src, 0, 0, None, kind=GONE,
                                     error=f"{type(e).__name__}: {e}"))

    def _run(self) -> None:
        t = self.t
        pw, pbuf = self._post_payload()
        gloo = self.cap.enabled  # tags keep gloo's receives apart; NCCL matches them in order
        room = 8 * _HEADER_LEN + (INLINE_BYTES if gloo else 0)
        hw, hb = self._recv(room, HEADER_TAG)
        while True:
            hw.wait()
            kind, gen, _, item, unit, n, *tensor_header = hb[:8 * _HEADER_LEN].view(
                torch.int64).tolist()
            if kind == _BYE:
                if pw is not None:
                    pw.wait()
                return
            cur = hb
            if gloo:  # the next header's receive first: the peer's next send finds it posted
                hw, hb = self._recv(room, HEADER_TAG)
            if kind == _CONTROL:
                t.queue.put(Message(self.src, item, unit, None, kind=CONTROL))
                if not gloo:
                    hw, hb = self._recv(room, HEADER_TAG)
                continue
            t0 = time.perf_counter()
            used = False  # the posted payload buffer took this payload
            if kind == _INLINE:  # the payload came in the header's buffer, made for this one
                raw = cur[8 * _HEADER_LEN:8 * _HEADER_LEN + n]
            elif n == 0:
                raw = torch.empty(0, dtype=torch.uint8, device=t.device)
            elif kind == _DATA and pw is not None:
                pw.wait()
                raw = pbuf[:n] if 2 * n > pbuf.numel() else pbuf[:n].clone()
                used = True
            else:  # a grow (the posted buffer gets one byte), or nothing posted (NCCL)
                if pw is not None:
                    pw.wait()
                    used = True
                rw, raw = self._recv(n, PAYLOAD_TAG)
                rw.wait()
            if tensor_header[0] == PACKET_CODE:
                x = Packet(unpack_packet(raw))
            else:
                dtype, shape = unpack_header(tensor_header)
                x = raw.view(dtype).view(shape)
            del raw
            if kind != _INLINE:  # the next payload's receive, before the message is handed on
                self.cap.update(n)
                if n:
                    if used:  # reused once no payload view of it is alive
                        self.spare.append(pbuf)
                        del self.spare[:-_SPARE]
                    pw, pbuf = self._post_payload()
            if not gloo:
                hw, hb = self._recv(room, HEADER_TAG)
            with t._lock:
                t.bytes_received += n
                t.messages_received += 1
                t.recv_time_s += time.perf_counter() - t0
                stale = gen < t.gen  # an abandoned generation: received, then dropped
                t.stale_dropped += stale
            if not stale:
                t.queue.put(Message(self.src, item, unit, x, n, gen=gen))
                time.sleep(0)  # let the main thread take the GIL before the next receives
            del x


def _tensors_of(x) -> tuple:
    return (x,) if isinstance(x, torch.Tensor) else tuple(x.tensors)


def _value_bytes(x) -> int:
    return sum(_nbytes(t) for t in _tensors_of(x))


class BoundaryCache:
    """The latest boundary output this rank produced per in-flight item, within a byte budget.

    Over budget, the oldest entries are spilled to ``spill_dir`` (safetensors) if given, else
    dropped (an item whose entry was dropped resumes from an earlier boundary after a failure).
    """

    def __init__(self, budget_bytes: int, spill_dir: str | None = None, tag: str = "cache"):
        self.budget_bytes = int(budget_bytes)
        self.spill_dir = spill_dir
        self.tag = tag
        self.mem: dict[int, tuple[int, torch.Tensor]] = {}
        self.disk: dict[int, tuple[int, str]] = {}
        self.bytes = 0
        self.peak_bytes = 0
        self.spilled = 0
        self.dropped = 0

    def put(self, item: int, unit: int, x) -> None:
        """Keep ``x`` (a tensor, or a packet of tensors: ``steps.Packet``) as ``item``'s boundary
        before ``unit``."""
        self.pop(item)
        self.mem[item] = (unit, x)
        self.bytes += _value_bytes(x)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        while self.bytes > self.budget_bytes and self.mem:
            k = min(self.mem)
            u, t = self.mem.pop(k)
            self.bytes -= _value_bytes(t)
            if self.spill_dir is not None:
                import os

                from safetensors.torch import save_file

                os.makedirs(self.spill_dir, exist_ok=True)
                path = os.path.join(self.spill_dir, f"{self.tag}-{k}.safetensors")
                tensors = _tensors_of(t)
                save_file({f"x{i}": v.detach().cpu().contiguous() for i, v in enumerate(tensors)},
                          path, metadata={"packet": str(not isinstance(t, torch.Tensor))})
                self.disk[k] = (u, path)
                self.spilled += 1
            else:
                self.dropped += 1

    def get(self, item: int, device=None):
        if item in self.mem:
            return self.mem[item]
        u, path = self.disk[item]
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            packet = f.metadata().get("packet") == "True"
            tensors = [f.get_tensor(f"x{i}") for i in range(len(f.keys()))]
        if device is not None:
            tensors = [t.to(device) for t in tensors]
        if not packet:
            return u, tensors[0]
        from .steps import Packet

        return u, Packet(tuple(tensors))

    def pop(self, item: int) -> None:
        if item in self.mem:
            self.bytes -= _value_bytes(self.mem.pop(item)[1])
        if item in self.disk:
            import os

            _, path = self.disk.pop(item)
            if os.path.exists(path):
                os.remove(path)

    def inventory(self) -> dict[int, int]:
        inv = {k: u for k, (u, _) in self.disk.items()}
        inv.update({k: u for k, (u, _) in self.mem.items()})
        return inv

    def evict_below(self, item: int) -> list[int]:
        gone = sorted(k for k in list(self.mem) + list(self.disk) if k < item)
        for k in gone:
            self.pop(k)
        return gone
