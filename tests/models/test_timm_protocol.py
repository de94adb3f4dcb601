"""EdgeViT and SqueezeNet follow timm's model protocol as timm's own models do (the checks of
timm's generic ``tests/test_models.py``, at small sizes), with ``resnet18`` as the control.

Each check runs on ``edgevit_xxs``, ``squeezenet1_0``, ``squeezenet1_1`` and ``resnet18``; where
the lapdtr models are stricter than timm (``ValueError`` where timm asserts) only they are held
to it.
"""
import copy
import math

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import lapdtr  # noqa: F401  (registers edgevit_* and squeezenet*)
from lapdtr.models import partition, units
from lapdtr.models.edgevit import EdgeVit

OURS = ["edgevit_xxs", "squeezenet1_0", "squeezenet1_1"]
NAMES = OURS + ["resnet18"]
SIZE = 32  # the smallest side EdgeViT takes (a multiple of 32): keeps every check cheap
# what the pretrained_cfg must say (pool_size: forward_features' map at input_size)
CFG = {
    "edgevit_xxs": dict(pool_size=(7, 7), first_conv="stages.0.downsample.proj",
                        classifier="head", interpolation="bicubic", crop_pct=0.875),
    "squeezenet1_0": dict(pool_size=(13, 13), first_conv="features.0", classifier="classifier.1",
                          interpolation="bilinear", crop_pct=0.875),
    "squeezenet1_1": dict(pool_size=(13, 13), first_conv="features.0", classifier="classifier.1",
                          interpolation="bilinear", crop_pct=0.875),
    "resnet18": dict(pool_size=(7, 7), first_conv="conv1", classifier="fc"),
}
# feature levels (channels, reduction) of forward_intermediates / feature_info
LEVELS = {
    "edgevit_xxs": [(36, 4), (72, 8), (144, 16), (288, 32)],
    "squeezenet1_0": [(96, 2), (256, 4), (512, 8), (512, 16)],
    "squeezenet1_1": [(64, 2), (128, 4), (256, 8), (512, 16)],
    "resnet18": [(64, 2), (64, 4), (128, 8), (256, 16), (512, 32)],
}


_MODELS = {}


def _create(name, **kwargs):
    """A new model in eval mode; a copy of one cached instance when built with no options (the
    same weights each time, and cheaper than timm's initialisation)."""
    if not kwargs and name in _MODELS:
        return copy.deepcopy(_MODELS[name])
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    if isinstance(model, EdgeVit):  # non-trivial head BatchNorm: norm=True must show
        bn = model.norm
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    if not kwargs:
        _MODELS[name] = copy.deepcopy(model)
    return model


def _x(batch=1, size=SIZE, chans=3):
    torch.manual_seed(1)
    return torch.randn(batch, chans, size, size)


def _tracer_kwargs():
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                param_shapes_constant=True)


def _fx(model):
    """timm's ``_create_fx_model`` (eval): a feature extractor returning the last graph node."""
    kw = _tracer_kwargs()
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    fx = create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                  eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)
    return fx, eval_nodes


def _final_norm(model, name):
    """What ``norm=True`` applies to the last intermediate."""
    return model.norm if name.startswith("edgevit") else torch.nn.Identity()


# ---- pretrained_cfg / default_cfg ----------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_default_cfg(name):
    model = _create(name)
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg or cfg == model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and not cfg.get("fixed_input_size", False)
    assert cfg["num_classes"] == 1000 == model.num_classes
    assert tuple(cfg["mean"]) == IMAGENET_DEFAULT_MEAN and tuple(cfg["std"]) == IMAGENET_DEFAULT_STD
    for key, value in CFG[name].items():
        assert cfg[key] == value, key
    sd = model.state_dict()
    assert cfg["first_conv"] + ".weight" in sd and cfg["classifier"] + ".weight" in sd
    assert sd[cfg["first_conv"] + ".weight"].shape[1] == 3
    assert sd[cfg["classifier"] + ".weight"].shape[0] == 1000
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["interpolation"] == cfg["interpolation"]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, *cfg["input_size"]))
    assert tuple(feats.shape[2:]) == cfg["pool_size"]  # timm: unpooled map == pool_size
    assert feats.shape[1] == model.num_features > 0 and model.head_hidden_size > 0


# ---- head: reset_classifier, num_features, head_hidden_size, forward_head ------------------------

