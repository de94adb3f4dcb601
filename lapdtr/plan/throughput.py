"""The ``throughput`` objective: the pipeline whose slowest step is fastest.

Contiguous stages on distinct devices stream requests; in steady state the pipeline finishes one
request per *period*: the largest of every stage's compute time (``flops / (gflops * 1e9)``) and
every boundary transfer's time (link latency + bytes / ``bytes_per_s``). A stage computes request
k + 1 while its output for request k is on the wire — the model ``throughput_target`` already
constrains. Minimizing the period maximizes requests per second, so on identical devices the
stages come out balanced. Ties (periods equal up to 1e-9, relative) go to the plan that uses the
most devices — a launched device stays busy unless giving it work lengthens the period — and then
to the least end-to-end latency. Redistribution's weights multiply a device's compute time.

Exact solver (:func:`solve_throughput`), over states (next unit, how many devices of each class are
used[, the last device when links differ]); devices with equal profiles and links are
interchangeable, so a state counts them instead of naming them:

1. a min-max dynamic program gives the least period ``P*`` (memory, energy budgets, allowed ends,
   the throughput target respected);
2. a second one, over the stages and transfers within ``P*``, gives the least latency per state;
   the plan is the goal state with the most stages, then the least latency.

With a latency target, (2) is repeated on the candidate periods (each a stage's compute or a
transfer time seen in (1)), bisected for the least one whose plan meets the target. The DPs visit
``(n + 1) * prod(|class| + 1)`` (times ``m`` with differing links) states; when that exceeds
``max_work`` (many distinct devices) a heuristic — devices in a few fixed orders, each taking the
longest stage within a bisected period — gives the plan and ``exact`` is False, with the lower
bound ``max(largest unit on its fastest device, total FLOPs / total FLOP/s)``.
"""
from __future__ import annotations

import math

import numpy as np

from .result import SolveResult

__all__ = ["solve_throughput", "pipeline_period_s"]

_REL = 1e-9


def pipeline_period_s(inst, assignment) -> float:
    """The period of a contiguous assignment with ``inst``'s arithmetic (weighted compute)."""
    best = 0.0
    prev, a = -1, 0
    n = inst.n
    while a < n:
        d = assignment[a]
        b = a
        while b < n and assignment[b] == d:
            b += 1
        t = inst.spf[d] * (inst.F[b] - inst.F[a]) * inst.weight[d]
        tin = inst.transfer_s(prev, d, a) if prev >= 0 else 0.0
        best = max(best, t, tin)
        prev, a = d, b
    return float(best)


