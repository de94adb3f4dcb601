"""EdgeViT (EdgeViTs, ECCV 2022) as a timm model and as lapdtr units."""
import collections

import pytest
import timm
import torch

import lapdtr
from lapdtr.models import partition, unit_owned_names, units
from lapdtr.models.edgevit import EdgeVit, GlobalSparseAttn, checkpoint_filter_fn

VARIANTS = {"edgevit_xxs": 4.07e6, "edgevit_xs": 6.77e6, "edgevit_s": 13.11e6}
SIZE = 64  # any multiple of 32 works; small keeps the tests cheap
_MODELS = {}


def _model(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        m = timm.create_model(name).eval()
        for mod in m.modules():  # non-trivial BatchNorm statistics and affine parameters
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
                torch.nn.init.uniform_(mod.weight, 0.5, 1.5)
                torch.nn.init.uniform_(mod.bias, -0.2, 0.2)
        _MODELS[name] = m
    return _MODELS[name]


def _run_units(model, ul, x):
    for u in ul:
        x = u.fn(model, x)
    return x


@pytest.mark.parametrize("name", list(VARIANTS))
def test_registered_with_timm_and_parameter_count(name):
    assert name in timm.list_models("edgevit_*")
    model = _model(name)
    assert isinstance(model, EdgeVit)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - VARIANTS[name]) / VARIANTS[name] < 0.01, n
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and not cfg["url"]


def test_architecture_matches_the_released_configuration():
    m = _model("edgevit_xxs")
    assert [s.downsample.proj.kernel_size[0] for s in m.stages] == [4, 2, 2, 2]
    assert [s.downsample.proj.stride[0] for s in m.stages] == [4, 2, 2, 2]
    assert [len(s.blocks) for s in m.stages] == [1, 1, 3, 2]
    assert [s.downsample.proj.out_channels for s in m.stages] == [36, 72, 144, 288]
    attn = [s.blocks[0].global_sparse.attn for s in m.stages]
    assert [a.sr_ratio for a in attn] == [4, 2, 2, 1]
    assert [a.num_heads for a in attn] == [1, 2, 4, 8]  # head dim 36
    # local aggregation in stages 1-3 only; local propagation is a depthwise transposed conv
    kinds = [type(s.blocks[0].local_agg).__name__ for s in m.stages]
    assert kinds == ["LocalAgg"] * 3 + ["Identity"]
    lp = attn[0].local_prop
    assert isinstance(lp, torch.nn.ConvTranspose2d) and lp.groups == 36
    assert lp.kernel_size == lp.stride == (4, 4)
    assert m.stages[0].blocks[0].global_sparse.mlp.fc1.out_features == 4 * 36  # MLP ratio 4
    assert [len(s.blocks) for s in _model("edgevit_s").stages] == [1, 2, 5, 3]
    heads = [s.blocks[0].global_sparse.attn.num_heads for s in _model("edgevit_s").stages]
    assert heads == [1, 2, 5, 8]  # head dim 48


def test_global_attention_sees_one_delegate_token_per_cell():
    torch.manual_seed(0)
    attn = GlobalSparseAttn(8, num_heads=2, sr_ratio=4).eval()
    H = W = 8
    x = torch.randn(1, H * W, 8)
    with torch.no_grad():
        ref = attn(x, (H, W))
        x_other = x.clone()
        x_other[0, 1 * W + 2] += 1.0  # not the top-left token of its 4x4 cell
        assert torch.equal(attn(x_other, (H, W)), ref)
        x_delegate = x.clone()
        x_delegate[0, 4 * W + 4] += 1.0  # the delegate of the cell at (1, 1)
        assert not torch.allclose(attn(x_delegate, (H, W)), ref)


def test_forward_backward_and_options():
    torch.manual_seed(0)
    model = timm.create_model("edgevit_xxs", num_classes=10, in_chans=1, drop_path_rate=0.1,
                              drop_rate=0.1).train()
    x = torch.randn(2, 1, SIZE, SIZE)
    out = model(x)
    assert out.shape == (2, 10)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 288, SIZE // 32, SIZE // 32)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 288)
        assert torch.equal(model.forward_head(feats), model(x))
        model.reset_classifier(5)
        assert model.get_classifier().out_features == 5 and model(x).shape == (2, 5)
        model.reset_classifier(0)
        assert model(x).shape == (2, 288)
    with pytest.raises(ValueError, match="global_pool='median' is not a pooling EdgeViT"):
        model.reset_classifier(3, global_pool="median")
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
        model.reset_classifier(3, global_pool="")
    with pytest.raises(ValueError, match="num_classes=-1 must be an integer >= 0"):
        model.reset_classifier(-1)


