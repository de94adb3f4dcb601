"""Plans for a run given only a model and a world size (issue 10.7): default rank devices, the
``throughput`` objective (exact, against exhaustive search), idle-rank warnings, re-plans that
keep survivors busy, and missing links as errors naming the devices."""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lapdtr.energy.analytical import find_link
from lapdtr.plan import (IdleRanksWarning, MissingLinkError, Plan, RedistributionEvent, StagePlan,
                         create_plan, get_planner, idle_ranks, list_planners, redistribute)
from lapdtr.plan.cost import Constraints
from lapdtr.plan.lapdtr_dp import Instance
from lapdtr.plan.throughput import solve_throughput
from lapdtr.profile import DeviceProfile, LinkProfile, default_rank_devices, profile_model

from plan_instances import feasible, make_devices, make_model

FAMILIES = ["deit_tiny_patch16_224", "tiny_vit_5m_224", "efficientvit_m0", "edgevit_xxs",
            "resnet50", "mobilenetv3_large_100", "vgg11", "squeezenet1_0",
            "vit_small_patch16_dinov3", "vit_relpos_small_patch16_224", "resnetv2_18", "gernet_s"]


@pytest.fixture(scope="module")
def profiles():
    # small inputs keep the profiling short; FLOPs and bytes still differ per unit as in the model
    return {name: profile_model(name, img_size=64, repeats=1, warmup=0) for name in FAMILIES}


def period_s(mp, devices, assignment) -> float:
    """The period, computed here from its definition: the slowest stage or boundary transfer."""
    stages = [list(g) for _, g in itertools.groupby(range(len(assignment)),
                                                    key=lambda u: assignment[u])]
    worst = 0.0
    for k, units in enumerate(stages):
        d = devices[assignment[units[0]]]
        worst = max(worst, sum(mp.units[u].flops for u in units) / (d.gflops * 1e9))
        if k > 0:
            link = find_link(devices, assignment[stages[k - 1][0]], assignment[units[0]])
            worst = max(worst, link.latency_s + mp.units[units[0]].in_bytes / link.bytes_per_s)
    return worst


def contiguous_plans(n, m):
    for k in range(1, min(n, m) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = [0, *cuts, n]
            for perm in itertools.permutations(range(m), k):
                yield [perm[s] for s in range(k) for _ in range(bounds[s], bounds[s + 1])]


def brute_throughput(mp, devices, *, latency_target=None):
    """(least period, most stages among the plans within it) over every feasible plan."""
    rows = []
    for a in contiguous_plans(len(mp.units), len(devices)):
        if feasible(mp, devices, a, latency_target=latency_target) is not None:
            rows.append((period_s(mp, devices, a), len(set(a))))
    if not rows:
        return math.inf, 0
    best = min(p for p, _ in rows)
    return best, max(k for p, k in rows if p <= best * (1 + 1e-9))


@contextlib.contextmanager
def no_idle_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdleRanksWarning)
        yield


# ---------------------------------------------------------------------------- default devices

def test_default_rank_devices_link_every_pair_with_documented_figures():
    devices = default_rank_devices(4)
    assert [d.name for d in devices] == ["rank0", "rank1", "rank2", "rank3"]
    assert len({(d.gflops, d.memory_bytes, d.kind) for d in devices}) == 1
    assert all(d.gflops > 0 and d.kind == "cpu" for d in devices)
    for i, j in itertools.permutations(range(4), 2):
        link = find_link(devices, i, j)
        assert link is not None and link.bytes_per_s > 0 and link.latency_s > 0
        assert link.measured is False
    assert all(v is False for d in devices for v in d.measured.values())
    custom = default_rank_devices(2, gflops=7.0, bandwidth="8Gbps", latency_s=1e-3,
                                  names=["a", "b"])
    assert custom[0].gflops == 7.0 and custom[0].links == [
        LinkProfile(peer="b", bytes_per_s=1e9, latency_s=1e-3, measured=False)]
    with pytest.raises(ValueError, match="world_size"):
        default_rank_devices(0)
    with pytest.raises(ValueError, match="gflops"):
        default_rank_devices(2, gflops=-1)
    with pytest.raises(ValueError, match="names"):
        default_rank_devices(2, names=["a", "a"])


def test_every_planner_and_objective_works_on_default_devices():
    mp = make_model(9, 3)
    devices = default_rank_devices(3)
    for strategy in list_planners():
        for objective in get_planner(strategy).objectives:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IdleRanksWarning)
                plan = create_plan(mp, devices, strategy=strategy, objective=objective)
            assert plan.stages, (strategy, objective)
            assert "idle_ranks" in plan.meta


