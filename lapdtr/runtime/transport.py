"""Boundary tensors rank to rank: payload by ``torch.distributed`` point-to-point, header on the store.

A message is announced by a small JSON header on the rendezvous store (source rank, item, the
unit the receiver starts at, dtype code, shape), numbered per destination and generation; the
payload goes by ``isend``/``recv`` tagged with the generation. Each rank runs one receiver
thread that blocks on the store until its next header exists (no polling), then posts the
``recv`` for a payload that is already on its way, and queues the message for the main loop.
So no rank ever blocks on a peer that may have died, and shapes and dtypes may change per
message. After a re-plan the generation changes: the receiver is woken (by writing a wake-up
header under the key it waits on) and moves to the new generation's keys; headers and tags of the
old one are abandoned (a gloo process group survives a dead member for point-to-point traffic
between the others).
"""
from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

__all__ = ["DTYPE_CODES", "Message", "Transport", "BoundaryCache"]

_WAKE = b"wake"

DTYPE_CODES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


class Message:
    __slots__ = ("src", "item", "unit", "tensor", "nbytes", "lost", "gen")

    def __init__(self, src, item, unit, tensor, nbytes=0, lost=False, gen=0):
        self.src, self.item, self.unit, self.tensor = src, item, unit, tensor
        self.nbytes, self.lost, self.gen = nbytes, lost, gen


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


class Transport:
    """Send and receive boundary tensors of generation ``gen`` (see the module docstring)."""

    def __init__(self, store, rank: int, device: torch.device, prefix: str = "", *, connect):
        """``connect()`` returns a new store client for the receiver thread (a client must not
        be shared between threads)."""
        self.store, self.rank, self.device, self.prefix = store, rank, device, prefix
        self.gen = 0
        self.local: deque[Message] = deque()
        self.works: dict[int, list] = {}
        self.graveyard: list = []  # sends of abandoned generations: never waited on
        self.bytes_sent = 0
        self.bytes_received = 0
        self.comm_time_s = 0.0  # sending (the receiver thread keeps recv_time_s)
        self.recv_time_s = 0.0
        self.messages_sent = 0
        self.messages_received = 0
        self.recv_errors = 0
        self.send_errors = 0
        self.queue: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._receiver = _Receiver(self, connect)
        self._receiver.start()

    def _key(self, *parts) -> str:
        return self.prefix + "/".join(str(p) for p in parts)

    def set_generation(self, gen: int) -> None:
        for ws in self.works.values():
            self.graveyard.extend(ws)
        self.works.clear()
        self.local.clear()
        self.gen = gen
        self._receiver.wake(lambda: self._receiver.gen_seen == gen)

    def close(self) -> None:
        self._receiver.stopped = True
        self._receiver.wake(lambda: not self._receiver.is_alive())

    def send(self, dst: int, item: int, unit: int, x: torch.Tensor) -> int:
        """Send ``x`` (the input of ``unit`` for ``item``) to ``dst``; returns bytes sent."""
        if dst == self.rank:
            self.local.append(Message(self.rank, item, unit, x))
            return 0
        t0 = time.perf_counter()
        x = x.contiguous()
        try:
            work = dist.isend(x, dst, tag=self.gen)
        except RuntimeError:  # dst died: the item is cached and resumes after re-planning
            self.send_errors += 1
            self.comm_time_s += time.perf_counter() - t0
            return 0
        hdr = json.dumps([self.rank, item, unit, DTYPE_CODES.index(x.dtype), list(x.shape)])
        ticket = self.store.add(self._key("g", self.gen, "n", dst), 1)
        self.store.set(self._key("g", self.gen, "h", dst, ticket), hdr)
        self.works.setdefault(item, []).append((work, x))
        n = _nbytes(x)
        self.bytes_sent += n
        self.messages_sent += 1
        self.comm_time_s += time.perf_counter() - t0
        return n

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
            if msg.gen == self.gen:
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
    """Waits on the store for this rank's next header, receives its payload, queues it."""

    def __init__(self, t: Transport, connect):
        super().__init__(daemon=True)
        self.t, self.connect = t, connect
        self.store = None
        self.waiting: str | None = None
        self.gen_seen = -1
        self.stopped = False
        self.ready = threading.Event()

    def wake(self, done, timeout_s: float = 10.0) -> None:
        """Write a wake-up header under the key the thread waits on until ``done()``."""
        self.ready.wait(timeout_s)
        t0 = time.monotonic()
        while not done() and time.monotonic() - t0 < timeout_s:
            key = self.waiting
            if key is not None:
                self.t.store.compare_set(key, "", _WAKE)
            time.sleep(1e-4)

    def run(self) -> None:
        t = self.t
        try:
            self.store = self.connect()
        finally:
            self.ready.set()
        gen, ticket = None, 1
        while not self.stopped:
            if gen != t.gen:
                gen, ticket = t.gen, 1
            self.gen_seen = gen
            key = t._key("g", gen, "h", t.rank, ticket)
            self.waiting = key
            try:
                self.store.wait([key])
                raw = self.store.get(key)
            except Exception:  # the store is gone: the run is over
                return
            ticket += 1
            if raw == _WAKE or gen != t.gen:
                self.store.delete_key(key)
                continue
            src, item, unit, code, shape = json.loads(raw)
            t0 = time.perf_counter()
            x = torch.empty(shape, dtype=DTYPE_CODES[code], device=t.device)
            try:
                dist.recv(x, src, tag=gen)
            except RuntimeError:  # the sender died mid-transfer: resumed after re-planning
                t.recv_errors += 1
                t.queue.put(Message(src, item, unit, None, lost=True, gen=gen))
                self.store.delete_key(key)
                continue
            n = _nbytes(x)
            t.bytes_received += n
            t.messages_received += 1
            t.recv_time_s += time.perf_counter() - t0
            t.queue.put(Message(src, item, unit, x, n, gen=gen))
            self.store.delete_key(key)  # after the hand-off: off the critical path


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
