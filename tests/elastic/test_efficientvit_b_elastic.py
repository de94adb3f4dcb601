"""Elastic heads and MBConv widths for EfficientViT-B (MIT's LiteMLA): qkv per head, grouped
multi-scale aggregation, proj reading each head in two ranges; full width is the original
exactly, a reduced width equals zeroing the dropped heads / mid channels, weights are views."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.efficientvit_mit import EfficientVitBlock, LiteMLA, MBConv
from torch import nn

import lapdtr
from lapdtr.elastic import (ElasticError, count_for, make_elastic, order_by_magnitude_,
                            set_width, widths)
from lapdtr.elastic.efficientvit_b import ElasticLiteMLA, ElasticMBConv, convert
from lapdtr.testing import assert_close_scaled, informative_weights_

_BASE = {}


def _b0():
    """efficientvit_b0 (attention in stages 2 and 3: 4 blocks of 4, 4, 8, 8 heads of 16) on
    informative weights, built once and copied per test."""
    if "b0" not in _BASE:
        torch.manual_seed(0)
        m = lapdtr.create_model("efficientvit_b0", num_classes=10).eval()
        x = torch.randn(2, 3, 64, 64)
        informative_weights_(m, seed=1, probe=x)
        _BASE["b0"] = (m, x)
    m, x = _BASE["b0"]
    return copy.deepcopy(m), x


def _cut_ranges(d_keep, width, ranges):
    """A pre-hook zeroing channels ``d_keep..width`` of each of ``ranges`` ranges at dim 1."""
    def hook(mod, args):
        a = args[0].clone()
        for s in range(ranges):
            a[:, s * width + d_keep:(s + 1) * width] = 0
        return (a,)
    return hook


def _zeroing_reference(model, x, heads_ratio, hidden_ratio=None):
    """The model with the dropped heads' channels zeroed at proj's input (in every range) and
    the dropped mid channels zeroed at point_conv's input."""
    hidden_ratio = heads_ratio if hidden_ratio is None else hidden_ratio
    hooks = []
    for m in model.modules():
        if isinstance(m, ElasticLiteMLA):
            T = m.num_heads * m.dim
            hooks.append(m.proj.register_forward_pre_hook(
                _cut_ranges(count_for(heads_ratio, m.num_heads) * m.dim, T, len(m.aggreg) + 1)))
        elif isinstance(m, ElasticMBConv):
            hooks.append(m.point_conv.register_forward_pre_hook(
                _cut_ranges(count_for(hidden_ratio, m.hidden_features), m.hidden_features, 1)))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()


def test_full_width_is_the_original_and_only_the_vit_blocks_are_swapped():
    model, x = _b0()
    with torch.no_grad():
        want = model(x)
    keys = list(model.state_dict())
    make_elastic(model)
    assert sum(isinstance(m, ElasticLiteMLA) for m in model.modules()) == 4
    assert sum(isinstance(m, ElasticMBConv) for m in model.modules()) == 4
    # the conv stages' MBConvs and every stage's downsampling one stay timm's
    assert sum(type(m) is MBConv for m in model.modules()) == 6
    assert all(type(model.stages[i].blocks[0].main) is MBConv for i in range(4))
    for m in model.modules():
        if isinstance(m, EfficientVitBlock):
            assert isinstance(m.local_module.main, ElasticMBConv)
    assert widths(model) == {"heads": [(4, 4), (4, 4), (8, 8), (8, 8)],
                             "hidden": [(256, 256), (256, 256), (512, 512), (512, 512)]}
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), want)
    set_width(model, 0.5)
    set_width(model, 1.0)
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("ratio, heads, hidden", [(0.75, [3, 3, 6, 6], [192, 192, 384, 384]),
                                                  (0.5, [2, 2, 4, 4], [128, 128, 256, 256]),
                                                  (0.25, [1, 1, 2, 2], [64, 64, 128, 128])])
def test_reduced_width_equals_zeroing_the_dropped_heads_and_mid_channels(ratio, heads, hidden):
    model, x = _b0()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    w = set_width(model, ratio)
    assert [k for k, _ in w["heads"]] == heads and [m for m, _ in w["hidden"]] == hidden
    with torch.no_grad():
        y = model(x)
    set_width(model, 1.0)
    assert_close_scaled(y, _zeroing_reference(model, x, ratio))
    assert (y - full).abs().max() > 100 * 2e-5 * full.abs().max()


@pytest.mark.parametrize("heads, hidden", [(0.5, 1.0), (1.0, 0.25)])
def test_heads_and_mid_channels_set_apart(heads, hidden):
    model, x = _b0()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    set_width(model, heads, mlp_ratio=hidden)
    with torch.no_grad():
        y = model(x)
    set_width(model, 1.0)
    assert_close_scaled(y, _zeroing_reference(model, x, heads, hidden))
    assert (y - full).abs().max() > 100 * 2e-5 * full.abs().max()


def test_train_mode_batch_norms_and_their_running_stats_match_the_reference():
    """proj's and point_conv's BatchNorms are over their outputs: in train mode a reduced width
    normalises with the batch's statistics and updates the running ones as the zeroing
    reference does."""
    model, x = _b0()
    make_elastic(model)
    ref = copy.deepcopy(model).train()
    model.train()
    set_width(model, 0.5)
    with torch.no_grad():
        y = model(x)
    want = _zeroing_reference(ref, x, 0.5)
    assert_close_scaled(y, want)
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        if "running" in n:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
        else:
            assert torch.equal(a, b), n