def test_state_dict_round_trip():
    model = _model("edgevit_xs")
    torch.manual_seed(1)
    fresh = timm.create_model("edgevit_xs").eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_units_in_sequence_equal_model(name):
    model = _model(name)
    ul = units(model, SIZE)
    depths = [len(s.blocks) for s in model.stages]
    assert len(ul) == 4 + sum(depths) + 1
    assert [u.name for u in ul[:2]] == ["stages.0.downsample", "stages.0.blocks.0"]
    assert ul[0].kind == "embed" and ul[-1].kind == "head" and ul[-1].out_format == "logits"
    assert {u.kind for u in ul[1:-1]} == {"stage", "block"}
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(_run_units(model, ul, x), model(x))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_tensor_owned_by_exactly_one_unit(name):
    model = _model(name)
    owned = [k for u in units(model, SIZE) for k in unit_owned_names(model, u.modules)]
    counts = collections.Counter(owned)
    assert not [k for k, c in counts.items() if c > 1]
    assert set(counts) == set(model.state_dict())


@pytest.mark.parametrize("cuts", [[1], [2, 9], ["stages.2.downsample"], list(range(1, 12))])
def test_partition_equals_model(cuts):
    model = _model("edgevit_xxs")
    stages = partition(model, cuts, img_size=SIZE)
    assert len(stages) == len(cuts) + 1
    keys = [k for s in stages for k in s.state_dict()]
    assert sorted(keys) == sorted(model.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        y = x
        for s in stages:
            y = s(y)
        assert torch.equal(y, model(x))


@pytest.mark.parametrize("size", [160, 256])
def test_other_input_sizes(size):
    model = timm.create_model("edgevit_xxs", img_size=size).eval()
    assert timm.models.get_model_input_config(model)["input_size"] == (3, size, size)
    ul = units(model, size)
    assert ul[0].out_shape == (1, 36, size // 4, size // 4)
    assert ul[-2].out_shape == (1, 288, size // 32, size // 32)
    stages = partition(model, [3, 8], unit_list=ul)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = x
        for s in stages:
            y = s(y)
        assert y.shape == (2, 1000) and torch.equal(y, model(x))


def test_input_size_not_a_multiple_of_32_is_a_value_error():
    with pytest.raises(ValueError, match="img_size=200: EdgeViT needs sides that are positive "
                                         "multiples of 32"):
        timm.create_model("edgevit_xxs", img_size=200)
    model = _model("edgevit_xxs")
    with pytest.raises(ValueError, match="sampling ratio 4 needs a feature map whose sides "
                                         "divide by 4, got 50x50"):
        model(torch.randn(1, 3, 200, 200))
    with pytest.raises(ValueError, match="cannot take image size 200"):
        units(model, 200)


def test_lapdtr_create_model():
    model = lapdtr.create_model("edgevit_xxs")
    assert isinstance(model, EdgeVit) and not model.training
    assert lapdtr.get_adapter(model).name == "edgevit"
    assert set(lapdtr.list_supported_models()["edgevit"]) == set(VARIANTS)
    with pytest.raises(ValueError, match="unknown model 'edgevit_m'.*edgevit_xxs"):
        lapdtr.create_model("edgevit_m")


def test_features_only():
    model = timm.create_model("edgevit_xxs", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, SIZE, SIZE))
    assert [tuple(o.shape[1:]) for o in outs] == [(36, 16, 16), (72, 8, 8), (144, 4, 4),
                                                   (288, 2, 2)]


def _official_keys(state_dict):
    """Our keys written the way the official code (saic-fi/edgevit) names them."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("stages."):
            _, i, rest = k.split(".", 2)
            i = int(i) + 1
            if rest.startswith("downsample."):
                k = f"patch_embed{i}." + rest[len("downsample."):]
            else:
                _, j, part, tail = rest.split(".", 3)
                part = {"local_agg": "LocalAgg", "global_sparse": "SelfAttn"}[part]
                k = f"blocks{i}.{j}.{part}.{tail}".replace(".attn.local_prop.", ".attn.LocalProp.")
        out[k] = v
    return out


def test_official_checkpoint_keys_load(tmp_path):
    model = _model("edgevit_xxs")
    official = _official_keys(model.state_dict())
    for k in ["patch_embed1.proj.weight", "patch_embed4.norm.bias",
              "blocks1.0.LocalAgg.attn.weight", "blocks1.0.SelfAttn.attn.LocalProp.weight",
              "blocks4.1.SelfAttn.mlp.fc2.bias",
              "blocks3.2.LocalAgg.mlp.fc1.weight", "norm.running_var", "head.weight"]:
        assert k in official, k
    mapped = checkpoint_filter_fn({"model": official, "epoch": 299})
    assert mapped.keys() == model.state_dict().keys()
    path = tmp_path / "edgevit_xxs_official.pth"
    torch.save({"model": official, "epoch": 299}, path)
    loaded = timm.create_model("edgevit_xxs", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(RuntimeError, match="No pretrained weights exist for edgevit_xxs"):
        timm.create_model("edgevit_xxs", pretrained=True)
