"""Elastic heads and MLP widths for EfficientViT-M: cascaded group attention (first k heads of
the cascade, not reorderable), ConvMlp with a BatchNorm on its hidden units, channel-first maps.

efficientvit_m0 at 128 px: stage 0 runs 8x8 maps through 7x7 windows (timm's padded window
partition), stages 1 and 2 run 4x4 and 2x2 maps as one window each."""
import copy

import pytest
import torch
import torch.nn.functional as F

import lapdtr
from lapdtr.elastic import ElasticError, count_for, make_elastic, set_width
from lapdtr.elastic.efficientvit_m import ElasticCascadedGroupAttention, ElasticConvMlp
from lapdtr.testing import assert_close_scaled

from elastic_helpers import (assert_clearly_differs, assert_count_refused, assert_full_width,
                             assert_largest_first, assert_partitioned_equals_whole,
                             assert_ratio_refused, clear_bias_caches, informative_model,
                             make_elastic_keeping_output, order_by_magnitude_keeping_output,
                             output_at_width, run_with_inputs_cut, spy_weights,
                             views_of_parameters, weight_copies)

SIZE = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core host two threads contend with each other and
    this file's small convs ran 8x slower; restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def prepared(_one_thread):
    """efficientvit_m0 with informative weights and non-zero bias tables (timm zero-inits the
    tables and the last BatchNorm scale of every branch), and a probe batch."""
    return informative_model("efficientvit_m0", img_size=SIZE, size=SIZE, bias_tables=True)


@pytest.fixture
def m0(prepared):
    model, x = prepared
    model = copy.deepcopy(model)
    clear_bias_caches(model)
    return model, x.clone()


def _zeroing_reference(model, ratio, x, mlp_ratio=None):
    """The full-width model with the outputs of heads >= k zeroed before each ``proj`` (ReLU
    then ConvNorm: a zero stays zero) and hidden units >= m zeroed before each ``pw2``."""
    mlp_ratio = ratio if mlp_ratio is None else mlp_ratio
    cuts = [(m.proj, count_for(ratio, m.num_heads) * m.val_dim) for m in model.modules()
            if isinstance(m, ElasticCascadedGroupAttention)]
    cuts += [(m.pw2, count_for(mlp_ratio, m.hidden_features)) for m in model.modules()
             if isinstance(m, ElasticConvMlp)]
    return run_with_inputs_cut(model, x, cuts, dim=1)  # channel-first maps


def _elastic(model):
    return [m for m in model.modules()
            if isinstance(m, (ElasticCascadedGroupAttention, ElasticConvMlp))]


def test_full_width_is_the_original_and_keys_are_unchanged(m0):
    model, x = m0
    original = copy.deepcopy(model)
    make_elastic_keeping_output(model, x)
    # 6 blocks' attentions; 2 ConvMlp per block and 2 per downsampling (stages 1, 2)
    assert sum(isinstance(m, ElasticCascadedGroupAttention) for m in model.modules()) == 6
    assert sum(isinstance(m, ElasticConvMlp) for m in model.modules()) == 16
    with torch.no_grad():
        model.train()
        original.train()
        assert torch.equal(model(x), original(x))  # training mode: batch statistics
    for a, b in zip(model.buffers(), original.buffers()):
        assert torch.equal(a, b)  # and the same running-statistics updates


def test_widths_round_per_layer():
    """m0 has 4 heads in every stage; m1 has (2, 3, 3): half of 2 and of 3 heads is 1 and 2
    (round half to even), and 0.75 of 2 heads is all of them."""
    m0 = make_elastic(lapdtr.create_model("efficientvit_m0", img_size=64))
    hidden = [128] * 3 + [256] * 6 + [384] * 7  # 2C per ConvMlp, stage by stage
    for ratio, k in [(0.75, 3), (0.5, 2), (0.25, 1), (0.1, 1)]:
        w = set_width(m0, ratio)
        assert w["heads"] == [(k, 4)] * 6
        assert w["hidden"] == [(max(1, round(ratio * h)), h) for h in hidden]
    m1 = make_elastic(lapdtr.create_model("efficientvit_m1", img_size=64))
    assert [k for k, _ in set_width(m1, 0.5)["heads"]] == [1, 2, 2, 2, 2, 2]
    assert set_width(m1, 0.75)["heads"] == [(2, 2), (2, 3), (2, 3), (2, 3), (2, 3), (2, 3)]


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25])
def test_reduced_width_equals_zeroing_the_dropped_heads_and_units(m0, ratio):
    model, x = m0
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    y = output_at_width(model, x, ratio)
    assert_close_scaled(y, _zeroing_reference(model, ratio, x))
    assert_clearly_differs(y, full)  # the width changed the logits


