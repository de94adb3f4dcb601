"""Planner registry: ``register_planner(name)``, ``list_planners()``, ``create_plan(...)``.

A planner is a pure, CPU-only, deterministic function
``fn(model_profile, devices, constraints, **kw) -> Plan``; the device list order is the rank order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .cost import OBJECTIVES, Constraints, validate_inputs
from .idle import idle_ranks, warn_idle
from .types import Plan

__all__ = ["PlannerInfo", "register_planner", "list_planners", "get_planner", "create_plan"]


@dataclass
class PlannerInfo:
    name: str
    fn: Callable
    objectives: tuple[str, ...]
    description: str


_PLANNERS: dict[str, PlannerInfo] = {}


def register_planner(name: str, *, objectives: Sequence[str] = OBJECTIVES,
                     description: str = ""):
    """Decorator: register ``fn(model_profile, devices, constraints, **kw) -> Plan`` as ``name``,
    accepting the given objectives."""

    def deco(fn):
        if name in _PLANNERS:
            raise ValueError(f"planner {name!r} is registered twice")
        bad = [o for o in objectives if o not in OBJECTIVES]
        if bad:
            raise ValueError(f"planner {name!r}: unknown objectives {bad}; allowed: {OBJECTIVES}")
        doc = description or (fn.__doc__ or "").strip().splitlines()[0]
        _PLANNERS[name] = PlannerInfo(name, fn, tuple(objectives), doc)
        return fn

    return deco


def list_planners() -> list[str]:
    _load()
    return list(_PLANNERS)


def get_planner(name: str) -> PlannerInfo:
    _load()
    if name not in _PLANNERS:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(_PLANNERS)}")
    return _PLANNERS[name]


def _load() -> None:
    # the planner modules register themselves on import
    import importlib

    for mod in _PLANNER_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


_PLANNER_MODULES = ("lapdtr_dp", "greedy", "vertical", "cnn", "hyps")


def create_plan(model_profile, devices, *, strategy: str = "lapdtr", objective: str = "energy",
                latency_target_s: float | None = None, throughput_target: float | None = None,
                horizon_requests: int = 1, **kw) -> Plan:
    """Plan ``model_profile`` onto ``devices`` (list order = rank order) with ``strategy``.

    Unknown strategies or objectives, bad device figures, and memory that no device has are
    ``ValueError``s naming the culprit; a transfer between devices without a link is a
    ``MissingLinkError`` naming both. A plan that leaves devices idle says so with an
    ``IdleRanksWarning`` (and ``meta['idle_ranks']``). Extra keywords go to the planner.

    Objectives: ``energy`` (total J per request), ``max-device-energy`` (the largest device's J),
    ``latency`` (end-to-end s of one request) and ``throughput`` (the pipeline's period: its
    slowest stage or transfer; balanced stages over the devices, for runs that stream requests).
    """
    info = get_planner(strategy)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; allowed: {', '.join(OBJECTIVES)}")
    if objective not in info.objectives:
        raise ValueError(f"strategy {strategy!r} does not optimize objective {objective!r}; "
                         f"allowed for it: {', '.join(info.objectives)}")
    devices = list(devices)
    validate_inputs(model_profile, devices)
    cons = Constraints(objective=objective, latency_target_s=latency_target_s,
                       throughput_target=throughput_target, horizon_requests=horizon_requests)
    plan = info.fn(model_profile, devices, cons, **kw)
    idle = idle_ranks(plan, len(devices))
    plan.meta["idle_ranks"] = idle
    warn_idle(plan, devices, idle)
    return plan
