"""Planning with elastic widths: profiles measured at each width (flop_counter), plans priced
and stamped at a width, Algorithm 1 choosing the width, re-plans keeping it, check_plan naming
the widths a model runs."""
import pytest
import torch

import lapdtr
from lapdtr.elastic import make_elastic, set_width
from lapdtr.plan import (RedistributionEvent, create_plan, plan_at_width, plan_widths,
                         redistribute)
from lapdtr.profile import DeviceProfile, LinkProfile, profile_model
from lapdtr.profile.profiler import flop_counter
from lapdtr.runtime import check_plan

NAMES = [("deit_tiny_patch16_224", {"depth": 4}, 64), ("tiny_vit_5m_224", {}, 64)]


pytestmark = pytest.mark.filterwarnings("ignore::lapdtr.plan.IdleRanksWarning")


@pytest.fixture(scope="module")
def deit_profile():
    m = lapdtr.create_model("deit_tiny_patch16_224", depth=4, img_size=64)
    return profile_model(m, img_size=64, repeats=1, warmup=0, widths="all", use_cache=False)


@pytest.mark.parametrize("name, kw, img", NAMES)
def test_flops_measured_at_each_width_match_the_profile(name, kw, img):
    model = lapdtr.create_model(name, img_size=img, **kw).eval()
    prof = profile_model(model, img_size=img, repeats=1, warmup=0, widths="all", use_cache=False)
    assert prof.widths[0] == 1.0 and len(prof.widths) >= 3
    make_elastic(model)
    x = torch.randn(1, 3, img, img)
    totals = []
    for w in prof.widths:
        set_width(model, w)
        with torch.no_grad(), flop_counter() as fc:
            model(x)
        got = fc.get_total_flops()
        want = prof.at_width(w).total_flops
        assert abs(got - want) <= 0.05 * want, (w, got, want)
        totals.append(want)
    assert totals == sorted(totals, reverse=True) and totals[-1] < 0.7 * totals[0]
    # the units' FLOPs change where the elastic layers are, not elsewhere
    low = prof.at_width(prof.widths[-1])
    assert any(a.flops == b.flops for a, b in zip(prof.units, low.units))  # embed, head


def test_a_model_without_elastic_layers_profiles_full_width_only():
    prof = profile_model("resnet18", img_size=32, repeats=1, warmup=0, widths="all",
                         use_cache=False)
    assert prof.widths == [1.0]
    with pytest.raises(ValueError, match=r"'resnet' has no elastic layers; allowed: \[1\.0\]"):
        profile_model("resnet18", img_size=32, repeats=1, warmup=0, widths=[0.5],
                      use_cache=False)


def test_a_width_not_profiled_is_named(deit_profile):
    with pytest.raises(ValueError, match=r"width 0\.5 was not profiled; profiled: "
                                         r"\[1\.0, 0\.666667, 0\.333333\]"):
        deit_profile.at_width(0.5)


def _devices(budget_j=None):
    out = []
    for i, (gf, p) in enumerate([(50.0, 10.0), (20.0, 4.0)]):
        out.append(DeviceProfile(name=f"d{i}", kind="simulated", gflops=gf,
                                 memory_bytes=10**9, power_active_w=p, power_idle_w=0.5,
                                 energy_per_byte_j=1e-9,
                                 energy_budget_j=budget_j, energy_remaining_j=budget_j,
                                 links=[LinkProfile(peer="*", bytes_per_s=1e8,
                                                    latency_s=1e-3)]))
    return out


def test_a_plan_at_a_width_is_priced_at_it_and_stamped(deit_profile):
    devices = _devices()
    full = create_plan(deit_profile, devices, strategy="lapdtr")
    third = plan_at_width(deit_profile, devices, 1 / 3, strategy="lapdtr")
    assert [s.width for s in third.stages] == [pytest.approx(1 / 3)] * len(third.stages)
    flops = sum(p.flops for p in third.predictions)
    assert flops == deit_profile.at_width(1 / 3).total_flops
    assert third.meta["total_energy_j"] < 0.7 * full.meta["total_energy_j"]


