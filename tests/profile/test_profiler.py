import json

import pytest
import torch

import lapdtr
from lapdtr.profile import ModelProfile, measure_device, profile_model
from lapdtr.profile import profiler as profiler_mod


@pytest.mark.parametrize("name,size", [("deit_tiny_patch16_224", None), ("resnet18", 96),
                                       ("efficientvit_m0", None), ("tiny_vit_5m_224", None),
                                       ("mobilenetv3_small_100", 128)])
def test_unit_flops_sum_to_model_flops(name, size, tmp_path):
    prof = profile_model(name, img_size=size, repeats=1, warmup=0, use_cache=False)
    assert prof.model_flops > 0
    assert abs(prof.total_flops - prof.model_flops) <= 0.005 * prof.model_flops
    assert all(u.latency_s > 0 for u in prof.units)
    assert prof.units[0].in_shape[0] == 1 and prof.units[-1].out_format == "logits"


def test_profile_fields_are_consistent():
    model = lapdtr.create_model("deit_tiny_patch16_224", depth=2)
    prof = profile_model(model, batch_size=2, repeats=1, warmup=0, use_cache=False)
    assert [u.name for u in prof.units] == ["embed", "blocks.0", "blocks.1", "head"]
    assert sum(u.num_params for u in prof.units) == sum(p.numel() for p in model.parameters())
    assert sum(u.param_bytes for u in prof.units) == sum(
        t.numel() * t.element_size() for t in model.state_dict().values())
    block = prof.units[1]
    assert block.in_bytes == block.out_bytes == 2 * 197 * 192 * 4
    # a block holds q, k, v and attention scores live at once: peak well above its output
    assert block.peak_bytes > 2 * block.out_bytes
    assert block.flops == pytest.approx(2 * 2 * (197 * 192 * 192 * 12 + 2 * 197 * 197 * 192),
                                        rel=0.01)


def test_json_round_trip(tmp_path):
    prof = profile_model("efficientvit_m0", repeats=1, warmup=0, use_cache=False)
    prof.save(tmp_path / "profile.json")
    back = ModelProfile.load(tmp_path / "profile.json")
    assert back == prof
    data = json.loads((tmp_path / "profile.json").read_text())
    data["bogus"] = 1
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus'\]"):
        ModelProfile.from_dict(data)


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    calls = []
    real = profiler_mod._time_fn
    monkeypatch.setattr(profiler_mod, "_time_fn", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = lapdtr.create_model("deit_tiny_patch16_224", depth=1)
    p1 = profile_model(model, repeats=1, warmup=0, cache_dir=tmp_path)
    n = len(calls)
    assert n == 3
    p2 = profile_model(model, repeats=1, warmup=0, cache_dir=tmp_path)
    assert len(calls) == n and p2 == p1  # hit: nothing measured again
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    # another batch size or dtype is another key
    profile_model(model, repeats=1, warmup=0, cache_dir=tmp_path, batch_size=2)
    assert len(list(tmp_path.glob("*.json"))) == 2
    # a cache written by another torch/timm/lapdtr version is not reused
    data = json.loads(files[0].read_text())
    data["versions"]["timm"] = "0.0.1"
    files[0].write_text(json.dumps(data))
    calls.clear()
    p3 = profile_model(model, repeats=1, warmup=0, cache_dir=tmp_path)
    assert len(calls) == 3 and p3.versions == profiler_mod.versions()
    # a different structure (depth) is a different key
    other = lapdtr.create_model("deit_tiny_patch16_224", depth=2)
    assert profiler_mod.profile_cache_path(other, img_size=224, batch_size=1, dtype=torch.float32,
                                           device=torch.device("cpu"), cache_dir=tmp_path) != files[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown dtype 'int3'; allowed: float32"):
        profile_model("resnet18", dtype="int3", use_cache=False)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
        profile_model("resnet18", batch_size=0, use_cache=False)
    with pytest.raises(ValueError, match=r"unknown model 'nope': timm registers no such name"):
        profile_model("nope")


def test_measure_device():
    dev = measure_device(size=256, repeats=2)
    assert dev.gflops > 0 and dev.memory_bytes > 0
    assert dev.measured == {"gflops": True, "memory_bytes": True}
