"""Boundary tensors rank to rank by ``torch.distributed`` point-to-point: header, then payload.

A message is two point-to-point sends on the same (source, destination) pair: a fixed-size int64
header (kind, generation, source rank, item, the unit the receiver starts at, dtype code, shape)
on a header tag shared by all generations, then the payload on the tag of the sender's plan
generation. Per pair and tag, gloo delivers in order, so a header is always followed by its own
payload. Each rank runs one receiver thread per peer rank, blocked in ``recv`` of that peer's
next header (no polling, no store round trip); it allocates the announced shape and dtype,
receives the payload and queues the message for the main loop. So shapes and dtypes may change
per message, nothing is pickled, and no rank ever blocks its main loop on a peer that may have
died: a dead peer only fails the receiver thread that listens to it (a gloo process group
survives a dead member for point-to-point traffic between the others).

Generations. After a re-plan the generation changes. A header names its generation: one from an
older generation is dropped without posting the receive of its payload (that payload's tag is
abandoned; the sender never waits on it), one from a newer generation (its sender re-planned
first) is received and held until this rank moves to that generation. On close, a rank sends a
``bye`` header to each peer, which ends that peer's receiver thread for it.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

__all__ = ["DTYPE_CODES", "HEADER_TAG", "MAX_DIMS", "Message", "Transport", "BoundaryCache"]

DTYPE_CODES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_CODE = {d: i for i, d in enumerate(DTYPE_CODES)}

HEADER_TAG = 1 << 30  # headers of every generation; payloads use the generation as their tag
MAX_DIMS = 9  # header: kind, gen, src, item, unit, dtype code, ndim, shape[MAX_DIMS]
_HEADER_LEN = 7 + MAX_DIMS
_DATA, _BYE = 0, 1


class Message:
    __slots__ = ("src", "item", "unit", "tensor", "nbytes", "lost", "gen")

    def __init__(self, src, item, unit, tensor, nbytes=0, lost=False, gen=0):
        self.src, self.item, self.unit, self.tensor = src, item, unit, tensor
        self.nbytes, self.lost, self.gen = nbytes, lost, gen


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _header(kind: int, gen: int, src: int, item: int = 0, unit: int = 0,
            x: torch.Tensor | None = None) -> torch.Tensor:
    h = [kind, gen, src, item, unit, 0, 0] + [0] * MAX_DIMS
    if x is not None:
        if x.dtype not in _CODE:
            raise ValueError(f"boundary dtype {x.dtype} cannot be sent; allowed: {DTYPE_CODES}")
        if x.dim() > MAX_DIMS:
            raise ValueError(f"boundary tensor has {x.dim()} dims; at most {MAX_DIMS} allowed")
        h[5], h[6] = _CODE[x.dtype], x.dim()
        h[7:7 + x.dim()] = x.shape
    return torch.tensor(h, dtype=torch.int64)


class Transport:
    """Send and receive boundary tensors of generation ``gen`` (see the module docstring)."""

    def __init__(self, store, rank: int, device: torch.device, prefix: str = "", *,
                 world_size: int | None = None, connect=None):
        """``store``, ``prefix`` and ``connect`` are kept for callers of the store-header
        transport; the data path no longer touches the store. ``world_size`` defaults to the
        default process group's."""
        self.store, self.rank, self.device, self.prefix = store, rank, device, prefix
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.gen = 0
        self.local: deque[Message] = deque()
        self.ahead: list[Message] = []  # messages of a newer generation than this rank's
        self.works: dict[int, list] = {}
        self.graveyard: list = []  # sends of abandoned generations: never waited on
        self.bytes_sent = 0
        self.bytes_received = 0
        self.comm_time_s = 0.0  # sending (the receiver threads keep recv_time_s)
        self.recv_time_s = 0.0
        self.messages_sent = 0
        self.messages_received = 0
        self.recv_errors = 0
        self.send_errors = 0
        self.stale_dropped = 0
        self.queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._lock = threading.Lock()  # counters written by several receiver threads
        self._receivers = [_Receiver(self, src) for src in range(self.world_size)
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

    def close(self, timeout_s: float = 2.0) -> None:
        """Say ``bye`` to every peer (ending its receiver thread for this rank) and wait a
        little for the peers' ``bye``; a dead peer's thread has already ended."""
        for dst in range(self.world_size):
            if dst == self.rank:
                continue
            h = _header(_BYE, self.gen, self.rank).to(self.device)
            try:
                self.graveyard.append((dist.isend(h, dst, tag=HEADER_TAG), h))
            except RuntimeError:
                pass
        deadline = time.monotonic() + timeout_s
        for r in self._receivers:
            r.join(max(0.0, deadline - time.monotonic()))

    def send(self, dst: int, item: int, unit: int, x: torch.Tensor) -> int:
        """Send ``x`` (the input of ``unit`` for ``item``) to ``dst``; returns bytes sent."""
        if dst == self.rank:
            self.local.append(Message(self.rank, item, unit, x, gen=self.gen))
            return 0
        t0 = time.perf_counter()
        x = x.contiguous()
        h = _header(_DATA, self.gen, self.rank, item, unit, x).to(x.device)
        try:
            hw = dist.isend(h, dst, tag=HEADER_TAG)
            work = dist.isend(x, dst, tag=self.gen)
        except RuntimeError:  # dst died: the item is cached and resumes after re-planning
            self.send_errors += 1
            self.comm_time_s += time.perf_counter() - t0
            return 0
        self.works.setdefault(item, []).extend(((hw, h), (work, x)))
        n = _nbytes(x)
        self.bytes_sent += n
        self.messages_sent += 1
        self.comm_time_s += time.perf_counter() - t0
        return n

    def _accept(self, msg: Message) -> bool:
        if msg.gen == self.gen:
            return True
        if msg.gen > self.gen:
            self.ahead.append(msg)
        return False

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
    """Receives the headers and payloads one peer sends to this rank and queues them."""

    def __init__(self, t: Transport, src: int):
        super().__init__(daemon=True, name=f"lapdtr-recv-{src}")
        self.t, self.src = t, src

    def run(self) -> None:
        t, src = self.t, self.src
        h = torch.empty(_HEADER_LEN, dtype=torch.int64, device=t.device)
        while True:
            try:
                dist.recv(h, src, tag=HEADER_TAG)
            except Exception:  # the peer died or the group is gone: nothing more from it
                return
            kind, gen, _, item, unit, code, ndim, *shape = h.tolist()
            if kind == _BYE:
                return
            if gen < t.gen:  # an abandoned generation: its payload is never received
                with t._lock:
                    t.stale_dropped += 1
                continue
            t0 = time.perf_counter()
            x = torch.empty(shape[:ndim], dtype=DTYPE_CODES[code], device=t.device)
            try:
                dist.recv(x, src, tag=gen)
            except Exception:  # the sender died mid-transfer: resumed after re-planning
                with t._lock:
                    t.recv_errors += 1
                t.queue.put(Message(src, item, unit, None, lost=True, gen=gen))
                return
            n = _nbytes(x)
            with t._lock:
                t.bytes_received += n
                t.messages_received += 1
                t.recv_time_s += time.perf_counter() - t0
            t.queue.put(Message(src, item, unit, x, n, gen=gen))


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

    def put(self, item: int, unit: int, x: torch.Tensor) -> None:
        self.pop(item)
        self.mem[item] = (unit, x)
        self.bytes += _nbytes(x)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        while self.bytes > self.budget_bytes and self.mem:
            k = min(self.mem)
            u, t = self.mem.pop(k)
            self.bytes -= _nbytes(t)
            if self.spill_dir is not None:
                import os

                from safetensors.torch import save_file

                os.makedirs(self.spill_dir, exist_ok=True)
                path = os.path.join(self.spill_dir, f"{self.tag}-{k}.safetensors")
                save_file({"x": t.detach().cpu().contiguous()}, path)
                self.disk[k] = (u, path)
                self.spilled += 1
            else:
                self.dropped += 1

    def get(self, item: int, device=None) -> tuple[int, torch.Tensor]:
        if item in self.mem:
            return self.mem[item]
        u, path = self.disk[item]
        from safetensors.torch import load_file

        x = load_file(path)["x"]
        return u, (x.to(device) if device is not None else x)

    def pop(self, item: int) -> None:
        if item in self.mem:
            self.bytes -= _nbytes(self.mem.pop(item)[1])
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
