"""Elastic widths inside a pipeline run: the per-item chain's Settings step asks each rank's
width controller, its RunUnits step runs the elastic layers at that width, and the report
records the widths."""
import pytest
import torch
import yaml

import lapdtr
from lapdtr.elastic import make_elastic, set_width
from lapdtr.runtime import RunConfig, run
from lapdtr.runtime.prepare import request_input
from lapdtr.testing import assert_close_scaled

from runtime_helpers import informative_checkpoint, load_outputs

KW = {"depth": 4}


def _cfg(tmp_path, ckpt, **kw):
    base = dict(model="deit_tiny_patch16_224", model_kwargs=KW, world_size=2, cuts=[3],
                requests=4, batch_size=2, out=str(tmp_path), save_outputs=True, plots=False,
                checkpoint=ckpt)
    base.update(kw)
    return RunConfig(**base)


def _reference(cfg, width):
    from safetensors.torch import load_file

    m = lapdtr.create_model(cfg.model, **cfg.model_kwargs)
    m.load_state_dict(load_file(cfg.checkpoint))
    make_elastic(m.eval())
    set_width(m, width)
    with torch.no_grad():
        return [m(request_input(cfg.seed, r, cfg.batch_size, 224)) for r in range(cfg.requests)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic-ckpt")
    return informative_checkpoint(d / "deit4.safetensors", "deit_tiny_patch16_224", KW)


def _check(cfg, width):
    outs = load_outputs(cfg.out)
    full = _reference(cfg, 1.0)
    for r, want in enumerate(_reference(cfg, width)):
        assert_close_scaled(outs[f"request{r}"], want, msg=f"request{r}")
        assert (outs[f"request{r}"] - full[r]).abs().max() > 1e-3 * full[r].abs().max()


def test_plan_policy_runs_every_rank_at_the_planned_width(tmp_path, ckpt):
    cfg = _cfg(tmp_path, ckpt, elastic={"kind": "plan", "plan_ratio": 0.5})
    r = run(cfg, timeout_s=200)
    assert r.completed == 4
    # 0.5 of 3 heads rounds to 2: the width is 2/3 (2 heads, 512 of 768 hidden units)
    assert [[w for _, w in k.widths] for k in r.ranks] == [[pytest.approx(2 / 3)]] * 2
    _check(cfg, 2 / 3)


def test_linear_policy_follows_each_ranks_battery(tmp_path, ckpt):
    """Rank 0's battery is full, rank 1's at 40%: rank 1 runs at the nearest width its layers
    allow (1/3 of 3 heads), rank 0 at full width; the outputs equal that mixed model."""
    devices = {"devices": [
        {"name": f"dev{i}", "kind": "simulated", "gflops": 10.0, "memory": "1GB",
         "power_active_w": 1.0, "power_idle_w": 0.1, "energy_budget_j": 1000,
         "energy_remaining_j": 1000 if i == 0 else 400, "energy_min_j": 1, "meter": "simulated"}
        for i in range(2)], "default_link": {"bandwidth": "1Gbps", "latency_ms": 1}}
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(devices))
    cfg = _cfg(tmp_path, ckpt, devices=str(path), elastic={"kind": "linear", "min_ratio": 0.2})
    r = run(cfg, timeout_s=200)
    assert r.completed == 4 and not r.replans
    assert [[w for _, w in k.widths] for k in r.ranks] == [[], [pytest.approx(1 / 3)]]
    # the reference: blocks 0-1 (rank 0) at full width, blocks 2-3 (rank 1) at 1/3
    from safetensors.torch import load_file

    m = lapdtr.create_model(cfg.model, **cfg.model_kwargs)
    m.load_state_dict(load_file(cfg.checkpoint))
    make_elastic(m.eval())
    for b in m.blocks[2:]:
        set_width(b, 1 / 3)
    outs = load_outputs(cfg.out)
    with torch.no_grad():
        for q in range(cfg.requests):
            assert_close_scaled(outs[f"request{q}"],
                                m(request_input(cfg.seed, q, cfg.batch_size, 224)))


def test_elastic_config_errors_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"family 'resnet', which has no elastic layers; "
                                         r"allowed: \['edgevit', 'efficientvit_b', "
                                         r"'efficientvit_m', 'eva', 'tiny_vit', 'vit'\]"):
        RunConfig(model="resnet18", elastic={"kind": "linear"}).validate()
    with pytest.raises(ValueError, match=r"elastic: unknown key\(s\) \['slope'\]"):
        RunConfig(elastic={"slope": 2}).validate()
    with pytest.raises(ValueError, match=r"min_ratio: 0 is not a width ratio; allowed"):
        RunConfig(elastic={"min_ratio": 0}).validate()
    with pytest.raises(ValueError, match="elastic: runs in mode 'pipeline'"):
        RunConfig(mode="tensor", elastic={"kind": "plan"}).validate()


def test_a_plan_with_widths_runs_them_and_a_replan_keeps_them(tmp_path, ckpt):
    """A saved plan at width 2/3 (priced on the profile at that width) runs elastic with no
    ``elastic`` block; rank 1 is killed after two requests, the re-plan keeps 2/3, and every
    answer equals the whole model at 2/3."""
    from lapdtr.plan import plan_at_width
    from lapdtr.profile import default_rank_devices
    from lapdtr.runtime import FaultSpec
    from lapdtr.runtime.prepare import build_plan_from_cuts, profile_for

    devices = default_rank_devices(3)
    prof = profile_for("deit_tiny_patch16_224", KW, 224, 2, widths="all")
    plan = build_plan_from_cuts("deit_tiny_patch16_224", [u.name for u in prof.units],
                                [2, 4], devices, img_size=224, batch_size=2)
    from lapdtr.plan.widths import stamp_widths

    stamp_widths(plan, prof.at_width(2 / 3).width)
    plan.objective = "throughput"
    plan.save(tmp_path / "plan.json")
    assert plan_at_width(prof, devices, 2 / 3, objective="throughput").meta["width"] \
        == pytest.approx(2 / 3)  # the planner makes such plans too
    cfg = _cfg(tmp_path, ckpt, world_size=3, cuts=None, plan=str(tmp_path / "plan.json"),
               requests=6, faults=[FaultSpec("kill", 1, 2)])
    r = run(cfg, timeout_s=300)
    assert r.completed == 6 and r.lost == 0 and [e.kind for e in r.replans] == ["failure"]
    _check(cfg, 2 / 3)
    assert [w for _, w in r.ranks[0].widths] == [w for _, w in r.ranks[2].widths] \
        == [pytest.approx(2 / 3)]  # (rank 1 was killed before it could report)
    assert [st["width"] for st in r.replans[0].stages] == [pytest.approx(2 / 3)] * 2