def test_reduced_width_in_training_mode_uses_batch_statistics_of_the_kept_units(m0):
    """BatchNorm in training mode normalizes each channel by the batch: the kept hidden units'
    statistics are the full model's, and only their running statistics move."""
    model, x = m0
    make_elastic(model)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    set_width(model, 0.5)
    before = {id(m): (m.pw1.bn.running_mean.clone(), m.pw1.bn.running_var.clone())
              for m in model.modules() if isinstance(m, ElasticConvMlp)}
    with torch.no_grad():
        y = model(x)
    want = _zeroing_reference(ref, 0.5, x)  # one training step of each
    assert_close_scaled(y, want)
    for a, b in zip(model.modules(), ref.modules()):
        if isinstance(a, ElasticConvMlp):
            m = a.hidden_now
            mean0, var0 = before[id(a)]
            assert_close_scaled(a.pw1.bn.running_mean[:m], b.pw1.bn.running_mean[:m])
            assert_close_scaled(a.pw1.bn.running_var[:m], b.pw1.bn.running_var[:m])
            assert torch.equal(a.pw1.bn.running_mean[m:], mean0[m:])  # dropped: untouched
            assert torch.equal(a.pw1.bn.running_var[m:], var0[m:])
            assert not torch.equal(a.pw1.bn.running_mean[:m], mean0[:m])
            assert int(a.pw1.bn.num_batches_tracked) == int(b.pw1.bn.num_batches_tracked)
    with torch.no_grad():
        assert_clearly_differs(y, ref(x), scale=want)


def test_heads_and_hidden_set_apart(m0):
    model, x = m0
    make_elastic(model)
    for ratio, mlp_ratio in [(0.5, 1.0), (1.0, 0.25)]:
        y = output_at_width(model, x, ratio, mlp_ratio)
        assert_close_scaled(y, _zeroing_reference(model, ratio, x, mlp_ratio))


def test_weights_are_sliced_as_views_not_copied(m0):
    """At a reduced width no op copies a weight: the profiler sees no copy, clone, cat or
    contiguous of a tensor shaped like a weight or a weight slice in use (F.conv2d would copy a
    column-sliced 1x1 weight, which is why those run as matmuls on the strided view)."""
    model, x = m0
    make_elastic(model)
    set_width(model, 0.5)
    shapes = {tuple(p.shape) for p in model.parameters()}
    for mod in _elastic(model):
        if isinstance(mod, ElasticCascadedGroupAttention):
            w, d = mod.proj[1].conv.weight, mod.heads_now * mod.val_dim
            shapes |= {(w.shape[0], d, 1, 1), (w.shape[0], d), (d, w.shape[0])}
        else:
            m, w1, w2 = mod.hidden_now, mod.pw1.conv.weight, mod.pw2.conv.weight
            shapes |= {(m, *w1.shape[1:]), (m, w1.shape[1]), (w2.shape[0], m, 1, 1),
                       (w2.shape[0], m), (m, w2.shape[0])}
    copies = weight_copies(model, x, shapes=shapes, warmup=True)  # warmup: timm's bias caches
    assert not copies, copies


