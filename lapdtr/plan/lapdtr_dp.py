"""``lapdtr``: the optimum over contiguous stages, each on a different device, the devices in any
order and any subset — exact, or within a certified optimality gap — and ``sequential``, Tang &
Stefanov's consecutive partitions.

Problem. Cut the units into contiguous stages and give every stage its own device, minimizing
total energy (compute + communication, ``energy``), the largest per-device energy
(``max-device-energy``) or the end-to-end latency (``latency``), subject to: each device's memory;
each device's usable energy over the horizon, ``horizon * E_stage <= E_i - E_min``; an optional
end-to-end latency target; an optional throughput target (every stage's compute and every transfer
within ``1 / throughput``).

Algorithm (:func:`solve`), the DPs vectorized over device classes with numpy:

1. *Relaxation.* The same problem with "each device at most once" dropped is a shortest path over
   unit positions, solved exactly by a backward and a forward dynamic program (``he``: least
   energy, ``ht``: least time, with range minima from sparse tables, O(n C log W) for n units, C
   device classes, stages of up to W units; ``hm``: least bottleneck). Its value is a lower bound.
2. *Plans (upper bounds).* The relaxed optimum's stages matched to distinct devices by a
   min-cost assignment (``scipy.optimize.linear_sum_assignment``), the best plan with devices in a
   fixed order (cheapest per FLOP first, any subset; a DP over (devices considered, unit prefix)),
   and alternations of the two (re-match the stages, re-cut for the matched device order) until
   neither improves. For ``max-device-energy``: the least threshold at which devices taking the
   longest stage within it cover the model, bottleneck matching, and a local search over device
   orders (swap two, move an unused one in).
3. *Lagrangian bound.* For the additive objectives (energy; latency when every link is alike and
   there is no latency target) the rule "each device at most once" is priced: with a price
   ``mu_c >= 0`` per use of device class c, ``h_mu(0) - sum_c mu_c * |c|`` is a lower bound for
   every ``mu``. The prices come from column generation (the master LP over the relaxed paths
   found so far, solved by HiGHS; each pricing step is the relaxed DP with prices), so the bound
   converges to the LP relaxation of the problem, which is often tight — on 64 distinct devices x
   1000 units it usually meets the best plan, proving it optimal without a search; relaxed paths
   that use each device at most once are plans themselves. For ``max-device-energy`` a cover
   bound: at a threshold T each device holds one stage of at most its longest stage within T
   (memory and the stage's transfers counted), and the stages must hold all the FLOPs.
4. *Pruning.* A stage ``[a, b)`` on class c is dropped when ``forward(a) + cost + backward(b)`` —
   with the plain and with the priced relaxations — exceeds the pruning threshold (below): no plan
   under the threshold uses it. For ``max-device-energy`` stages whose energy exceeds the threshold
   are dropped. Bounds computed on the stages kept hold for the plans under the threshold, so
   they certify ``min(bound, threshold)``.
5. *A\\* search* over states ``(next unit, devices used)`` on the stages kept; an edge puts units
   ``[a, b)`` on one more device; the heuristic is the largest of the relaxation, the priced
   relaxation minus the prices of the devices still free, and (``max-device-energy``) the least
   threshold at which the free devices can hold the FLOPs left — admissible and consistent, so
   the first goal popped is optimal (for the latency target, labels are Pareto sets over
   (objective, latency)). Devices with identical profiles (and, when latency matters, identical
   links) are interchangeable, so a state keeps only how many of each class are used. Successors
   are generated lazily in order of their priority.

Certified gap. ``gap_tol`` (default 0: exact) lets the search prune at ``UB / (1 + gap_tol)``
(``UB``: the best plan's objective): whatever is pruned or left unexplored costs at least the
threshold or its priority, so when the search empties, or stops at ``max_expansions`` expanded
states or ``max_pending`` queued successors, the certified lower bound is the largest of the
relaxation, the Lagrangian or cover bound and ``min(threshold, least priority still queued)``.
The plan's meta says ``exact`` (the bound meets the plan's objective, up to 1e-9 relative float
rounding), ``lower_bound``, ``objective_value`` (what was minimized: the weighted energy when
``weights`` are given) and ``gap = (objective_value - lower_bound) / lower_bound`` (0 when exact).
The tests check exact plans, the bounds and the gaps against exhaustive search. Energy and latency
on the benchmark's device sets (4 kinds, 64 distinct, 64 fully varied; up to 1000 units) are
solved exactly in seconds. ``max-device-energy`` over many distinct devices stays hard: small
instances (8 x 100) are exact, 64 distinct devices x 1000 units stop at the search limits with a
certified gap of a few percent.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math

import numpy as np

from ..energy.analytical import find_link
from .cost import (Constraints, MissingLinkError, build_pipeline_plan, check_units_fit,
                   memory_limit, missing_links, usable_energy_j)
from .registry import register_planner
from .result import SolveResult
from .throughput import solve_ordered_throughput, solve_throughput

__all__ = ["Instance", "SolveResult", "solve", "solve_contiguous", "solve_ordered", "plan_lapdtr",
           "plan_sequential"]

_REL = 1e-9  # "no worse than" slack, relative: costs are sums of float terms
_LB_SAFETY = 1e-10  # certified lower bounds are lowered by this (relative) for DP float rounding
_INF = math.inf


class Instance:
    """Arrays of one planning problem: prefix sums over units, per-device rates, reachable ends,
    per-class stage-cost tables (a stage ``[a, b)`` on class c costs ``G[c, b] + K[c, a]``)."""

    def __init__(self, model_profile, devices, cons: Constraints, *, latency_matters=None,
                 exclude=(), weights=None, allowed_ends=None):
        units = model_profile.units
        self.devices = devices
        self.cons = cons
        self.n = n = len(units)
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
            latency_matters = (cons.objective in ("latency", "throughput")
                               or cons.latency_target_s is not None
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
                        lat[a, b], bw[a, b] = link.latency_s, link.bytes_per_s
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
        self.maxend = _maxend_all(self.param_b, self.peak_b, self.mem)
        # stage boundaries allowed (HyPS split points); the model's end always is
        self.allowed_ends = None if allowed_ends is None else np.asarray(allowed_ends, dtype=bool)
        self._edges: dict = {}
        self._cache_left = 4_000_000  # edge entries kept (about 100 MB)
        self._tables()

    def _tables(self):
        """Per-class arrays of the vectorized DPs (class c is represented by its first device)."""
        n = self.n
        F = self.F
        # bytes a stage [a, b) receives (IN[a]) and sends (OUT[b]); the model's ends exchange none
        self.IN = np.zeros(n + 1)
        self.IN[1:n] = self.in_b[1:n]
        self.OUT = np.zeros(n + 1)
        self.OUT[1:n] = self.out_b[:n - 1]
        # least transfer time into a stage starting at b, i.e. after one ending there (0 at the
        # model's end)
        self.XO = np.zeros(n + 1)
        if self.latency_matters and n > 1:
            self.XO[1:n] = self.lat_min + self.in_b[1:n] / self.bw_max
        ends = np.ones(n + 1, dtype=bool)
        if self.allowed_ends is not None:
            ends[:n] = self.allowed_ends[:n]
        ends[0] = False
        self.ends_ok = ends
        rep = np.array([c[0] for c in self.classes], dtype=np.int64)
        self.rep = rep
        self.cap = np.array([len(c) for c in self.classes], dtype=np.float64)
        self.c_jpf, self.c_epb, self.c_spf = self.jpf[rep], self.epb[rep], self.spf[rep]
        self.c_w, self.c_budget = self.weight[rep], self.budget[rep]
        alpha, beta = (self.c_w * self.c_jpf)[:, None], (self.c_w * self.c_epb)[:, None]
        with np.errstate(invalid="ignore"):
            self.Ge = alpha * F[None, :] + beta * self.OUT[None, :]
            self.Ke = -alpha * F[None, :] + beta * self.IN[None, :]
            self.Gt = self.c_spf[:, None] * F[None, :] + self.XO[None, :]
            self.Kt = -self.c_spf[:, None] * F[None, :]
        self.Ge[:, ~ends] = np.inf
        self.Gt[:, ~ends] = np.inf
        # base windows: b in [a + 1, hi[c, a]] (memory exact; budget and period widened by one
        # and checked exactly by the masks)
        C = len(rep)
        a = np.arange(n)
        hi = self.maxend[rep].astype(np.int64)
        self.c_mask = np.zeros(C, dtype=bool)  # rows whose stages need the exact checks
        for c in range(C):
            bud = self.c_budget[c]
            if bud == -np.inf:
                hi[c] = a
                continue
            if math.isfinite(bud) and self.c_jpf[c] > 0:
                room = (bud - self.c_epb[c] * self.IN[:n]) / self.c_jpf[c]
                room = np.maximum(room, 0.0) * (1 + 1e-9)
                hi[c] = np.minimum(hi[c], np.searchsorted(F, F[:n] + room, side="right"))
            if math.isfinite(self.period):
                room = self.period / self.c_spf[c] * (1 + 1e-9)
                hi[c] = np.minimum(hi[c], np.searchsorted(F, F[:n] + room, side="right"))
            if math.isfinite(bud) or math.isfinite(self.period):
                self.c_mask[c] = True
        self.base_hi = np.clip(hi, a, n)

    def stage_ok(self, c, a, b):
        """Exact budget and period checks of stages ``[a, b)`` on class c (``b`` an array)."""
        flops = self.F[b] - self.F[a]
        comm = (self.in_b[a] if a > 0 else 0.0) + np.where(b < self.n, self.OUT[b], 0.0)
        e = self.c_jpf[c] * flops + self.c_epb[c] * comm
        return (e <= self.c_budget[c]) & (self.c_spf[c] * flops <= self.period)

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

    def _compute_edges(self, a: int, d: int, lo: int | None = None, hi: int | None = None):
        top = int(self.maxend[d, a])
        lo = a + 1 if lo is None else max(lo, a + 1)
        hi = top if hi is None else min(hi, top)
        if hi < lo:
            return None
        b = np.arange(lo, hi + 1)
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
        """Lower bound on the transfer time leaving a stage that ends at b (``transfer_s`` of
        the next stage's input)."""
        return self.XO[b]

    def evaluate(self, assignment):
        """``(weighted energy, largest weighted stage energy, latency)`` of a contiguous
        assignment, with the search's own arithmetic; None when it breaks a constraint (memory,
        energy, period, latency target, allowed ends, a device used twice)."""
        if assignment is None or len(assignment) != self.n:
            return None
        stages = _stages(assignment)
        if len({d for d, _, _ in stages}) != len(stages):
            return None
        ge = gm = gt = 0.0
        prev = -1
        for d, a, b in stages:
            if b > self.maxend[d, a]:
                return None
            ed = self._compute_edges(a, d, b, b)
            if ed is None:
                return None
            e, t = float(ed[1][0]), float(ed[2][0])
            tin = self.transfer_s(prev, d, a) if (prev >= 0 and self.latency_matters) else 0.0
            if tin > self.period:
                return None
            ge, gm, gt = ge + e, max(gm, e), gt + t + tin
            prev = d
        target = self.cons.latency_target_s
        if target is not None and gt > target * (1 + 1e-12):
            return None
        return ge, gm, gt


def _stages(assignment):
    """``[(device, a, b)]``: maximal runs of one device."""
    out = []
    for u, d in enumerate(assignment):
        if out and out[-1][0] == d:
            out[-1][2] = u + 1
        else:
            out.append([d, u, u + 1])
    return [tuple(s) for s in out]


def _maxend_all(param_b, peak_b, mem):
    """``maxend[d, a]``: the largest b with units [a, b) within device d's memory (parameters plus
    the largest peak), by a vectorized binary search per distinct memory size."""
    n, m = len(param_b), len(mem)
    out = np.zeros((m, n), dtype=np.int64)
    if n == 0:
        return out
    P = np.concatenate([[0.0], np.cumsum(param_b)])
    levels = [peak_b]
    while 2 ** len(levels) <= n:
        prev, s = levels[-1], 2 ** (len(levels) - 1)
        levels.append(np.maximum(prev[:-s], prev[s:]) if prev.size > s else prev[:0])
    a = np.arange(n)

    def fits(lo_a, b, cap):
        length = b - lo_a
        ok = length <= 0
        pos = ~ok
        if pos.any():
            aa, bb, ll = lo_a[pos], b[pos], length[pos]
            k = np.floor(np.log2(ll)).astype(np.int64)
            mx = np.empty(aa.size)
            for lv in np.unique(k):
                sel = k == lv
                tab = levels[lv]
                mx[sel] = np.maximum(tab[aa[sel]], tab[bb[sel] - 2 ** lv])
            ok[pos] = P[bb] - P[aa] + mx <= cap
        return ok

    cache = {}
    for d in range(m):
        cap = float(mem[d])
        if cap not in cache:
            if cap == math.inf:
                cache[cap] = np.full(n, n, dtype=np.int64)
            else:
                lo, hi = a.copy(), np.full(n, n, dtype=np.int64)
                while True:
                    act = lo < hi
                    if not act.any():
                        break
                    mid = np.where(act, (lo + hi + 1) // 2, lo)
                    ok = fits(a, mid, cap)
                    lo = np.where(act & ok, mid, lo)
                    hi = np.where(act & ~ok, mid - 1, hi)
                cache[cap] = lo
        out[d] = cache[cap]
    return out


def _log2_floor(x):
    """``floor(log2(x))`` of positive integers (an array)."""
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    y = x.copy()
    for s in (32, 16, 8, 4, 2, 1):
        big = y >= (1 << s)
        out += np.where(big, s, 0)
        y = np.where(big, y >> s, y)
    return out


class _Windows:
    """The stages kept: ``[a, b)`` on class c for ``lo[c, a] <= b <= hi[c, a]``, minus those the
    exact budget / period checks of the masked classes (``inst.c_mask``) reject."""

    def __init__(self, inst: Instance, lo, hi):
        self.inst = inst
        self.lo, self.hi = lo, hi
        ne = hi >= lo
        self.arcs = int(np.sum(np.where(ne, hi - lo + 1, 0)))
        self.maxlen = int(max(1, np.max(np.where(ne, hi - lo + 1, 0), initial=0)))
        self._rows = None
        self._masks: dict = {}
        self._mmasks: dict = {}
        self._keep = True

    @classmethod
    def base(cls, inst: Instance):
        n = inst.n
        lo = np.broadcast_to(np.arange(1, n + 1), (len(inst.classes), n)).copy()
        return cls(inst, lo, inst.base_hi.copy())

    def _index(self):
        n = self.inst.n
        ne = self.hi >= self.lo
        self._rows = [np.flatnonzero(ne[:, a]) for a in range(n)]
        self.b0 = np.zeros(n, dtype=np.int64)
        self.span = np.zeros(n, dtype=np.int64)
        size = 0
        for a, r in enumerate(self._rows):
            if r.size:
                b0, b1 = int(self.lo[r, a].min()), int(self.hi[r, a].max())
                self.b0[a], self.span[a] = b0, b1 - b0 + 1
                size += r.size * (b1 - b0 + 1)
        self._keep = size <= 3_000_000

    @property
    def rows(self):
        """Per start a, the classes with stages from a."""
        if self._rows is None:
            self._index()
        return self._rows

    def slab(self, a: int, masked_only: bool = False):
        """``(rows, b0, mask)``: the classes with stages from a (only the masked classes when
        ``masked_only``), the first end, and which of the ends ``b0 .. b0 + span - 1`` each row
        keeps; ``(None, 0, None)`` when there are none."""
        cache = self._mmasks if masked_only else self._masks
        hit = cache.get(a)
        if hit is not None:
            return hit
        rows = self.rows[a]
        inst = self.inst
        if masked_only:
            rows = rows[inst.c_mask[rows]]
        if rows.size == 0:
            out = (None, 0, None)
            cache[a] = out
            return out
        b0 = int(self.lo[rows, a].min())
        span = int(self.hi[rows, a].max()) - b0 + 1
        cols = b0 + np.arange(span)
        M = (cols >= self.lo[rows, a][:, None]) & (cols <= self.hi[rows, a][:, None])
        for i in np.flatnonzero(inst.c_mask[rows]):
            M[i] &= inst.stage_ok(rows[i], a, np.minimum(cols, inst.n))
        out = (rows, b0, M)
        if self._keep or masked_only:
            cache[a] = out
        return out


class _RangeMin:
    """Sparse table of the row-wise minima of ``V`` (rows x N): ``min V[r, l..h]`` in O(1)."""

    def __init__(self, V, maxlen: int):
        N = V.shape[1]
        tabs = [V]
        for j in range(1, max(1, int(maxlen).bit_length())):
            s = 1 << (j - 1)
            prev = tabs[-1]
            nxt = prev.copy()
            if N > s:
                nxt[:, :N - s] = np.minimum(prev[:, :N - s], prev[:, s:])
            tabs.append(nxt)
        self.T = np.stack(tabs)

    def query(self, rows, l, h):
        """Minima over ``[l, h]`` (arrays, ``l <= h``)."""
        j = _log2_floor(h - l + 1)
        return np.minimum(self.T[j, rows, l], self.T[j, rows, h - (1 << j) + 1])

    def first_le(self, rows, l, h, cut):
        """The first index in ``[l, h]`` whose value is <= cut, else -1."""
        ok = self.query(rows, l, h) <= cut
        L, H = l.copy(), h.copy()
        while True:
            act = ok & (L < H)
            if not act.any():
                break
            mid = (L + H) // 2
            good = self.query(rows, l, np.maximum(mid, l)) <= cut
            H = np.where(act & good, mid, H)
            L = np.where(act & ~good, mid + 1, L)
        return np.where(ok, L, -1)

    def last_le(self, rows, l, h, cut):
        """The last index in ``[l, h]`` whose value is <= cut, else -1."""
        ok = self.query(rows, l, h) <= cut
        L, H = l.copy(), h.copy()
        while True:
            act = ok & (L < H)
            if not act.any():
                break
            mid = (L + H + 1) // 2
            good = self.query(rows, np.minimum(mid, h), h) <= cut
            L = np.where(act & good, mid, L)
            H = np.where(act & ~good, mid - 1, H)
        return np.where(ok, L, -1)


def _backward(inst: Instance, win: _Windows, G, K, mu=None, mode="sum", path=False):
    """Relaxed DP from the end: ``h[a]``, the least cost of units [a, n) with classes reusable
    (stage ``[a, b)`` on c costs ``G[c, b] + K[c, a]`` plus ``mu[c]``; ``mode`` 'max': the largest
    stage cost). With ``path`` also the argmin stage end and class per position. Sum mode takes
    range minima from a sparse table built as the DP goes (O(C log W) per position)."""
    if mode == "max":
        return _backward_max(inst, win, G, K)
    n, C = inst.n, G.shape[0]
    h = np.full(n + 1, np.inf)
    h[n] = 0.0
    nxt = np.full(n + 1, -1, dtype=np.int64) if path else None
    cls = np.full(n + 1, -1, dtype=np.int64) if path else None
    lo, hi = win.lo.T, win.hi.T  # (n, C)
    length = hi - lo + 1
    masked = inst.c_mask
    valid = (length > 0) & ~masked[None, :]
    J = _log2_floor(np.maximum(length, 1))
    R2 = np.maximum(hi - (1 << J) + 1, 0)
    LV = max(1, win.maxlen.bit_length())
    # T[b, j, c] = min of G[c, b'] + h[b'] over b <= b' < b + 2^j (b' <= n); flat, with an inf
    # sentinel after the end for empty windows
    T = np.full((n + 2) * LV * C, np.inf)
    T3 = T[:(n + 1) * LV * C].reshape(n + 1, LV, C)
    ar = np.arange(C)
    sentinel = (n + 1) * LV * C
    i1 = np.where(valid, (np.minimum(lo, n) * LV + J) * C + ar, sentinel)
    i2 = np.where(valid, (R2 * LV + J) * C + ar, sentinel)
    KM = np.ascontiguousarray(K[:, :n].T) + (0.0 if mu is None else mu[None, :])
    GT = np.ascontiguousarray(G.T)
    steps = [(j, 1 << (j - 1)) for j in range(1, LV)]
    any_masked = bool(masked.any())

    def put(a, col):
        row = T3[a]
        row[0] = col
        for j, s in steps:
            if a + s <= n:
                np.minimum(row[j - 1], T3[a + s, j - 1], out=row[j])
            else:
                row[j] = row[j - 1]

    put(n, GT[n])
    for a in range(n - 1, -1, -1):
        v = np.minimum(T[i1[a]], T[i2[a]])
        mb = None
        if any_masked:
            rows, b0, M = win.slab(a, masked_only=True)
            if rows is not None:
                V = np.where(M, T3[b0:b0 + M.shape[1], 0, :][:, rows].T, np.inf)
                k = V.argmin(axis=1)
                v[rows] = V[np.arange(rows.size), k]
                mb = dict(zip(rows.tolist(), (b0 + k).tolist()))
        v += KM[a]
        i = int(v.argmin())
        ha = float(v[i])
        if ha < np.inf:
            h[a] = ha
            if path:
                if mb is not None and i in mb:
                    nxt[a] = mb[i]
                else:
                    l0, h0 = int(lo[a, i]), int(hi[a, i])
                    nxt[a] = l0 + int(np.argmin(T3[l0:h0 + 1, 0, i]))
                cls[a] = i
        put(a, GT[a] + ha)  # also when ha is inf: the upper levels still hold later minima
    return h, nxt, cls


def _backward_max(inst: Instance, win: _Windows, G, K):
    """Bottleneck relaxation: the least largest stage cost of units [a, n)."""
    n = inst.n
    h = np.full(n + 1, np.inf)
    h[n] = 0.0
    for a in range(n - 1, -1, -1):
        rows, b0, M = win.slab(a)
        if rows is None:
            continue
        span = M.shape[1]
        S = np.maximum(G[rows, b0:b0 + span] + K[rows, a][:, None], h[b0:b0 + span])
        h[a] = float(np.where(M, S, np.inf).min())
    return h, None, None


def _forward(inst: Instance, G, K, mu=None):
    """Relaxed DP from the start on the base windows: ``f[b]``, the least cost of units [0, b)
    with classes reusable (the starts of stages ending at b form an interval per class, since
    memory reach grows with the start)."""
    n, C = inst.n, G.shape[0]
    f = np.full(n + 1, np.inf)
    f[0] = 0.0
    masked = inst.c_mask
    hi = inst.base_hi  # (C, n), non-decreasing in a for the unmasked classes
    Lf = np.stack([np.searchsorted(hi[c], np.arange(n + 1), side="left") for c in range(C)]).T
    b_idx = np.arange(n + 1)[:, None]
    length = b_idx - Lf  # starts Lf .. b-1
    valid = (length > 0) & ~masked[None, :]
    J = _log2_floor(np.maximum(length, 1))
    L2 = np.minimum(Lf + (1 << J) - 1, n)
    maxlen = int(max(1, length.max(initial=1)))
    LV = max(1, maxlen.bit_length())
    # T[a, j, c] = min of f[a'] + K[c, a'] + mu[c] over a - 2^j < a' <= a (a' >= 0)
    T = np.full((n + 2) * LV * C, np.inf)
    T3 = T[:(n + 1) * LV * C].reshape(n + 1, LV, C)
    ar = np.arange(C)
    sentinel = (n + 1) * LV * C
    i1 = np.where(valid, ((b_idx - 1).clip(0) * LV + J) * C + ar, sentinel)
    i2 = np.where(valid, (L2 * LV + J) * C + ar, sentinel)
    KM = np.ascontiguousarray(K[:, :n].T) + (0.0 if mu is None else mu[None, :])
    GT = np.ascontiguousarray(G.T)
    steps = [(j, 1 << (j - 1)) for j in range(1, LV)]
    any_masked = bool(masked.any())
    acc = np.full((C, n + 1), np.inf) if any_masked else None
    win = _Windows.base(inst) if any_masked else None
    for a in range(n + 1):
        if a > 0:
            v = np.minimum(T[i1[a]], T[i2[a]])
            if any_masked:
                v = np.minimum(v, acc[:, a])
            v += GT[a]
            f[a] = float(v.min())
        if a == n:
            break
        x = KM[a] + f[a]
        row = T3[a]
        row[0] = x
        for j, s in steps:
            if a - s >= 0:
                np.minimum(row[j - 1], T3[a - s, j - 1], out=row[j])
            else:
                row[j] = row[j - 1]
        if any_masked and f[a] < np.inf:
            rows, b0, M = win.slab(a, masked_only=True)
            if rows is not None:
                span = M.shape[1]
                acc[rows, b0:b0 + span] = np.minimum(acc[rows, b0:b0 + span],
                                                     np.where(M, x[rows][:, None], np.inf))
    return f


def _prune(inst: Instance, win: _Windows, G, K, f, h, thr, mu=None, const=0.0, mode="sum"):
    """The windows without the stages no plan of objective <= ``thr`` uses: sum mode keeps
    ``[a, b)`` on c when ``f[a] + cost + mu[c] + h[b] - const <= thr``; max mode when the stage
    cost and ``h[b]`` are <= thr. Each window shrinks to the first and last end kept."""
    n, C = inst.n, G.shape[0]
    if mode == "sum":
        V = G + h[None, :]
        MU = np.zeros(C) if mu is None else mu
        cut = thr - (f[None, :n] + K[:, :n] + MU[:, None] - const)
        reach = (f[:n] + h[:n] - const <= thr)[None, :]
    else:
        V = np.where((h <= thr)[None, :], G, np.inf)
        cut = thr - K[:, :n]
        reach = np.ones((1, n), dtype=bool)
    lo, hi = win.lo, win.hi
    sel = (hi >= lo) & reach & np.isfinite(cut)
    rr, aa = np.nonzero(sel)
    new_lo = np.broadcast_to(np.arange(1, n + 1), lo.shape).copy()
    new_hi = np.broadcast_to(np.arange(n), hi.shape).copy()
    if rr.size:
        rmq = _RangeMin(V, win.maxlen)
        l, hh, c = lo[rr, aa], hi[rr, aa], cut[rr, aa]
        first = rmq.first_le(rr, l, hh, c)
        keep = first >= 0
        rr, aa, l, hh, c, first = rr[keep], aa[keep], l[keep], hh[keep], c[keep], first[keep]
        last = rmq.last_le(rr, first, hh, c)
        new_lo[rr, aa], new_hi[rr, aa] = first, last
    return _Windows(inst, new_lo, new_hi)


def _ordered(inst: Instance, win: _Windows, order, objective: str):
    """The best plan with devices taken in ``order`` (each at most once, any skipped), on the
    stages of ``win``: a DP over (devices considered, unit prefix), vectorized over stages.
    ``objective`` 'energy' | 'max-device-energy' (ties: the sum) | 'latency' (ties: energy); the
    latency target and transfers are respected. For energy without latency constraints each
    device's layer is a range minimum over the base windows. Returns an assignment or None."""
    n, k = inst.n, len(order)
    target = inst.cons.latency_target_s
    P = np.full(n + 1, np.inf)
    S = np.full(n + 1, np.inf)
    T = np.full(n + 1, np.inf)
    L = np.full(n + 1, -1, dtype=np.int64)
    P[0] = S[0] = T[0] = 0.0
    starts = np.full((k, n + 1), -1, dtype=np.int64)
    fast = objective == "energy" and not inst.latency_matters and target is None
    Lf = {}
    bb_all = np.arange(1, n + 1)
    for j, d in enumerate(order):
        c = inst.class_of[d]
        if fast and not inst.c_mask[c]:
            if c not in Lf:
                Lf[c] = np.searchsorted(inst.base_hi[c], bb_all, side="left")
            X = np.where(np.isfinite(P[:n]), P[:n] + inst.Ke[c, :n], np.inf)
            if not np.isfinite(X).any():
                continue
            lo_a = Lf[c]
            has = lo_a < bb_all  # starts lo_a .. b-1
            if not has.any():
                continue
            bsel = bb_all[has]
            val, arg = _range_argmin(X, lo_a[has], bsel - 1)
            cand = val + inst.Ge[c, bsel]
            better = cand < P[bsel]
            if better.any():
                b2, a2 = bsel[better], arg[better]
                P[b2] = cand[better]
                T[b2] = T.copy()[a2] + inst.spf[d] * (inst.F[b2] - inst.F[a2])
                S[b2] = T[b2]
                L[b2] = d
                starts[j, b2] = a2
            continue
        lo_c, hi_c = win.lo[c], win.hi[c]
        aa = np.flatnonzero(np.isfinite(P[:n]) & (hi_c >= lo_c))
        if aa.size == 0:
            continue
        lo = lo_c[aa]
        span = int((hi_c[aa] - lo).max()) + 1
        B = lo[:, None] + np.arange(span)
        valid = B <= hi_c[aa][:, None]
        B = np.minimum(B, n)
        valid &= inst.ends_ok[B]
        flops = inst.F[B] - inst.F[aa][:, None]
        comm = inst.IN[aa][:, None] + inst.OUT[B]
        e_true = inst.jpf[d] * flops + inst.epb[d] * comm
        t = inst.spf[d] * flops
        valid &= (e_true <= inst.budget[d]) & (t <= inst.period)
        e = e_true * inst.weight[d]
        tin = np.zeros(aa.size)
        if inst.latency_matters:
            last = L[aa]
            has = (last >= 0) & (aa > 0)
            if has.any():
                tin[has] = inst.lat[last[has], d] + inst.in_b[aa[has]] / inst.bw[last[has], d]
            valid &= (tin <= inst.period)[:, None]
        tt = T[aa][:, None] + t + tin[:, None]
        if target is not None:
            valid &= tt <= target
        if objective == "energy":
            p, s = P[aa][:, None] + e, tt
        elif objective == "max-device-energy":
            p, s = np.maximum(P[aa][:, None], e), S[aa][:, None] + e
        else:
            p, s = tt, S[aa][:, None] + e
        ia, ib = np.nonzero(valid)
        if ia.size == 0:
            continue
        bf, pf, sf, tf = B[ia, ib], p[ia, ib], s[ia, ib], tt[ia, ib]
        o = np.lexsort((sf, pf, bf))
        first = o[np.r_[True, bf[o][1:] != bf[o][:-1]]]
        bb = bf[first]
        better = (pf[first] < P[bb]) | ((pf[first] == P[bb]) & (sf[first] < S[bb]))
        if better.any():
            sel, bsel = first[better], bb[better]
            P[bsel], S[bsel], T[bsel], L[bsel] = pf[sel], sf[sel], tf[sel], d
            starts[j, bsel] = aa[ia[sel]]
    if not np.isfinite(P[n]):
        return None
    assignment = [0] * n
    j, b = k - 1, n
    while b > 0:
        a = int(starts[j, b])
        if a >= 0:
            for u in range(a, b):
                assignment[u] = order[j]
            b = a
        j -= 1
    return assignment


def _range_argmin(X, l, h):
    """Minimum and its index of ``X[l..h]`` for every pair of (arrays) ``l <= h``."""
    N = X.size
    vals, idxs = [X], [np.arange(N)]
    maxlen = int((h - l).max()) + 1
    for j in range(1, max(1, maxlen.bit_length())):
        s = 1 << (j - 1)
        pv, pi = vals[-1], idxs[-1]
        nv, ni = pv.copy(), pi.copy()
        if N > s:
            right = pv[s:] < pv[:N - s]
            nv[:N - s] = np.where(right, pv[s:], pv[:N - s])
            ni[:N - s] = np.where(right, pi[s:], pi[:N - s])
        vals.append(nv)
        idxs.append(ni)
    V, I = np.stack(vals), np.stack(idxs)
    j = _log2_floor(h - l + 1)
    r = h - (1 << j) + 1
    v1, v2 = V[j, l], V[j, r]
    take2 = v2 < v1
    return np.where(take2, v2, v1), np.where(take2, I[j, r], I[j, l])


class _Best:
    """The best plan so far, by (objective, tie-break)."""

    def __init__(self, inst: Instance, objective: str):
        self.inst, self.objective = inst, objective
        self.assignment, self.key, self.cost = None, (_INF, _INF), None
        self.source = None

    def offer(self, assignment, source: str) -> bool:
        cost = self.inst.evaluate(assignment)
        if cost is None:
            return False
        ge, gm, gt = cost
        key = {"energy": (ge, gt), "max-device-energy": (gm, ge), "latency": (gt, ge)}[
            self.objective]
        if key < self.key:
            self.assignment, self.key, self.cost, self.source = list(assignment), key, cost, source
            return True
        return False

    @property
    def value(self) -> float:
        return self.key[0]


def _repair(inst: Instance, stages, kind: str):
    """The stages ``[(a, b)]`` matched to distinct devices at least cost (linear sum
    assignment; ``kind`` 'energy' or 'time'); None when no matching is feasible."""
    from scipy.optimize import linear_sum_assignment

    k, m = len(stages), inst.m
    if k == 0 or k > m:
        return None
    cost = np.full((k, m), np.inf)
    for s, (a, b) in enumerate(stages):
        ok = (inst.maxend[:, a] >= b) & (inst.budget > -np.inf)
        if not ok.any():
            return None
        flops = inst.F[b] - inst.F[a]
        comm = inst.IN[a] + inst.OUT[b]
        e = inst.jpf * flops + inst.epb * comm
        t = inst.spf * flops
        ok &= (e <= inst.budget) & (t <= inst.period)
        if kind == "time":
            val = t + inst.XO[b]
        else:
            val = e * inst.weight
        cost[s, ok] = val[ok]
    if kind == "bottleneck":  # least largest stage cost first, then the least sum
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_bipartite_matching

        vals = np.unique(cost[np.isfinite(cost)])
        lo, hi = 0, vals.size - 1
        if vals.size == 0:
            return None

        def match(t):
            g = csr_matrix((cost <= t).astype(np.int8))
            return np.all(maximum_bipartite_matching(g, perm_type="column") >= 0)

        if not match(vals[hi]):
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if match(vals[mid]):
                hi = mid
            else:
                lo = mid + 1
        cost = np.where(cost <= vals[hi], cost, np.inf)
    big = np.where(np.isfinite(cost), cost, 0.0).max() * (k + 1) + 1.0
    rows, cols = linear_sum_assignment(np.where(np.isfinite(cost), cost, big))
    if not np.all(np.isfinite(cost[rows, cols])):
        return None
    assignment = [0] * inst.n
    for s, d in zip(rows, cols):
        a, b = stages[s]
        for u in range(a, b):
            assignment[u] = int(d)
    return assignment


def _improve(inst: Instance, win: _Windows, best: _Best, kind: str, rounds: int = 6):
    """Alternate: re-match the best plan's stages to devices, re-cut for its device order."""
    if best.objective == "max-device-energy":
        kind = "bottleneck"
    for _ in range(rounds):
        cur = best.assignment
        if cur is None:
            return
        st = _stages(cur)
        changed = False
        a1 = _repair(inst, [(a, b) for _, a, b in st], kind)
        if a1 is not None and best.offer(a1, "matching"):
            changed = True
        a2 = _ordered(inst, win, [d for d, _, _ in _stages(best.assignment)], best.objective)
        if a2 is not None and best.offer(a2, "ordered-dp"):
            changed = True
        if not changed:
            return


def _path_stages(nxt, cls, n):
    out, a = [], 0
    while 0 <= a < n:
        b = int(nxt[a])
        if b <= a:
            return None
        out.append((int(cls[a]), a, b))
        a = b
    return out


def _lagrangian(inst: Instance, win: _Windows, G, K, kind: str, best: _Best, closed,
                max_iter: int = 80):
    """Prices on device classes by column generation (see the module docstring). Returns
    ``(bound, mu, h_mu)`` for the best bound found (``mu`` None when prices never beat the plain
    relaxation). Relaxed paths that respect the class sizes, and their re-matched stages, are
    offered to ``best``."""
    from scipy.optimize import linprog

    cap = inst.cap
    C = cap.size
    mu = np.zeros(C)
    cols_c, cols_u = [], []
    scale = None
    out = None
    best_bound = -np.inf
    for it in range(max_iter):
        h, nxt, cls = _backward(inst, win, G, K, mu, path=True)
        if not h[0] < np.inf:
            break
        bound = float(h[0] - mu @ cap)
        if bound > best_bound:
            best_bound = bound
            out = (bound, mu.copy(), h)
        st = _path_stages(nxt, cls, inst.n)
        if st is None:
            break
        use = np.bincount([c for c, _, _ in st], minlength=C).astype(np.float64)
        pcost = float(h[0] - sum(mu[c] for c, _, _ in st))
        if np.all(use <= cap):
            # a plan: give the stages of each class distinct members
            taken = {}
            assignment = [0] * inst.n
            for c, a, b in st:
                d = inst.classes[c][taken.get(c, 0)]
                taken[c] = taken.get(c, 0) + 1
                for u in range(a, b):
                    assignment[u] = d
            best.offer(assignment, "lagrangian")
        elif it < 8 or it % 4 == 0:
            rep = _repair(inst, [(a, b) for _, a, b in st], kind)
            if rep is not None:
                best.offer(rep, "matching")
        if closed(best_bound):
            break
        if scale is None:
            scale = max(abs(pcost), 1e-300)
        cols_c.append(pcost / scale)
        cols_u.append(use)
        # master LP over the columns so far plus the best plan (and a costly empty column that
        # keeps it feasible); its capacity duals are the next prices
        U = np.array(cols_u).T
        cc = list(cols_c)
        if best.assignment is not None:
            bu = np.bincount([inst.class_of[d] for d, _, _ in _stages(best.assignment)],
                             minlength=C).astype(np.float64)
            U = np.column_stack([U, bu])
            cc.append(best.value / scale)
        art = (best.value if best.value < _INF else 10 * abs(pcost) + 1.0) / scale
        U = np.column_stack([U, np.zeros(C)])
        cc.append(art * 2.0)
        live = np.flatnonzero(U.max(axis=1) > cap)
        if live.size == 0:
            break
        res = linprog(np.array(cc), A_ub=U[live], b_ub=cap[live], A_eq=np.ones((1, len(cc))),
                      b_eq=[1.0], bounds=(0, None), method="highs")
        if res.status != 0:
            break
        new = np.zeros(C)
        new[live] = np.maximum(0.0, -np.asarray(res.ineqlin.marginals)) * scale
        lp = float(res.fun) * scale
        if bound >= lp - 1e-12 * abs(lp) or np.allclose(new, mu, rtol=1e-12, atol=0.0):
            break  # the LP bound is reached
        mu = new
    if out is None:
        return None
    return out


def _walk(inst: Instance, order, T: float):
    """Devices in ``order``, each taking the longest stage within T (memory, energy budget,
    period, allowed ends): the assignment when they cover the model, else None."""
    n = inst.n
    a, assignment = 0, [0] * n
    for d in order:
        if a >= n:
            break
        hi = int(inst.maxend[d, a])
        if hi <= a:
            continue
        b = np.arange(a + 1, hi + 1)
        flops = inst.F[b] - inst.F[a]
        e = inst.jpf[d] * flops + inst.epb[d] * (inst.IN[a] + inst.OUT[b])
        ok = (e <= inst.budget[d]) & (inst.spf[d] * flops <= inst.period) & inst.ends_ok[b]
        ok &= e * inst.weight[d] <= T
        last = np.flatnonzero(ok)
        if last.size == 0:
            continue
        bb = int(b[last[-1]])
        assignment[a:bb] = [d] * (bb - a)
        a = bb
    return assignment if a >= n else None


def _greedy_bottleneck(inst: Instance, order, lo_t: float, hi_t: float, iters: int = 40):
    """A plan for ``max-device-energy``: the least threshold (bisection) at which ``_walk`` with
    ``order`` covers the model."""
    best = _walk(inst, order, hi_t)
    if best is None:
        return None
    for _ in range(iters):
        if hi_t <= lo_t * (1 + 1e-6):
            break
        mid = math.sqrt(lo_t * hi_t) if lo_t > 0 else hi_t / 2
        got = _walk(inst, order, mid)
        if got is None:
            lo_t = mid
        else:
            best, hi_t = got, mid
    return best


def _order_search(inst: Instance, win, best, lb: float, work: int = 40_000):
    """Local search for ``max-device-energy`` over device orders: swap two devices, or move an
    unused one in, whenever ``_walk`` then covers the model below the best plan's largest stage
    energy; each success is re-cut exactly (``_ordered``). ``work`` bounds the device steps
    walked (deterministic)."""
    if best.assignment is None:
        return
    rate = inst.jpf * inst.weight
    m = inst.m
    spent = 0

    def current_order():
        used = [d for d, _, _ in _stages(best.assignment)]
        rest = sorted(set(range(m)) - set(used), key=lambda d: (rate[d], d))
        return used, rest

    improved = True
    while improved and spent < work:
        improved = False
        used, rest = current_order()
        order = used + rest
        T = best.value * (1 - 1e-9)
        k = len(used)
        moves = [("swap", i, j) for i in range(k) for j in range(i + 1, m)]
        moves += [("insert", j, i) for j in range(k, m) for i in range(k + 1)]
        for kind, i, j in moves:
            if spent >= work:
                break
            o = list(order)
            if kind == "swap":
                o[i], o[j] = o[j], o[i]
            else:
                d = o.pop(i)
                o.insert(j, d)
            spent += k + 1
            got = _walk(inst, o, T)
            if got is None:
                continue
            best.offer(got, "order-search")
            g = _greedy_bottleneck(inst, o, max(lb, 1e-300), best.value, iters=20)
            spent += 20 * (k + 1)
            if g is not None:
                best.offer(g, "order-search")
            exact = _ordered(inst, win, o, "max-device-energy")
            if exact is not None:
                best.offer(exact, "order-search")
            improved = True
            break


def _cover_bound(inst: Instance, lo_t: float, hi_t: float, iters: int = 50) -> float:
    """A lower bound on the least largest (weighted) stage energy. At a threshold T each device
    runs at most one stage, of at most ``phi_c(T)`` FLOPs: its longest stage within T and its
    memory from any start (receiving its input, sending at least the least output) — plus, once
    per plan, the extra FLOPs of the first stage (which receives nothing) and of the last (which
    sends nothing). The stages hold all the model's FLOPs, so ``sum_c |c| phi_c(T) + bonuses <
    F_total`` proves T too small (unless one device holds the whole model within T)."""
    n, F = inst.n, inst.F
    total = F[n]
    if n < 2 or not total > 0 or not hi_t > lo_t:
        return lo_t
    alpha = inst.c_w * inst.c_jpf
    beta = inst.c_w * inst.c_epb
    IN, OUT = inst.IN, inst.OUT
    out_min = float(OUT[1:n].min())
    starts = np.arange(1, n)
    # ends within memory: middle stages end before n
    hi_mid = np.minimum(inst.base_hi[:, 1:n], n - 1)  # (C, n - 1), for starts 1..n-1
    hi_first = np.minimum(inst.base_hi[:, 0], n - 1)  # the first stage (start 0), not the whole
    steps = 8

    def longest(c, a, cap_b, comm_in, T):
        """The FLOPs of the longest stage from starts ``a`` (array) within T, ends <= cap_b."""
        if alpha[c] > 0:
            room = (T - beta[c] * (comm_in + out_min)) / alpha[c]
            reach = np.searchsorted(F, F[a] + np.maximum(room, 0.0) * (1 + 1e-9),
                                    side="right") - 1
            b = np.where(room >= 0, np.minimum(cap_b, reach), a)
        else:
            b = np.where(beta[c] * (comm_in + out_min) <= T * (1 + 1e-9), cap_b, a)
        b = np.maximum(b, a)
        # step down past ends whose own outgoing bytes break T (the bound stays valid: ends
        # beyond b cannot be within T, and the last end tried bounds those below it)
        for _ in range(steps):
            bad = (b > a) & (alpha[c] * (F[b] - F[a]) + beta[c] * (comm_in + OUT[b])
                             > T * (1 + 1e-9))
            if not bad.any():
                break
            b = np.where(bad, b - 1, b)
        return F[b] - F[a]

    whole = [c for c in range(alpha.size) if inst.base_hi[c, 0] >= n]

    def feasible(T):
        if any(alpha[c] * total <= T for c in whole):
            return True
        s, bonus_first, bonus_last = 0.0, 0.0, 0.0
        for c in range(alpha.size):
            if inst.cap[c] == 0 or inst.c_budget[c] == -np.inf:
                continue
            mid = longest(c, starts, hi_mid[c], IN[1:n], T)
            phi = float(mid.max(initial=0.0))
            s += inst.cap[c] * phi
            first = float(longest(c, np.array([0]), np.array([hi_first[c]]), 0.0, T)[0])
            bonus_first = max(bonus_first, first - phi)
            # last stage: start a with the model's end in memory, nothing sent
            ok = inst.base_hi[c, 1:n] >= n
            if ok.any() and alpha[c] > 0:
                a = starts[ok]
                fl = F[n] - F[a]
                within = alpha[c] * fl + beta[c] * IN[a] <= T * (1 + 1e-9)
                if within.any():
                    bonus_last = max(bonus_last, float(fl[within].max()) - phi)
        return s + bonus_first + bonus_last >= total

    if feasible(lo_t):
        return lo_t
    for _ in range(iters):
        mid = (lo_t + hi_t) / 2
        if feasible(mid):
            hi_t = mid
        else:
            lo_t = mid
        if hi_t - lo_t <= 1e-7 * hi_t:
            break
    return lo_t


def solve(inst: Instance, *, gap_tol: float = 0.0, max_expansions: int = 200_000,
          max_pending: int = 1_000_000, upper_bound: float = _INF, lagrangian: bool = True,
          heuristics: bool = True, short_search: bool = True) -> SolveResult:
    """The contiguous-stage optimum of ``inst`` (see the module docstring), or a plan within the
    certified ``gap_tol``. ``upper_bound``: the objective of a plan the caller already holds (the
    result's assignment is None, and ``exact`` True, when nothing beats it);
    ``heuristics`` False skips this function's own plans (the A* alone, with the bounds);
    ``short_search``: on small instances try 200 expansions with the plain relaxation before the
    Lagrangian bound (most end there)."""
    if not (gap_tol >= 0 and math.isfinite(gap_tol)):
        raise ValueError(f"gap_tol must be a finite number >= 0, got {gap_tol!r}")
    n, cons = inst.n, inst.cons
    obj = cons.objective
    target = cons.latency_target_s
    stats = {"expansions": 0}
    win = _Windows.base(inst)
    he, nxt, cls = _backward(inst, win, inst.Ge, inst.Ke, path=True)
    if not he[0] < np.inf:
        return SolveResult(None, exact=True, lower_bound=_INF, objective_value=_INF,
                           solver="relaxation (infeasible)", stats=stats)
    additive_time = obj == "latency" and inst.uniform_links and target is None
    ht = None
    if inst.latency_matters:
        ht, tnxt, tcls = _backward(inst, win, inst.Gt, inst.Kt, path=additive_time)
        if additive_time:
            nxt, cls = tnxt, tcls
        if not ht[0] < np.inf:
            return SolveResult(None, exact=True, lower_bound=_INF, objective_value=_INF,
                               solver="relaxation (infeasible)", stats=stats)
    hm = None
    best = _Best(inst, obj)
    ncls = len(inst.classes)

    def threshold(tol=True):  # prune above: what is left is proven to cost at least this
        v = min(best.value, upper_bound)
        return v * (1 + _REL) if gap_tol == 0 or not tol else v / (1 + gap_tol) * (1 + _REL)

    cut = [_INF]  # the least threshold stages were pruned at: bounds computed on the windows
    # left hold only for the plans in them, so they certify min(bound, cut)

    def prune(*args, **kw):
        cut[0] = min(cut[0], args[6])
        return _prune(*args, **kw)

    def closed(bound):
        v = min(best.value, upper_bound)
        return bound >= v * (1 - _REL) or (gap_tol > 0
                                           and bound >= v / (1 + gap_tol) * (1 + _REL))

    if obj == "energy":
        G, K, kind, h0 = inst.Ge, inst.Ke, "energy", he
    elif obj == "latency":
        G, K, kind, h0 = inst.Gt, inst.Kt, "time", ht
    else:
        G, K, kind, h0 = inst.Ge, inst.Ke, "energy", None
    additive = obj == "energy" or additive_time
    rate = inst.spf if obj == "latency" else inst.jpf * inst.weight
    order = sorted(range(inst.m), key=lambda d: (rate[d], d))
    if additive:
        lb = float(h0[0])
        if heuristics:  # the relaxed optimum's stages on distinct devices
            st = _path_stages(nxt, cls, n)
            if st is not None:
                rep = _repair(inst, [(a, b) for _, a, b in st], kind)
                if rep is not None:
                    best.offer(rep, "matching")
        f0 = _forward(inst, G, K)
        if threshold(False) < _INF:
            win = prune(inst, win, G, K, f0, h0, threshold(False))
        if heuristics:
            a0 = _ordered(inst, win, order, obj)
            if a0 is not None:
                best.offer(a0, "ordered-dp")
            if best.assignment is not None and target is None:
                _improve(inst, win, best, kind)
    elif obj == "max-device-energy":
        e_max = float(np.max(inst.c_w * inst.c_jpf)) * inst.F[n] + float(
            np.max(inst.c_w * inst.c_epb)) * float(np.sum(inst.IN) + np.sum(inst.OUT))
        lb = float(_cover_bound(inst, 0.0, max(e_max, 1e-300) * 2))
        if heuristics and target is None and not inst.latency_matters:
            g = _greedy_bottleneck(inst, order, lb, max(e_max, 1e-300) * 2)
            if g is not None:
                best.offer(g, "bottleneck-greedy")
        zero = np.zeros(n + 1)
        if threshold(False) < _INF:
            win = prune(inst, win, G, K, None, zero, threshold(False), mode="max")
        if heuristics:
            a0 = _ordered(inst, win, order, obj)
            if a0 is not None:
                best.offer(a0, "ordered-dp")
            if best.assignment is not None and target is None:
                _improve(inst, win, best, kind, rounds=20)
                if not inst.latency_matters:
                    _order_search(inst, win, best, lb)
                    _improve(inst, win, best, kind, rounds=20)
            if threshold(False) < _INF:
                win = prune(inst, win, G, K, None, zero, threshold(False), mode="max")
        hm = _backward_max(inst, win, G, K)[0]
        lb = max(lb, min(float(hm[0]), cut[0]))
        if threshold(False) < _INF:
            win = prune(inst, win, G, K, None, hm, threshold(False), mode="max")
    else:  # latency with a target or non-uniform links
        lb = float(ht[0])
        if heuristics:
            a0 = _ordered(inst, win, order, obj)
            if a0 is not None:
                best.offer(a0, "ordered-dp")
    lag = None
    astar_lb = None
    found = None

    def search(lag, max_exp, max_pend):
        nonlocal win
        thr = threshold()
        if additive and thr < _INF:
            if lag is not None:
                mu, hmu = lag[1], lag[2]
                fmu = _forward(inst, G, K, mu)
                win = prune(inst, win, G, K, fmu, hmu, thr, mu=mu, const=float(mu @ inst.cap))
            win = prune(inst, win, G, K, f0, h0, thr)
        stats["arcs"] = win.arcs
        got, st2 = _astar(inst, win, he, hm, ht, lag, kind, thr, max_exp, max_pend)
        stats["expansions"] += st2["expansions"]
        stats["search_limit"] = bool(st2.get("limit"))
        stats["pending"] = st2.get("pending", 0)
        if got is not None:
            best.offer(got, "astar")
        return got, st2

    # small instances: a short search with the plain heuristic first (most end there)
    if short_search and not closed(lb) and n * ncls <= 20_000:
        found, st2 = search(None, min(200, max_expansions), min(max_pending, 50_000))
        if not st2.get("limit"):
            astar_lb = st2["lower_bound"]
        else:
            lb = max(lb, min(st2["lower_bound"], min(best.value, upper_bound), cut[0]))
    if astar_lb is None and lagrangian and additive and ncls > 1 and not closed(lb):
        relaxed = _path_stages(nxt, cls, n)
        use_ok = relaxed is not None and np.all(
            np.bincount([c for c, _, _ in relaxed], minlength=ncls) <= inst.cap)
        if not use_ok:
            lag = _lagrangian(inst, win, G, K, kind, best, lambda x: closed(min(x, cut[0])))
            if lag is not None and min(lag[0], cut[0]) > lb:
                lb = min(lag[0], cut[0])
                stats["lagrangian_bound"] = True
            else:
                lag = None
            if best.assignment is not None and target is None:
                _improve(inst, win, best, kind)
    if astar_lb is None and not closed(lb):
        found, st2 = search(lag, max_expansions, max_pending)
        astar_lb = st2["lower_bound"]
    # the certificate
    v = min(best.value, upper_bound)
    if astar_lb is not None:
        lb = max(lb, min(astar_lb, v, cut[0]))
    lb = float(lb)
    stats["lower_bound_raw"] = lb
    lb_cert = lb * (1 - _LB_SAFETY) if lb > 0 else lb
    if not v < _INF:  # nothing found: proven infeasible unless the search stopped at a limit
        return SolveResult(None, exact=not stats.get("search_limit", False), lower_bound=lb_cert,
                           objective_value=_INF, solver="astar", stats=stats)
    exact = lb >= v * (1 - _REL)
    if exact:
        lb_cert = v
    if best.assignment is None or best.value > upper_bound:
        return SolveResult(None, exact=exact, lower_bound=lb_cert, objective_value=upper_bound,
                           solver="given", stats=stats)
    return SolveResult(best.assignment, exact=exact, lower_bound=lb_cert,
                       objective_value=best.value, solver=best.source, stats=stats)


def _astar(inst: Instance, win: _Windows, he, hm, ht, lag, kind, thr, max_expansions,
           max_pending):
    """A* over (next unit, class counts[, last device]) on the stages of ``win``, dropping
    successors whose priority exceeds ``thr``. Returns ``(assignment or None, stats)``;
    ``stats['lower_bound']``: what the search proves (``thr`` when it empties, the goal's cost
    when it pops one, the least queued priority when it stops at a limit)."""
    n, cons = inst.n, inst.cons
    obj = cons.objective
    target = cons.latency_target_s
    ncls = len(inst.classes)
    stats = {"expansions": 0, "lower_bound": thr}
    cap = inst.cap
    cls_arr = np.array(inst.class_of)
    if lag is not None:
        mu, hmu = lag[1], lag[2]
    cover = None
    if obj == "max-device-energy":
        # cover bound: the FLOPs left must fit the free devices, each running one stage of at
        # most min(T * FLOPs per joule, its longest stage kept) FLOPs within the largest stage
        # energy T: the least such T bounds what is left (a relaxation, and consistent)
        rate = inst.c_w * inst.c_jpf
        if np.all(rate > 0):
            inv = 1.0 / rate
            ne = win.hi >= win.lo
            reach = np.where(ne, inst.F[np.minimum(win.hi, n)] - inst.F[None, :n], 0.0)
            M = reach.max(axis=1, initial=0.0)
            rest = inst.F[n] - inst.F
            cover = (inv, M, rest)
    edge_cache: dict = {}

    def cover_bound(free, R):
        """The least T with sum_c free_c * min(T * inv_c, M_c) >= R (R an array)."""
        inv, M, _ = cover
        sel = free > 0
        if not sel.any():
            return np.where(R > 0, np.inf, 0.0)
        t = M[sel] / inv[sel]
        wi, wm = free[sel] * inv[sel], free[sel] * M[sel]
        o = np.argsort(t)
        t, wi, wm = t[o], wi[o], wm[o]
        after = np.concatenate([np.cumsum(wi[::-1])[::-1][1:], [0.0]])  # slope beyond t_k
        gk = np.concatenate([[0.0], np.cumsum(wm) + t * after])
        Tk = np.concatenate([[0.0], t])
        out = np.interp(R, gk, Tk)
        return np.where(R > gk[-1] * (1 + 1e-12), np.inf, out)

    def arcs(a, c, d):
        key = (a, c)
        hit = edge_cache.get(key, False)
        if hit is not False:
            return hit
        lo, hi = int(win.lo[c, a]), int(win.hi[c, a])
        ed = inst._compute_edges(a, d, lo, hi) if hi >= lo else None
        if not inst.track_last:
            edge_cache[key] = ed
        return ed

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
    ht_ = ht if ht is not None else np.zeros(n + 1)

    def expand(node):
        a, counts, _, ge, gm, gt, _, prev = node
        bs, ds, es, ts = [], [], [], []
        for c in win.rows[a].tolist():
            if counts[c] >= len(inst.classes[c]):
                continue
            d = inst.classes[c][counts[c]]
            ed = arcs(a, c, d)
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
        lt = gt2 + inst.XO[b] + ht_[b]
        keep = np.isfinite(ge2 + he[b])
        if target is not None:
            keep &= lt <= target * (1 + 1e-12)
        if lag is not None:  # the priced relaxation, with the child's free devices
            free = float(mu @ (cap - np.asarray(counts, dtype=np.float64)))
            hl = hmu[b] - (free - mu[cls_arr[d]])
        if obj == "energy":
            h = he[b] if lag is None else np.maximum(he[b], hl)
            k1, k2 = ge2 + h, lt
        elif obj == "max-device-energy":
            k1 = np.maximum(gm2, hm[b])
            if cover is not None:
                fr = cap - np.asarray(counts, dtype=np.float64)
                cc = cls_arr[d]
                hc = np.zeros(b.size)
                for c in np.unique(cc).tolist():
                    sel = cc == c
                    f2 = fr.copy()
                    f2[c] -= 1
                    hc[sel] = cover_bound(f2, cover[2][b[sel]])
                k1 = np.maximum(k1, hc)
            k2 = ge2 + he[b]
        else:
            if lag is not None:
                lt = gt2 + inst.XO[b] + np.maximum(ht_[b], hl)
            k1, k2 = lt, ge2 + he[b]
        keep &= np.isfinite(k1) & (k1 <= thr)
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
        k1top, _, _, succ, pos = heapq.heappop(heap)
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
            stats["lower_bound"] = k1top
            stats["pending"] = pending[0]
            return _unwind(node, n), stats
        c = crit(node[3], node[4], node[5])
        if labels is None:
            labels = closed[key] = []
        elif dominated(labels, c):
            continue
        labels.append(c)
        stats["expansions"] += 1
        if stats["expansions"] > max_expansions or pending[0] > max_pending:
            stats["lower_bound"] = min(thr, k1top)  # every open node's priority is >= k1top
            stats["limit"] = True
            stats["pending"] = pending[0]
            return None, stats
        expand(node)
    return None, stats


def solve_contiguous(inst: Instance, *, max_expansions: int = 200_000,
                     max_pending: int = 1_000_000, upper_bound: float = math.inf,
                     lagrangian: bool = True, gap_tol: float = 0.0):
    """The bounds and the A* of :func:`solve` from a plan the caller holds (objective
    ``upper_bound``), without this module's own plans. Returns ``(assignment, stats)``;
    ``assignment`` is None when no plan satisfies the constraints or none beats ``upper_bound``,
    and ``stats['exact']`` is False when the search stopped at a limit before proving it
    (``stats['lower_bound']``: the certified bound)."""
    r = solve(inst, gap_tol=gap_tol, max_expansions=max_expansions, max_pending=max_pending,
              upper_bound=upper_bound, lagrangian=lagrangian, heuristics=False,
              short_search=False)
    stats = dict(r.stats, exact=r.exact, lower_bound=r.lower_bound)
    return r.assignment, stats


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


def _objective_of(inst: Instance, assignment) -> float | None:
    """What ``inst`` minimizes, for ``assignment`` (None when it breaks a constraint)."""
    ev = inst.evaluate(assignment)
    if ev is None:
        return None
    return {"energy": ev[0], "max-device-energy": ev[1], "latency": ev[2]}[inst.cons.objective]


def _busier_tie(model_profile, devices, cons: Constraints, inst: Instance, r, exclude, weights):
    """Among plans as good as ``r`` under ``cons.objective``, one that leaves fewer devices idle:
    the least-period plan, when it ties (e.g. every device costs 0 J). None when there is none,
    or when the exact least-period solve would be large."""
    used = len(set(r.assignment))
    alive = [i for i in range(inst.m) if inst.budget[i] > -np.inf]
    if used >= min(len(alive), inst.n):
        return None
    work = (inst.n + 1) * math.prod(len(c) + 1 for c in inst.classes) * len(inst.classes)
    if work > 20_000:  # the least-period instance has at least these states: too large here
        return None
    tcons = Constraints(objective="throughput", latency_target_s=cons.latency_target_s,
                        throughput_target=cons.throughput_target,
                        horizon_requests=cons.horizon_requests)
    tinst = Instance(model_profile, devices, tcons, exclude=exclude, weights=weights)
    t = solve_throughput(tinst, max_work=20_000, exact_only=True)
    if t is None or t.assignment is None or len(set(t.assignment)) <= used:
        return None
    v = _objective_of(inst, t.assignment)
    if v is None or v > r.objective_value * (1 + _REL) + 1e-300:
        return None
    return t.assignment


def _solve(inst: Instance, *, gap_tol=0.0, max_expansions=200_000, max_pending=1_000_000):
    if inst.cons.objective == "throughput":
        return solve_throughput(inst)
    return solve(inst, gap_tol=gap_tol, max_expansions=max_expansions, max_pending=max_pending)


def _check_links(model_profile, devices, cons: Constraints, inst: Instance, r, exclude, weights,
                 **kw) -> None:
    """Links the objective depends on but the devices lack: plan as if the unlinked pairs of the
    devices that may hold units were joined by free links; when that finds a plan where there was
    none, or a better one, the missing links decide the plan: a ``MissingLinkError`` naming the
    pairs it crosses."""
    from ..profile.types import LinkProfile

    alive = [i for i in range(len(devices)) if inst.budget[i] > -np.inf]
    pairs = missing_links(devices, alive)
    if not pairs:
        return
    patched = [dataclasses.replace(d, links=list(d.links)) for d in devices]
    for i, j in pairs:
        patched[i].links.append(LinkProfile(peer=devices[j].name, bytes_per_s=math.inf,
                                            latency_s=0.0))
    rp = _solve(Instance(model_profile, patched, cons, exclude=exclude, weights=weights), **kw)
    if rp.assignment is None:
        return  # links are not what is missing
    if r.assignment is not None and rp.objective_value >= r.objective_value * (1 - _REL):
        return  # the links would not improve the plan
    need = {(min(p, d), max(p, d)) for p, d in zip(rp.assignment, rp.assignment[1:]) if p != d}
    crossed = [p for p in pairs if p in need] or pairs
    raise MissingLinkError([(devices[i].name, devices[j].name) for i, j in crossed])


@register_planner("lapdtr")
def plan_lapdtr(model_profile, devices, cons: Constraints, *, max_expansions: int = 200_000,
                max_pending: int = 1_000_000, gap_tol: float = 0.0, exclude=(), weights=None,
                strategy: str = "lapdtr"):
    """LAP-DTR assignment: contiguous stages over any order / subset of devices, exact (or within
    the certified ``gap_tol``; meta ``exact``, ``lower_bound``, ``gap``).

    ``exclude``: device indices that may hold nothing; ``weights``: per-device multipliers of the
    energy in the objective (redistribution's penalty; of the compute time for ``throughput``),
    budgets still use true energy. Objective ``throughput`` is solved by
    :func:`lapdtr.plan.throughput.solve_throughput`. For the other objectives, when the optimum
    leaves devices idle and the least-period plan is as good, that plan is taken (meta
    ``tie_break``): a device is left idle only when the objective prefers it."""
    inst = Instance(model_profile, devices, cons, exclude=exclude, weights=weights)
    kw = {"gap_tol": gap_tol, "max_expansions": max_expansions, "max_pending": max_pending}
    r = _solve(inst, **kw)
    if inst.latency_matters:
        _check_links(model_profile, devices, cons, inst, r, exclude, weights, **kw)
    if r.assignment is None:
        if not r.exact and cons.objective == "throughput":
            raise ValueError(
                "no plan found by the least-period heuristic (too many distinct devices for the "
                "exact DP) and none proven impossible; check memory and energy budgets, or "
                "group identical devices")
        if not r.exact:  # the search stopped before finding a plan or proving there is none
            raise ValueError(
                "no plan found within the search limits (max_expansions="
                f"{max_expansions}, max_pending={max_pending}) and none proven impossible; "
                "raise the limits or gap_tol")
        _infeasible(model_profile, devices, cons)
    assignment = r.assignment
    meta = {"solver": r.solver, "exact": bool(r.exact), "lower_bound": float(r.lower_bound),
            "objective_value": float(r.objective_value), "gap": float(r.gap),
            "gap_tol": float(gap_tol), "expansions": r.stats.get("expansions", 0),
            "device_classes": len(inst.classes)}
    if cons.objective != "throughput":
        busy = _busier_tie(model_profile, devices, cons, inst, r, exclude, weights)
        if busy is not None:
            assignment = busy
            v = float(_objective_of(inst, busy))
            # the gap is of the plan returned (where the search stopped early, the tie plan can
            # score better than the one it found)
            meta["objective_value"] = v
            meta["gap"] = float(SolveResult(busy, exact=r.exact, lower_bound=r.lower_bound,
                                            objective_value=v, solver=r.solver, stats={}).gap)
            meta["tie_break"] = "least period among the optimal plans"
    return build_pipeline_plan(model_profile, devices, assignment, strategy=strategy,
                               constraints=cons, meta=meta)


@register_planner("sequential", objectives=("max-device-energy", "energy", "latency",
                                            "throughput"))
def plan_sequential(model_profile, devices, cons: Constraints):
    """Tang & Stefanov's sequential partitioning: one run of consecutive units per device, in rank
    order, every device used (while there are units), minimizing the largest per-device energy
    (or the objective asked: ``throughput`` minimizes the pipeline's period)."""
    inst = Instance(model_profile, devices, cons)
    k = min(inst.m, inst.n)
    if cons.objective == "throughput":
        assignment = solve_ordered_throughput(inst, list(range(k)))
    else:
        assignment = solve_ordered(inst, list(range(k)), use_all=True)
    if assignment is None:
        _link_diagnosis_ordered(devices, k)
        _infeasible(model_profile, devices, cons)
    return build_pipeline_plan(model_profile, devices, assignment, strategy="sequential",
                               constraints=cons, meta={"solver": "ordered-dp", "exact": True})


def _link_diagnosis_ordered(devices, k: int) -> None:
    pairs = [(devices[i].name, devices[i + 1].name) for i in range(k - 1)
             if find_link(devices, i, i + 1) is None]
    if pairs:
        raise MissingLinkError(pairs)
