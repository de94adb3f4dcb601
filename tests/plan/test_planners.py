"""Planners: registry, exactness against exhaustive search, plan invariants, errors."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lapdtr.plan import Plan, create_plan, list_planners
from lapdtr.plan.cost import memory_limit, usable_energy_j
from lapdtr.profile.types import DeviceProfile, LinkProfile

from plan_instances import (exhaustive_contiguous, exhaustive_sequential, exhaustive_vertical,
                            feasible, make_devices, make_model, objective_value, plant_feasible)

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
PIPELINE = ("lapdtr", "lapdtr-greedy", "sequential", "vertical")
SHARDED = ("horizontal", "hybrid", "ensembled", "data")


def _objective(strategy):
    return "max-device-energy" if strategy == "vertical" else "energy"


def _assignment(plan, mp):
    return [plan.unit_to_rank()[u.name] for u in mp.units]


def test_registry_lists_every_strategy():
    assert set(list_planners()) >= {"lapdtr", "lapdtr-greedy", "vertical", "sequential", "data",
                                    "horizontal", "ensembled", "hybrid", "hyps"}


@pytest.mark.parametrize("strategy", list_planners())
def test_every_planner_plans_and_round_trips(strategy, tmp_path):
    mp = make_model(10, seed=3)
    devices = make_devices(3, seed=3, mem_scale=100.0)  # room for the weight-replicating data split
    plan = create_plan(mp, devices, strategy=strategy, objective=_objective(strategy))
    assert plan.strategy == strategy and plan.devices == [d.name for d in devices]
    assert len(plan.predictions) == len(devices)
    assert [p.rank for p in plan.predictions] == list(range(len(devices)))
    total = sum(p.energy_j for p in plan.predictions)
    assert total > 0 and math.isclose(total, plan.meta["total_energy_j"])
    for p in plan.predictions:
        assert math.isclose(p.energy_j, p.compute_energy_j + p.comm_energy_j, rel_tol=1e-9)
        assert p.memory_bytes <= memory_limit(devices[p.rank])
    assert sum(p.flops for p in plan.predictions) == pytest.approx(
        sum(u.flops for u in mp.units), rel=1e-6)
    assert sum(p.bytes_sent for p in plan.predictions) == pytest.approx(
        sum(p.bytes_received for p in plan.predictions), abs=len(devices))
    names = [u.name for u in mp.units]
    if strategy in PIPELINE:
        assert [u for s in plan.stages for u in s.units] == names  # each unit once, in order
    covered = {}
    for sh in plan.shards:
        covered.setdefault((sh.unit, sh.axis), []).append((sh.start, sh.stop))
    for (unit, axis), spans in covered.items():  # shards tile their axis exactly once
        spans.sort()
        assert spans[0][0] == 0
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again == plan and again.to_dict() == plan.to_dict()


@SETTINGS
@given(n=st.integers(1, 24), m=st.integers(1, 4), seed=st.integers(0, 10**6),
       objective=st.sampled_from(["energy", "max-device-energy", "latency"]),
       budget=st.booleans(), uniform=st.booleans(), target=st.booleans())
def test_lapdtr_matches_exhaustive_search(n, m, seed, objective, budget, uniform, target):
    if n > 14:
        m = min(m, 3)  # keeps the exhaustive reference quick
    mp = make_model(n, seed)
    devices = make_devices(m, seed, budget=budget, uniform_links=uniform)
    lt = None
    if target:  # a latency target between the fastest and slowest single-stage plans
        lt = 0.5 * sum(u.flops for u in mp.units) / (max(d.gflops for d in devices) * 1e9) + 0.01
    ref = exhaustive_contiguous(mp, devices, objective, latency_target=lt)
    event("feasible" if ref < math.inf else "infeasible")
    try:
        plan = create_plan(mp, devices, strategy="lapdtr", objective=objective,
                           latency_target_s=lt)
    except ValueError as e:  # only when exhaustive search finds no plan either
        assert ref == math.inf, e
        assert "no plan satisfies" in str(e) or "fits on no device" in str(e)
        return
    a = _assignment(plan, mp)
    res = feasible(mp, devices, a, latency_target=lt)
    assert res is not None, "the plan breaks a constraint"
    got = objective_value(*res, objective)
    assert plan.meta["exact"]
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("n,m,seed,objective", [(24, 4, 11, "energy"),
                                                (24, 4, 12, "max-device-energy"),
                                                (20, 3, 13, "latency")])
def test_lapdtr_matches_exhaustive_search_at_full_size(n, m, seed, objective):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, budget=True, uniform_links=False)
    ref = exhaustive_contiguous(mp, devices, objective)
    plan = create_plan(mp, devices, strategy="lapdtr", objective=objective)
    res = feasible(mp, devices, _assignment(plan, mp))
    assert res is not None and plan.meta["exact"]
    assert objective_value(*res, objective) == pytest.approx(ref, rel=1e-9)


@SETTINGS
@given(n=st.integers(1, 7), m=st.integers(1, 4), seed=st.integers(0, 10**6),
       budget=st.booleans())
def test_vertical_matches_exhaustive_and_beats_sequential(n, m, seed, budget):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, budget=budget)
    ref = exhaustive_vertical(mp, devices)
    event("feasible" if ref < math.inf else "infeasible")
    try:
        plan = create_plan(mp, devices, strategy="vertical", objective="max-device-energy")
    except ValueError as e:  # only when exhaustive search finds no assignment either
        assert ref == math.inf, e
        return
    assert feasible(mp, devices, _assignment(plan, mp)) is not None
    assert plan.meta["max_device_energy_j"] == pytest.approx(ref, rel=1e-6)
    seq_ref = exhaustive_sequential(mp, devices)
    try:
        seq = create_plan(mp, devices, strategy="sequential", objective="max-device-energy")
    except ValueError as e:  # sequential uses every device in rank order: it can be infeasible
        assert seq_ref == math.inf, e
        event("sequential infeasible")
        return
    assert seq.meta["max_device_energy_j"] == pytest.approx(seq_ref, rel=1e-9)
    assert plan.meta["max_device_energy_j"] <= seq.meta["max_device_energy_j"] * (1 + 1e-9)


@SETTINGS
@given(n=st.integers(1, 24), m=st.integers(1, 4), seed=st.integers(0, 10**6),
       strategy=st.sampled_from(["lapdtr", "lapdtr-greedy", "sequential"]),
       horizon=st.integers(1, 5))
def test_pipeline_plans_assign_each_unit_once_within_memory_and_energy(n, m, seed, strategy,
                                                                        horizon):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, budget=True)
    # feasible by construction: a planted plan fits (memory and energy raised where short)
    plant_feasible(mp, devices, seed, horizon=horizon, sequential=strategy == "sequential")
    try:
        plan = create_plan(mp, devices, strategy=strategy, horizon_requests=horizon)
    except ValueError as e:
        # only the greedy baseline may miss a plan that exists, and it says where it got stuck
        assert strategy == "lapdtr-greedy", e
        assert "fits on no device with memory and energy left" in str(e)
        event("greedy stuck on a feasible instance")
        return
    event(f"{strategy} planned")
    assert [u for s in plan.stages for u in s.units] == [u.name for u in mp.units]
    for p, d in zip(plan.predictions, devices):
        assert p.memory_bytes <= memory_limit(d)
        if strategy != "lapdtr-greedy" or plan.meta["constraints_met"]:
            assert p.energy_j <= usable_energy_j(d, horizon) * (1 + 1e-9) or p.energy_j == 0
    if strategy == "lapdtr":  # stages are contiguous and each device holds at most one
        ranks = [s.rank for s in plan.stages]
        assert len(ranks) == len(set(ranks))


def test_greedy_is_algorithm_2_and_never_beats_the_optimum():
    gaps = []
    for seed in range(20):
        mp = make_model(16, seed)
        devices = make_devices(4, seed)
        opt = create_plan(mp, devices, strategy="lapdtr")
        greedy = create_plan(mp, devices, strategy="lapdtr-greedy")
        # Algorithm 2: a unit leaves the cheapest-per-FLOP device only when memory runs out
        a = _assignment(greedy, mp)
        best = min(range(4), key=lambda d: (devices[d].power_active_w / devices[d].gflops, d))
        held = [u for u, r in zip(mp.units, a) if r == best]
        for u, r in zip(mp.units, a):
            if r != best:
                need = sum(h.param_bytes for h in held) + u.param_bytes + max(
                    [h.peak_bytes for h in held] + [u.peak_bytes])
                assert need > devices[best].memory_bytes or held == []
        if len(greedy.stages) == len({s.rank for s in greedy.stages}):  # contiguous: comparable
            assert greedy.meta["total_energy_j"] >= opt.meta["total_energy_j"] * (1 - 1e-9)
        gaps.append(greedy.meta["total_energy_j"] / opt.meta["total_energy_j"] - 1)
    assert max(gaps) > 0  # the greedy baseline is not optimal on these instances


def test_energy_cost_is_power_over_throughput_not_remaining_energy():
    mp = make_model(3, 0)
    cheap = DeviceProfile("cheap", gflops=100.0, power_active_w=5.0, energy_per_byte_j=1e-9,
                          energy_remaining_j=1.0, energy_budget_j=100.0,
                          links=[LinkProfile("*", 1e8, 1e-3)])
    dear = DeviceProfile("dear", gflops=100.0, power_active_w=50.0, energy_per_byte_j=1e-9,
                         energy_remaining_j=100.0, energy_budget_j=100.0,
                         links=[LinkProfile("*", 1e8, 1e-3)])
    for strategy in ("lapdtr", "lapdtr-greedy"):
        plan = create_plan(mp, [dear, cheap], strategy=strategy)
        # the seed's E_i / C_i cost would pick the nearly empty battery-rich 'dear' device
        assert set(plan.unit_to_rank().values()) == {1}


def test_remaining_energy_over_the_horizon_is_a_budget():
    mp = make_model(6, 1)
    link = [LinkProfile("*", 1e8, 1e-3)]
    cheap = DeviceProfile("cheap", gflops=100.0, power_active_w=5.0, energy_per_byte_j=1e-9,
                          links=link)
    dear = DeviceProfile("dear", gflops=100.0, power_active_w=20.0, energy_per_byte_j=1e-9,
                         links=link)
    one = create_plan(mp, [cheap, dear], strategy="lapdtr")
    e = one.predictions[0].energy_j
    assert set(one.unit_to_rank().values()) == {0}
    cheap.energy_budget_j = 100.0
    cheap.energy_min_j = 1.0
    cheap.energy_remaining_j = 1.0 + 10 * e * (1 + 1e-9)  # usable: 10 requests
    assert create_plan(mp, [cheap, dear], strategy="lapdtr", horizon_requests=10).unit_to_rank() \
        == one.unit_to_rank()
    for horizon in (11, 40):
        plan = create_plan(mp, [cheap, dear], strategy="lapdtr", horizon_requests=horizon)
        assert plan.predictions[0].energy_j * horizon <= 10 * e * (1 + 1e-9)
        assert plan.predictions[1].energy_j > 0  # work moved to the device with energy left
    cheap.energy_remaining_j = 0.5  # below E_min: holds nothing
    plan = create_plan(mp, [cheap, dear], strategy="lapdtr")
    assert set(plan.unit_to_rank().values()) == {1}


def test_latency_objective_and_target():
    mp = make_model(12, 5)
    devices = make_devices(4, 5, mem_scale=100.0)
    fast = create_plan(mp, devices, strategy="lapdtr", objective="latency")
    cheap = create_plan(mp, devices, strategy="lapdtr", objective="energy")
    assert fast.meta["latency_s"] <= cheap.meta["latency_s"] + 1e-12
    assert cheap.meta["total_energy_j"] <= fast.meta["total_energy_j"] + 1e-12
    mid = (fast.meta["latency_s"] + cheap.meta["latency_s"]) / 2
    bounded = create_plan(mp, devices, strategy="lapdtr", latency_target_s=mid)
    assert bounded.meta["latency_s"] <= mid * (1 + 1e-9)
    with pytest.raises(ValueError, match="no plan satisfies"):
        create_plan(mp, devices, strategy="lapdtr", latency_target_s=fast.meta["latency_s"] / 2)


def test_throughput_target_bounds_every_stage():
    mp = make_model(12, 6)
    devices = make_devices(4, 6, mem_scale=100.0)
    free = create_plan(mp, devices, strategy="lapdtr")
    slowest = max(p.latency_s for p in free.predictions)
    thr = 1.5 / slowest
    plan = create_plan(mp, devices, strategy="lapdtr", throughput_target=thr)  # feasible here
    assert plan.unit_to_rank() != free.unit_to_rank()
    for p, d in zip(plan.predictions, devices):
        assert p.flops / (d.gflops * 1e9) <= 1 / thr * (1 + 1e-9)


def test_large_instances_stay_exact_with_device_classes():
    mp = make_model(200, 7)
    types = make_devices(4, 7, mem_scale=3.0)
    devices = []
    for i in range(32):
        t = types[i % 4]
        devices.append(DeviceProfile(f"d{i}", gflops=t.gflops, memory_bytes=t.memory_bytes,
                                     power_active_w=t.power_active_w,
                                     energy_per_byte_j=t.energy_per_byte_j, links=t.links))
    plan = create_plan(mp, devices, strategy="lapdtr")
    assert plan.meta["exact"] and plan.meta["device_classes"] == 4
    assert [u for s in plan.stages for u in s.units] == [u.name for u in mp.units]


def test_bad_input_errors_name_it():
    mp = make_model(5, 0)
    devices = make_devices(2, 0)
    with pytest.raises(ValueError, match="unknown strategy 'nope'.*lapdtr"):
        create_plan(mp, devices, strategy="nope")
    with pytest.raises(ValueError, match="unknown objective 'speed'.*max-device-energy"):
        create_plan(mp, devices, objective="speed")
    with pytest.raises(ValueError, match="does not optimize objective 'latency'"):
        create_plan(mp, devices, strategy="vertical", objective="latency")
    with pytest.raises(ValueError, match="horizon_requests"):
        create_plan(mp, devices, horizon_requests=0)
    with pytest.raises(ValueError, match="no devices"):
        create_plan(mp, [])
    dup = make_devices(2, 0)
    dup[1].name = dup[0].name
    with pytest.raises(ValueError, match="unique"):
        create_plan(mp, dup)
    neg = make_devices(2, 0)
    neg[1].memory_bytes = -5
    with pytest.raises(ValueError, match="dev1.*memory_bytes"):
        create_plan(mp, neg)
    tiny = make_devices(2, 0)
    for d in tiny:
        d.memory_bytes = 10
    for strategy in ("lapdtr", "lapdtr-greedy", "sequential", "vertical"):
        with pytest.raises(ValueError, match="unit 'u0'.*fits on no device.*dev0.*dev1"):
            create_plan(mp, tiny, strategy=strategy, objective=_objective(strategy))
    with pytest.raises(ValueError, match="horizontal.*memory"):
        create_plan(mp, tiny, strategy="horizontal")


def test_lagrangian_bound_keeps_the_search_exact():
    """Distinct devices whose memory binds: the priced relaxation is used and stays exact."""
    from lapdtr.plan.cost import Constraints
    from lapdtr.plan.lapdtr_dp import Instance, solve_contiguous, solve_ordered

    used = 0
    for seed in range(10):
        mp = make_model(12, seed)
        devices = make_devices(4, seed, mem_scale=0.5)
        inst = Instance(mp, devices, Constraints())
        order = sorted(range(4), key=lambda d: inst.jpf[d])
        ordered = solve_ordered(inst, order, with_value=True)
        ref = exhaustive_contiguous(mp, devices, "energy")
        a, stats = solve_contiguous(inst, upper_bound=ordered[1] if ordered else math.inf)
        used += bool(stats.get("lagrangian_bound"))
        a = a or (ordered[0] if ordered else None)
        if a is None:
            assert ref == math.inf
            continue
        assert objective_value(*feasible(mp, devices, a), "energy") == pytest.approx(ref, rel=1e-9)
    assert used >= 3


def test_benchmark_instances_are_solved_exactly():
    """benchmarks/planner.py's energy instances (4x24, 8x100, 64x1000) are solved exactly on the
    4 device kinds and on 64 *distinct* devices (gflops * (1 + 0.001 i)), and greedy is never
    better than the optimum. Their wall times are the benchmark's to report, not a test's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "planner.py"
    spec = importlib.util.spec_from_file_location("bench_planner", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(seed=0, repeats=1, sets=("kinds", "distinct"), objectives=("energy",))
    assert len(rows) == 6
    for row in rows:
        assert row["exact"] and row["gap"] == 0.0, row
        assert row["lower_bound"] == row["objective_value"]
        assert row["greedy_gap"] >= -1e-9
    assert {r["device_classes"] for r in rows if r["set"] == "distinct"} >= {64}


# -- certified bounds: lower_bound <= the true optimum, the gap is truthful, exact is exact --

def _bound_instance(n, m, seed, kind, budget, uniform):
    mp = make_model(n, seed)
    if kind == "distinct":
        devices = make_devices(m, seed, budget=budget, uniform_links=uniform, spread=0.01,
                               mem_scale=0.5)
    elif kind == "identical":  # one profile repeated: a single class of m devices
        base = make_devices(1, seed, budget=budget, mem_scale=0.5)[0]
        devices = [DeviceProfile(f"dev{i}", gflops=base.gflops, memory_bytes=base.memory_bytes,
                                 power_active_w=base.power_active_w,
                                 energy_per_byte_j=base.energy_per_byte_j,
                                 energy_budget_j=base.energy_budget_j,
                                 energy_remaining_j=base.energy_remaining_j,
                                 energy_min_j=base.energy_min_j,
                                 links=[LinkProfile("*", 12.5e6, 1e-3)]) for i in range(m)]
    else:
        devices = make_devices(m, seed, budget=budget, uniform_links=uniform)
    return mp, devices


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 10), m=st.integers(1, 4), seed=st.integers(0, 10**6),
       kind=st.sampled_from(["distinct", "distinct", "mixed", "identical"]),
       objective=st.sampled_from(["energy", "energy", "max-device-energy", "latency"]),
       budget=st.booleans(), uniform=st.booleans(),
       gap_tol=st.sampled_from([0.0, 0.0, 1e-3, 0.05]),
       max_expansions=st.sampled_from([200_000, 200_000, 0, 2, 10]))
