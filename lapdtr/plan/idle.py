"""Launched devices a plan gives nothing to: ``idle_ranks`` and the ``IdleRanksWarning`` that
``create_plan`` and ``redistribute`` raise, naming the ranks and why the objective left them idle.
"""
from __future__ import annotations

import warnings

from .cost import usable_energy_j

__all__ = ["IdleRanksWarning", "idle_ranks", "idle_reason", "warn_idle"]


class IdleRanksWarning(UserWarning):
    """A plan leaves launched ranks without units (``ranks``: their ranks)."""

    def __init__(self, message: str, ranks=()):
        super().__init__(message)
        self.ranks = list(ranks)


_WHY = {
    "energy": "the least total energy uses fewer devices (work on them would add transfer energy "
              "or run on costlier joules per FLOP)",
    "max-device-energy": "no plan that gives them work lowers the largest device's energy",
    "latency": "one request finishes soonest on fewer devices (every stage boundary adds a "
               "transfer)",
    "throughput": "giving them work would not shorten the pipeline's period (its slowest stage or "
                  "transfer) or would break a memory, energy or latency constraint",
}


def idle_ranks(plan, world_size: int) -> list[int]:
    """Ranks ``0 .. world_size - 1`` that hold no stage and no shard of ``plan``."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    busy = {s.rank for s in plan.stages if s.units} | {s.rank for s in plan.shards}
    return [r for r in range(world_size) if r not in busy]


def idle_reason(plan, devices, ranks, *, available: int | None = None) -> str:
    """Why ``ranks`` hold nothing: no usable energy, fewer units than devices, or the objective.
    ``available``: how many devices could take work (default: all of ``devices``)."""
    available = len(devices) if available is None else available
    horizon = int(plan.meta.get("horizon_requests", 1))
    empty = [r for r in ranks if r < len(devices) and usable_energy_j(devices[r], horizon) <= 0]
    parts = []
    if empty:
        parts.append(f"rank(s) {empty} have no usable energy (E_i - E_min <= 0)")
    units = sum(len(s.units) for s in plan.stages)
    busy = len({s.rank for s in plan.stages if s.units} | {s.rank for s in plan.shards})
    if not plan.shards and units < available and busy >= units:
        parts.append(f"the model has {units} unit(s) for {available} devices")
    elif len(empty) < len(ranks):
        why = _WHY.get(plan.objective, f"objective {plan.objective!r} placed no units there")
        parts.append(f"strategy {plan.strategy!r} with objective {plan.objective!r}: {why}")
        if plan.objective != "throughput":
            parts.append("objective 'throughput' keeps every launched rank busy unless that "
                         "lengthens the period; or launch fewer ranks")
    return "; ".join(parts)


def warn_idle(plan, devices, ranks, *, available: int | None = None, stacklevel: int = 3) -> None:
    """Warn (``IdleRanksWarning``) that ``ranks`` of ``plan`` are idle, and why."""
    if not ranks:
        return
    available = len(devices) if available is None else available
    names = ", ".join(f"{r} ({devices[r].name!r})" for r in ranks)
    msg = (f"plan for {plan.model!r} leaves {len(ranks)} of {available} available rank(s) idle: "
           f"rank {names}; {idle_reason(plan, devices, ranks, available=available)}")
    warnings.warn(IdleRanksWarning(msg, ranks), stacklevel=stacklevel)
