"""``vertical``: Tang & Stefanov's vertical partitioning — a device may hold non-consecutive units
(sub-partitions, eqs. 18-22) — minimizing the largest per-device energy, ties broken by the total.

Exact as a mixed-integer program (:func:`solve_vertical_milp`, HiGHS through
``scipy.optimize.milp``); meta ``exact`` says whether HiGHS proved optimality within
``time_limit_s``. The ``sequential`` optimum is a feasible vertical plan and is kept when it is at
least as good, so vertical is never worse than sequential partitioning.
"""
from __future__ import annotations

import math

from .cost import Constraints, build_pipeline_plan, check_units_fit, memory_limit, usable_energy_j
from ..energy.analytical import vertical_energy
from .lapdtr_dp import Instance, solve_ordered
from .registry import register_planner

__all__ = ["plan_vertical", "solve_vertical_milp"]


def solve_vertical_milp(model_profile, devices, cons: Constraints, *, time_limit_s: float = 20.0):
    """The same problem as a mixed-integer program solved by HiGHS (``scipy.optimize.milp``).

    Per unit u and device d: ``x[u,d]`` (binary: u runs on d), ``s[u,d] >= x[u,d] - x[u-1,d]``
    (a run starts: d receives u's input), ``t[u,d] >= x[u,d] - x[u+1,d]`` (a run ends: d sends
    u's output); per device ``E_d`` (eqs. 18-22) ``<= z`` and ``<= E_i - E_min``, ``K_d >=
    peak_u * x[u,d]`` and ``params + K_d <= memory``. Minimizes ``z`` plus a tiny multiple of the
    total energy (the tie-break). Identical devices are ordered by energy to break symmetry.
    Returns ``(assignment or None, proven_optimal)``.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    units = model_profile.units
    n, m = len(units), len(devices)
    jpf = [d.power_active_w / (d.gflops * 1e9) for d in devices]
    scale = max(1e-30, sum(min(jpf) * u.flops for u in units))
    X = lambda u, d: u * m + d  # noqa: E731
    S = lambda u, d: n * m + u * m + d  # noqa: E731
    T = lambda u, d: 2 * n * m + u * m + d  # noqa: E731
    Ei = lambda d: 3 * n * m + d  # noqa: E731
    Ki = lambda d: 3 * n * m + m + d  # noqa: E731
    Z = 3 * n * m + 2 * m
    nv = Z + 1
    lo, hi = [], []
    A = lil_matrix((5 * n * m + 4 * m + n, nv))
    r = 0

    def add(coefs, lb, ub):
        nonlocal r
        for j, v in coefs:
            A[r, j] = A[r, j] + v
        lo.append(lb)
        hi.append(ub)
        r += 1

    for u in range(n):
        add([(X(u, d), 1.0) for d in range(m)], 1.0, 1.0)
    for d, dev in enumerate(devices):
        for u in range(n):
            if u > 0:
                add([(S(u, d), 1.0), (X(u, d), -1.0), (X(u - 1, d), 1.0)], 0.0, np.inf)
            if u < n - 1:
                add([(T(u, d), 1.0), (X(u, d), -1.0), (X(u + 1, d), 1.0)], 0.0, np.inf)
            add([(Ki(d), 1.0), (X(u, d), -float(units[u].peak_bytes))], 0.0, np.inf)
        coefs = [(Ei(d), -1.0)]
        for u in range(n):
            coefs.append((X(u, d), jpf[d] * units[u].flops / scale))
            if u > 0:
                coefs.append((S(u, d), dev.energy_per_byte_j * units[u].in_bytes / scale))
            if u < n - 1:
                coefs.append((T(u, d), dev.energy_per_byte_j * units[u].out_bytes / scale))
        add(coefs, 0.0, 0.0)
        add([(Ei(d), 1.0), (Z, -1.0)], -np.inf, 0.0)
        cap = memory_limit(dev)
        if math.isfinite(cap):
            add([(X(u, d), float(units[u].param_bytes)) for u in range(n)] + [(Ki(d), 1.0)],
                -np.inf, cap)
    keys = [(d.gflops, memory_limit(d), d.power_active_w, d.energy_per_byte_j,
             usable_energy_j(d, cons.horizon_requests)) for d in devices]
    for d in range(1, m):
        if keys[d] == keys[d - 1]:
            # device d opens only after device d - 1 has a unit (identical devices in order)
            add([(X(0, d), 1.0)], 0.0, 0.0)
            for u in range(1, n):
                add([(X(u, d), 1.0)] + [(X(v, d - 1), -1.0) for v in range(u)], -np.inf, 0.0)
    A = A.tocsr()[:r]
    lb = np.zeros(nv)
    ub = np.ones(nv)
    for d, dev in enumerate(devices):
        ub[Ei(d)] = usable_energy_j(dev, cons.horizon_requests) / scale
        ub[Ki(d)] = np.inf
        ub[S(0, d)] = 0.0
        ub[T(n - 1, d)] = 0.0
    ub[Z] = np.inf
    if np.any(ub[3 * n * m:3 * n * m + m] < 0):
        ub[3 * n * m:3 * n * m + m] = np.maximum(ub[3 * n * m:3 * n * m + m], 0.0)
    c = np.zeros(nv)
    c[Z] = 1.0
    for d in range(m):
        c[Ei(d)] = 1e-7
    integrality = np.zeros(nv)
    integrality[:n * m] = 1
    res = milp(c, constraints=LinearConstraint(A, lo[:r], hi[:r]), integrality=integrality,
               bounds=Bounds(lb, ub), options={"time_limit": time_limit_s, "mip_rel_gap": 1e-9,
                                               "presolve": True})
    if res.x is None:
        return None, res.status == 2  # 2: infeasible (proven)
    x = res.x[:n * m].reshape(n, m)
    return [int(np.argmax(x[u])) for u in range(n)], res.status == 0


@register_planner("vertical", objectives=("max-device-energy",))
def plan_vertical(model_profile, devices, cons: Constraints, *, time_limit_s: float = 30.0):
    """Tang & Stefanov vertical partitioning: non-consecutive units per device, min-max energy."""
    if cons.latency_target_s is not None or cons.throughput_target is not None:
        raise ValueError("strategy 'vertical' minimizes the largest per-device energy and takes no "
                         "latency_target_s / throughput_target; use strategy 'lapdtr'")
    seq_cons = Constraints(objective="max-device-energy", horizon_requests=cons.horizon_requests)
    inst = Instance(model_profile, devices, seq_cons)
    incumbent = solve_ordered(inst, list(range(min(inst.m, inst.n))), use_all=True)
    assignment, proven = solve_vertical_milp(model_profile, devices, cons,
                                             time_limit_s=time_limit_s)
    solver = "milp"
    if incumbent is not None and (assignment is None or _key(model_profile, devices, incumbent)
                                  < _key(model_profile, devices, assignment)):
        assignment, solver = incumbent, "milp (sequential incumbent kept)"
    if assignment is None:
        check_units_fit(model_profile, devices)
        raise ValueError(f"vertical: no assignment fits the devices' memory and energy over "
                         f"{cons.horizon_requests} request(s); devices: "
                         f"{', '.join(d.name for d in devices)}")
    return build_pipeline_plan(model_profile, devices, assignment, strategy="vertical",
                               constraints=cons, meta={"solver": solver, "exact": bool(proven)})


def _key(model_profile, devices, assignment):
    en, _ = vertical_energy(model_profile, devices, assignment)
    return (round(max(e.energy_j for e in en), 15), sum(e.energy_j for e in en))