class _Dp:
    """The state space of one instance: keys ``(class counts, last device or -1)``."""

    def __init__(self, inst):
        self.inst = inst
        self.C = len(inst.classes)
        self.cap = [len(c) for c in inst.classes]
        self.track = inst.track_last
        self.start = ((0,) * self.C, -1)

    def arcs(self, a, key):
        """``(key2, d, b, cost, time)`` of every stage starting at unit ``a`` from state ``key``:
        ``cost`` the stage's period term (weighted compute or its inbound transfer), ``time`` its
        compute plus inbound transfer."""
        inst = self.inst
        counts, last = key
        for c in range(self.C):
            if counts[c] >= self.cap[c]:
                continue
            d = inst.classes[c][counts[c]]
            ed = inst.edges(a, d)
            if ed is None:
                continue
            b, _, t = ed
            if a == 0:
                tin = 0.0
            elif self.track:
                tin = inst.transfer_s(last, d, a)
            else:
                tin = float(inst.XO[a])
            if not tin <= inst.period:
                continue
            cost = np.maximum(t * inst.weight[d], tin)
            cc = list(counts)
            cc[c] += 1
            yield (tuple(cc), d if self.track else -1), d, b, cost, t + tin

    def minmax(self, collect=False):
        """Least period reaching every state; ``collect``: also every stage cost seen."""
        n = self.inst.n
        V = {self.start: np.full(n + 1, np.inf)}
        V[self.start][0] = 0.0
        seen = []
        for a in range(n):
            for key in list(V):
                v = V[key][a]
                if not v < np.inf:
                    continue
                for key2, _, b, cost, _ in self.arcs(a, key):
                    if collect:
                        seen.append(cost)
                    row = V.get(key2)
                    if row is None:
                        row = V[key2] = np.full(n + 1, np.inf)
                    val = np.maximum(cost, v)
                    better = val < row[b]
                    row[b[better]] = val[better]
        best = min((row[n] for row in V.values()), default=np.inf)
        return float(best), (np.unique(np.concatenate(seen)) if seen else np.zeros(0))

    def least_latency(self, cap_s: float, target: float | None):
        """Among plans whose period is within ``cap_s`` (and latency within ``target``): the one
        with the most stages, then the least latency. Returns ``(assignment, latency)`` or
        ``(None, inf)``."""
        inst = self.inst
        n = inst.n
        lim = cap_s * (1 + _REL)
        L = {self.start: np.full(n + 1, np.inf)}
        L[self.start][0] = 0.0
        par = {self.start: (np.full(n + 1, -1), [None] * (n + 1), np.full(n + 1, -1))}
        for a in range(n):
            for key in list(L):
                v = L[key][a]
                if not v < np.inf:
                    continue
                for key2, d, b, cost, tm in self.arcs(a, key):
                    ok = cost <= lim
                    if not ok.any():
                        continue
                    b, val = b[ok], v + tm[ok]
                    row = L.get(key2)
                    if row is None:
                        row = L[key2] = np.full(n + 1, np.inf)
                        par[key2] = (np.full(n + 1, -1), [None] * (n + 1), np.full(n + 1, -1))
                    better = val < row[b]
                    if better.any():
                        bb = b[better]
                        row[bb] = val[better]
                        pa, pk, pd = par[key2]
                        pa[bb] = a
                        pd[bb] = d
                        for x in bb.tolist():
                            pk[x] = key
        goals = [(-sum(k[0]), float(row[n]), k) for k, row in L.items()
                 if row[n] < np.inf and (target is None or row[n] <= target * (1 + 1e-12))]
        if not goals:
            return None, math.inf
        _, lat, key = min(goals, key=lambda g: (g[0], g[1]))
        assignment = [0] * n
        b = n
        while b > 0:
            pa, pk, pd = par[key]
            a, d = int(pa[b]), int(pd[b])
            assignment[a:b] = [d] * (b - a)
            key, b = pk[b], a
        return assignment, lat


def _walk(inst, order, T: float):
    """Devices in ``order``, each taking the longest stage within period ``T`` (compute and its
    inbound transfer): the assignment when they cover the model, else None."""
    n = inst.n
    a, prev, assignment = 0, -1, [0] * n
    for d in order:
        if a >= n:
            break
        tin = inst.transfer_s(prev, d, a) if prev >= 0 else 0.0
        if not tin <= min(T, inst.period):
            continue
        ed = inst.edges(a, d)
        if ed is None:
            continue
        b, _, t = ed
        ok = np.flatnonzero(t * inst.weight[d] <= T)
        if ok.size == 0:
            continue
        bb = int(b[ok[-1]])
        assignment[a:bb] = [d] * (bb - a)
        a, prev = bb, d
    return assignment if a >= n else None


def _heuristic(inst, lb: float):
    alive = [d for d in range(inst.m) if inst.budget[d] > -np.inf]
    rate = inst.spf * inst.weight
    orders = [sorted(alive, key=lambda d: (rate[d], d)), alive]
    best, best_p = None, math.inf
    for order in orders:
        hi = math.inf
        got = _walk(inst, order, hi)
        if got is None:
            continue
        hi = pipeline_period_s(inst, got)
        lo = lb
        for _ in range(60):
            if hi <= lo * (1 + 1e-9):
                break
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
            g = _walk(inst, order, mid)
            if g is None:
                lo = mid
            else:
                got, hi = g, pipeline_period_s(inst, g)
        ev = inst.evaluate(got)
        if ev is not None and hi < best_p:
            best, best_p = got, hi
    return best, best_p


def _lower_bound(inst) -> float:
    alive = [d for d in range(inst.m) if inst.budget[d] > -np.inf]
    if not alive:
        return math.inf
    rate = inst.spf[alive] * inst.weight[alive]
    flops = np.diff(inst.F)
    unit = float(flops.max() * rate.min()) if flops.size else 0.0
    return max(unit, float(inst.F[-1] / np.sum(1.0 / rate)))


