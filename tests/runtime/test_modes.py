"""``tensor`` and ``ensemble`` modes through ``lapdtr.runtime.run`` (spawned gloo ranks)."""
import pytest
import torch

import lapdtr
from lapdtr.runtime import RunConfig, request_input, run
from lapdtr.runtime.ensemble import ensemble_reference

from lapdtr.testing import assert_close_scaled, assert_sees_every_unit, scaled_atol

from runtime_helpers import assert_outputs_match, load_outputs, reference_model

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def test_tensor_mode_uneven_split_equals_single_process(tmp_path):
    cfg = RunConfig(model="deit_tiny_patch16_224", model_kwargs={"depth": 2}, mode="tensor",
                    world_size=2, proportions=[0.7, 0.3], requests=3, out=str(tmp_path),
                    save_outputs=True)
    r = run(cfg, timeout_s=200)
    assert r.mode == "tensor" and r.completed == 3 and r.meta["proportions"] == [0.7, 0.3]
    assert all(k.bytes_sent > 0 for k in r.ranks)
    assert_outputs_match(cfg, tmp_path, atol=1e-5)
    # the comparison sees every unit of this model (a DeiT: no zero-initialized residual norms)
    assert_sees_every_unit(reference_model(cfg), request_input(cfg.seed, 0, cfg.batch_size, 224))


def test_ensemble_mode_equals_reference(tmp_path):
    cfg = RunConfig(model="deit_tiny_patch16_224", model_kwargs={"depth": 2}, mode="ensemble",
                    world_size=2, aggregator="mean", requests=2, out=str(tmp_path),
                    save_outputs=True)
    r = run(cfg, timeout_s=200)
    assert r.completed == 2
    models = []
    for rank in range(2):
        torch.manual_seed(cfg.seed + rank)
        models.append(lapdtr.create_model(cfg.model, depth=2))
    outs = load_outputs(tmp_path)
    for i in range(2):
        x = request_input(cfg.seed, i, cfg.batch_size, 224)
        ref = ensemble_reference(models, x, "mean")
        assert_close_scaled(outs[f"request{i}"], ref)
        for r in range(2):  # the comparison would see a member left out
            alone = ensemble_reference(models[1 - r:2 - r], x, "mean")
            assert (alone - ref).abs().max() > 100 * scaled_atol(ref)