@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_and_forward_head(name):
    model = _create(name)
    x = _x(2)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        logits = model(x)
        assert feats.shape[:2] == (2, model.num_features) and feats.ndim == 4
        assert pre.shape == (2, model.head_hidden_size) == (2, model.num_features)
        assert logits.shape == (2, 1000) and torch.equal(model.forward_head(feats), logits)

        model.reset_classifier(0)  # no classifier: the pooled pre-logit features
        assert model.num_classes == 0
        assert torch.equal(model(x), pre)

        model.reset_classifier(0, "")  # no pooling either: the unpooled map, as timm's CNNs
        out = model(x)
        assert out.shape == feats.shape
        assert torch.equal(out, _final_norm(model, name)(feats))
        assert torch.equal(model.forward_features(x), feats)

        model.reset_classifier(0, "avg")  # pooling back
        assert torch.equal(model(x), pre)

        model.reset_classifier(7)
        assert model.num_classes == 7 and model(x).shape == (2, 7)
        clf = model.get_classifier()
        assert (clf.out_features if isinstance(clf, torch.nn.Linear) else clf.out_channels) == 7

    # at creation too (timm's test_model_default_cfgs)
    with torch.no_grad():
        out = _create(name, num_classes=0, global_pool="")(x)
    assert out.ndim == 4 and out.shape[1] == model.num_features


@pytest.mark.parametrize("name", NAMES)
def test_other_global_pools(name):
    model = _create(name)
    x = _x(2)
    with torch.no_grad():
        feats = model.forward_features(x)
        for pool, mult in [("max", 1), ("avgmax", 1), ("fast", 1), ("catavgmax", 2)]:
            model.reset_classifier(0, pool)
            assert model.head_hidden_size == mult * model.num_features, pool
            pre = model.forward_head(feats, pre_logits=True)
            assert pre.shape == (2, model.head_hidden_size), pool
            assert torch.equal(model(x), pre), pool
            if name.startswith("squeezenet") and mult > 1:
                continue  # its classifier conv comes before the pool: see the error test below
            model.reset_classifier(5)  # keeps the pool
            assert model(x).shape == (2, 5), pool
            assert model.head_hidden_size == mult * model.num_features, pool
            assert torch.equal(model.forward_head(feats, pre_logits=True), pre), pool


@pytest.mark.parametrize("name", OURS)
def test_bad_head_arguments_are_value_errors(name):
    model = _create(name)
    with pytest.raises(ValueError, match="global_pool='median' is not a pooling"):
        model.reset_classifier(3, "median")
    with pytest.raises(ValueError, match="global_pool=2 is not a pooling"):
        model.reset_classifier(3, 2)
    with pytest.raises(ValueError, match="global_pool='max2' is not a pooling"):
        _create(name, global_pool="max2")
    with pytest.raises(ValueError, match="num_classes=-2 must be an integer >= 0"):
        model.reset_classifier(-2)
    if name.startswith("squeezenet"):
        with pytest.raises(ValueError, match="'catavgmax' doubles the channels"):
            model.reset_classifier(3, "catavgmax")
        model.reset_classifier(3, "")  # a conv classifier without pooling: a map of scores
        with torch.no_grad():
            assert model(_x(size=64)).shape == (1, 3, 3, 3)
    else:
        with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0"):
            model.reset_classifier(3, "")
    assert model.num_classes == (3 if name.startswith("squeezenet") else 1000)  # not half-reset


@pytest.mark.parametrize("name", NAMES)
def test_units_still_equal_model_after_head_changes(name):
    model = _create(name)
    x = _x(2)
    for args in [(0, ""), (4, "max")]:
        model.reset_classifier(*args)
        stages = partition(model, [1, len(units(model, SIZE)) - 1], img_size=SIZE)
        with torch.no_grad():
            y = x
            for s in stages:
                y = s(y)
            assert torch.equal(y, model(x)), args


# ---- forward_intermediates / prune_intermediate_layers / features_only ---------------------------

@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name):
    model = _create(name)
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert list(zip(info.channels(), info.reduction())) == LEVELS[name]
    n = len(LEVELS[name])
    x = _x(2)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(inter) == n
        for (chs, red), o in zip(LEVELS[name], inter):
            assert o.shape[:2] == (2, chs)
            assert all(s <= math.ceil(SIZE / red) + 1 for s in o.shape[2:]), (o.shape, red)
        assert torch.equal(inter[-1], final)

        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert isinstance(last2, list) and len(last2) == 2
        assert all(torch.equal(a, b) for a, b in zip(last2, inter[-2:]))
        _, some = model.forward_intermediates(x, indices=[0, -1], output_fmt="NCHW")
        assert torch.equal(some[0], inter[0]) and torch.equal(some[1], inter[-1])

        early, taken = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert len(taken) == 1 and torch.equal(taken[0], inter[1]) and torch.equal(early, inter[1])

        final_n, normed = model.forward_intermediates(x, norm=True)
        assert torch.equal(final_n, final)
        assert all(torch.equal(a, b) for a, b in zip(normed[:-1], inter[:-1]))
        assert torch.equal(normed[-1], _final_norm(model, name)(inter[-1]))
        if name.startswith("edgevit"):
            assert not torch.equal(normed[-1], inter[-1])

    bad = ValueError if name in OURS else (ValueError, AssertionError)
    with pytest.raises(bad, match="NHWC" if name in OURS else None):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(bad, match=rf"indices={n + 1}: the last n must lie in 1..{n}"
                       if name in OURS else None):
        model.forward_intermediates(x, indices=n + 1)
    with pytest.raises(bad, match=rf"{n} is not a feature index" if name in OURS else None):
        model.forward_intermediates(x, indices=[0, n])


