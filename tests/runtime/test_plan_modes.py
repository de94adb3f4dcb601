"""``mode: auto`` runs a plan as it was made: stage plans in pipeline mode, channel-shard plans
(horizontal, hybrid) in tensor mode with the plan's own shares; the parts no mode runs yet (row
tiles, fused blocks, stages with a split layer) are refused by name, and an explicit mode that
would run another split than the plan's is an error naming the mode that runs it."""
import warnings

import pytest

import lapdtr
from lapdtr.plan import create_plan
from lapdtr.plan.types import Shard
from lapdtr.profile import profile_model
from lapdtr.profile.devices import load_devices
from lapdtr.runtime import RunConfig, run
from lapdtr.runtime.plan_modes import (FusedBlocksNotRealized, check_plan_mode, mode_for_plan,
                                       plan_parts)
from lapdtr.runtime.prepare import prepare
from lapdtr.runtime.tensor import proportions_from_plan

from runtime_helpers import assert_outputs_match

DEVICES = "configs/devices/edge_heterogeneous.yaml"
MODEL = "resnet18"


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Each strategy's plan of resnet18 at 64 px on the first ``n`` heterogeneous devices."""
    d = tmp_path_factory.mktemp("plans")
    prof = profile_model(lapdtr.create_model(MODEL), img_size=64, batch_size=1)
    # at 64 px the data planner tiles layer4's 2-row map over 4 ranks with a halo of 2 around a
    # 1-row tile (which check_shards refuses); at 128 px every tile holds its halo
    prof128 = profile_model(lapdtr.create_model(MODEL), img_size=128, batch_size=1)
    devs = load_devices(DEVICES)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s, n in [("sequential", 4), ("horizontal", 4), ("hybrid", 2), ("ensembled", 4),
                     ("data", 4)]:
            p = create_plan(prof128 if s == "data" else prof, devs[:n], strategy=s)
            p.save(d / f"{s}.json")
            out[s] = (p, str(d / f"{s}.json"))
    return out


def test_auto_picks_the_mode_that_runs_each_plan(plans):
    assert mode_for_plan(plans["sequential"][0]) == "pipeline"
    assert mode_for_plan(plans["horizontal"][0]) == "tensor"
    assert mode_for_plan(plans["hybrid"][0]) == "tensor"
    with pytest.raises(ValueError, match=r"row shards with halos .*strategy 'data'.* not run by "
                                         r"any mode yet; runnable plans: .*horizontal, hybrid"):
        mode_for_plan(plans["data"][0])
    with pytest.raises(ValueError, match=r"fused blocks .*strategy 'ensembled'.* set mode: tensor"):
        mode_for_plan(plans["ensembled"][0])
    assert set(plan_parts(plans["ensembled"][0])) == {"channels", "fused_blocks"}


def test_a_hyps_plan_with_a_split_layer_beside_its_stages_is_refused_by_name(plans):
    p = plans["sequential"][0]
    p.shards = [Shard(unit="layer1.0", rank=r, axis="channels", start=32 * r, stop=32 * (r + 1))
                for r in range(2)]
    with pytest.raises(ValueError, match=r"stages with a layer split beside them \(2 channel "
                                         r"shards of 1 unit\(s\); strategy 'hyps'"):
        mode_for_plan(p)
    p.shards = []


def test_a_config_in_auto_mode_takes_the_plans_mode(plans, tmp_path):
    for s, mode in [("sequential", "pipeline"), ("horizontal", "tensor")]:
        cfg = RunConfig(model=MODEL, plan=plans[s][1], world_size=4, devices=DEVICES,
                        img_size=64, out=str(tmp_path)).validate()
        assert cfg.mode == mode, s
    assert RunConfig(model=MODEL, cuts=[3], out=str(tmp_path)).validate().mode == "pipeline"


