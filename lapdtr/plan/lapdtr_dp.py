"""``lapdtr``: the exact optimum over contiguous stages, each on a different device, the devices in
any order and any subset — and ``sequential``, Tang & Stefanov's consecutive partitions.

Problem. Cut the units into contiguous stages and give every stage its own device, minimizing
total energy (compute + communication, ``energy``), the largest per-device energy
(``max-device-energy``) or the end-to-end latency (``latency``), subject to: each device's memory;
each device's usable energy over the horizon, ``horizon * E_stage <= E_i - E_min``; an optional
end-to-end latency target; an optional throughput target (every stage's compute and every transfer
within ``1 / throughput``).

Algorithm: A* over states ``(next unit, devices used)``; an edge puts units ``[a, b)`` on one more
device. The heuristic is the same problem with the "each device at most once" rule dropped,
solved exactly by a backward dynamic program over unit positions (O(n^2 m) with numpy), so it is
admissible and consistent and the first goal popped is optimal (for the latency target, labels are
Pareto sets over (objective, latency)). Devices with identical profiles (and, when latency matters,
identical links) are interchangeable, so a state keeps only how many of each class are used:
symmetric device choices are explored once. Successors are generated lazily in order of their
priority, so an expansion pushes one heap entry, not n*m.

For the energy objective the heuristic is tightened by Lagrangian prices on device classes
(subgradient ascent on the multipliers of "each device at most once"): from a state, ``h_mu(b) -
sum_c mu_c * free_c`` is also a consistent lower bound, and it is what makes memory-bound plans over
distinct devices tractable (8 distinct devices x 100 units: ~0.1 s instead of ~3 s).

Before the search an O(n^2 m) DP finds the best plan with devices taken in a *fixed* order
(cheapest energy per FLOP first, any subset); its cost is an upper bound that prunes the A*.

Exactness: the result is the exact optimum whenever the A* finishes within ``max_expansions``
expanded states and ``max_pending`` queued successors (meta ``exact: true``; the tests check it
against exhaustive search). The search is fast when (a) devices come in few classes of identical
devices — states are at most ``n * prod(class size + 1)``, e.g. 64 devices of 4 kinds and 1000
units in ~1.5 s — or (b) the relaxation already uses distinct devices (memory does not bind).
Many *distinct* devices with binding memory can exhaust the limits (16 distinct devices x 300
units or 64 distinct x 1000 stop after a few seconds), and so can ``max-device-energy`` over many
distinct devices (balancing 1000 units over 64 distinct devices stops after ~14 s); the planner
then returns the fixed-order optimum with meta ``exact: false``.
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque

import numpy as np

from ..energy.analytical import find_link
from .cost import (Constraints, build_pipeline_plan, check_units_fit, memory_limit,
                   usable_energy_j)
from .registry import register_planner

__all__ = ["Instance", "solve_contiguous", "solve_ordered", "plan_lapdtr", "plan_sequential"]


class Instance:
    """Arrays of one planning problem: prefix sums over units, per-device rates, reachable ends."""

    def __init__(self, model_profile, devices, cons: Constraints, *, latency_matters=None,
                 exclude=(), weights=None, allowed_ends=None):
        units = model_profile.units
        self.devices = devices
        self.cons = cons
        self.n = len(units)
        self.m = m = len(devices)
        f = np.array([u.flops for u in units], dtype=np.float64)
        self.F = np.concatenate([[0.0], np.cumsum(f)])
        self.out_b = np.array([u.out_bytes for u in units], dtype=np.float64)
        self.in_b = np.array([u.in_bytes for u in units], dtype=np.float64)
        self.param_b = np.array([u.param_bytes for u in units], dtype=np.float64)
        self.peak_b = np.array([u.peak_bytes for u in units], dtype=np.float64)
        self.jpf = np.array([d.power_active_w / (d.gflops * 1e9) for d in devices])
        self.spf = np.array([1.0 / (d.gflops * 1e9) for d in devices])
        self.epb = np.array([d.energy_per_byte_j for d in devices], dtype=np.float64)
        self.mem = np.array([memory_limit(d) for d in devices])
        self.budget = np.array([usable_energy_j(d, cons.horizon_requests) for d in devices])
        for i in exclude:
            self.budget[i] = -np.inf  # holds nothing
        # objective weight per device (redistribution's penalty); budgets use true energy
        self.weight = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
        self.period = 1.0 / cons.throughput_target if cons.throughput_target else math.inf
        if latency_matters is None:
            latency_matters = (cons.objective == "latency" or cons.latency_target_s is not None
                               or cons.throughput_target is not None)
        self.latency_matters = latency_matters
        # links: latency and bandwidth between every pair (inf time when no link is listed)
        lat = np.zeros((m, m))
        bw = np.full((m, m), np.inf)
        if latency_matters:
            for a in range(m):
                for b in range(m):
                    if a == b:
                        continue
                    link = find_link(devices, a, b)
                    if link is None:
                        lat[a, b], bw[a, b] = np.inf, 1.0
                    else:
                        lat[a, b], bw[a, b] = link.latency_s, link.bandwidth_bps
        self.lat, self.bw = lat, bw
        off = ~np.eye(m, dtype=bool)
        self.uniform_links = bool(m <= 1 or (np.all(lat[off] == lat[off][0])
                                             and np.all(bw[off] == bw[off][0])))
        self.lat_min = float(lat[off].min()) if m > 1 else 0.0
        self.bw_max = float(bw[off].max()) if m > 1 else np.inf
        # classes of interchangeable devices
        keys = {}
        self.class_of = []
        for i, d in enumerate(devices):
            key = (d.gflops, float(self.mem[i]), d.power_active_w, d.energy_per_byte_j,
                   float(self.budget[i]), float(self.weight[i]))
            if latency_matters and not self.uniform_links:
                key = key + (i,)
            self.class_of.append(keys.setdefault(key, len(keys)))
        self.classes = [[i for i in range(m) if self.class_of[i] == c] for c in range(len(keys))]
        self.track_last = latency_matters and not self.uniform_links
        self.maxend = np.array([self._maxend(d) for d in range(m)], dtype=np.int64)
        # stage boundaries allowed (HyPS split points); the model's end always is
        self.allowed_ends = None if allowed_ends is None else np.asarray(allowed_ends, dtype=bool)
        self._edges: dict = {}
        self._cache_left = 4_000_000  # edge entries kept (about 100 MB)

    def _maxend(self, d: int) -> list[int]:
        """For each start a, the largest b with units [a, b) within device d's memory."""
        n, cap = self.n, self.mem[d]
        out = [0] * n
        b, psum, dq = 0, 0.0, deque()
        for a in range(n):
            if b < a:
                b, psum, dq = a, 0.0, deque()
            while b < n:
                new_max = max(self.peak_b[dq[0]] if dq else 0.0, self.peak_b[b])
                if psum + self.param_b[b] + new_max > cap:
                    break
                psum += self.param_b[b]
                while dq and self.peak_b[dq[-1]] <= self.peak_b[b]:
                    dq.pop()
                dq.append(b)
                b += 1
            out[a] = b
            if b > a:
                psum -= self.param_b[a]
                if dq and dq[0] == a:
                    dq.popleft()
        return out

    def edges(self, a: int, d: int):
        """Ends b, stage energy and compute time of units [a, b) on device d (feasible only)."""
        key = (a, d)
        hit = self._edges.get(key)
        if hit is not None:
            return hit[0]
        ed = self._compute_edges(a, d)
        size = 0 if ed is None else ed[0].size
        if size <= self._cache_left:  # bounded cache: big instances recompute
            self._cache_left -= size
            self._edges[key] = (ed,)
        return ed

    def _compute_edges(self, a: int, d: int):
        hi = int(self.maxend[d, a])
        if hi <= a:
            return None
        b = np.arange(a + 1, hi + 1)
        flops = self.F[b] - self.F[a]
        comm = (self.in_b[a] if a > 0 else 0.0) + np.where(b < self.n, self.out_b[b - 1], 0.0)
        e = self.jpf[d] * flops + self.epb[d] * comm
        t = self.spf[d] * flops
        ok = (e <= self.budget[d]) & (t <= self.period)
        if self.allowed_ends is not None:
            ok &= self.allowed_ends[b] | (b == self.n)
        if not ok.all():
            b, e, t = b[ok], e[ok], t[ok]
        if b.size == 0:
            return None
        return b, e * self.weight[d], t

    def transfer_s(self, p: int, d: int, a: int) -> float:
        """Time to hand unit a's input from device p to device d."""
        if a == 0 or p == d:
            return 0.0
        return float(self.lat[p, d] + self.in_b[a] / self.bw[p, d])

    def out_transfer_min(self, b):
        """Lower bound on the transfer time leaving a stage that ends at b."""
        return np.where(b < self.n, self.lat_min + self.out_b[np.minimum(b, self.n) - 1] / self.bw_max,
                        0.0)


