"""What an exact planner's solver returns: the assignment and its proof (certified lower bound,
gap), shared by the energy/latency DP (``lapdtr_dp``) and the period DP (``throughput``)."""
from __future__ import annotations

import math

__all__ = ["SolveResult"]


class SolveResult:
    """What :func:`solve` returns: the plan (assignment; None when infeasible) and its proof."""

    def __init__(self, assignment, *, exact, lower_bound, objective_value, solver, stats):
        self.assignment = assignment
        self.exact = exact
        self.lower_bound = lower_bound
        self.objective_value = objective_value
        self.solver = solver
        self.stats = stats

    @property
    def gap(self) -> float:
        if self.assignment is None:
            return 0.0
        if self.exact:
            return 0.0
        lb, v = self.lower_bound, self.objective_value
        if lb > 0:
            return max(0.0, (v - lb) / lb)
        return 0.0 if v <= lb else math.inf
