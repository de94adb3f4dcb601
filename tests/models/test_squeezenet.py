"""SqueezeNet 1.0 / 1.1 (torchvision layout) as timm models and as lapdtr units."""
import collections

import pytest
import timm
import torch
import torchvision

import lapdtr
from lapdtr.models import partition, unit_owned_names, units
from lapdtr.models.squeezenet import Fire, SqueezeNet

VARIANTS = {"squeezenet1_0": 1_248_424, "squeezenet1_1": 1_235_496}
TV_WEIGHTS = {"squeezenet1_0": torchvision.models.SqueezeNet1_0_Weights.IMAGENET1K_V1,
              "squeezenet1_1": torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1}
SIZE = 96
_MODELS = {}


def _model(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = timm.create_model(name).eval()
    return _MODELS[name]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_registered_with_timm_and_parameter_count(name):
    assert name in timm.list_models("squeezenet*")
    model = _model(name)
    assert isinstance(model, SqueezeNet)
    assert sum(p.numel() for p in model.parameters()) == VARIANTS[name]
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
    assert cfg["url"] == TV_WEIGHTS[name].url


@pytest.mark.parametrize("name", list(VARIANTS))
def test_torchvision_state_dict_loads_as_is_and_gives_equal_outputs(name):
    torch.manual_seed(1)
    tv = getattr(torchvision.models, name)(weights=None).eval()
    model = timm.create_model(name).eval()
    assert set(model.state_dict()) == set(tv.state_dict())
    assert {"features.0.weight", "features.3.squeeze.weight", "classifier.1.weight"} <= set(
        model.state_dict())
    model.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))


def test_pretrained_file_in_torchvision_format_loads_with_a_new_classifier(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.squeezenet1_1(weights=None).eval()
    path = tmp_path / "squeezenet1_1_tv.pth"
    torch.save(tv.state_dict(), path)
    model = timm.create_model("squeezenet1_1", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), tv.features(x))
        assert model(x).shape == (1, 7)


def test_layout_is_torchvisions():
    m = _model("squeezenet1_0")
    assert [type(layer).__name__ for layer in m.features] == (
        ["Conv2d", "ReLU", "MaxPool2d"] + ["Fire"] * 3 + ["MaxPool2d"] + ["Fire"] * 4
        + ["MaxPool2d", "Fire"])
    assert [type(layer).__name__ for layer in m.classifier] == ["Dropout", "Conv2d", "ReLU",
                                                        "SelectAdaptivePool2d"]
    assert isinstance(m.classifier[3].pool, torch.nn.AdaptiveAvgPool2d)  # torchvision's pool
    fire = m.features[3]
    assert isinstance(fire, Fire)
    assert list(fire._modules) == ["squeeze", "squeeze_activation", "expand1x1",
                                   "expand1x1_activation", "expand3x3", "expand3x3_activation"]
    m11 = _model("squeezenet1_1")
    assert m11.features[0].kernel_size == (3, 3) and m11.features[0].out_channels == 64
    pools = [i for i, layer in enumerate(m11.features) if isinstance(layer, torch.nn.MaxPool2d)]
    assert pools == [2, 5, 8]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name).train()
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 1000)
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_options_and_classifier_reset():
    model = timm.create_model("squeezenet1_1", num_classes=10, in_chans=1, drop_rate=0.2).eval()
    assert model.classifier[0].p == 0.2
    x = torch.randn(2, 1, SIZE, SIZE)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
        assert torch.equal(model.forward_head(feats), model(x))
        model.reset_classifier(4)
        assert model.get_classifier().out_channels == 4 and model(x).shape == (2, 4)
        model.reset_classifier(0)
        assert model(x).shape == (2, 512)
    with pytest.raises(ValueError, match="version='1_2' is not a SqueezeNet version"):
        SqueezeNet(version="1_2")
    with pytest.raises(ValueError, match="global_pool='median' is not a pooling SqueezeNet"):
        model.reset_classifier(3, global_pool="median")
    with pytest.raises(ValueError, match="global_pool='catavgmax' doubles .* num_classes=0"):
        model.reset_classifier(3, global_pool="catavgmax")
    with pytest.raises(ValueError, match="num_classes=2.5 must be an integer >= 0"):
        model.reset_classifier(2.5)


def test_state_dict_round_trip():
    model = _model("squeezenet1_0")
    torch.manual_seed(2)
    fresh = timm.create_model("squeezenet1_0").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_units_equal_model_and_own_every_tensor_once(name):
    model = _model(name)
    ul = units(model, SIZE)
    names = [u.name for u in ul]
    assert names == ["features.0"] + [f"features.{i}" for i in range(2, 13)] + ["head"]
    assert ul[0].modules == ("features.0", "features.1") and ul[-1].out_format == "logits"
    counts = collections.Counter(k for u in ul for k in unit_owned_names(model, u.modules))
    assert max(counts.values()) == 1 and set(counts) == set(model.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        y = x
        for u in ul:
            y = u.fn(model, y)
        assert torch.equal(y, model(x))


@pytest.mark.parametrize("cuts", [[1], [3, 7], ["features.6", "features.11"], list(range(1, 13))])
def test_partition_equals_model(cuts):
    model = _model("squeezenet1_0")
    stages = partition(model, cuts, img_size=SIZE)
    assert len(stages) == len(cuts) + 1
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        y = x
        for s in stages:
            y = s(y)
        assert torch.equal(y, model(x))


def test_other_input_size():
    model = _model("squeezenet1_1")
    ul = units(model, 160)
    assert ul[-2].out_shape[1] == 512
    stages = partition(model, [2, 9], unit_list=ul)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        y = x
        for s in stages:
            y = s(y)
        assert y.shape == (2, 1000) and torch.equal(y, model(x))


def test_lapdtr_create_model_and_features_only():
    model = lapdtr.create_model("squeezenet1_0")
    assert isinstance(model, SqueezeNet) and not model.training
    assert lapdtr.get_adapter(model).name == "squeezenet"
    assert set(lapdtr.list_supported_models()["squeezenet"]) == set(VARIANTS)
    feats = timm.create_model("squeezenet1_1", features_only=True).eval()
    with torch.no_grad():
        outs = feats(torch.randn(1, 3, SIZE, SIZE))
    assert [o.shape[1] for o in outs] == [64, 128, 256, 512]
