"""Elastic heads and MLP widths for timm's Eva: full width is the original exactly; a reduced
width equals zeroing the dropped heads before ``proj`` and the dropped hidden units before
``fc2`` (RoPE on the kept heads, RoPE-Mixed's per-head tables, grouped-query attention, GluMlp's
fused halves, SwiGLU); ordering keeps the full-width output; importance runs; a partitioned
elastic model equals the whole; layers with a norm over all heads / hidden units are refused."""
import pytest
import torch
import torch.nn.functional as F

from lapdtr.elastic import (ElasticError, count_for, importance, inexact_layers, make_elastic,
                            order_by_importance_, set_width, widths)
from lapdtr.elastic.eva import (ElasticEvaAttention, ElasticEvaMlp, ElasticGluMlp,
                                ElasticRopeAttention, ElasticSwiGLU)
from lapdtr.testing import assert_close_scaled

from elastic_helpers import (assert_clearly_differs, assert_count_refused, assert_full_width,
                             assert_partitioned_equals_whole, informative_model,
                             make_elastic_keeping_output, order_by_magnitude_keeping_output,
                             output_at_width, run_with_inputs_cut, weight_copies)

HEADS = (ElasticEvaAttention, ElasticRopeAttention)
HIDDEN = (ElasticEvaMlp, ElasticGluMlp, ElasticSwiGLU)
# name -> (create_model kwargs beyond depth=3, img_size=64; attention class; MLP class)
CASES = {
    "vit_small_patch16_rope_224": ({}, ElasticRopeAttention, ElasticEvaMlp),
    "vit_small_patch16_dinov3": ({}, ElasticEvaAttention, ElasticEvaMlp),  # 4 register tokens
    "eva02_tiny_patch14_224": ({}, ElasticEvaAttention, ElasticGluMlp),   # q/v bias, fused GLU
    "vit_small_patch16_rope_mixed_224": ({}, ElasticRopeAttention, ElasticEvaMlp),
    # separate q/k/v projections, qk norm, grouped-query attention in blocks.1 (6 q / 3 kv)
    "vit_base_patch16_sapiens2": ({"embed_dim": 192, "num_heads": 6, "num_kv_heads": (6, 3, 6)},
                                  ElasticRopeAttention, ElasticGluMlp),
    "vit_small_plus_patch16_dinov3": ({"embed_dim": 192, "num_heads": 3}, ElasticEvaAttention,
                                      ElasticSwiGLU),
}


def _model(name, **kw):
    extra = CASES[name][0] if name in CASES else {}
    return informative_model(name, depth=3, img_size=64, **{**extra, **kw})


def _zeroing_reference(model, ratio, mlp_ratio, x):
    """The model at full width with the heads and hidden units ``ratio`` / ``mlp_ratio`` drops
    zeroed before ``proj`` / ``fc2``."""
    assert_full_width(model)
    cuts = [(m.proj, count_for(ratio, m.num_heads) * m.head_dim) for m in model.modules()
            if isinstance(m, HEADS)]
    cuts += [(m.fc2, count_for(mlp_ratio, m.hidden_features)) for m in model.modules()
             if isinstance(m, HIDDEN)]
    return run_with_inputs_cut(model, x, cuts)


@pytest.mark.parametrize("name", list(CASES))
def test_full_width_is_the_original_and_reduced_width_equals_zeroing(name):
    model, x = _model(name)
    make_elastic_keeping_output(model, x)  # torch.equal, keys unchanged, also after 0.5 -> 1
    _, attn_cls, mlp_cls = CASES[name]
    assert [type(b.attn) for b in model.blocks] == [attn_cls] * 3
    assert [type(b.mlp) for b in model.blocks] == [mlp_cls] * 3
    with torch.no_grad():
        full = model(x)
    for ratio, mlp_ratio in [(0.5, 0.5), (0.34, 0.75), (1.0, 0.25), (0.5, 1.0)]:
        y = output_at_width(model, x, ratio, mlp_ratio)  # back at full width after
        want = _zeroing_reference(model, ratio, mlp_ratio, x)
        assert_close_scaled(y, want, msg=f"{name} at {ratio}/{mlp_ratio}")
        assert_clearly_differs(y, full)
    assert_full_width(model)


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_mixed_224", "eva02_tiny_patch14_224",
                                  "vit_base_patch16_sapiens2", "vit_small_plus_patch16_dinov3"])
def test_ordering_keeps_the_output_and_widths_still_equal_zeroing(name):
    """Heads and hidden units reordered by magnitude, then by importance: the full-width output
    is kept (RoPE-Mixed: the block's per-head freqs move with its heads; without that the
    full-width output changes); a reduced width still equals zeroing the dropped ones."""
    model, x = _model(name)
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    applied = order_by_magnitude_keeping_output(model, x)
    reorderable = [n for n, m in model.named_modules() if isinstance(m, HEADS + HIDDEN)
                   and m.reorderable]
    assert sorted(applied) == sorted(reorderable)
    for n, m in model.named_modules():
        if n in applied:
            s = m.magnitude()
            assert torch.all(s[:-1] >= s[1:]), n
    assert any(o != sorted(o) for o in applied.values())  # something moved
    order_by_importance_(model, x)
    with torch.no_grad():
        assert_close_scaled(model(x), full)
    y = output_at_width(model, x, 0.5)
    assert_close_scaled(y, _zeroing_reference(model, 0.5, 0.5, x))


