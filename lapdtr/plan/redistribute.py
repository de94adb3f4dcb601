"""Dynamic task redistribution (LAP-DTR section 4.1): re-plan when devices run low on energy, fail,
or are overloaded.

The seed minimizes ``sum_i (C_i / L_i + lambda / E_i)``; lapdtr keeps its intent — shift load
towards devices with energy and capacity left — as a weighted energy objective: a stage's energy
on device i counts ``1 + lambda * E_mean / E_i`` times (E_i remaining energy, E_mean the mean over
the candidate devices with a battery; devices without an energy limit weigh 1), solved exactly by
the ``lapdtr`` search. Budgets and predictions use the true energy.

For objective ``throughput`` the weight multiplies a device's compute time instead, so a device
low on energy gets shorter stages.

Rules: a failed device and every device whose remaining energy is below its ``energy_min_j`` hold
no units; if no plan exists without them that is a ``ValueError`` naming them. An overloaded
device is left out when a plan exists without it, and otherwise kept at a tenfold penalty.
Surviving devices keep their ranks (the runtime keeps its processes); ``meta['moves']`` lists the
units that change rank.

The re-plan keeps the plan's objective; a plan made without one (from cuts: ``objective
"none"``) is re-planned for ``throughput``, so the survivors share the work. Survivors stay busy
unless the objective prefers otherwise (the planner takes the least-period plan among equally good
ones); survivors left idle get an ``IdleRanksWarning``. A transfer between survivors that have no
link is a ``MissingLinkError`` naming them, not "no plan exists".

Widths are kept: the re-plan is priced on the profile at the plan's width (``plan_width``:
measured per unit, ``profile_model(widths=...)``), and every stage keeps the width its device
ran (a device new to the plan runs the plan's width).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .cost import OBJECTIVES, Constraints, MissingLinkError, validate_inputs
from .idle import idle_ranks, warn_idle
from .lapdtr_dp import plan_lapdtr
from .types import Plan
from .widths import plan_width, stamp_widths

__all__ = ["RedistributionEvent", "EVENT_KINDS", "redistribute", "unit_moves"]

EVENT_KINDS = ("low_energy", "failure", "overload")


@dataclass
class RedistributionEvent:
    """What happened: ``kind`` in ``low_energy`` | ``failure`` | ``overload`` and the device names."""

    kind: str
    devices: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown redistribution event kind {self.kind!r}; allowed: "
                             f"{', '.join(EVENT_KINDS)}")
        self.devices = list(self.devices)


def unit_moves(old: Plan, new: Plan) -> list[dict]:
    """Units whose rank changes: ``[{unit, from_rank, to_rank}]`` in model order."""
    before, after = old.unit_to_rank(), new.unit_to_rank()
    moves = []
    for s in new.stages:
        for u in s.units:
            if before.get(u) != after[u]:
                moves.append({"unit": u, "from_rank": before.get(u, -1), "to_rank": after[u]})
    return moves


def _below_min(d) -> bool:
    return d.energy_remaining_j is not None and d.energy_remaining_j < (d.energy_min_j or 0.0)


def redistribute(plan: Plan, model_profile, devices, event: RedistributionEvent, *,
                 lam: float = 1.0, unavailable=()) -> Plan:
    """Re-plan ``plan`` after ``event`` on ``devices`` (the plan's devices, in rank order, with
    their current energy figures). ``unavailable``: names of devices that must hold nothing
    whatever the event (e.g. ranks that failed earlier). Returns a new pipeline plan whose
    ``meta['moves']`` lists the units that change rank."""
    if not isinstance(event, RedistributionEvent):
        raise ValueError(f"event must be a RedistributionEvent, got {type(event).__name__}")
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    devices = list(devices)
    validate_inputs(model_profile, devices)
    width = plan_width(plan)
    if width != 1.0:
        if not model_profile.has_width(width):
            raise ValueError(f"redistribute: the plan runs width {width:g}, which its profile "
                             f"does not hold (profiled: {model_profile.widths}); profile the "
                             f"model with profile_model(..., widths='all')")
        model_profile = model_profile.at_width(width)
    names = [d.name for d in devices]
    if names != list(plan.devices):
        raise ValueError(f"devices {names} are not the plan's devices in rank order "
                         f"{list(plan.devices)}")
    unknown = [n for n in list(event.devices) + list(unavailable) if n not in names]
    if unknown:
        raise ValueError(f"event names unknown device(s) {unknown}; the plan's devices: {names}")
    idx = {n: i for i, n in enumerate(names)}
    hard = set()
    if event.kind in ("failure", "low_energy"):
        hard |= {idx[n] for n in event.devices}
    low = {i for i, d in enumerate(devices) if _below_min(d)}
    hard |= low | {idx[n] for n in unavailable}
    soft = {idx[n] for n in event.devices} if event.kind == "overload" else set()
    soft -= hard

    alive = [i for i in range(len(devices)) if i not in hard]
    finite = [devices[i].energy_remaining_j for i in alive
              if devices[i].energy_remaining_j is not None and devices[i].energy_remaining_j > 0]
    mean_e = sum(finite) / len(finite) if finite else 1.0
    weights = []
    for d in devices:
        e = d.energy_remaining_j
        weights.append(1.0 if e is None else 1.0 + lam * mean_e / max(e, 1e-12))

    objective = plan.objective if plan.objective in OBJECTIVES else "throughput"
    cons = Constraints(objective=objective,
                       horizon_requests=int(plan.meta.get("horizon_requests", 1)))
    attempts = [sorted(hard | soft)]
    if soft:
        attempts.append(sorted(hard))  # keep the overloaded devices, penalized
    new = None
    for k, exclude in enumerate(attempts):
        w = list(weights)
        if k == 1:
            for i in soft:
                w[i] *= 10.0
        try:
            new = plan_lapdtr(model_profile, devices, cons, exclude=exclude, weights=w)
            break
        except MissingLinkError:
            raise
        except ValueError:
            continue
    if new is None:
        out = [names[i] for i in sorted(hard)]
        raise ValueError(f"redistribution after {event.kind} of {event.devices}: no plan exists "
                         f"without device(s) {out} (failed or below E_min) on the remaining "
                         f"devices' memory and energy")
    stamp_widths(new, width, by_device={s.device: s.width for s in plan.stages})
    new.meta.update({
        "redistributed_from": plan.strategy,
        "event": {"kind": event.kind, "devices": list(event.devices)},
        "excluded": [names[i] for i in sorted(hard)],
        "penalized": [names[i] for i in sorted(soft)],
        "lam": lam, "moves": unit_moves(plan, new)})
    idle = idle_ranks(new, len(devices))
    new.meta["idle_ranks"] = idle
    warn_idle(new, devices, [r for r in idle if r not in hard], available=len(devices) - len(hard))
    return new
