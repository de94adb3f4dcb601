"""The control plane of a pipeline run: keys on the rendezvous store, heartbeats, the watcher.

Store keys (under the run prefix): ``join/<rank>``, ``setup``, ``ready/<rank>``, ``go``,
``epoch`` (bumped on every control change), ``state`` (JSON: gen, stop, abort), ``plan/<gen>``,
``tele/<rank>`` (heartbeat time and energy telemetry), ``g/<gen>/inv/<rank>``,
``g/<gen>/resume``, ``report/<rank>``, ``error/<rank>``, ``abort``.
"""
from __future__ import annotations

import datetime
import json
import threading
import time

import torch.distributed as dist

__all__ = ["RendezvousError", "StoreView", "client", "wait_key", "wait_all", "publish_abort",
           "Heartbeat", "Watcher", "stop_threads"]


class RendezvousError(RuntimeError):
    """A rank did not join, or the run was aborted by another rank."""


class StoreView:
    """Key helpers over a store client (all keys live under one run prefix)."""

    def __init__(self, store, prefix: str):
        self.s, self.p = store, prefix

    def k(self, *parts) -> str:
        return self.p + "/".join(str(p) for p in parts)

    def set(self, key, value: str):
        self.s.set(self.k(key) if isinstance(key, str) else self.k(*key), value)

    def get(self, *parts) -> str:
        return self.s.get(self.k(*parts)).decode()

    def get_json(self, *parts):
        return json.loads(self.s.get(self.k(*parts)))

    def has(self, *parts) -> bool:
        return self.s.check([self.k(*parts)])

    def add(self, key: str, n: int) -> int:
        return self.s.add(self.k(key), n)


def client(host: str, port: int, timeout_s: float = 86400.0):
    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def wait_key(st: StoreView, parts, timeout_s: float | None, abort_check=True) -> bool:
    t0 = time.time()
    sleep = 1e-4
    while not st.has(*parts):
        if abort_check and st.has("abort"):
            raise RendezvousError(st.get("abort"))
        if timeout_s is not None and time.time() - t0 > timeout_s:
            return False
        time.sleep(sleep)
        sleep = min(sleep * 2, 0.01)
    return True


def wait_all(st: StoreView, key: str, world_size: int, timeout_s: float) -> bool:
    """Wait until every rank has set ``key/<rank>``; ``False`` after ``timeout_s``."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if st.has("abort"):
            raise RendezvousError(st.get("abort"))
        if all(st.has(key, r) for r in range(world_size)):
            return True
        time.sleep(0.01)
    return False


def publish_abort(st: StoreView, rank: int, msg: str) -> None:
    """Record ``msg`` as rank ``rank``'s error and, if nobody did yet, abort the run with it."""
    try:
        st.set(("error", rank), msg)
        if not st.has("abort"):
            st.set("abort", msg)
            cur = st.get_json("state") if st.has("state") else {"gen": 0}
            cur["abort"] = msg
            st.set("state", json.dumps(cur))
            st.add("epoch", 1)
    except Exception:  # the store is gone: nobody is left to tell
        pass


class Heartbeat(threading.Thread):
    """Writes ``tele/<rank>`` (wall time ``hb`` and energy telemetry) every interval.

    If a store call fails, the thread records the cause in ``error`` and stops; the rank's
    main loop checks it (:meth:`check`) and ends with that error, instead of the rank showing
    up later as dead and being re-planned away without a word."""

    def __init__(self, host, port, prefix, rank, interval_s, telemetry):
        super().__init__(daemon=True, name=f"lapdtr-heartbeat-{rank}")
        self.store = StoreView(client(host, port, 60.0), prefix)
        self.rank, self.interval_s, self.telemetry = rank, interval_s, telemetry
        self.stopped = threading.Event()
        self.error: str | None = None

    def beat(self):
        self.store.set(("tele", self.rank), json.dumps(self.telemetry()))

    def run(self):
        while not self.stopped.wait(self.interval_s):
            try:
                self.beat()
            except Exception as e:
                if not self.stopped.is_set():
                    self.error = f"{type(e).__name__}: {e}"
                return

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"rank {self.rank}: its heartbeat to the rendezvous store failed "
                               f"({self.error}); the other ranks would take it for dead")


class Watcher(threading.Thread):
    """The coordinator: reads every rank's telemetry and the abort key every interval, off the
    main thread (whose store round trips would otherwise sit between stages and outputs)."""

    def __init__(self, host, port, prefix, world_size, interval_s, coordinator: int = 0):
        super().__init__(daemon=True, name="lapdtr-watcher")
        self.store = StoreView(client(host, port, 60.0), prefix)
        self.ranks = [r for r in range(world_size) if r != coordinator]
        self.interval_s = interval_s
        self.tele: dict[int, dict] = {}
        self.abort: str | None = None
        self.error: str | None = None
        self.stopped = threading.Event()

    def read(self) -> None:
        st = self.store
        if st.has("abort"):
            self.abort = st.get("abort")
        if self.ranks:  # every rank wrote its telemetry before the run started
            vals = st.s.multi_get([st.k("tele", r) for r in self.ranks])
            self.tele = {r: json.loads(v) for r, v in zip(self.ranks, vals)}  # one swap

    def run(self):
        while not self.stopped.wait(self.interval_s):
            try:
                self.read()
            except Exception as e:  # the coordinator's monitor() raises it
                self.error = f"{type(e).__name__}: {e}"
                return


def stop_threads(threads) -> None:
    """Stop and join the store helper threads: one still inside a store call when the process
    exits would abort it ("terminate called without an active exception")."""
    for t in threads:
        t.stopped.set()
    for t in threads:
        if t.is_alive():
            t.join(5.0)
