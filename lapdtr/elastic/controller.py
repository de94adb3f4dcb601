"""The width controller: a rank's remaining energy -> the width ratio its stages run at.

The rule is the corrected one of ../shared/SPEC.md ("Seed formulas lapdtr corrects"): the width
*grows* with the energy left, ``r = clip(E_i / E_max, r_min, 1)`` (the paper's
``h = h_max (1 - E_i/E_max)`` grows as energy falls, against its own text), then rounded to
the nearest width the layers can run (``allowed``: e.g. ``k/h`` for ``k = 1..h`` heads).

Energy counters are coarse and noisy (NVML's total-energy counter moves every 20-100 ms), so a
controller changes width only when the energy has clearly crossed the boundary of the next width
(``hysteresis``, a fraction of ``E_max``, either way) and at least ``min_dwell_s`` after its
last change; it never flaps on a reading that wobbles around a boundary.

Policies: ``linear`` (the rule above), ``threshold`` (steps: the ratio of the highest energy
fraction reached, e.g. ``[(0.6, 1.0), (0.3, 0.5)]``, and ``min_ratio`` below them), ``plan``
(the ratio the plan chose, whatever the energy).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import ElasticError, check_ratio

__all__ = ["WidthPolicy", "WidthController", "POLICIES"]

POLICIES = ("linear", "threshold", "plan")


@dataclass
class WidthPolicy:
    """How a rank's width follows its energy. ``steps`` (``threshold`` only): ``(energy
    fraction, ratio)`` pairs. ``plan_ratio`` (``plan`` only): the width of a controller used on
    its own, and of a run's plan built from ``cuts`` (no planner to choose one); in the
    runtime the ``plan`` policy runs each stage at its ``StagePlan.width``."""

    kind: str = "linear"
    min_ratio: float = 0.25
    steps: list = field(default_factory=list)
    hysteresis: float = 0.05
    min_dwell_s: float = 1.0
    plan_ratio: float = 1.0

    def validate(self) -> "WidthPolicy":
        if self.kind not in POLICIES:
            raise ElasticError(f"width policy: {self.kind!r} is not allowed; allowed: "
                               f"{list(POLICIES)}")
        check_ratio(self.min_ratio, "min_ratio")
        check_ratio(self.plan_ratio, "plan_ratio")
        for name in ("hysteresis", "min_dwell_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ElasticError(f"{name}: {v!r}; allowed: a number >= 0")
        if self.hysteresis >= 0.5:
            raise ElasticError(f"hysteresis: {self.hysteresis} of E_max would hold any width; "
                               "allowed: 0 <= hysteresis < 0.5")
        if self.kind == "threshold":
            if not self.steps:
                raise ElasticError("steps: the 'threshold' policy needs (energy fraction, ratio) "
                                   "pairs, e.g. [[0.6, 1.0], [0.3, 0.5]]")
            for i, st in enumerate(self.steps):
                if not isinstance(st, (list, tuple)) or len(st) != 2:
                    raise ElasticError(f"steps[{i}]: {st!r}; allowed: [energy fraction, ratio]")
                frac, ratio = st
                if isinstance(frac, bool) or not isinstance(frac, (int, float)) \
                        or not 0 <= frac <= 1:
                    raise ElasticError(f"steps[{i}]: energy fraction {frac!r}; allowed: 0..1")
                check_ratio(ratio, f"steps[{i}] ratio")
        elif self.steps:
            raise ElasticError(f"steps: only the 'threshold' policy takes steps (this is "
                               f"{self.kind!r})")
        return self


class WidthController:
    """One rank's width ratio over time. ``update(remaining_j, now_s)`` returns it.

    ``e_max_j``: the energy budget (E_max). ``allowed``: the ratios the rank's layers can run
    (default: any ratio); the controller's ratio is always one of them. ``history`` holds
    ``(time_s, ratio)`` at the start and at every change."""

    def __init__(self, policy: WidthPolicy, e_max_j: float, *, allowed=None):
        self.policy = policy.validate()
        if isinstance(e_max_j, bool) or not isinstance(e_max_j, (int, float)) or e_max_j <= 0:
            raise ElasticError(f"e_max_j: {e_max_j!r}; allowed: a positive energy budget in J")
        self.e_max_j = float(e_max_j)
        ratios = sorted({check_ratio(r, "allowed") for r in allowed}) if allowed else None
        if ratios is not None and not ratios:
            raise ElasticError("allowed: no width ratios given")
        self.allowed = ratios
        self.ratio: float | None = None
        self.changed_at = float("-inf")
        self.history: list[tuple[float, float]] = []

    def _snap(self, r: float) -> float:
        """The allowed ratio nearest ``r`` (ties to the smaller), among those at or above
        ``min_ratio`` where there are any: a head count rounded, as ``count_for`` rounds."""
        if self.allowed is None:
            return r
        ok = [a for a in self.allowed if a >= self.policy.min_ratio - 1e-12] or self.allowed
        return min(ok, key=lambda a: (abs(a - r), a))

    def target(self, fraction: float) -> float:
        """The ratio the policy gives at ``fraction`` = E_i / E_max, snapped to ``allowed``."""
        p = self.policy
        if p.kind == "plan":
            return self._snap(p.plan_ratio)
        if p.kind == "linear":
            r = min(1.0, max(p.min_ratio, fraction))
        else:
            r = p.min_ratio
            for frac, ratio in sorted(p.steps, key=lambda s: -s[0]):
                if fraction >= frac:
                    r = ratio
                    break
        return self._snap(r)

    def update(self, remaining_j: float | None, now_s: float) -> float:
        """The ratio for this moment, from the energy left (``None``: no meter, full width)."""
        if remaining_j is None:
            r = self._snap(1.0) if self.policy.kind != "plan" else self.target(1.0)
        else:
            frac = max(0.0, float(remaining_j)) / self.e_max_j
            r = self.target(frac)
            if self.ratio is not None and r != self.ratio:
                # only a clear crossing: the width must still change with the reading moved
                # ``hysteresis`` toward the current width, and the last change be old enough
                h = self.policy.hysteresis
                if r < self.ratio:
                    held = self.target(frac + h)
                    move = held < self.ratio
                else:
                    held = self.target(frac - h)
                    move = held > self.ratio
                if not move or now_s - self.changed_at < self.policy.min_dwell_s:
                    r = self.ratio
                else:
                    r = held
        if r != self.ratio:
            self.ratio = r
            self.changed_at = now_s
            self.history.append((now_s, r))
        return r
