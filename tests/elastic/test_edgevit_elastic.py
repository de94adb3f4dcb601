"""Elastic heads and MLP widths for EdgeViT: full width is the original exactly; the last stage's
attention (r = 1), the token MLPs and LocalAgg's conv MLPs at a reduced width equal zeroing the
dropped heads / hidden units; the r > 1 attentions run below full width approximately (the
LayerNorm after local propagation sees the kept channels only) and are named as inexact."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import ConvMlp
from torch import nn

from lapdtr.elastic import (ElasticError, ElasticHeads, ElasticMlp, count_for, inexact_layers,
                            make_elastic, set_width, widths)
from lapdtr.elastic.edgevit import (ElasticConvMlp, ElasticGlobalSparseAttn,
                                    ElasticPropagatedSparseAttn, convert)
from lapdtr.models.edgevit import LocalAgg
from lapdtr.testing import assert_close_scaled, informative_weights_

from elastic_helpers import (assert_clearly_differs, assert_count_refused, assert_full_width,
                             assert_largest_first, assert_partitioned_equals_whole,
                             assert_ratio_refused, informative_model, inputs_cut,
                             make_elastic_keeping_output, order_by_magnitude_keeping_output,
                             run_with_inputs_cut, spy_weights, views_of_parameters,
                             weight_copies)


def _edgevit():
    return informative_model("edgevit_xxs", img_size=64, num_classes=10)


def _layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


def _attns(model):
    return _layers(model, ElasticGlobalSparseAttn)


def _exact_attns(model):
    return [m for m in _attns(model) if m.sr_ratio == 1]


def _approx_attns(model):
    return [m for m in _attns(model) if m.sr_ratio > 1]


def _sliced_norm(d):
    """Forward hook on an r > 1 attention's LayerNorm: its output replaced by the LayerNorm of
    the first ``d`` channels alone (its first ``d`` scales and shifts), the rest zero: what the
    elastic layer's approximate path computes."""
    def hook(m, args, out):
        (a,) = args
        y = torch.zeros_like(out)
        y[..., :d] = F.layer_norm(a[..., :d], (d,), m.weight[:d], m.bias[:d], m.eps)
        return y
    return hook


def _reference(model, x, *, exact_only: bool):
    """The model at full width with, for each elastic layer at its current (reduced) width:
    the dropped heads of the r = 1 attention zeroed before ``proj``, the dropped hidden units of
    each MLP zeroed before ``fc2`` (channel-first for the conv MLPs); and, unless
    ``exact_only``, each r > 1 attention's norm replaced by :func:`_sliced_norm`."""
    saved = [(m, m.heads_now) for m in _attns(model)] + \
        [(m, m.hidden_now) for m in _layers(model, (ElasticMlp, ElasticConvMlp))]
    cuts, hooks = [], []
    for m in _exact_attns(model):
        cuts.append((m.proj, m.heads_now * m.head_dim))
    for m in _layers(model, ElasticMlp):
        cuts.append((m.fc2, m.hidden_now))
    channel_cuts = [(m.fc2, m.hidden_now) for m in _layers(model, ElasticConvMlp)]
    for m in _approx_attns(model):
        d = m.heads_now * m.head_dim
        if exact_only:
            assert m.heads_now == m.num_heads
        else:
            hooks.append(m.norm.register_forward_hook(_sliced_norm(d)))
            cuts.append((m.proj, d))
    for m, _ in saved:
        if isinstance(m, ElasticHeads):
            m.active_heads = m.num_heads
        else:
            m.active_hidden = m.hidden_features
    try:
        with inputs_cut(channel_cuts, dim=1):  # channel-first (B, C, H, W) maps
            return run_with_inputs_cut(model, x, cuts)
    finally:
        for h in hooks:
            h.remove()
        for m, n in saved:
            if isinstance(m, ElasticHeads):
                m.active_heads = n
            else:
                m.active_hidden = n


def _set_exact_only(model, ratio):
    """``set_width(model, ratio)``, then the inexact (r > 1) attentions back to full width."""
    set_width(model, ratio)
    for m in _approx_attns(model):
        m.set_heads(m.num_heads)