def test_an_explicit_mode_that_would_run_another_split_is_an_error(plans, tmp_path):
    def cfg(s, mode):
        return RunConfig(model=MODEL, plan=plans[s][1], world_size=4, devices=DEVICES,
                         img_size=64, mode=mode, out=str(tmp_path))
    with pytest.raises(ValueError, match=r"mode 'pipeline' runs stages, but the plan \(strategy "
                                         r"'horizontal'\) is 40 channel shards.*mode 'tensor'"):
        cfg("horizontal", "pipeline").validate()
    with pytest.raises(ValueError, match=r"mode 'tensor' cannot run it: its \d+ row shards"):
        cfg("data", "tensor").validate()
    with pytest.raises(ValueError, match=r"mode 'tensor' runs channel shards, but the plan "
                                         r"\(strategy 'sequential'\) has none.*'pipeline'"):
        cfg("sequential", "tensor").validate()
    with pytest.warns(FusedBlocksNotRealized, match=r"per-unit channel split"):
        cfg("ensembled", "tensor").validate()
    with pytest.raises(ValueError, match=r"mode 'ensemble' runs whole models"):
        check_plan_mode(plans["hybrid"][0], "ensemble")


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_a_hybrid_plan_runs_in_tensor_mode_with_the_plans_shares(plans, tmp_path):
    plan, path = plans["hybrid"]
    shares = proportions_from_plan(plan)
    assert abs(shares[0] - shares[1]) > 0.05  # heterogeneous: not an even split
    cfg = RunConfig(model=MODEL, plan=path, world_size=2, devices=DEVICES, img_size=64,
                    requests=2, out=str(tmp_path), save_outputs=True, plots=False).validate()
    assert cfg.mode == "tensor"
    assert prepare(cfg, 2)["proportions"] == shares
    r = run(cfg, timeout_s=200)
    assert r.mode == "tensor" and r.completed == 2 and r.meta["proportions"] == shares
    assert_outputs_match(cfg, tmp_path, atol=1e-5)


def test_malformed_shards_are_named(plans, tmp_path):
    import copy

    base = plans["horizontal"][0]

    def bad(edit):
        p = copy.deepcopy(base)
        edit(p.shards)
        return p
    cases = [
        (lambda sh: setattr(sh[1], "start", 12), r"shards of unit 'stem' leave an overlap at "
                                                  r"12..16 \(rank 1's shard starts at 12\)"),
        (lambda sh: setattr(sh[1], "start", 20), r"leave a gap at 16..20"),
        (lambda sh: setattr(sh[1], "rank", 0), r"rank\(s\) \[0\] hold more than one channels "
                                                r"shard of unit 'stem'"),
        (lambda sh: setattr(sh[0], "stop", 0), r"the channels shard of unit 'stem' on rank 0 is "
                                                r"empty or negative: \[0, 0\)"),
        (lambda sh: setattr(sh[0], "axis", "depth"), r"on axis 'depth'; allowed axes: channels, "
                                                      r"rows"),
    ]
    for edit, msg in cases:
        with pytest.raises(ValueError, match=msg):
            mode_for_plan(bad(edit))
    rows = copy.deepcopy(plans["data"][0])
    rows.shards[4].halo = 9  # layer1.0 on rank 0: a tile of 8 rows
    with pytest.raises(ValueError, match=r"row shard of unit 'layer1.0' on rank 0 has a halo of 9 "
                                         r"rows around a tile of 8; allowed: 0 \.\. 8"):
        plan_parts(rows)
    p = bad(lambda sh: [setattr(s, "unit", "layer9.0") for s in sh if s.unit == "stem"])
    with pytest.raises(ValueError, match=r"has shards of unit 'layer9.0', which none of its "
                                         r"stages lists"):
        mode_for_plan(p)
    # a unit the model does not have: named when the run is prepared
    for st in p.stages:
        st.units = ["layer9.0" if u == "stem" else u for u in st.units]
    p.save(tmp_path / "p.json")
    cfg = RunConfig(model=MODEL, plan=str(tmp_path / "p.json"), world_size=4, devices=DEVICES,
                    img_size=64, out=str(tmp_path / "run")).validate()
    with pytest.raises(ValueError, match=r"has shards of unit 'layer9.0', which 'resnet18' does not "
                                         r"have; its units: stem, layer1.0"):
        prepare(cfg, 4)