def _heuristics(inst: Instance):
    """Backward DPs without the distinct-device rule: least energy, least bottleneck, least time."""
    n = inst.n
    he = np.full(n + 1, np.inf)
    hm = np.full(n + 1, np.inf)
    ht = np.full(n + 1, np.inf)
    he[n] = hm[n] = ht[n] = 0.0
    reps = [c[0] for c in inst.classes]
    for a in range(n - 1, -1, -1):
        be, bm, bt = np.inf, np.inf, np.inf
        for d in reps:
            ed = inst.edges(a, d)
            if ed is None:
                continue
            b, e, t = ed
            be = min(be, float(np.min(e + he[b])))
            bm = min(bm, float(np.min(np.maximum(e, hm[b]))))
            if inst.latency_matters:
                bt = min(bt, float(np.min(t + inst.out_transfer_min(b) + ht[b])))
            else:
                bt = min(bt, float(np.min(t + ht[b])))
        he[a], hm[a], ht[a] = be, bm, bt
    return he, hm, ht


def _relaxed_energy(inst: Instance, mu):
    """Backward DP of the energy relaxation with price ``mu[c]`` on each use of class c; returns
    the suffix costs and how many stages of each class the relaxed optimum uses."""
    n, ncls = inst.n, len(inst.classes)
    h = np.full(n + 1, np.inf)
    h[n] = 0.0
    nxt = np.zeros(n + 1, dtype=np.int64)
    cls = np.full(n + 1, -1, dtype=np.int64)
    for a in range(n - 1, -1, -1):
        for c in range(ncls):
            ed = inst.edges(a, inst.classes[c][0])
            if ed is None:
                continue
            b, e, _ = ed
            v = e + mu[c] + h[b]
            k = int(np.argmin(v))
            if v[k] < h[a]:
                h[a], nxt[a], cls[a] = v[k], b[k], c
    use = np.zeros(ncls)
    a = 0
    while a < n and np.isfinite(h[a]):
        use[cls[a]] += 1
        a = int(nxt[a])
    return h, use


