"""Where a rank runs on its host: torch threads, CPU pinning, and whether ranks share cores.

``oversubscribed``: the host's ranks' threads outnumber its CPUs (this benchmark's 3 and 4 ranks
on 2 cores). The pipeline then keeps fewer items in flight, so fewer ranks have work queued and
compete for a core at once (``benchmarks/pipeline.py`` measures the effect).

Pinning (``pin_cpus: true``) gives each rank its own CPUs (``os.sched_setaffinity``, inherited
by the gloo and lapdtr threads it starts), the usual practice on hosts with many cores; on this
project's 2-core VM it changed throughput by less than the run-to-run spread, so it is off by
default.

Allocator (``tune_malloc: true``, the default). glibc's malloc serves blocks above a dynamic
threshold with fresh ``mmap``s and returns freed memory at the top of the heap to the system, so
a rank that streams batches keeps faulting the same activation memory in again: deit_tiny at
batch 16 took 45,000-185,000 minor page faults per rank in 6 batches, a tenth of a second or more
of CPU time that varied from run to run. :func:`tune_malloc` keeps freed memory for reuse (no
trimming, ``mmap`` only above 32 MB), the same as running with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set; the faults drop tenfold. Memory is then held at its peak, as a
serving process's is anyway. ``benchmarks/pipeline.py`` gives its baselines the same settings.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import torch

__all__ = ["Placement", "place_rank", "apply_placement", "tune_malloc"]


@dataclass
class Placement:
    threads: int  # torch intra-op threads
    cpus: list[int] | None  # the CPUs the rank is pinned to; None: not pinned
    oversubscribed: bool  # the host's ranks' threads outnumber its CPUs


def _available() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def place_rank(local_rank: int, local_world: int, threads_per_rank: int | None = None,
               pin: bool | None = None, cpus: list[int] | None = None) -> Placement:
    """The placement of local rank ``local_rank`` of ``local_world`` on ``cpus`` (default: the
    CPUs this process may use). ``pin``: ``True`` pins (an error when the ranks do not fit),
    ``False`` or ``None`` does not."""
    avail = sorted(cpus) if cpus is not None else _available()
    threads = threads_per_rank or max(1, len(avail) // max(1, local_world))
    over = local_world * threads > len(avail)
    if pin is True:
        if over:
            raise ValueError(f"pin_cpus: true, but {local_world} local rank(s) × {threads} "
                             f"thread(s) do not fit on {len(avail)} CPU(s); allowed: false")
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError("pin_cpus: true, but this platform cannot pin threads "
                             "(no os.sched_setaffinity); allowed: false")
    if not pin:
        return Placement(threads, None, over)
    return Placement(threads, avail[local_rank * threads:(local_rank + 1) * threads], over)


def apply_placement(p: Placement) -> None:
    torch.set_num_threads(p.threads)
    if p.cpus:
        os.sched_setaffinity(0, p.cpus)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_MMAP_THRESHOLD_MAX = 32 * 2**20  # the most glibc accepts on 64-bit hosts
_TRIM_THRESHOLD = 2**31 - 1  # an int: trim only with 2 GB free at the top of the heap


def tune_malloc() -> bool:
    """Keep freed memory for reuse in this process (see the module docstring); ``False`` where
    the C library is not glibc (nothing is changed there)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS), or no CDLL(None) (Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a glibc too old for a value returns 0
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return bool(ok)