def test_three_ranges_when_lite_mla_has_two_scales():
    """A LiteMLA with scales (3, 5) and 3 heads of 8 on 32 channels: proj reads each head in
    three ranges, each aggreg op's grouped convs are cut with it, and the head count is read
    from qkv (not ``in_channels // dim``)."""
    torch.manual_seed(0)
    block = EfficientVitBlock(32, head_dim=8)
    block.context_module.main = LiteMLA(32, 32, heads=3, dim=8, scales=(3, 5),
                                        norm_layer=(None, nn.BatchNorm2d))
    block.eval()
    x = torch.randn(2, 32, 6, 6)
    informative_weights_(block, seed=3, probe=x)
    with torch.no_grad():
        full = block(x)
    convert(block)
    attn = block.context_module.main
    assert isinstance(attn, ElasticLiteMLA) and attn.num_heads == 3
    assert attn.proj.conv.in_channels == 3 * 3 * 8
    with torch.no_grad():
        assert torch.equal(block(x), full)
    for k in (1, 2):
        attn.set_heads(k)
        with torch.no_grad():
            y = block(x)
        attn.set_heads(3)
        h = attn.proj.register_forward_pre_hook(_cut_ranges(k * 8, 24, 3))
        with torch.no_grad():
            want = block(x)
        h.remove()
        assert_close_scaled(y, want)
        assert (y - full).abs().max() > 100 * 2e-5 * full.abs().max()


def test_weights_are_sliced_as_views_not_copied(monkeypatch):
    """At a reduced width every weight given to a conv or a matmul is a view of a parameter's
    storage, a conv's one contiguous (F.conv2d would copy another), and the profiler sees no
    copy, clone, cat or contiguous of a tensor shaped as any weight or weight slice."""
    model, x = _b0()
    make_elastic(model)
    set_width(model, 0.5)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, shapes = [], {tuple(p.shape) for p in model.parameters()}
    real_conv, real_linear = F.conv2d, F.linear

    def conv2d(inp, weight, *a, **kw):
        seen.append(("conv2d", weight.untyped_storage().data_ptr() in params,
                     weight.is_contiguous()))
        shapes.add(tuple(weight.shape))
        return real_conv(inp, weight, *a, **kw)

    def linear(inp, weight, bias=None):
        seen.append(("linear", weight.untyped_storage().data_ptr() in params, True))
        shapes.add(tuple(weight.shape))
        return real_linear(inp, weight, bias)

    monkeypatch.setattr(F, "conv2d", conv2d)
    monkeypatch.setattr(F, "linear", linear)
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    # per LiteMLA: qkv, dw, grouped 1x1, proj x 2 ranges; per MBConv: 2 convs + 1 matmul
    assert sum(s[0] == "linear" for s in seen) >= 4 * 2 + 4
    assert all(ok and contiguous for _, ok, contiguous in seen), seen

    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(x)
    copies = [(e.name, shape) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous")
              for shape in e.input_shapes if shape and tuple(shape) in shapes]
    assert not copies, copies


def test_magnitude_order_keeps_the_full_width_output_and_the_reduced_one_exact():
    model, x = _b0()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    applied = order_by_magnitude_(model)
    assert len(applied) == 8
    assert any(v != sorted(v) for v in applied.values())  # something really moved
    with torch.no_grad():
        assert_close_scaled(model(x), full)
    for mod in model.modules():
        if isinstance(mod, (ElasticLiteMLA, ElasticMBConv)):
            score = mod.magnitude()
            assert torch.all(score[:-1] >= score[1:])
    set_width(model, 0.5)
    with torch.no_grad():
        y = model(x)
    set_width(model, 1.0)
    assert_close_scaled(y, _zeroing_reference(model, x, 0.5))


def test_a_partitioned_elastic_model_runs_stage_by_stage():
    model, x = _b0()
    make_elastic(model)
    set_width(model, 0.5)
    with torch.no_grad():
        want = model(x)
        y = x
        for s in lapdtr.partition(model, ["stages.2.blocks.2", "stages.3.blocks.1"]):
            y = s(y)
    assert torch.equal(y, want)


def test_bad_counts_and_unsliced_norms_are_named():
    model, _ = _b0()
    make_elastic(model)
    attn = next(m for m in model.modules() if isinstance(m, ElasticLiteMLA))
    mlp = next(m for m in model.modules() if isinstance(m, ElasticMBConv))
    with pytest.raises(ElasticError, match=r"heads=5; allowed: 1\.\.4"):
        attn.set_heads(5)
    with pytest.raises(ElasticError, match=r"hidden=0; allowed: 1\.\.256"):
        mlp.set_hidden(0)
    with pytest.raises(ElasticError, match=r"\(0, 1\]"):
        set_width(model, 0)
    with pytest.raises(ElasticError, match="not a permutation"):
        attn.reorder_([0, 0, 1, 2])
    assert attn.head_site() == (attn.proj, 1, attn.dim, 2)  # heads meet at proj in 2 ranges
    # a norm on qkv's output / the mid channels is not sliced: refused, nothing changed
    attn.qkv.norm = nn.BatchNorm2d(attn.qkv.conv.out_channels).eval()
    with pytest.raises(ElasticError, match="norm on qkv's output.*allowed: heads=4 only"):
        set_width(model, 0.5)
    attn.qkv.norm = nn.Identity()
    mlp.depth_conv.norm = nn.BatchNorm2d(256).eval()
    with pytest.raises(ElasticError, match="norm on the mid channels.*allowed: hidden=256 only"):
        set_width(model, 0.5)
    assert all(k == h for k, h in widths(model)["heads"] + widths(model)["hidden"])