def test_full_width_is_the_original_exactly_and_keys_are_unchanged():
    model, x = _edgevit()
    before = {n: type(m) for n, m in model.named_modules()}
    make_elastic_keeping_output(model, x)
    assert len(_approx_attns(model)) == 5 and len(_exact_attns(model)) == 2  # depths 1,1,3 | 2
    assert all(type(m) is ElasticPropagatedSparseAttn for m in _approx_attns(model))
    assert all(type(m) is ElasticGlobalSparseAttn for m in _exact_attns(model))
    assert len(_layers(model, ElasticMlp)) == 7 and len(_layers(model, ElasticConvMlp)) == 5
    changed = {n for n, m in model.named_modules() if type(m) is not before[n]}
    assert changed == {n for n, m in model.named_modules()
                       if n.endswith((".attn", ".mlp")) and "global_sparse" in n or
                       n.endswith("local_agg.mlp")}  # only inside EdgeViT's blocks


@pytest.mark.parametrize("ratio, fused", [(0.75, True), (0.5, True), (0.25, True), (0.5, False)])
def test_exact_layers_at_a_reduced_width_equal_zeroing_the_dropped_units(ratio, fused):
    """Last-stage attention, token MLPs and conv MLPs reduced, the r > 1 attentions at full
    width (``set_heads``): equal to zeroing the dropped heads / hidden units."""
    model, x = _edgevit()
    make_elastic(model)
    for m in _attns(model):
        m.fused_attn = fused
    with torch.no_grad():
        full = model(x)
    _set_exact_only(model, ratio)
    w = widths(model)
    assert [k for k, _ in w["hidden"]] == [count_for(ratio, h) for _, h in w["hidden"]]
    assert [m.heads_now for m in _exact_attns(model)] == [count_for(ratio, 8)] * 2
    with torch.no_grad():
        y = model(x)
    assert_close_scaled(y, _reference(model, x, exact_only=True))
    assert_clearly_differs(y, full)  # the width changed the logits


def test_inexact_layers_are_named_and_still_run_below_full_width():
    model, x = _edgevit()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    names = inexact_layers(model)
    assert names == [n for n, m in model.named_modules()
                     if isinstance(m, ElasticGlobalSparseAttn) and m.sr_ratio > 1]
    assert names and not any(n.startswith("stages.3") for n in names)
    for m in _approx_attns(model):
        assert m.approximate and not m.exact_below_full()
    for m in _exact_attns(model) + _layers(model, (ElasticMlp, ElasticConvMlp)):
        assert not m.approximate and m.exact_below_full()
    w = set_width(model, 0.5, mlp_ratio=1.0)  # allowed there: the model relies on elastic training
    assert [m.heads_now for m in _approx_attns(model)] == [1, 1, 2, 2, 2]  # 1, 2, 4, 4, 4 heads
    assert all(k == h for k, h in w["hidden"])
    for m in _exact_attns(model):  # only the r > 1 attentions reduced
        m.set_heads(m.num_heads)
    with torch.no_grad():
        y = model(x)
    assert y.shape == full.shape and torch.isfinite(y).all()
    assert_clearly_differs(y, full)
    # what it runs: the kept heads, local propagation and the norm over the kept channels only
    assert_close_scaled(y, _reference(model, x, exact_only=False))
    # ... which is not zeroing the dropped heads before proj (the norm sees all channels there)
    cuts = [(m.proj, m.heads_now * m.head_dim) for m in _approx_attns(model)]
    set_width(model, 1.0)
    assert_clearly_differs(y, run_with_inputs_cut(model, x, cuts), scale=full)


@pytest.mark.parametrize("ratio", [0.75, 0.25])
def test_every_layer_reduced_equals_the_sliced_reference(ratio):
    model, x = _edgevit()
    make_elastic(model)
    set_width(model, ratio)
    with torch.no_grad():
        y = model(x)
    assert torch.isfinite(y).all()
    assert_close_scaled(y, _reference(model, x, exact_only=False))


def test_conv_mlp_with_a_batch_norm_slices_it_in_eval_and_train_mode():
    """LocalAgg's ConvMlp with a BatchNorm between its 1x1 convs: its first m channels are
    sliced with the conv (scales, shifts, running statistics), eval and train mode as
    nn.BatchNorm2d, and equal zeroing the dropped channels before fc2."""
    torch.manual_seed(0)
    agg = LocalAgg(16)
    agg.mlp = ConvMlp(16, 48, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d)
    informative_weights_(agg, seed=2)
    x = torch.randn(2, 16, 8, 8)
    convert(agg)
    mlp = agg.mlp
    assert type(mlp) is ElasticConvMlp and mlp.exact_below_full()
    assert {id(p) for p, _ in mlp.hidden_params()} >= {id(mlp.norm.weight), id(mlp.norm.bias)}
    for training in (False, True):
        agg.train(training)
        ref = {k: v.clone() for k, v in agg.state_dict().items()}
        mlp.set_hidden(20)
        with torch.no_grad():
            y = agg(x)
        after = {k: v.clone() for k, v in agg.state_dict().items()}
        agg.load_state_dict(ref)
        mlp.set_hidden(48)
        want = run_with_inputs_cut(agg, x, [(mlp.fc2, 20)], dim=1)
        assert_close_scaled(y, want)
        for key in ("mlp.norm.running_mean", "mlp.norm.running_var"):
            assert_close_scaled(after[key][:20], agg.state_dict()[key][:20])
            assert torch.equal(after[key][20:], ref[key][20:])  # dropped channels untouched
        tracked = "mlp.norm.num_batches_tracked"
        assert after[tracked] == agg.state_dict()[tracked]
        assert training == bool(after[tracked] > ref[tracked])
    agg.eval()
    mlp.norm = nn.GroupNorm(4, 48)  # a norm across channels: refused below full width
    with pytest.raises(ElasticError, match="hidden=48 only"):
        mlp.set_hidden(20)


