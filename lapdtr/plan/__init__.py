"""Planners: pure, CPU-only, deterministic functions of profiles -> ``Plan``.

``create_plan(model_profile, devices, strategy=..., objective=...)`` runs a registered planner
(``list_planners()``); ``redistribute`` re-plans after a low-energy, failure or overload event;
``select_profile`` is LAP-DTR's Algorithm 1 with the corrected score; ``plan_at_width`` /
``plan_widths`` plan at elastic widths (Algorithm 1 choosing the width); ``plan_summarized``
prices stage boundaries at a keep ratio and wire format (``summarized_profile``).
``idle_ranks(plan, world_size)`` lists launched ranks a plan leaves without work
(``create_plan`` warns with an ``IdleRanksWarning``); objective ``throughput`` balances a
pipeline over every device it can.
"""
from .cost import OBJECTIVES, Constraints, MissingLinkError
from .idle import IdleRanksWarning, idle_ranks
from .redistribute import EVENT_KINDS, RedistributionEvent, redistribute, unit_moves
from .registry import create_plan, get_planner, list_planners, register_planner
from .select import Candidate, Selection, SelectionConstraints, select_profile
from .summarized import (PIPELINE_STRATEGIES, BoundaryPricing, apply_summarization,
                         plan_summarized, price_boundaries, summarized_profile)
from .types import DevicePrediction, Plan, Shard, StagePlan
from .widths import plan_at_width, plan_width, plan_widths

__all__ = ["EVENT_KINDS", "OBJECTIVES", "Candidate", "Constraints", "DevicePrediction",
           "IdleRanksWarning", "MissingLinkError", "Plan", "RedistributionEvent", "Selection",
           "SelectionConstraints", "Shard", "StagePlan", "create_plan", "get_planner",
           "idle_ranks", "list_planners", "redistribute", "register_planner", "select_profile",
           "unit_moves", "plan_at_width", "plan_widths", "plan_width", "PIPELINE_STRATEGIES",
           "BoundaryPricing", "apply_summarization", "plan_summarized", "price_boundaries",
           "summarized_profile"]
