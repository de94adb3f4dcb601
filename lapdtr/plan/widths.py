"""Planning with elastic widths: plans priced at a width as profiled, and Algorithm 1 choosing
the width, so a plan can trade accuracy for energy.

A profile made with ``profile_model(..., widths=...)`` holds every unit's FLOPs and latency at
each width, measured with ``torch.utils.flop_counter`` and timed (``UnitProfile.at_width``).

* :func:`plan_at_width` plans on the profile at one width (every stage runs it) and stamps the
  width on the plan's stages: the planner's energy, latency, memory and budget checks then use
  the FLOPs the units really execute at that width.
* :func:`plan_widths` is Algorithm 1 (``select_profile``) over the widths: one candidate plan
  per width the planner can place (a width whose plan breaks a device's energy budget, memory or
  a latency target has no candidate, and the reason is kept), scored by accuracy, energy and
  latency. Accuracy per width comes from the caller (e.g. ``lapdtr elastic-curve``'s JSON);
  without it the width ratio stands in for accuracy, and ``meta['width_selection']`` says so.
* :func:`plan_width` is the width a plan's stages were priced at, for re-planning
  (``redistribute`` keeps it).
"""
from __future__ import annotations

from .registry import create_plan
from .select import Candidate, select_profile
from .types import Plan

__all__ = ["plan_at_width", "plan_widths", "plan_width", "stamp_widths"]


def stamp_widths(plan: Plan, width: float, *, by_device: dict | None = None) -> Plan:
    """Set every stage's width: ``by_device[device]`` where given, else ``width``."""
    by_device = by_device or {}
    for s in plan.stages:
        s.width = float(by_device.get(s.device, width))
    plan.meta["width"] = float(width)
    return plan


def plan_width(plan: Plan) -> float:
    """The width a plan was priced at: ``meta['width']``, else its widest stage (a plan written
    by hand with several widths is priced, conservatively, at the widest)."""
    if "width" in plan.meta:
        return float(plan.meta["width"])
    return max((s.width for s in plan.stages), default=1.0)


def plan_at_width(model_profile, devices, width: float, **kw) -> Plan:
    """``create_plan`` on ``model_profile.at_width(width)``; every stage runs at ``width``.
    A width the profile lacks is a ``ValueError`` naming the profiled ones."""
    prof = model_profile.at_width(width)
    plan = create_plan(prof, devices, **kw)
    stamp_widths(plan, prof.width)
    plan.meta["width_priced"] = "measured per unit at this width (profile_model widths)"
    return plan


def plan_widths(model_profile, devices, *, widths=None, accuracy: dict | None = None,
                constraints=None, w_acc: float = 1.0, w_energy: float = 1.0,
                w_latency: float = 1.0, **kw) -> Plan:
    """Algorithm 1 over elastic widths (see the module docstring). ``widths``: the ratios to
    consider (default: every width in the profile); ``accuracy``: ``{width: accuracy}``;
    ``constraints``: ``SelectionConstraints`` (min accuracy, max energy and latency per
    request). Returns the chosen plan with ``meta['width_selection']``."""
    widths = list(model_profile.widths if widths is None else widths)
    if not widths:
        raise ValueError("plan_widths: no widths given; allowed: the profile's "
                         f"{model_profile.widths}")
    missing = [w for w in widths if not model_profile.has_width(w)]
    if missing:
        raise ValueError(f"plan_widths: width(s) {missing} were not profiled; profiled: "
                         f"{[round(w, 6) for w in model_profile.widths]}")

    def acc(w):
        if accuracy is None:
            return float(w)
        for k, v in accuracy.items():
            if abs(float(k) - w) <= 1e-6:
                return float(v)
        raise ValueError(f"plan_widths: no accuracy given for width {w:g}; given for "
                         f"{sorted(float(k) for k in accuracy)}")

    candidates, refused = [], {}
    for w in widths:
        try:
            plan = plan_at_width(model_profile, devices, w, **kw)
        except ValueError as e:  # this width has no plan: Algorithm 1 never sees it
            refused[f"{w:g}"] = str(e)
            continue
        candidates.append(Candidate.from_plan(plan, accuracy=acc(w), name=f"width {w:g}"))
    if not candidates:
        raise ValueError(f"plan_widths: no width has a plan on these devices: {refused}")
    sel = select_profile(candidates, w_acc=w_acc, w_energy=w_energy, w_latency=w_latency,
                         constraints=constraints)
    plan = sel.candidate.plan
    plan.meta["width_selection"] = {
        "chosen": plan.meta["width"], "fallback": sel.fallback, "passed": sel.passed,
        "scores": sel.scores,
        "accuracy_source": "given" if accuracy is not None else
        "width ratio (no accuracies given: a stand-in, not a measurement)",
        "candidates": [{"width": c.plan.meta["width"], "accuracy": c.accuracy,
                        "energy_j": c.energy_j, "latency_s": c.latency_s} for c in candidates],
        "refused": refused}
    return plan