def _lagrangian(inst: Instance, he, upper_bound: float, iterations: int = 30):
    """Prices on device classes (Lagrange multipliers of "each device at most once") by
    subgradient ascent. With them ``h_mu[b] - sum_c mu_c * (free devices of c)`` is a lower bound
    on the energy still to spend from a state (and a consistent one), often far tighter than
    ``he`` when the cheapest device would be needed more than once. Returns ``(mu, h_mu)`` or
    None when the relaxation already respects the counts."""
    ncls = len(inst.classes)
    cap = np.array([len(c) for c in inst.classes], dtype=np.float64)
    mu = np.zeros(ncls)
    h, use = _relaxed_energy(inst, mu)
    if np.all(use <= cap) or not np.isfinite(upper_bound):
        return None
    best = (h[0] - mu @ cap, mu.copy(), h)
    for _ in range(iterations):
        g = use - cap
        if not np.any(g > 0) and np.all(mu * g == 0):
            break
        val = h[0] - mu @ cap
        step = max(upper_bound - val, 1e-12 * abs(upper_bound)) / max(float(g @ g), 1.0)
        mu = np.maximum(0.0, mu + step * g)
        h, use = _relaxed_energy(inst, mu)
        val = h[0] - mu @ cap
        if val > best[0]:
            best = (val, mu.copy(), h)
    if best[0] <= he[0]:
        return None
    return best[1], best[2]