def test_algorithm_1_picks_the_widest_width_the_energy_allows(deit_profile):
    one = _devices()[:1]
    at = {w: plan_at_width(deit_profile, one, w, strategy="lapdtr").meta["total_energy_j"]
          for w in deit_profile.widths}
    # the one device may spend per request 5% more than the model costs at 1/3 width
    budget = at[deit_profile.widths[-1]] * 1.05
    plan = plan_widths(deit_profile, _devices(budget)[:1], strategy="lapdtr", objective="energy",
                       accuracy={1.0: 0.9, 0.666667: 0.85, 0.333333: 0.6})
    sel = plan.meta["width_selection"]
    assert sel["chosen"] == pytest.approx(1 / 3)
    assert set(sel["refused"]) == {"1", "0.666667"}
    assert sel["accuracy_source"] == "given"
    # with energy to spare Algorithm 1 weighs accuracy against energy and latency
    roomy = plan_widths(deit_profile, _devices(), strategy="lapdtr",
                        accuracy={1.0: 0.9, 0.666667: 0.85, 0.333333: 0.6}, w_acc=100.0)
    assert roomy.meta["width"] == 1.0 and not roomy.meta["width_selection"]["refused"]
    cheap = plan_widths(deit_profile, _devices(), strategy="lapdtr",
                        accuracy={1.0: 0.9, 0.666667: 0.85, 0.333333: 0.6}, w_acc=0.01)
    assert cheap.meta["width"] == pytest.approx(1 / 3)
    nothing = plan_widths(deit_profile, _devices(), strategy="lapdtr")
    assert "stand-in" in nothing.meta["width_selection"]["accuracy_source"]


def test_a_replan_keeps_the_widths(deit_profile):
    devices = _devices(1000.0) + [DeviceProfile(
        name="d2", kind="simulated", gflops=30.0, memory_bytes=10**9, power_active_w=5.0,
        energy_budget_j=1000.0, energy_remaining_j=1000.0,
        links=[LinkProfile(peer="*", bytes_per_s=1e8, latency_s=1e-3)])]
    plan = plan_at_width(deit_profile, devices, 2 / 3, strategy="lapdtr", objective="throughput")
    used = {s.device for s in plan.stages}
    gone = sorted(used)[0]
    new = redistribute(plan, deit_profile, devices, RedistributionEvent("failure", [gone]))
    assert all(s.device != gone for s in new.stages)
    assert [s.width for s in new.stages] == [pytest.approx(2 / 3)] * len(new.stages)
    assert sum(p.flops for p in new.predictions) == deit_profile.at_width(2 / 3).total_flops
    full_only = profile_model(lapdtr.create_model("deit_tiny_patch16_224", depth=4, img_size=64),
                              img_size=64, repeats=1, warmup=0, use_cache=False)
    with pytest.raises(ValueError, match=r"runs width 0\.666667, which its profile does not "
                                         r"hold"):
        redistribute(plan, full_only, devices, RedistributionEvent("failure", [gone]))


def test_check_plan_names_the_widths_a_model_runs(deit_profile):
    plan = plan_at_width(deit_profile, _devices(), 2 / 3, strategy="lapdtr")
    names = [u.name for u in deit_profile.units]
    check_plan(plan, names, 2, widths=[1.0, 2 / 3, 1 / 3])
    plan.stages[0].width = 0.5
    with pytest.raises(ValueError, match=r"asks width=0\.5; 'deit_tiny_patch16_224' runs "
                                         r"widths \[1\.0, 0\.666667, 0\.333333\]"):
        check_plan(plan, names, 2, widths=[1.0, 2 / 3, 1 / 3])
    with pytest.raises(ValueError, match=r"runs widths \[1\.0\] \(.*has no elastic layers"):
        check_plan(plan, names, 2)