@pytest.mark.parametrize("name", FAMILIES)
def test_default_plan_gives_every_rank_units(name, profiles):
    mp = profiles[name]
    devices = default_rank_devices(3)
    with no_idle_warning():
        plan = create_plan(mp, devices, strategy="lapdtr", objective="throughput")
    assert sorted({s.rank for s in plan.stages}) == [0, 1, 2]
    assert idle_ranks(plan, 3) == [] and plan.meta["idle_ranks"] == []
    assert [u for s in plan.stages for u in s.units] == [u.name for u in mp.units]
    # the period is the least over every split of the model into up to 3 stages
    best, most = brute_throughput(mp, devices)
    assert plan.meta["period_s"] == pytest.approx(best, rel=1e-9)
    assert period_s(mp, devices, [plan.unit_to_rank()[u.name] for u in mp.units]) == \
        pytest.approx(best, rel=1e-9)
    assert plan.meta["exact"] and most == 3


def test_throughput_balances_what_energy_and_latency_concentrate(profiles):
    mp = profiles["deit_tiny_patch16_224"]
    devices = default_rank_devices(3)
    with pytest.warns(IdleRanksWarning, match=r"rank 1 \('rank1'\), 2 \('rank2'\).*'latency'"):
        lat = create_plan(mp, devices, objective="latency")
    assert lat.meta["idle_ranks"] == [1, 2]
    thr = create_plan(mp, devices, objective="throughput")
    assert thr.meta["period_s"] < 0.5 * lat.meta["period_s"]
    # with a power model and a cost per byte sent, the least energy keeps to one device
    for d in devices:
        d.power_active_w, d.energy_per_byte_j = 10.0, 1e-8
    with pytest.warns(IdleRanksWarning) as rec:
        energy = create_plan(mp, devices, objective="energy")
    assert len({s.rank for s in energy.stages}) == 1
    msg = str(rec[0].message)
    idle = energy.meta["idle_ranks"]
    assert len(idle) == 2 and rec[0].message.ranks == idle
    assert all(f"rank{r}" in msg for r in idle) and "'energy'" in msg and "throughput" in msg


def test_energy_objective_without_a_power_model_keeps_ranks_busy(profiles):
    # every plan costs 0 J on devices without a power model: the tie goes to the busiest one
    mp = profiles["resnet50"]
    plan = create_plan(mp, default_rank_devices(3), objective="energy")
    assert sorted({s.rank for s in plan.stages}) == [0, 1, 2]
    assert plan.meta["tie_break"]


def test_idle_ranks():
    plan = Plan(model="m", strategy="s", devices=["a", "b", "c", "d"],
                stages=[StagePlan(0, 0, "a", ["u0"]), StagePlan(1, 2, "c", ["u1"])])
    assert idle_ranks(plan, 4) == [1, 3]
    assert idle_ranks(plan, 3) == [1]
    with pytest.raises(ValueError, match="world_size"):
        idle_ranks(plan, 0)


def test_more_ranks_than_units_says_so():
    mp = make_model(2, 1)
    with pytest.warns(IdleRanksWarning, match="2 unit"):
        plan = create_plan(mp, default_rank_devices(4), objective="throughput")
    assert len(plan.meta["idle_ranks"]) == 2


# ---------------------------------------------------------- throughput: exact on random instances

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 7), m=st.integers(1, 4), seed=st.integers(0, 10**6),
       uniform=st.booleans(), budget=st.booleans(), target=st.sampled_from([None, 0.5, 1.5]))
def test_throughput_is_exact_against_exhaustive_search(n, m, seed, uniform, budget, target):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, budget=budget, mem_scale=2.0, uniform_links=uniform)
    best_free, _ = brute_throughput(mp, devices)
    lat_target = None
    if target is not None and best_free < math.inf:
        # a latency target between the least latency and that of the least-period plan
        lats = [feasible(mp, devices, a)[1] for a in contiguous_plans(n, m)
                if feasible(mp, devices, a) is not None]
        lat_target = min(lats) * (1 + target)
    best, most = brute_throughput(mp, devices, latency_target=lat_target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdleRanksWarning)
        if best == math.inf:
            with pytest.raises(ValueError):
                create_plan(mp, devices, objective="throughput", latency_target_s=lat_target)
            return
        plan = create_plan(mp, devices, objective="throughput", latency_target_s=lat_target)
    a = [plan.unit_to_rank()[u.name] for u in mp.units]
    assert feasible(mp, devices, a, latency_target=lat_target) is not None
    assert period_s(mp, devices, a) == pytest.approx(best, rel=1e-9)
    assert plan.meta["period_s"] == pytest.approx(best, rel=1e-9)
    assert len(set(a)) == most  # ties: the most devices
    assert plan.meta["exact"] and plan.meta["gap"] == 0.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 7), m=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_sequential_throughput_uses_every_device_in_rank_order(n, m, seed):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, mem_scale=1000.0)
    k = min(n, m)
    best = min(period_s(mp, devices, [s for s in range(k) for _ in range(b[s], b[s + 1])])
               for cuts in itertools.combinations(range(1, n), k - 1) for b in [[0, *cuts, n]])
    plan = create_plan(mp, devices, strategy="sequential", objective="throughput")
    assert [s.rank for s in plan.stages] == list(range(k))
    assert plan.meta["period_s"] == pytest.approx(best, rel=1e-9)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 7), m=st.integers(2, 4), seed=st.integers(0, 10**6))
