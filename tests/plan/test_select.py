"""Profile selection (Algorithm 1) with the corrected score."""
from __future__ import annotations

import pytest

from lapdtr.plan.select import Candidate, select_profile

A = Candidate("cheap", accuracy=0.80, energy_j=1.0, latency_s=0.10)
B = Candidate("dear", accuracy=0.80, energy_j=2.0, latency_s=0.10)


def test_picks_the_cheaper_of_two_equally_accurate_profiles():
    for order in ([A, B], [B, A]):
        s = select_profile(order, w_acc=1.0, w_energy=1.0, w_latency=1.0)
        assert s.candidate.name == "cheap" and not s.fallback
        # the seed's plus sign rewards energy: it would pick the dearer profile
        assert select_profile(order, paper_sign=True).candidate.name == "dear"


def test_latency_is_penalized_too():
    fast = Candidate("fast", 0.8, 1.0, 0.05)
    slow = Candidate("slow", 0.8, 1.0, 0.50)
    assert select_profile([slow, fast]).candidate.name == "fast"


def test_accuracy_can_outweigh_energy():
    acc = Candidate("accurate", 0.95, 2.0, 0.1)
    s = select_profile([A, acc], w_acc=10.0, w_energy=1.0, w_latency=0.0)
    assert s.candidate.name == "accurate"
    assert s.scores["accurate"] == pytest.approx(9.5 - 1.0)
    assert s.scores["cheap"] == pytest.approx(8.0 - 0.5)


def test_constraint_filter_and_fallback():
    s = select_profile([A, B], constraints={"max_energy_j": 1.5})
    assert s.passed == ["cheap"]
    low = Candidate("low", 0.5, 0.1, 0.01)
    s = select_profile([low, B, A], constraints={"min_accuracy": 0.9})
    assert s.fallback and s.score is None
    assert s.candidate.name == "cheap"  # the most accurate; the cheaper on a tie


def test_dict_candidates_and_errors():
    s = select_profile([{"name": "x", "accuracy": 0.7, "energy_j": 1, "latency_s": 1}])
    assert s.candidate.name == "x" and s.index == 0
    with pytest.raises(ValueError, match="unknown key.*'energy'"):
        select_profile([{"accuracy": 0.7, "energy": 1, "latency_s": 1}])
    with pytest.raises(ValueError, match="missing key.*energy_j"):
        select_profile([{"accuracy": 0.7, "latency_s": 1}])
    with pytest.raises(ValueError, match="energy_j must be"):
        select_profile([Candidate("n", 0.7, -1.0, 1.0)])
    with pytest.raises(ValueError, match="constraints: unknown key.*'max_power'"):
        select_profile([A], constraints={"max_power": 1})
    with pytest.raises(ValueError, match="no candidate"):
        select_profile([])
    with pytest.raises(ValueError, match="w_energy"):
        select_profile([A], w_energy=-1)


def test_candidates_from_plans():
    from lapdtr.plan import create_plan

    from plan_instances import make_devices, make_model

    mp, devices = make_model(8, 1), make_devices(3, 1, mem_scale=100.0)
    plans = [create_plan(mp, devices, strategy=s) for s in ("lapdtr", "horizontal")]
    cands = [Candidate.from_plan(p, accuracy=0.8) for p in plans]
    s = select_profile(cands, w_acc=1.0, w_energy=1.0, w_latency=0.0)
    assert s.candidate.plan is plans[0]  # same accuracy, the exact planner spends least energy