def solve_throughput(inst, *, max_work: int = 400_000, exact_only: bool = False):
    """The least-period plan of ``inst`` (an ``Instance`` built with ``latency_matters=True``); see
    the module docstring. ``max_work`` bounds ``(n + 1) * states * classes`` of the exact DPs;
    beyond it the heuristic runs, or with ``exact_only`` None is returned."""
    n, C = inst.n, len(inst.classes)
    target = inst.cons.latency_target_s
    keys = math.prod(len(c) + 1 for c in inst.classes) * (inst.m + 1 if inst.track_last else 1)
    stats = {"states_bound": keys}
    if (n + 1) * keys * C > max_work:
        if exact_only:
            return None
        lb = _lower_bound(inst)
        got, p = _heuristic(inst, lb)
        if got is None:
            return SolveResult(None, exact=False, lower_bound=lb, objective_value=math.inf,
                           solver="walk", stats=stats)
        exact = p <= lb * (1 + _REL)
        return SolveResult(got, exact=exact, lower_bound=p if exact else lb, objective_value=p,
                       solver="walk", stats=stats)
    dp = _Dp(inst)
    p_star, cands = dp.minmax(collect=target is not None)
    if not p_star < math.inf:
        return SolveResult(None, exact=True, lower_bound=math.inf, objective_value=math.inf,
                       solver="dp (infeasible)", stats=stats)
    assignment, _ = dp.least_latency(p_star, target)
    if assignment is None and target is not None:
        # the least candidate period whose capped least latency meets the target
        cands = cands[cands > p_star * (1 + _REL)]
        lo, hi = 0, cands.size - 1
        if hi < 0 or dp.least_latency(float(cands[hi]), target)[0] is None:
            return SolveResult(None, exact=True, lower_bound=math.inf, objective_value=math.inf,
                           solver="dp (infeasible)", stats=stats)
        while lo < hi:
            mid = (lo + hi) // 2
            if dp.least_latency(float(cands[mid]), target)[0] is not None:
                hi = mid
            else:
                lo = mid + 1
        assignment, _ = dp.least_latency(float(cands[hi]), target)
    p = pipeline_period_s(inst, assignment)
    return SolveResult(assignment, exact=True, lower_bound=p, objective_value=p, solver="dp",
                   stats=stats)


def solve_ordered_throughput(inst, order):
    """The least-period plan with one stage on each device of ``order``, in that order (every
    device used): a min-max DP over (device, unit prefix), then the least latency within it (with
    a latency target: the least candidate period whose plan meets it). None when none exists."""
    n, k = inst.n, len(order)
    target = inst.cons.latency_target_s

    def arcs(j, a):
        d = order[j]
        ed = inst.edges(a, d)
        if ed is None:
            return None
        b, _, t = ed
        tin = inst.transfer_s(order[j - 1], d, a) if j > 0 else 0.0
        if not tin <= inst.period:
            return None
        return b, np.maximum(t * inst.weight[d], tin), t + tin

    V = np.full((k + 1, n + 1), np.inf)
    V[0, 0] = 0.0
    seen = []
    for j in range(k):
        for a in np.flatnonzero(np.isfinite(V[j, :n])).tolist():
            got = arcs(j, a)
            if got is not None:
                b, cost, _ = got
                seen.append(cost)
                V[j + 1, b] = np.minimum(V[j + 1, b], np.maximum(cost, V[j, a]))
    if not V[k, n] < np.inf:
        return None

    def within(cap):
        lim = cap * (1 + _REL)
        L = np.full((k + 1, n + 1), np.inf)
        L[0, 0] = 0.0
        A = np.full((k + 1, n + 1), -1, dtype=np.int64)
        for j in range(k):
            for a in np.flatnonzero(np.isfinite(L[j, :n])).tolist():
                got = arcs(j, a)
                if got is None:
                    continue
                b, cost, tm = got
                ok = cost <= lim
                b, val = b[ok], L[j, a] + tm[ok]
                better = val < L[j + 1, b]
                L[j + 1, b[better]] = val[better]
                A[j + 1, b[better]] = a
        if not L[k, n] < np.inf or (target is not None and L[k, n] > target * (1 + 1e-12)):
            return None
        assignment, b = [0] * n, n
        for j in range(k, 0, -1):
            a = int(A[j, b])
            assignment[a:b] = [order[j - 1]] * (b - a)
            b = a
        return assignment

    got = within(float(V[k, n]))
    if got is not None or target is None:
        return got
    cands = np.unique(np.concatenate(seen))
    cands = cands[cands > V[k, n] * (1 + _REL)]
    if cands.size == 0 or within(float(cands[-1])) is None:
        return None
    lo, hi = 0, cands.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if within(float(cands[mid])) is not None:
            hi = mid
        else:
            lo = mid + 1
    return within(float(cands[hi]))