def _sliced_weight_shapes(model):
    shapes = set()
    for m in _attns(model):
        d, C = m.heads_now * m.head_dim, m.proj.in_features
        if d < C:
            shapes |= {(d, C), (C, d)}
            if m.sr_ratio > 1:
                shapes.add((d, 1, m.sr_ratio, m.sr_ratio))
    for m in _layers(model, ElasticMlp):
        if m.hidden_now < m.hidden_features:
            shapes |= {(m.hidden_now, m.fc1.in_features), (m.fc2.out_features, m.hidden_now)}
    for m in _layers(model, ElasticConvMlp):
        n, c, o = m.hidden_now, m.fc1.in_channels, m.fc2.out_channels
        if n < m.hidden_features:
            shapes |= {(n, c, 1, 1), (o, n, 1, 1), (o, n)}
    return shapes


def test_weights_are_sliced_as_views_not_copied(monkeypatch):
    """At a reduced width every weight the layers compute with is a view of a parameter, and
    no op copies a tensor shaped like a sliced weight (as F.conv2d would a column-sliced 1x1
    kernel): the profiler sees no copy, clone or contiguous of one."""
    model, x = _edgevit()
    make_elastic(model)
    set_width(model, 0.5)
    shapes = _sliced_weight_shapes(model)
    assert len(shapes) > 10
    copies = weight_copies(model, x, shapes=shapes)
    assert not copies, copies

    spies = [spy_weights(monkeypatch, F, name, at=2 if name == "layer_norm" else 1)
             for name in ("linear", "conv2d", "conv_transpose2d", "layer_norm")]
    with torch.no_grad():
        model(x)
    seen = views_of_parameters(model, [w for weights in spies for w in weights])
    assert len(seen) > 40 and all(seen)


def test_magnitude_order_keeps_the_full_width_output_and_puts_the_largest_first():
    model, x = _edgevit()
    make_elastic(model)
    applied = order_by_magnitude_keeping_output(model, x)
    assert len(applied) == 7 + 7 + 5
    assert any(o != sorted(o) for o in applied.values())  # something was moved
    assert_largest_first(model, (ElasticGlobalSparseAttn, ElasticMlp, ElasticConvMlp))
    set_width(model, 0.5)  # heads and channels moved consistently: the references still hold
    with torch.no_grad():
        y = model(x)
    assert_close_scaled(y, _reference(model, x, exact_only=False))


def test_head_site_holds_the_heads_side_by_side():
    model, x = _edgevit()
    make_elastic(model)
    got = []
    hooks = []
    for m in _attns(model):
        site, dim, per = m.head_site()
        assert site is (m.local_prop if m.sr_ratio > 1 else m.proj)
        hooks.append(site.register_forward_pre_hook(
            lambda mod, a, m=m, dim=dim, per=per: got.append(a[0].shape[dim] == m.num_heads * per)))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(got) == 7 and all(got)


def test_a_partitioned_elastic_model_runs_stage_by_stage():
    assert_partitioned_equals_whole(*_edgevit(), ["stages.2.blocks.1", "stages.3.blocks.0"])


def test_bad_counts_are_named():
    model, _ = _edgevit()
    make_elastic(model)
    attn = _exact_attns(model)[0]
    assert_count_refused(attn.set_heads, 9, "heads", 8)
    assert_count_refused(_approx_attns(model)[-1].set_heads, 0, "heads", 4)
    conv_mlp = _layers(model, ElasticConvMlp)[0]
    assert_count_refused(conv_mlp.set_hidden, 145, "hidden", 144)
    assert_ratio_refused(model, 1.5)
    assert_full_width(model)  # nothing changed