def solve_contiguous(inst: Instance, *, max_expansions: int = 200_000,
                     max_pending: int = 3_000_000, upper_bound: float = math.inf,
                     lagrangian: bool = True):
    """Exact A* (see the module docstring). Returns ``(assignment, stats)``; ``assignment`` is
    None when no plan satisfies the constraints, and ``stats['exact']`` is False when the search
    hit ``max_expansions`` or held more than ``max_pending`` successors before proving
    optimality. ``upper_bound``: the objective of a known plan; successors whose bound exceeds it
    are dropped (they cannot be better)."""
    n, cons = inst.n, inst.cons
    he, hm, ht = _heuristics(inst)
    stats = {"expansions": 0, "exact": True}
    if not np.isfinite(he[0]):
        return None, stats
    obj = cons.objective
    target = cons.latency_target_s
    ncls = len(inst.classes)
    lag = None
    if lagrangian and obj == "energy" and ncls > 1 and inst.n * ncls <= 20_000:
        lag = _lagrangian(inst, he, upper_bound)
    if lag is not None:
        mu, hmu = lag
        cap = np.array([len(c) for c in inst.classes], dtype=np.float64)
        cls_arr = np.array(inst.class_of)
        stats["lagrangian_bound"] = True

    def crit(ge, gm, gt):
        if obj == "energy":
            return (ge,) if target is None else (ge, gt)
        if obj == "max-device-energy":
            return (gm, ge) if target is None else (gm, ge, gt)
        return (gt, ge)

    def dominated(labels, c):
        return any(all(x <= y + 1e-15 * max(1.0, abs(y)) for x, y in zip(l, c)) for l in labels)

    tie = itertools.count()
    heap: list = []
    pending = [0]
    # a node: (a, counts, last, ge, gm, gt, parent, device)
    root = (0, (0,) * ncls, -1, 0.0, 0.0, 0.0, None, -1)
    closed: dict = {}

    def expand(node):
        a, counts, _, ge, gm, gt, _, prev = node
        bs, ds, es, ts = [], [], [], []
        for c in range(ncls):
            if counts[c] >= len(inst.classes[c]):
                continue
            d = inst.classes[c][counts[c]]
            ed = inst.edges(a, d)
            if ed is None:
                continue
            b, e, t = ed
            tin = inst.transfer_s(prev, d, a) if (prev >= 0 and inst.latency_matters) else 0.0
            if tin > inst.period:
                continue
            bs.append(b)
            ds.append(np.full(b.size, d))
            es.append(e)
            ts.append(t + tin)
        if not bs:
            return
        b = np.concatenate(bs)
        d = np.concatenate(ds)
        e = np.concatenate(es)
        t = np.concatenate(ts)
        ge2, gm2, gt2 = ge + e, np.maximum(gm, e), gt + t
        lt = gt2 + (inst.out_transfer_min(b) if inst.latency_matters else 0.0) + ht[b]
        keep = np.isfinite(ge2 + he[b])
        if target is not None:
            keep &= lt <= target * (1 + 1e-12)
        if obj == "energy":
            h = he[b]
            if lag is not None:  # the priced relaxation, with the child's free devices
                free = float(mu @ (cap - np.asarray(counts, dtype=np.float64)))
                h = np.maximum(h, hmu[b] - (free - mu[cls_arr[d]]))
            k1, k2 = ge2 + h, lt
        elif obj == "max-device-energy":
            k1, k2 = np.maximum(gm2, hm[b]), ge2 + he[b]
        else:
            k1, k2 = lt, ge2 + he[b]
        keep &= np.isfinite(k1) & (k1 <= upper_bound * (1 + 1e-9))
        idx = np.nonzero(keep)[0]
        if idx.size == 0:
            return
        order = idx[np.lexsort((-b[idx], k2[idx], k1[idx]))]
        D = d[order]
        child_counts = {}
        for dd in np.unique(D).tolist():
            cc = list(counts)
            cc[inst.class_of[dd]] += 1
            child_counts[dd] = tuple(cc)
        succ = (node, b[order], D, ge2[order], gm2[order], gt2[order], k1[order], k2[order],
                child_counts)
        heapq.heappush(heap, (float(succ[6][0]), float(succ[7][0]), next(tie), succ, 0))
        pending[0] += len(succ[1])

    single = obj == "energy" and target is None
    track_last = inst.track_last
    expand(root)
    while heap:
        _, _, _, succ, pos = heapq.heappop(heap)
        parent, B, D, GE, GM, GT, K1, K2, CC = succ
        if pos + 1 < len(B):
            heapq.heappush(heap, (K1[pos + 1].item(), K2[pos + 1].item(), next(tie), succ,
                                  pos + 1))
        b, d = B[pos].item(), D[pos].item()
        last = d if track_last else -1
        key = (b, CC[d], last)
        labels = closed.get(key)
        if single and labels:
            continue
        node = (b, CC[d], last, GE[pos].item(), GM[pos].item(), GT[pos].item(), parent, d)
        if b == n:
            stats["cost"] = {"energy_j": node[3], "max_device_energy_j": node[4],
                             "latency_s": node[5]}
            return _unwind(node, n), stats
        c = crit(node[3], node[4], node[5])
        if labels is None:
            labels = closed[key] = []
        elif dominated(labels, c):
            continue
        labels.append(c)
        stats["expansions"] += 1
        if stats["expansions"] > max_expansions or pending[0] > max_pending:
            stats["exact"] = False
            return None, stats
        expand(node)
    return None, stats


