import json

import pytest
import torch

from lapdtr.data import DataConfig, build_loader, digits_model_kwargs, train_digits_checkpoint
from lapdtr.data.predictions import Accuracy


@pytest.fixture(scope="module")
def trained(digits_trained):
    return digits_trained


def _rank_model(name, path, model_kwargs, img_size):
    """The checkpoint as lapdtr's ranks load it: every unit from the file."""
    from lapdtr.runtime.stages import RankModel, build_host, check_checkpoint

    host, _ = build_host(name, model_kwargs, img_size)
    check_checkpoint(path, host, name)  # all keys, no extra ones, same shapes
    rm = RankModel(name, path, model_kwargs=model_kwargs, img_size=img_size)
    rm.load_units([u.name for u in rm.units])
    return rm


def _rank_model_accuracy(name, path, model_kwargs, img_size, data_cfg):
    rm = _rank_model(name, path, model_kwargs, img_size)
    acc = Accuracy()
    for x, t in build_loader(data_cfg, rm.host, img_size=img_size, batch_size=128):
        acc.update(rm.run(x, 0, rm.num_units), t)
    return acc.to_dict()


def test_trained_checkpoint_classifies_the_held_out_digits(trained):
    assert trained["test_top1"] > 0.8
    assert trained["model_kwargs"] == {"num_classes": 10}
    assert set(trained) >= {"path", "train_s", "test_top1"} and trained["train_s"] > 0


def test_checkpoint_loads_in_lapdtrs_ranks_with_the_same_accuracy(trained):
    from safetensors import safe_open

    with safe_open(trained["path"], framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "resnet10t" and meta["weights"] == "trained on digits"
    assert json.loads(meta["model_kwargs"]) == trained["model_kwargs"]
    acc = _rank_model_accuracy("resnet10t", trained["path"], trained["model_kwargs"], 32,
                               DataConfig(kind="digits"))
    assert acc["count"] == 359 and acc["top1"] == pytest.approx(trained["test_top1"])


def test_checkpoint_does_not_load_into_a_thousand_class_model(trained):
    from lapdtr.runtime.stages import build_host, check_checkpoint

    host, _ = build_host("resnet10t", {}, 32)
    with pytest.raises(ValueError, match=r"fc.weight: checkpoint \[10, 512\] vs model \[1000, 512\]"):
        check_checkpoint(trained["path"], host, "resnet10t")


def test_vit_checkpoint_carries_its_img_size(tmp_path):
    import lapdtr

    kw = {"patch_size": 4, "depth": 2}
    assert digits_model_kwargs("deit_tiny_patch16_224", 32, kw) == {
        "num_classes": 10, "img_size": 32, "patch_size": 4, "depth": 2}
    res = train_digits_checkpoint("deit_tiny_patch16_224", tmp_path / "deit.safetensors",
                                  img_size=32, epochs=0, seed=3, model_kwargs=kw)
    assert res["model_kwargs"]["img_size"] == 32
    rm = _rank_model("deit_tiny_patch16_224", res["path"], res["model_kwargs"], 32)
    torch.manual_seed(3)  # epochs=0 saved the seeded initial weights
    ref = lapdtr.create_model("deit_tiny_patch16_224", **res["model_kwargs"])
    x, _ = next(iter(build_loader(DataConfig(kind="digits"), ref, img_size=32, batch_size=8)))
    with torch.no_grad():
        expected = ref(x)
    assert expected.shape == (8, 10)
    assert torch.allclose(rm.run(x, 0, rm.num_units), expected, atol=1e-5)


def test_training_is_seeded_and_leaves_global_state_alone(tmp_path):
    torch.manual_seed(123)
    before = torch.get_num_threads(), torch.random.get_rng_state()
    a = train_digits_checkpoint("resnet10t", tmp_path / "a.safetensors", img_size=16, epochs=0)
    b = train_digits_checkpoint("resnet10t", tmp_path / "b.safetensors", img_size=16, epochs=0,
                                num_threads=1)
    assert torch.get_num_threads() == before[0]
    assert torch.equal(torch.random.get_rng_state(), before[1])
    from safetensors.torch import load_file

    sa, sb = load_file(a["path"]), load_file(b["path"])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="epochs: expected an integer >= 0"):
        train_digits_checkpoint("resnet10t", tmp_path / "c.safetensors", epochs=-1)
