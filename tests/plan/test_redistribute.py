"""Dynamic task redistribution: excluded devices, kept ranks, moves, the lambda / E_i penalty."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lapdtr.plan import create_plan
from lapdtr.plan.redistribute import RedistributionEvent, redistribute

from plan_instances import make_devices, make_model, plant_feasible


def _setup(n=12, m=4, seed=0):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, mem_scale=3.0)
    for d in devices:
        d.energy_budget_j, d.energy_remaining_j, d.energy_min_j = 100.0, 50.0, 1.0
    return mp, devices, create_plan(mp, devices, strategy="lapdtr")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 16), m=st.integers(2, 4), seed=st.integers(0, 10**6),
       kind=st.sampled_from(["low_energy", "failure"]), k=st.integers(1, 2))
def test_hit_devices_hold_nothing_unless_no_plan_exists(n, m, seed, kind, k):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, mem_scale=2.0)
    for d in devices:
        d.energy_budget_j, d.energy_remaining_j, d.energy_min_j = 100.0, 50.0, 1.0
    plant_feasible(mp, devices, seed)  # a first plan exists by construction
    plan = create_plan(mp, devices, strategy="lapdtr")
    used = sorted({s.rank for s in plan.stages})
    hit = [devices[r].name for r in used[:k]]
    if kind == "low_energy":
        for d in devices:
            if d.name in hit:
                d.energy_remaining_j = 0.5  # below E_min
    try:
        new = redistribute(plan, mp, devices, RedistributionEvent(kind, hit))
    except ValueError as e:
        event("no plan without the hit devices")
        assert all(h in str(e) for h in hit)
        # no plan exists on the others: confirm with the planner itself
        rest = [d for d in devices if d.name not in hit]
        with pytest.raises(ValueError):
            if not rest:
                raise ValueError("no devices")
            create_plan(mp, rest, strategy="lapdtr")
        return
    event("redistributed")
    ranks = new.unit_to_rank()
    assert [u for s in new.stages for u in s.units] == [u.name for u in mp.units]
    assert not {devices[r].name for r in ranks.values()} & set(hit)
    assert new.devices == plan.devices  # survivors keep their ranks
    old = plan.unit_to_rank()
    assert new.meta["moves"] == [{"unit": u.name, "from_rank": old[u.name], "to_rank": ranks[u.name]}
                                 for u in mp.units if old[u.name] != ranks[u.name]]
    assert new.meta["event"] == {"kind": kind, "devices": hit}


def test_devices_below_e_min_are_excluded_even_if_not_named():
    mp, devices, plan = _setup()
    r = plan.stages[0].rank
    devices[r].energy_remaining_j = 0.1
    new = redistribute(plan, mp, devices, RedistributionEvent("overload", []))
    assert r not in new.unit_to_rank().values()
    assert devices[r].name in new.meta["excluded"]


def test_overload_moves_load_away_when_possible():
    mp, devices, plan = _setup()
    r = plan.stages[0].rank
    new = redistribute(plan, mp, devices, RedistributionEvent("overload", [devices[r].name]))
    assert r not in new.unit_to_rank().values()
    assert new.meta["penalized"] == [devices[r].name]
    assert all(m["from_rank"] == r or m["to_rank"] != r for m in new.meta["moves"])


def test_lambda_penalizes_devices_with_little_energy():
    mp = make_model(6, 2)
    a, b = make_devices(2, 2, mem_scale=100.0)
    for d in (a, b):
        d.gflops, d.power_active_w, d.energy_per_byte_j = 100.0, 10.0, 1e-9
        d.energy_budget_j, d.energy_min_j = 1000.0, 0.0
    a.power_active_w = 9.0  # a is slightly cheaper per FLOP ...
    a.energy_remaining_j, b.energy_remaining_j = 2.0, 900.0  # ... but nearly empty
    plan = create_plan(mp, [a, b], strategy="lapdtr")
    assert set(plan.unit_to_rank().values()) == {0}
    ev = RedistributionEvent("overload", [])
    assert set(redistribute(plan, mp, [a, b], ev, lam=0.0).unit_to_rank().values()) == {0}
    moved = redistribute(plan, mp, [a, b], ev, lam=1.0)
    assert set(moved.unit_to_rank().values()) == {1}
    assert len(moved.meta["moves"]) == 6
    # predictions are true energies, not the penalized objective
    assert moved.meta["total_energy_j"] == pytest.approx(sum(p.energy_j for p in moved.predictions))


def test_no_plan_without_the_hit_devices_is_an_error_naming_them():
    mp = make_model(8, 4)
    devices = make_devices(2, 4, mem_scale=0.4)
    devices[0].memory_bytes = 10**10
    plan = create_plan(mp, devices, strategy="lapdtr")
    with pytest.raises(ValueError, match="dev0"):
        redistribute(plan, mp, devices, RedistributionEvent("failure", ["dev0"]))


def test_bad_events_are_errors():
    mp, devices, plan = _setup()
    with pytest.raises(ValueError, match="unknown redistribution event kind 'boom'"):
        RedistributionEvent("boom", [])
    with pytest.raises(ValueError, match="unknown device.*'ghost'"):
        redistribute(plan, mp, devices, RedistributionEvent("failure", ["ghost"]))
    with pytest.raises(ValueError, match="rank order"):
        redistribute(plan, mp, devices[::-1], RedistributionEvent("failure", []))


def test_unavailable_devices_stay_out_of_an_overload_replan():
    mp, devices, plan = _setup()
    used = sorted({s.rank for s in plan.stages})
    gone = [d.name for i, d in enumerate(devices) if i not in used][:1] or [devices[used[-1]].name]
    new = redistribute(plan, mp, devices, RedistributionEvent("overload", [devices[used[0]].name]),
                       unavailable=gone)
    assert not {devices[r].name for r in new.unit_to_rank().values()} & set(gone)
    assert set(gone) <= set(new.meta["excluded"])
