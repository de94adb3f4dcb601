"""``hyps``: HyPS hybrid partitioning (seeds/kaboubi-hyps-hybrid-partitioning.txt).

1. Mandatory split points (HyPS Algorithm 1): a unit whose parameters exceed the threshold — by
   default, a unit that fits whole on no device (parameters + peak activation > the largest
   memory) — is isolated by a split before and after it, and split horizontally into the fewest
   equal neuron / channel groups that fit, one group per device (the devices with the most memory).
2. Optional split points: after pooling units (no parameters, fewer rows out than in) and after
   units whose output is a local minimum of activation size, where a cut sends the least data.
3. Vertical partitions: each run of units between mandatory points is cut only at optional split
   points, placed by the exact ``lapdtr`` search (contiguous stages, least energy) on the memory
   the earlier partitions left free; HyPS prefers vertical partitions and splits horizontally only
   where it must.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..energy.analytical import channel_axis, placement_energy, row_axis, split_evenly
from .cost import Constraints, check_units_fit, memory_limit, plan_totals, to_predictions
from .lapdtr_dp import Instance, solve_contiguous, solve_ordered
from .registry import register_planner
from .types import Plan, Shard, StagePlan

__all__ = ["mandatory_split_points", "optional_split_points", "plan_hyps"]


def _fits(u, share: float, cap: float) -> bool:
    return u.param_bytes * share + u.in_bytes + share * max(0, u.peak_bytes - u.in_bytes) <= cap


def mandatory_split_points(model_profile, devices, *, param_threshold_bytes=None):
    """Units that must be split: ``{unit index: number of groups}`` (fewest equal groups that fit
    on distinct devices). A unit that no number of groups makes fit is a ``ValueError``."""
    caps = sorted((memory_limit(d) for d in devices), reverse=True)
    out = {}
    for i, u in enumerate(model_profile.units):
        too_big = (u.param_bytes > param_threshold_bytes if param_threshold_bytes is not None
                   else u.param_bytes + u.peak_bytes > caps[0])
        if not too_big:
            continue
        C = channel_axis(u)
        for g in range(2, min(len(devices), C) + 1):
            share = max(split_evenly(C, g)) / C
            thr_ok = param_threshold_bytes is None or u.param_bytes * share <= param_threshold_bytes
            if thr_ok and all(_fits(u, share, caps[k]) for k in range(g)):
                out[i] = g
                break
        else:
            raise ValueError(f"hyps: unit {u.name!r} ({u.param_bytes} parameter bytes) fits on no "
                             f"device even split into {min(len(devices), C)} groups; devices: "
                             f"{', '.join(d.name for d in devices)}")
    return out


def optional_split_points(model_profile) -> list[int]:
    """Boundaries ``b`` (a cut before unit ``b``) after pooling units or activation minima."""
    units = model_profile.units
    out = []
    for i in range(len(units) - 1):
        u = units[i]
        hi, ho = row_axis(units[i - 1]) if i > 0 else None, row_axis(u)
        pooling = ("pool" in u.name) or (u.param_bytes == 0 and ho is not None
                                          and hi is not None and ho < hi)
        prev_b = units[i - 1].out_bytes if i > 0 else math.inf
        minimum = u.out_bytes < prev_b and u.out_bytes <= units[i + 1].out_bytes
        if pooling or minimum:
            out.append(i + 1)
    return out


@register_planner("hyps", objectives=("energy",))
def plan_hyps(model_profile, devices, cons: Constraints, *, param_threshold_bytes=None):
    """HyPS: mandatory split points split horizontally, vertical partitions at optional points."""
    units = model_profile.units
    n = len(units)
    mandatory = mandatory_split_points(model_profile, devices,
                                       param_threshold_bytes=param_threshold_bytes)
    optional = optional_split_points(model_profile)
    ends = np.zeros(n + 1, dtype=bool)
    ends[optional] = True
    for i in mandatory:
        ends[i] = ends[i + 1] = True
    left = [memory_limit(d) for d in devices]
    placement: list = [None] * n
    shards: list[Shard] = []
    i = 0
    while i < n:
        if i in mandatory:
            u = units[i]
            g = mandatory[i]
            sizes = split_evenly(channel_axis(u), g)
            C = channel_axis(u)
            order = sorted(range(len(devices)), key=lambda d: (-left[d], d))
            chosen = [d for d in order if _fits(u, max(sizes) / C, left[d])][:g]
            if len(chosen) < g:
                raise ValueError(f"hyps: unit {u.name!r} needs {g} devices with memory for one "
                                 f"group each; the earlier partitions left too little")
            chosen.sort()
            placement[i] = [(d, k / C) for d, k in zip(chosen, sizes)]
            start = 0
            for d, k in zip(chosen, sizes):
                shards.append(Shard(unit=u.name, rank=d, axis="channels", start=start,
                                    stop=start + k))
                start += k
                left[d] -= u.param_bytes * k / C
            i += 1
            continue
        j = i
        while j < n and j not in mandatory:
            j += 1
        # units [i, j): vertical partitions at optional split points, on the memory left
        sub = dataclasses.replace(model_profile, units=units[i:j])
        devs = [dataclasses.replace(d, memory_bytes=max(1, int(left[k])) if math.isfinite(left[k])
                                    else 0) for k, d in enumerate(devices)]
        exclude = [k for k in range(len(devices)) if math.isfinite(left[k]) and left[k] < 1]
        inst = Instance(sub, devs, Constraints(horizon_requests=cons.horizon_requests),
                        exclude=exclude, allowed_ends=ends[i:j + 1])
        order = sorted(range(len(devs)), key=lambda d: (inst.jpf[d], d))
        ordered = solve_ordered(inst, order, with_value=True)
        assignment, _ = solve_contiguous(inst, upper_bound=ordered[1] if ordered else math.inf)
        assignment = assignment or (ordered[0] if ordered else None)
        if assignment is None:
            check_units_fit(sub, devs)
            raise ValueError(f"hyps: units {units[i].name!r}..{units[j - 1].name!r} fit on no "
                             f"device at the allowed split points; devices: "
                             f"{', '.join(d.name for d in devices)}")
        for k, d in enumerate(assignment):
            placement[i + k] = [(d, 1.0)]
        for d in set(assignment):
            held = [units[i + k] for k, a in enumerate(assignment) if a == d]
            left[d] -= sum(u.param_bytes for u in held) + max(u.peak_bytes for u in held)
        i = j
    energies, latency = placement_energy(model_profile, devices, placement)
    stages: list[StagePlan] = []
    for u, parts in zip(units, placement):
        if len(parts) == 1 and stages and stages[-1].rank == parts[0][0] and \
                stages[-1].units[-1] not in mandatory_names(units, mandatory):
            stages[-1].units.append(u.name)
            continue
        for d, _ in parts:
            stages.append(StagePlan(index=len(stages), rank=d, device=devices[d].name,
                                    units=[u.name]))
    preds = to_predictions(energies)
    meta = plan_totals(preds, latency)
    meta.update({"mandatory_split_points": {units[i].name: g for i, g in mandatory.items()},
                 "optional_split_points": [units[b].name for b in optional],
                 "exact": False, "horizon_requests": cons.horizon_requests})
    return Plan(model=model_profile.model, strategy="hyps", devices=[d.name for d in devices],
                stages=stages, img_size=model_profile.img_size,
                batch_size=model_profile.batch_size, objective=cons.objective, shards=shards,
                predictions=preds, meta=meta)


def mandatory_names(units, mandatory) -> set[str]:
    return {units[i].name for i in mandatory}