def test_throughput_heuristic_is_feasible_with_a_valid_bound(n, m, seed):
    mp = make_model(n, seed)
    devices = make_devices(m, seed, mem_scale=3.0, spread=0.1)
    best, _ = brute_throughput(mp, devices)
    inst = Instance(mp, devices, Constraints(objective="throughput"))
    r = solve_throughput(inst, max_work=0)  # past the exact DP's budget
    assert r.solver == "walk"
    if r.assignment is None:
        return
    assert inst.evaluate(r.assignment) is not None
    assert r.lower_bound <= best * (1 + 1e-9) <= r.objective_value * (1 + 2e-9)
    assert r.exact or r.gap == pytest.approx((r.objective_value - r.lower_bound) / r.lower_bound)


# ------------------------------------------------------------------------------ redistribution

@pytest.mark.parametrize("objective", ["throughput", "energy"])
@pytest.mark.parametrize("name", ["resnet50", "deit_tiny_patch16_224"])
def test_replan_after_a_failure_keeps_the_survivors_busy(name, objective, profiles):
    mp = profiles[name]
    devices = default_rank_devices(3)
    plan = create_plan(mp, devices, objective=objective)
    assert sorted({s.rank for s in plan.stages}) == [0, 1, 2]
    with no_idle_warning():
        new = redistribute(plan, mp, devices, RedistributionEvent("failure", ["rank1"]))
    assert sorted({s.rank for s in new.stages}) == [0, 2]
    assert new.meta["idle_ranks"] == [1]


def test_replan_of_a_plan_from_cuts_is_for_throughput(profiles):
    mp = profiles["resnet50"]
    devices = default_rank_devices(3)
    names = [u.name for u in mp.units]
    plan = Plan(model=mp.model, strategy="cuts", devices=[d.name for d in devices],
                objective="none", stages=[StagePlan(0, 0, "rank0", names[:2]),
                                          StagePlan(1, 1, "rank1", names[2:4]),
                                          StagePlan(2, 2, "rank2", names[4:])])
    new = redistribute(plan, mp, devices, RedistributionEvent("failure", ["rank2"]))
    assert new.objective == "throughput"
    assert sorted({s.rank for s in new.stages}) == [0, 1]


def test_replan_warns_when_the_objective_leaves_survivors_idle(profiles):
    mp = profiles["resnet50"]
    devices = default_rank_devices(4)
    plan = create_plan(mp, devices, objective="throughput")
    plan.objective = "latency"  # latency: one device is best
    with pytest.warns(IdleRanksWarning, match="'latency'") as rec:
        new = redistribute(plan, mp, devices, RedistributionEvent("failure", ["rank1"]))
    assert 1 not in rec[0].message.ranks and len(rec[0].message.ranks) == 2
    assert len({s.rank for s in new.stages}) == 1


# ------------------------------------------------------------------------------- missing links

def _unlinked(k, memory_bytes=0):
    return [DeviceProfile(name=f"rank{r}", kind="cpu", memory_bytes=memory_bytes)
            for r in range(k)]


@pytest.mark.parametrize("objective", ["throughput", "latency", "energy"])
def test_a_missing_link_is_an_error_naming_both_devices(objective):
    mp = make_model(6, 5)
    # memory that no single device has: every plan crosses a link
    mem = int(max(u.param_bytes + u.peak_bytes for u in mp.units)
              + sum(u.param_bytes for u in mp.units) * 0.6)
    devices = _unlinked(2, mem)
    with pytest.raises(MissingLinkError, match=r"'rank0' and 'rank1'.*'links' entry") as e:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IdleRanksWarning)
            create_plan(mp, devices, objective=objective)
    assert e.value.pairs == [("rank0", "rank1")]
    assert isinstance(e.value, ValueError)


def test_default_runtime_devices_used_to_fail_without_links(profiles):
    # what the runtime planned before default_rank_devices: no links, so no throughput plan
    with pytest.raises(MissingLinkError, match="rank0"):
        create_plan(profiles["resnet50"], _unlinked(3), objective="throughput")
    plan = create_plan(profiles["resnet50"], default_rank_devices(3), objective="throughput")
    assert len(plan.stages) == 3


@pytest.mark.parametrize("objective", ["throughput", "energy"])
def test_replan_across_a_missing_link_names_the_survivors(objective):
    mp = make_model(6, 5)
    mem = int(max(u.param_bytes + u.peak_bytes for u in mp.units)
              + sum(u.param_bytes for u in mp.units) * 0.6)
    devices = _unlinked(3, mem)
    # a chain: rank0 - rank1 - rank2, no link between rank0 and rank2
    for a, b in ((0, 1), (1, 2)):
        devices[a].links.append(LinkProfile(devices[b].name, 1e8, 1e-4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IdleRanksWarning)
        plan = create_plan(mp, devices, objective="throughput")  # over the links there are
        plan.objective = objective
        with pytest.raises(MissingLinkError, match=r"'rank0' and 'rank2'.*'links' entry"):
            redistribute(plan, mp, devices, RedistributionEvent("failure", ["rank1"]))