@pytest.mark.parametrize("name", NAMES)
def test_prune_intermediate_layers(name):
    x = _x(2)
    ref = _create(name)
    with torch.no_grad():
        logits = ref(x)
        _, inter = ref.forward_intermediates(x)

    model = _create(name)  # keep levels 0 and 1: later layers, norm and head go
    assert model.prune_intermediate_layers([0, 1]) == [0, 1]
    assert model.num_classes == 0 and model.num_features == LEVELS[name][1][0]
    with torch.no_grad():
        out = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert torch.equal(out[0], inter[0]) and torch.equal(out[1], inter[1])
        assert torch.equal(model(x), inter[1])  # unpooled map of the last kept level
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in ref.parameters())

    model = _create(name)  # default: the last level, head pruned, norm kept
    assert model.prune_intermediate_layers() == [len(inter) - 1]
    with torch.no_grad():
        assert torch.equal(model(x), _final_norm(ref, name)(inter[-1]))
        assert torch.equal(model.forward_intermediates(x, indices=1)[1][0], inter[-1])

    model = _create(name)
    model.prune_intermediate_layers([-1], prune_norm=True, prune_head=False)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), inter[-1])
        if name.startswith("edgevit"):  # the classifier stays; its BatchNorm went
            assert model(x).shape == (2, 1000) and not torch.equal(model(x), logits)
        else:
            assert torch.equal(model(x), logits)


@pytest.mark.parametrize("name", OURS)
def test_pruned_model_trains(name):
    """The pruned head adds no in-place op on the features (SqueezeNet's classifier ReLU), so
    gradients flow in eval mode (dropout off) as in train mode."""
    model = _create(name)
    model.prune_intermediate_layers([0])
    for train in (False, True):
        model.train(train).zero_grad()
        out = model(_x(2))
        out.square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("feature_cls", [None, "getter", "fx"])
@pytest.mark.parametrize("name", NAMES)
def test_features_only(name, feature_cls):
    x = _x(2)
    with torch.no_grad():
        inter = _create(name).forward_intermediates(x, intermediates_only=True)
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = _create(name, features_only=True, **kwargs)
    assert list(zip(model.feature_info.channels(), model.feature_info.reduction())) == LEVELS[name]
    with torch.no_grad():
        outs = model(x)
    assert len(outs) == len(inter)
    assert all(torch.equal(a, b) for a, b in zip(outs, inter))


# ---- torch.fx and TorchScript ------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_fx_trace(name):
    model = _create(name)
    x = _x()
    fx, nodes = _fx(model)
    assert nodes[0] == "x" and len(nodes) > 20
    if name.startswith("edgevit"):  # the side check is a leaf call, kept in the graph
        assert "stages.0.blocks.0.global_sparse.attn._delegate_grid" in nodes
    with torch.inference_mode():
        assert torch.equal(tuple(fx(x).values())[0], model(x))
        assert torch.equal(torch.fx.symbolic_trace(model)(x), model(x))
    # timm's own helper, asking for inner nodes
    level = model.feature_info[1]["module"]
    inner = timm.models.create_feature_extractor(model, return_nodes=[level])
    with torch.no_grad():
        assert torch.equal(inner(x)[level], model.forward_intermediates(x)[1][1])
    if name.startswith("edgevit"):
        with pytest.raises(ValueError, match="sampling ratio 4 needs a feature map whose sides "
                                             "divide by 4, got 18x18"):
            fx(_x(size=72))


@pytest.mark.parametrize("name", NAMES)
def test_fx_backward(name):
    model = _create(name, num_classes=4).train()
    fx, _ = _fx(model)
    out = tuple(fx(_x(2)).values())[0]
    assert out.shape == (2, 4)
    out.mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", NAMES)
def test_torchscript(name):
    x = _x()
    with timm.layers.set_layer_config(scriptable=True):
        model = _create(name)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), ref, rtol=1e-4, atol=1e-5)
        fx_scripted = torch.jit.script(_fx(model)[0])
        assert torch.allclose(tuple(fx_scripted(x).values())[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing(name):
    x = _x(2)
    model = _create(name, drop_rate=0.).train()
    model.forward(x).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    out = model(x)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-6), n
    model.eval()
    with torch.no_grad():
        final, _ = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), rtol=1e-5, atol=1e-6)
