"""Elastic heads and MBConv widths for EfficientViT-B (MIT's LiteMLA): qkv per head, grouped
multi-scale aggregation, proj reading each head in two ranges; full width is the original
exactly, a reduced width equals zeroing the dropped heads / mid channels, weights are views."""
import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.efficientvit_mit import EfficientVitBlock, LiteMLA, MBConv
from torch import nn

from lapdtr.elastic import ElasticError, count_for, make_elastic, set_width, widths
from lapdtr.elastic.efficientvit_b import ElasticLiteMLA, ElasticMBConv, convert
from lapdtr.testing import assert_close_scaled, informative_weights_

from elastic_helpers import (assert_clearly_differs, assert_count_refused, assert_full_width,
                             assert_largest_first, assert_partitioned_equals_whole,
                             assert_ratio_refused, informative_model, make_elastic_keeping_output,
                             order_by_magnitude_keeping_output, output_at_width,
                             run_with_inputs_cut, spy_weights, views_of_parameters,
                             weight_copies)

_BASE = {}


def _b0():
    """efficientvit_b0 (attention in stages 2 and 3: 4 blocks of 4, 4, 8, 8 heads of 16) on
    informative weights, built once and copied per test."""
    if "b0" not in _BASE:
        _BASE["b0"] = informative_model("efficientvit_b0", num_classes=10)
    m, x = _BASE["b0"]
    return copy.deepcopy(m), x


def _zeroing_reference(model, x, heads_ratio, hidden_ratio=None):
    """The model with the dropped heads' channels zeroed at proj's input (in every range) and
    the dropped mid channels zeroed at point_conv's input."""
    hidden_ratio = heads_ratio if hidden_ratio is None else hidden_ratio
    cuts = []
    for m in model.modules():
        if isinstance(m, ElasticLiteMLA):
            cuts.append((m.proj, count_for(heads_ratio, m.num_heads) * m.dim,
                         m.num_heads * m.dim, len(m.aggreg) + 1))
        elif isinstance(m, ElasticMBConv):
            cuts.append((m.point_conv, count_for(hidden_ratio, m.hidden_features),
                         m.hidden_features, 1))
    return run_with_inputs_cut(model, x, cuts, dim=1)


def test_full_width_is_the_original_and_only_the_vit_blocks_are_swapped():
    model, x = _b0()
    make_elastic_keeping_output(model, x)
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
    y = output_at_width(model, x, ratio)
    assert_close_scaled(y, _zeroing_reference(model, x, ratio))
    assert_clearly_differs(y, full)


@pytest.mark.parametrize("heads, hidden", [(0.5, 1.0), (1.0, 0.25)])
def test_heads_and_mid_channels_set_apart(heads, hidden):
    model, x = _b0()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    y = output_at_width(model, x, heads, hidden)
    assert_close_scaled(y, _zeroing_reference(model, x, heads, hidden))
    assert_clearly_differs(y, full)


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
        want = run_with_inputs_cut(block, x, [(attn.proj, k * 8, 24, 3)], dim=1)
        assert_close_scaled(y, want)
        assert_clearly_differs(y, full)


def test_weights_are_sliced_as_views_not_copied(monkeypatch):
    """At a reduced width every weight given to a conv or a matmul is a view of a parameter's
    storage, a conv's one contiguous (F.conv2d would copy another), and the profiler sees no
    copy, clone, cat or contiguous of a tensor shaped as any weight or weight slice."""
    model, x = _b0()
    make_elastic(model)
    set_width(model, 0.5)
    convs = spy_weights(monkeypatch, F, "conv2d")
    linears = spy_weights(monkeypatch, F, "linear")
    with torch.no_grad():
        model(x)
    monkeypatch.undo()
    # per LiteMLA: qkv, dw, grouped 1x1, proj x 2 ranges; per MBConv: 2 convs + 1 matmul
    assert len(linears) >= 4 * 2 + 4
    seen = [("conv2d", view, w.is_contiguous())
            for w, view in zip(convs, views_of_parameters(model, convs))]
    seen += [("linear", view, True) for view in views_of_parameters(model, linears)]
    assert all(ok and contiguous for _, ok, contiguous in seen), seen

    shapes = {tuple(t.shape) for t in [*model.parameters(), *convs, *linears]}
    copies = weight_copies(model, x, shapes=shapes)
    assert not copies, copies


def test_magnitude_order_keeps_the_full_width_output_and_the_reduced_one_exact():
    model, x = _b0()
    make_elastic(model)
    applied = order_by_magnitude_keeping_output(model, x)
    assert len(applied) == 8
    assert any(v != sorted(v) for v in applied.values())  # something really moved
    assert_largest_first(model, (ElasticLiteMLA, ElasticMBConv))
    y = output_at_width(model, x, 0.5)
    assert_close_scaled(y, _zeroing_reference(model, x, 0.5))


def test_a_partitioned_elastic_model_runs_stage_by_stage():
    assert_partitioned_equals_whole(*_b0(), ["stages.2.blocks.2", "stages.3.blocks.1"])


def test_bad_counts_and_unsliced_norms_are_named():
    model, _ = _b0()
    make_elastic(model)
    attn = next(m for m in model.modules() if isinstance(m, ElasticLiteMLA))
    mlp = next(m for m in model.modules() if isinstance(m, ElasticMBConv))
    assert_count_refused(attn.set_heads, 5, "heads", 4)
    assert_count_refused(mlp.set_hidden, 0, "hidden", 256)
    assert_ratio_refused(model, 0)
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
    assert_full_width(model)
