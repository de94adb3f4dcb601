"""CPU slots: at most ``n`` co-located ranks run a stage at once.

When a host runs more ranks than it has cores (several stages on one edge box, or this
benchmark's 3 and 4 ranks on 2 cores), every rank with queued work is runnable and the kernel
time-slices their stages: each switch evicts the other stage's weights and activations from the
core's caches, and the same work costs more CPU. With slots, a rank holds one of ``n`` host-wide
slots (``fcntl.flock`` on ``n`` files under the temp directory, shared by every lapdtr process
of the user on the host) while it runs a stage, so stages run to completion on a core instead of
interleaving. ``benchmarks/pipeline.py --slots-ab`` measures runs with and without.

A rank first tries its own slot (rank mod ``n``), then the others, without blocking; if all are
taken it blocks on its own. After releasing, it yields the core once so that a rank blocked on
the same slot gets it before this rank takes it again (``flock`` has no queue).
"""
from __future__ import annotations

import fcntl
import os
import tempfile
import time

__all__ = ["CpuSlots", "auto_slots"]


def auto_slots(local_ranks: int, threads_per_rank: int, cpu_count: int | None = None) -> int:
    """Slots for ``local_ranks`` ranks of ``threads_per_rank`` threads on this host: 0 (no
    limit) when they fit on the cores, else as many as fit (at least 1)."""
    cores = cpu_count or os.cpu_count() or 1
    if local_ranks * threads_per_rank <= cores:
        return 0
    return max(1, cores // max(1, threads_per_rank))


class CpuSlots:
    """Context manager: hold one of ``n`` host-wide slots while inside."""

    def __init__(self, n: int, rank: int, directory: str | None = None):
        if n < 1:
            raise ValueError(f"cpu_slots: expected at least 1 slot, got {n}")
        d = directory or os.path.join(tempfile.gettempdir(), f"lapdtr-cpu-slots-{os.getuid()}")
        os.makedirs(d, exist_ok=True)
        self.n, self.rank, self.directory = n, rank, d
        self.files = [open(os.path.join(d, f"slot{i}"), "a+") for i in range(n)]
        self.preferred = rank % n
        self.held: int | None = None
        self.wait_s = 0.0
        self.acquired = 0

    def __enter__(self) -> "CpuSlots":
        t0 = time.perf_counter()
        order = [self.preferred] + [i for i in range(self.n) if i != self.preferred]
        for i in order:
            try:
                fcntl.flock(self.files[i], fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.held = i
                break
            except BlockingIOError:
                continue
        else:
            fcntl.flock(self.files[self.preferred], fcntl.LOCK_EX)
            self.held = self.preferred
        self.wait_s += time.perf_counter() - t0
        self.acquired += 1
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.files[self.held], fcntl.LOCK_UN)
        self.held = None
        os.sched_yield()

    def close(self) -> None:
        for f in self.files:
            f.close()
