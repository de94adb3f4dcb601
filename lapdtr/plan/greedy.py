"""``lapdtr-greedy``: Algorithm 2 of the LAP-DTR paper (seeds/katare-sac25-lapdtr.txt), the
published baseline, with lapdtr's corrected cost.

The paper assigns layer ``l`` to ``argmin_i (E_i / C_i) * C_L`` subject to ``M_L <= M_i``, where
``E_i`` is the device's *remaining* energy: that sends work to the emptiest battery, the opposite
of what the text wants. lapdtr uses the energy cost of the layer's compute on the device,
``C_L * power_active_w / (gflops * 1e9)`` (joules per FLOP times FLOPs), and treats the remaining
energy as a budget: over the planning horizon a device may spend at most ``E_i - E_min``.
Like the paper, the choice ignores communication (the prediction counts it).
"""
from __future__ import annotations

import math

from .cost import Constraints, build_pipeline_plan, check_units_fit, memory_limit, usable_energy_j
from .registry import register_planner

__all__ = ["plan_greedy", "greedy_assignment"]


def greedy_assignment(model_profile, devices, cons: Constraints) -> list[int]:
    m = len(devices)
    jpf = [d.power_active_w / (d.gflops * 1e9) for d in devices]
    cap = [memory_limit(d) for d in devices]
    budget = [usable_energy_j(d, cons.horizon_requests) for d in devices]
    params = [0.0] * m
    peak = [0.0] * m
    spent = [0.0] * m
    assignment: list[int] = []
    prev = -1
    for i, u in enumerate(model_profile.units):
        best, best_cost = -1, math.inf
        for d in range(m):
            if params[d] + u.param_bytes + max(peak[d], u.peak_bytes) > cap[d]:
                continue  # M_L <= M_i
            recv = u.in_bytes * devices[d].energy_per_byte_j if (prev >= 0 and prev != d) else 0.0
            cost = jpf[d] * u.flops
            if spent[d] + cost + recv > budget[d]:
                continue  # remaining energy over the horizon
            if cost < best_cost:
                best, best_cost = d, cost
        if best < 0:
            check_units_fit(model_profile, devices)
            raise ValueError(
                f"lapdtr-greedy: unit {u.name!r} fits on no device with memory and energy left "
                f"(devices: {', '.join(d.name for d in devices)}; horizon "
                f"{cons.horizon_requests} request(s))")
        d = best
        params[d] += u.param_bytes
        peak[d] = max(peak[d], u.peak_bytes)
        spent[d] += best_cost
        if prev >= 0 and prev != d:
            spent[d] += u.in_bytes * devices[d].energy_per_byte_j
            spent[prev] += model_profile.units[i - 1].out_bytes * devices[prev].energy_per_byte_j
        assignment.append(d)
        prev = d
    return assignment


@register_planner("lapdtr-greedy", objectives=("energy",))
def plan_greedy(model_profile, devices, cons: Constraints):
    """LAP-DTR Algorithm 2 (greedy, corrected cost): each unit to its cheapest device by energy."""
    assignment = greedy_assignment(model_profile, devices, cons)
    plan = build_pipeline_plan(model_profile, devices, assignment, strategy="lapdtr-greedy",
                               constraints=cons, meta={"solver": "greedy", "exact": False})
    over = [p.device for p, d in zip(plan.predictions, devices)
            if p.energy_j > usable_energy_j(d, cons.horizon_requests) * (1 + 1e-9)]
    plan.meta["constraints_met"] = not over
    if over:
        plan.meta["over_budget"] = over  # communication the greedy choice did not foresee
    return plan