def _unwind(node, n):
    assignment = [0] * n
    while node[6] is not None:
        parent = node[6]
        for u in range(parent[0], node[0]):
            assignment[u] = node[7]
        node = parent
    return assignment


def solve_ordered(inst: Instance, order, *, use_all: bool = False, objective: str | None = None,
                  with_value: bool = False):
    """Exact optimum of contiguous stages on devices taken in the fixed ``order`` (each at most
    once, skipping allowed unless ``use_all``): a DP over (devices considered, unit prefix).
    ``objective`` 'energy' sums stage energies, 'max-device-energy' takes the largest (ties broken
    by the sum), 'latency' sums compute and transfer times (ties broken by energy). Returns the
    assignment or None."""
    n, k = inst.n, len(order)
    objective = objective or inst.cons.objective
    target = inst.cons.latency_target_s
    P = np.full((k + 1, n + 1), np.inf)  # primary
    S = np.full((k + 1, n + 1), np.inf)  # secondary
    T = np.full((k + 1, n + 1), np.inf)  # elapsed time
    L = np.full((k + 1, n + 1), -1, dtype=np.int64)  # last device used
    A = np.full((k + 1, n + 1), -1, dtype=np.int64)  # start of the last stage (-1: skipped)
    P[0, 0] = S[0, 0] = T[0, 0] = 0.0
    for j, d in enumerate(order):
        if not use_all:  # skip device j
            P[j + 1], S[j + 1], T[j + 1], L[j + 1] = P[j], S[j], T[j], L[j]
        for a in range(n):
            if not np.isfinite(P[j, a]):
                continue
            ed = inst.edges(a, d)
            if ed is None:
                continue
            b, e, t = ed
            last = int(L[j, a])
            tin = inst.transfer_s(last, d, a) if (last >= 0 and inst.latency_matters) else 0.0
            if tin > inst.period:
                continue
            tt = T[j, a] + t + tin
            if objective == "energy":
                cp, cs = P[j, a] + e, tt
            elif objective == "max-device-energy":
                cp, cs = np.maximum(P[j, a], e), S[j, a] + e
            else:
                cp, cs = tt, S[j, a] + e
            ok = np.ones(b.size, dtype=bool) if target is None else tt <= target
            better = ok & ((cp < P[j + 1, b]) | ((cp == P[j + 1, b]) & (cs < S[j + 1, b])))
            if better.any():
                bb = b[better]
                P[j + 1, bb], S[j + 1, bb], T[j + 1, bb] = cp[better], cs[better], tt[better]
                L[j + 1, bb], A[j + 1, bb] = d, a
    if not np.isfinite(P[k, n]):
        return None
    if with_value:
        return _backtrack(A, L, order, n, k), float(P[k, n])
    return _backtrack(A, L, order, n, k)