def test_certified_lower_bound_and_gap_against_exhaustive_search(n, m, seed, kind, objective,
                                                                 budget, uniform, gap_tol,
                                                                 max_expansions):
    """(a) meta lower_bound <= the exhaustive optimum, whatever the limits and tolerance;
    (b) the reported gap is (objective - lower_bound) / lower_bound and bounds the true gap, and
    is within gap_tol when the search was not stopped by a limit; (c) a plan marked exact is the
    exhaustive optimum (distinct devices included)."""
    mp, devices = _bound_instance(n, m, seed, kind, budget, uniform)
    ref = exhaustive_contiguous(mp, devices, objective)
    try:
        plan = create_plan(mp, devices, strategy="lapdtr", objective=objective, gap_tol=gap_tol,
                           max_expansions=max_expansions)
    except ValueError as e:
        if "search limits" in str(e):  # stopped before finding a plan or proving there is none
            assert max_expansions < 200_000, e
            event("no plan within tiny limits")
        else:
            assert ref == math.inf, e
            assert "no plan satisfies" in str(e) or "fits on no device" in str(e)
            event("infeasible")
        return
    assert ref < math.inf, "a plan for an instance exhaustive search finds infeasible"
    meta = plan.meta
    res = feasible(mp, devices, _assignment(plan, mp))
    assert res is not None, "the plan breaks a constraint"
    got = objective_value(*res, objective)
    assert meta["objective_value"] == pytest.approx(got, rel=1e-9, abs=1e-15)
    assert got >= ref * (1 - 1e-9) - 1e-15
    lb = meta["lower_bound"]
    assert lb <= ref * (1 + 1e-12) + 1e-15, (lb, ref)  # (a)
    true_gap = (got - ref) / ref if ref > 0 else 0.0
    if meta["exact"]:  # (c)
        event(f"exact ({kind})")
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-15)
        assert meta["gap"] == 0.0 and lb == meta["objective_value"]
    else:  # (b)
        event(f"certified gap ({kind})")
        assert meta["gap"] == pytest.approx((meta["objective_value"] - lb) / lb, rel=1e-9)
        assert true_gap <= meta["gap"] * (1 + 1e-9) + 1e-12
        if max_expansions == 200_000:
            assert meta["gap"] <= gap_tol * (1 + 1e-9) + 1e-12
    assert meta["gap_tol"] == gap_tol