def test_importance_scores_every_head_and_hidden_unit_glu_halves_included():
    model, x = _model("eva02_tiny_patch14_224")
    make_elastic(model)
    y = torch.tensor([3, 7])
    scores = importance(model, [(x, y)])
    for n, m in model.named_modules():
        if isinstance(m, HEADS):
            assert scores[n].shape == (m.num_heads,) and bool((scores[n] > 0).all())
        elif isinstance(m, HIDDEN):
            assert scores[n].shape == (m.hidden_features,)
    # GluMlp: a hidden unit is a row of each fc1 half (weight and bias) and a column of fc2
    name, mlp = next((n, m) for n, m in model.named_modules() if isinstance(m, ElasticGluMlp))
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    h, w, b = mlp.hidden_features, mlp.fc1.weight, mlp.fc1.bias
    s_w, s_b = (w * w.grad).abs().sum(1), (b * b.grad).abs()
    want = s_w[:h] + s_w[h:] + s_b[:h] + s_b[h:] + (mlp.fc2.weight * mlp.fc2.weight.grad).abs().sum(0)
    torch.testing.assert_close(scores[name], want.detach())
    model.zero_grad()


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_mixed_224",
                                  "vit_base_patch16_sapiens2"])
def test_a_partitioned_elastic_model_runs_stage_by_stage(name):
    assert_partitioned_equals_whole(*_model(name), ["blocks.1", "blocks.2"])


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_224", "vit_base_patch16_sapiens2"])
def test_weights_are_sliced_as_views_not_copied(name):
    """At a reduced width no op copies a tensor as large as the smallest block weight (one
    image: the activations copied, 25 tokens x 384 hidden at most, are smaller)."""
    model, x = _model(name)
    x = x[:1]
    make_elastic(model)
    set_width(model, 0.5)
    smallest = min(p.numel() for n, p in model.named_parameters()
                   if n.endswith("weight") and p.dim() == 2 and "blocks" in n)
    copies = weight_copies(model, x, min_numel=smallest)
    assert not copies, copies


def test_grouped_query_attention_keeps_its_groups():
    model, x = _model("vit_base_patch16_sapiens2")
    make_elastic(model)
    gqa = model.blocks[1].attn
    assert gqa._groups == 2 and not gqa.reorderable and model.blocks[0].attn.reorderable
    with torch.no_grad():
        full = model(x)
    gqa.reorder_([5, 4, 1, 0, 2, 3])  # groups (2, 0, 1), members swapped within two of them
    with torch.no_grad():
        assert_close_scaled(model(x), full)
    with pytest.raises(ElasticError, match=r"splits a group of 2 query heads .* allowed: "
                                           r"permutations that move each group of 2 heads"):
        gqa.reorder_([0, 2, 1, 3, 4, 5])
    # 3 of 6 query heads read kv heads 0 and 1 (the first kv head's both, the second's first)
    gqa.set_heads(3)
    with torch.no_grad():
        got = model(x)
    gqa.set_heads(6)
    want = run_with_inputs_cut(model, x, [(gqa.proj, 3 * gqa.head_dim)])
    assert_close_scaled(got, want)
    assert_count_refused(gqa.set_heads, 7, "heads", 6)


def test_a_norm_over_all_heads_or_hidden_units_is_refused_below_full_width():
    # EVA-02 base: SwiGLU with a norm over its hidden units (scale_mlp): heads only
    model, x = informative_model("eva02_base_patch14_224", depth=2, img_size=64, embed_dim=128,
                                 num_heads=4)
    make_elastic(model)
    assert inexact_layers(model) == ["blocks.0.mlp", "blocks.1.mlp"]
    with pytest.raises(ElasticError, match=r"ElasticSwiGLU: an MLP with a norm over all its "
                                           r"hidden units \(scale_mlp\) .* allowed: hidden=341 "
                                           r"only"):
        set_width(model, 0.5)
    assert_full_width(model)  # checked before anything changed
    y = output_at_width(model, x, 0.5, mlp_ratio=1.0)
    assert_close_scaled(y, run_with_inputs_cut(
        model, x, [(b.attn.proj, 2 * b.attn.head_dim) for b in model.blocks]))
    # EVA-02 CLIP: a norm over all heads' outputs (scale_attn_inner) as well
    model, x = informative_model("eva02_base_patch16_clip_224", depth=2, img_size=64,
                                 embed_dim=128, num_heads=4)
    with torch.no_grad():
        want = model(x)
    make_elastic(model)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    with pytest.raises(ElasticError, match=r"ElasticEvaAttention: .*norm over all heads' outputs "
                                           r"\(scale_attn_inner / scale_norm\).* allowed: "
                                           r"heads=4 only"):
        set_width(model, 0.5, mlp_ratio=1.0)
    assert widths(model)["heads"] == [(4, 4)] * 2
    # reordering moves the norms' per-channel parameters with the heads / hidden units
    order_by_magnitude_keeping_output(model, x)