def _backtrack(A, L, order, n, k):
    assignment = [0] * n
    j, b = k, n
    while j > 0 and b > 0:
        a = int(A[j, b])
        if a >= 0:  # device order[j - 1] runs units [a, b)
            for u in range(a, b):
                assignment[u] = order[j - 1]
            b = a
        j -= 1
    return assignment


def _infeasible(model_profile, devices, cons):
    check_units_fit(model_profile, devices)
    low = [d.name for d in devices if usable_energy_j(d, cons.horizon_requests) <= 0]
    raise ValueError(
        "no plan satisfies the constraints: memory, each device's energy over "
        f"{cons.horizon_requests} request(s)" + (f", latency <= {cons.latency_target_s} s"
                                                 if cons.latency_target_s else "")
        + (f", throughput >= {cons.throughput_target}/s" if cons.throughput_target else "")
        + f"; devices: {', '.join(d.name for d in devices)}"
        + (f" (below E_min: {', '.join(low)})" if low else ""))


@register_planner("lapdtr")
def plan_lapdtr(model_profile, devices, cons: Constraints, *, max_expansions: int = 200_000,
                exclude=(), weights=None, strategy: str = "lapdtr"):
    """LAP-DTR assignment, exact: contiguous stages over any order / subset of devices.

    ``exclude``: device indices that may hold nothing; ``weights``: per-device multipliers of the
    energy in the objective (redistribution's penalty), budgets still use true energy."""
    inst = Instance(model_profile, devices, cons, exclude=exclude, weights=weights)
    # a feasible plan first (devices in order of energy per FLOP): its cost bounds the search
    order = sorted(range(inst.m), key=lambda d: (inst.jpf[d] * inst.weight[d], d))
    ordered = solve_ordered(inst, order, with_value=True)
    ub = ordered[1] if ordered else math.inf
    # a short search with the plain heuristic first (most instances end here), then the full one
    assignment, stats = solve_contiguous(inst, max_expansions=min(200, max_expansions),
                                         upper_bound=ub, lagrangian=False)
    if not stats["exact"]:
        assignment, stats = solve_contiguous(inst, max_expansions=max_expansions, upper_bound=ub)
    meta = {"solver": "astar", "exact": stats["exact"], "expansions": stats["expansions"],
            "device_classes": len(inst.classes)}
    if assignment is None and ordered is not None:
        # A* proved nothing beats the ordered plan, or stopped at its limit
        assignment = ordered[0]
        if not stats["exact"]:
            meta["solver"] = "ordered-dp (A* limit reached)"
    if assignment is None:
        _infeasible(model_profile, devices, cons)
    return build_pipeline_plan(model_profile, devices, assignment, strategy=strategy,
                               constraints=cons, meta=meta)


@register_planner("sequential", objectives=("max-device-energy", "energy", "latency"))
def plan_sequential(model_profile, devices, cons: Constraints):
    """Tang & Stefanov's sequential partitioning: one run of consecutive units per device, in rank
    order, every device used (while there are units), minimizing the largest per-device energy."""
    inst = Instance(model_profile, devices, cons)
    k = min(inst.m, inst.n)
    assignment = solve_ordered(inst, list(range(k)), use_all=True)
    if assignment is None:
        _infeasible(model_profile, devices, cons)
    return build_pipeline_plan(model_profile, devices, assignment, strategy="sequential",
                               constraints=cons, meta={"solver": "ordered-dp", "exact": True})