@pytest.mark.parametrize("objective,m,n", [("energy", 12, 60), ("latency", 12, 60),
                                           ("max-device-energy", 8, 30)])
def test_bounds_stay_certified_when_the_search_stops_early_on_distinct_devices(objective, m, n):
    """Distinct devices, several stages: the exact run is the reference; runs stopped after a
    few expansions, or allowed a 1% gap, report a lower bound below it and a gap that covers
    it."""
    mp = make_model(n, 21)
    devices = make_devices(m, 21, spread=0.005, mem_scale=2.0)
    exact = create_plan(mp, devices, strategy="lapdtr", objective=objective)
    assert exact.meta["exact"] and exact.meta["gap"] == 0.0
    opt = exact.meta["objective_value"]
    for kw in ({"max_expansions": 3}, {"gap_tol": 0.01}, {"gap_tol": 0.01, "max_expansions": 3}):
        p = create_plan(mp, devices, strategy="lapdtr", objective=objective, **kw)
        lb, v = p.meta["lower_bound"], p.meta["objective_value"]
        assert lb <= opt * (1 + 1e-12) and v >= opt * (1 - 1e-9), kw
        assert v <= lb * (1 + p.meta["gap"]) * (1 + 1e-9)
        if p.meta["exact"]:
            assert v == pytest.approx(opt, rel=1e-9)
        if "max_expansions" not in kw:
            assert p.meta["gap"] <= 0.01 * (1 + 1e-9)