def test_sliced_weights_share_the_parameters_storage(m0, monkeypatch):
    """Every conv and matmul weight at a reduced width is a view of a parameter (a contiguous
    one for F.conv2d), and the bias tables are views of timm's device-keyed cache."""
    from lapdtr.elastic import efficientvit_m as mod

    model, x = m0
    make_elastic(model)
    set_width(model, 0.5)
    conv_weights = spy_weights(monkeypatch, F, "conv2d")
    mm_weights = spy_weights(monkeypatch, mod.torch, "matmul", at=0)
    with torch.no_grad():
        model(x)
    mms = [view and w.dim() == 2
           for w, view in zip(mm_weights, views_of_parameters(model, mm_weights))]
    convs = [view and w.is_contiguous()
             for w, view in zip(conv_weights, views_of_parameters(model, conv_weights))]
    assert len(mms) == 6 + 16 and all(mms), mms  # proj per attention, pw2 per ConvMlp
    assert convs and all(convs)
    attn = next(m for m in model.modules() if isinstance(m, ElasticCascadedGroupAttention))
    cached = attn.attention_bias_cache[str(x.device)]
    assert cached[:2].untyped_storage().data_ptr() == cached.untyped_storage().data_ptr()


def test_magnitude_order_reorders_the_mlps_only_and_keeps_the_output(m0):
    model, x = m0
    make_elastic(model)
    applied = order_by_magnitude_keeping_output(model, x)
    assert len(applied) == 16  # the ConvMlps; the cascaded attentions are not reorderable
    assert all(".ffn" in n or ".res" in n for n in applied)
    assert any(order != sorted(order) for order in applied.values())
    assert_largest_first(model, ElasticConvMlp)
    for mod in _elastic(model):
        if isinstance(mod, ElasticCascadedGroupAttention):
            score = mod.magnitude()
            assert score.shape == (4,) and torch.all(score > 0)
    y = output_at_width(model, x, 0.5)  # pw1.bn's statistics moved with the rows
    assert_close_scaled(y, _zeroing_reference(model, 0.5, x))


def test_cascaded_heads_cannot_be_reordered(m0):
    model, x = m0
    make_elastic(model)
    attn = next(m for m in model.modules() if isinstance(m, ElasticCascadedGroupAttention))
    assert attn.reorderable is False
    assert attn.head_site() == (attn.proj, 1, attn.val_dim)
    with torch.no_grad():
        full = model(x)
    attn.reorder_([0, 1, 2, 3])  # the identity: nothing to do
    with pytest.raises(ElasticError, match=r"cannot be reordered \(head i adds head i-1's "
                                           r"output.*allowed: the identity order \[0, 1, 2, 3\]"):
        attn.reorder_([1, 0, 2, 3])
    with pytest.raises(ElasticError, match="not a permutation of 0..3"):
        attn.reorder_([0, 0, 1, 2])
    with torch.no_grad():
        assert torch.equal(model(x), full)


def test_a_partitioned_elastic_model_runs_stage_by_stage(m0):
    assert_partitioned_equals_whole(*m0, ["stages.1.downsample", "stages.2.blocks.1"])


def test_bad_widths_are_named():
    model = make_elastic(lapdtr.create_model("efficientvit_m0", img_size=64))
    attn = next(m for m in model.modules() if isinstance(m, ElasticCascadedGroupAttention))
    mlp = next(m for m in model.modules() if isinstance(m, ElasticConvMlp))
    assert_count_refused(attn.set_heads, 5, "heads", 4)
    assert_count_refused(attn.set_heads, 0, "heads", 4)
    assert_count_refused(mlp.set_hidden, 129, "hidden", 128)
    assert_ratio_refused(model, 0)
    assert_ratio_refused(model, 0.5, mlp_ratio=1.5)
    assert_full_width(model)


@pytest.mark.parametrize("name", ["efficientvit_m1", "efficientvit_m2", "efficientvit_m3",
                                  "efficientvit_m4", "efficientvit_m5"])
def test_every_size_converts_and_runs_below_full_width(name):
    """The other sizes (2-4 heads, other kernels and widths): converted, full width equal,
    half width equal to zeroing (default init, so only a smoke test of the shapes)."""
    model = lapdtr.create_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    make_elastic_keeping_output(model, x)
    depth = sum(len(s.blocks) for s in model.stages)
    assert sum(isinstance(m, ElasticCascadedGroupAttention) for m in model.modules()) == depth
    assert sum(isinstance(m, ElasticConvMlp) for m in model.modules()) == 2 * depth + 4
    y = output_at_width(model, x, 0.5)
    assert_close_scaled(y, _zeroing_reference(model, 0.5, x))
