"""The vit_relpos (timm ``VisionTransformerRelPos``), resnetv2 (``ResNetV2``, BiT) and byobnet
(``ByobNet``: GENet, ``resnet*ts``, the CLIP ResNets, with an attention-pool head or global
average pooling) adapters: on
informative weights (``lapdtr.testing.informative_weights_``) single-unit stages in sequence
equal ``model(x)`` exactly, every unit shows in the output (skipping or perturbing it moves the
logits by more than 100x the fp32 tolerance), every timm key is owned by a unit (by exactly one,
except the relative-position bias that ``vit_srelpos_*`` shares among its blocks), and the
units are laid out as the family docs say. Small variants at 64 px keep this file cheap."""
from collections import Counter

import pytest
import torch

import lapdtr
from lapdtr.models import get_adapter_for_name, partition, unit_owned_names, units
from lapdtr.testing import assert_sees_every_unit, informative_weights_

SIZE = 64
# name -> (family, create_model kwargs)
CASES = {
    "vit_relpos_small_patch16_224": ("vit_relpos", {"depth": 3}),
    "vit_srelpos_small_patch16_224": ("vit_relpos", {"depth": 3}),
    "vit_relpos_medium_patch16_cls_224": ("vit_relpos", {"depth": 2}),  # class token, avg pool
    "resnetv2_18": ("resnetv2", {}),
    "resnetv2_50x1_bit": ("resnetv2", {}),
    "gernet_s": ("byobnet", {}),
    "resnet32ts": ("byobnet", {}),
    "resnet50_clip_gap": ("byobnet", {}),
    "resnet50_clip": ("byobnet", {}),  # attention-pool head (sized by img_size at creation)
}
_MODELS = {}


def _model(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        model = lapdtr.create_model(name, img_size=SIZE, num_classes=10, **CASES[name][1])
        probe = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
        _MODELS[name] = informative_weights_(model, seed=1, probe=probe)
    return _MODELS[name]


@pytest.mark.parametrize("name", list(CASES))
def test_single_unit_stages_equal_the_model_and_every_unit_shows(name):
    model = _model(name)
    assert get_adapter_for_name(name).name == CASES[name][0]
    ul = units(model, SIZE)
    stages = partition(model, list(range(1, len(ul))), unit_list=ul)
    assert [s.unit_names for s in stages] == [[u.name] for u in ul]
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        y = x
        for s in stages:
            y = s(y)
    assert ref.shape == (3, 10) and torch.isfinite(ref).all()
    assert torch.equal(y, ref)
    seen = assert_sees_every_unit(model, x[:1], ref[:1], unit_list=ul)
    assert list(seen) == [u.name for u in ul]


@pytest.mark.parametrize("name", list(CASES))
def test_units_own_every_timm_key(name):
    model = _model(name)
    ul = units(model, SIZE)
    owners = Counter(k for u in ul for k in unit_owned_names(model, u.modules))
    assert set(owners) == set(model.state_dict())
    shared = set(unit_owned_names(model, ["shared_rel_pos"]))
    n_blocks = sum(u.kind == "block" for u in ul)
    assert {k: c for k, c in owners.items() if c > 1} == {k: n_blocks for k in shared}
    assert bool(shared) == (name == "vit_srelpos_small_patch16_224")


def test_vit_relpos_layout_and_the_shared_bias():
    for name in ("vit_relpos_small_patch16_224", "vit_srelpos_small_patch16_224",
                 "vit_relpos_medium_patch16_cls_224"):
        model = _model(name)
        ul = units(model, SIZE)
        depth = CASES[name][1]["depth"]
        assert [u.name for u in ul] == ["embed", *[f"blocks.{i}" for i in range(depth)], "head"]
        assert all(u.out_format == "tokens" for u in ul[:-1])
        tokens = (SIZE // 16) ** 2 + (name.endswith("_cls_224"))
        assert ul[0].out_shape[1] == tokens
        assert ("cls_token" in ul[0].modules) == name.endswith("_cls_224")
        shared = model.shared_rel_pos is not None
        assert shared == name.startswith("vit_srelpos")
        assert all(("shared_rel_pos" in u.modules) == shared for u in ul if u.kind == "block")
    # a stage of one srelpos block holds the shared bias module and computes the bias itself
    model = _model("vit_srelpos_small_patch16_224")
    ul = units(model, SIZE)
    _, mid, _ = partition(model, [2, 3], unit_list=ul)
    assert mid.unit_names == ["blocks.1"] and mid.shared_rel_pos is model.shared_rel_pos
    x = torch.randn(2, *ul[2].in_shape[1:])
    with torch.no_grad():
        assert torch.equal(mid(x), model.blocks[1](x, shared_rel_pos=model.shared_rel_pos.get_bias()))


def test_resnetv2_layout_head_holds_the_final_preact_norm():
    model = _model("resnetv2_50x1_bit")
    ul = units(model, SIZE)
    names = [u.name for u in ul]
    assert names[0] == "stem" and names[-1] == "head"
    assert names[1:-1] == [f"stages.{i}.blocks.{j}" for i, n in enumerate((3, 4, 6, 3))
                           for j in range(n)]
    assert ul[-1].modules == ("norm", "head")
    assert not isinstance(model.norm, torch.nn.Identity)  # pre-activation: the net's last norm
    # the stage's projection shortcut is in its first block: a stage has no other tensors
    assert all(model.stages[i].blocks[0].downsample is not None for i in range(4))
    assert all(k.startswith(f"stages.{i}.blocks.") for i in range(4)
               for k in model.stages[i].state_dict(prefix=f"stages.{i}."))
    assert [u.out_shape[1] for u in ul[1:-1]][-1] == 2048


def test_byobnet_layout_head_holds_final_conv_and_the_attention_pool():
    from timm.layers import AttentionPool2d

    for name in ("gernet_s", "resnet32ts", "resnet50_clip_gap", "resnet50_clip"):
        model = _model(name)
        ul = units(model, SIZE)
        assert ul[0].name == "stem" and ul[-1].modules == ("final_conv", "head")
        assert [u.name for u in ul[1:-1]] == [f"stages.{i}.{j}" for i, s in enumerate(model.stages)
                                              for j in range(len(s))]
    assert not isinstance(_model("gernet_s").final_conv, torch.nn.Identity)
    clip = _model("resnet50_clip")
    assert isinstance(clip.head, AttentionPool2d)
    # the attention pool's position embedding is sized at creation: img_size reaches timm
    assert get_adapter_for_name("resnet50_clip").img_size_kwarg
    assert units(clip, SIZE)[-2].out_shape[-2:] == (SIZE // 32, SIZE // 32)


def test_a_model_built_for_another_size_is_named():
    model = lapdtr.create_model("vit_relpos_small_patch16_224", img_size=SIZE, depth=1)
    with pytest.raises(ValueError, match=r"vit_relpos model VisionTransformerRelPos cannot take "
                                         r"image size 96: unit 'embed' failed"):
        units(model, 96)
    assert not get_adapter_for_name("resnetv2_18").img_size_kwarg  # ResNetV2 takes any size