def test_gap_tol_is_validated():
    mp = make_model(4, 0)
    with pytest.raises(ValueError, match="gap_tol"):
        create_plan(mp, make_devices(2, 0), strategy="lapdtr", gap_tol=-0.1)


@SETTINGS
@given(n=st.integers(1, 12), m=st.integers(1, 4), seed=st.integers(0, 10**6),
       strategy=st.sampled_from(["lapdtr", "lapdtr-greedy", "sequential"]),
       why=st.sampled_from(["memory", "energy", "latency", "throughput"]))
def test_infeasible_instances_raise_an_error_naming_what_is_impossible(n, m, seed, strategy, why):
    """Instances infeasible by construction: a ValueError that names the constraint."""
    mp = make_model(n, seed)
    # ample memory unless memory is the point: only the constraint meant is broken
    devices = make_devices(m, seed, budget=True, mem_scale=1.0 if why == "memory" else 100.0)
    kw = {}
    if why == "memory":  # one unit larger than every device's memory
        u = mp.units[seed % n]
        u.param_bytes = max(d.memory_bytes for d in devices) + 1
        match = f"unit '{u.name}' needs .* fits on no device"
    elif why == "energy":  # every device below E_min: nothing may run anywhere
        for d in devices:
            d.energy_remaining_j = d.energy_min_j / 2
        match = ("below E_min: " + ", ".join(d.name for d in devices) if strategy != "lapdtr-greedy"
                 else "fits on no device with memory and energy left")
    elif why == "latency":
        if strategy != "lapdtr":
            strategy = "lapdtr"
        # half the time of the whole model on the fastest device: no plan is that fast
        fastest = max(d.gflops for d in devices) * 1e9
        kw["latency_target_s"] = 0.5 * sum(u.flops for u in mp.units) / fastest
        match = "latency <= "
    else:
        if strategy != "lapdtr":
            strategy = "lapdtr"
        # the smallest unit on the fastest device takes longer than the period
        fastest = max(d.gflops for d in devices) * 1e9
        kw["throughput_target"] = 2.0 * fastest / min(u.flops for u in mp.units)
        match = "throughput >= "
    event(f"{why} / {strategy}")
    with pytest.raises(ValueError, match=match):
        create_plan(mp, devices, strategy=strategy, **kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), m=st.integers(1, 5), seed=st.integers(0, 10**6),
       budget=st.booleans(), spread=st.sampled_from([0.0, 0.01]),
       ends=st.booleans(), thr_scale=st.sampled_from([1.0, 1.05, 1.5]))
