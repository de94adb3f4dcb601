"""With only a model and a world size (no cuts, plan or device file: what lapdtr.distribute(model)
does most often), a run plans over identical linked ranks and gives every launched rank units."""
import warnings

import pytest

from lapdtr.runtime import RunConfig, run
from lapdtr.runtime.prepare import default_devices, profile_for, resolve_plan
from lapdtr.runtime.stages import build_host

# one model per family; resnet50, mobilenetv3_large_100 (no link between the default devices),
# deit_tiny and tiny_vit_11m (every unit on rank 0) are the ones this once failed for
FAMILIES = ["deit_tiny_patch16_224", "tiny_vit_11m_224", "efficientvit_m0", "efficientvit_b0",
            "edgevit_xxs", "resnet50", "mobilenetv3_large_100", "vgg11", "squeezenet1_1",
            "vit_small_patch16_dinov3", "vit_relpos_small_patch16_224", "resnetv2_18", "gernet_s"]


@pytest.mark.parametrize("name", FAMILIES)
def test_default_plan_uses_every_rank(name):
    cfg = RunConfig.from_dict({"model": name, "world_size": 3})
    host, ul = build_host(name, {}, None)
    img = ul[0].in_shape[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an IdleRanksWarning fails the test
        plan, _ = resolve_plan(cfg, [u.name for u in ul], default_devices(3), 3, img,
                               profile_fn=lambda: profile_for(name, {}, img, 1))
    assert sorted(s.rank for s in plan.stages) == [0, 1, 2], plan.stages
    assert plan.meta["idle_ranks"] == []


def _only_model(tmp_path, name):
    return RunConfig.from_dict({"model": name, "world_size": 3, "requests": 2,
                                "out": str(tmp_path), "plots": False})


@pytest.mark.parametrize("name", FAMILIES)
def test_run_with_only_a_model_every_family(tmp_path, name):
    r = run(_only_model(tmp_path, name), timeout_s=600)
    assert r.completed == 2 and r.meta["idle_ranks"] == []
    assert all(k.units and k.items == 2 for k in r.ranks), [(k.rank, k.units) for k in r.ranks]
