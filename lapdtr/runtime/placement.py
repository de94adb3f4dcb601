"""Where a rank runs on its host: torch threads, CPU pinning, and whether ranks share cores.

``oversubscribed``: the host's ranks' threads outnumber its CPUs (this benchmark's 3 and 4 ranks
on 2 cores). The pipeline then keeps fewer items in flight, so fewer ranks have work queued and
compete for a core at once (``benchmarks/pipeline.py`` measures the effect).

Pinning (``pin_cpus: true``) gives each rank its own CPUs (``os.sched_setaffinity``, inherited
by the gloo and lapdtr threads it starts), the usual practice on hosts with many cores; on this
project's 2-core VM it changed throughput by less than the run-to-run spread, so it is off by
default.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Placement", "place_rank", "apply_placement"]


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