def test_relaxation_dps_and_pruning_match_brute_force(n, m, seed, budget, spread, ends,
                                                      thr_scale):
    """The vectorized DPs of lapdtr_dp (sparse-table range minima) against plain loops, on the
    base windows and on pruned ones (windows with gaps, positions no stage reaches): backward
    with and without prices, forward, bottleneck; pruning keeps every stage under the
    threshold."""
    import random

    import numpy as np

    from lapdtr.plan.cost import Constraints
    from lapdtr.plan.lapdtr_dp import (Instance, _backward, _backward_max, _forward, _prune,
                                       _Windows)

    r = random.Random(seed)
    mp = make_model(n, seed)
    devices = make_devices(m, seed, budget=budget, spread=spread, mem_scale=r.choice([0.5, 2.0]))
    allowed = None
    if ends:
        allowed = [r.random() < 0.6 for _ in range(n + 1)]
    inst = Instance(mp, devices, Constraints(), allowed_ends=allowed)
    C = len(inst.classes)
    base = _Windows.base(inst)

    def arcs(win, c, a):
        rows, b0, M = win.slab(a)
        if rows is None or c not in rows.tolist():
            return []
        i = rows.tolist().index(c)
        return [b0 + k for k in np.flatnonzero(M[i])]

    def brute_backward(win, G, K, mu, mode="sum"):
        h = [math.inf] * (n + 1)
        h[n] = 0.0
        for a in range(n - 1, -1, -1):
            for c in range(C):
                for b in arcs(win, c, a):
                    cost = G[c, b] + K[c, a]
                    v = cost + mu[c] + h[b] if mode == "sum" else max(cost, h[b])
                    h[a] = min(h[a], v)
        return np.array(h)

    def brute_forward(win, G, K, mu):
        f = [math.inf] * (n + 1)
        f[0] = 0.0
        for a in range(n):
            for c in range(C):
                for b in arcs(win, c, a):
                    f[b] = min(f[b], f[a] + G[c, b] + K[c, a] + mu[c])
        return np.array(f)

    def same(x, y):
        assert np.array_equal(np.isfinite(x), np.isfinite(y)), (x, y)
        fin = np.isfinite(x)
        assert np.allclose(x[fin], y[fin], rtol=1e-12, atol=1e-15), (x, y)

    G, K = inst.Ge, inst.Ke
    zero = np.zeros(C)
    mu = np.array([r.random() * 0.05 for _ in range(C)])
    for win in (base,):
        same(_backward(inst, win, G, K)[0], brute_backward(win, G, K, zero))
        same(_backward(inst, win, G, K, mu)[0], brute_backward(win, G, K, mu))
        same(_forward(inst, G, K), brute_forward(win, G, K, zero))
        same(_forward(inst, G, K, mu), brute_forward(win, G, K, mu))
    h = _backward(inst, base, G, K)[0]
    f = _forward(inst, G, K)
    if not h[0] < math.inf:
        return
    thr = h[0] * thr_scale * (1 + 1e-9)
    pruned = _prune(inst, base, G, K, f, h, thr)
    # every stage whose bound is under the threshold is kept
    for c in range(C):
        for a in range(n):
            for b in arcs(base, c, a):
                if f[a] + G[c, b] + K[c, a] + h[b] <= thr * (1 - 1e-12):
                    assert pruned.lo[c, a] <= b <= pruned.hi[c, a], (c, a, b)
    # the DPs on the pruned windows (gaps, unreachable positions) equal the plain loops
    same(_backward(inst, pruned, G, K)[0], brute_backward(pruned, G, K, zero))
    same(_backward(inst, pruned, G, K, mu)[0], brute_backward(pruned, G, K, mu))
    same(_backward_max(inst, pruned, G, K)[0], brute_backward(pruned, G, K, zero, "max"))
    same(_backward_max(inst, base, G, K)[0], brute_backward(base, G, K, zero, "max"))
    # the relaxed optimum is no worse on the pruned windows (pruning removes useless stages)
    assert _backward(inst, pruned, G, K)[0][0] == pytest.approx(h[0], rel=1e-12)
