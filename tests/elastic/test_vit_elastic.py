"""Elastic heads and MLP widths for DeiT/ViT: full width is the original exactly; a reduced
width equals zeroing the dropped heads / hidden units; weights are sliced as views."""
import pytest
import torch
from torch import nn

import lapdtr
from lapdtr.elastic import (ElasticAttention, ElasticError, ElasticMlp, make_elastic,
                            set_width, widths)
from lapdtr.testing import assert_close_scaled

from elastic_helpers import (assert_clearly_differs, assert_count_refused, assert_largest_first,
                             assert_partitioned_equals_whole, informative_model,
                             make_elastic_keeping_output, order_by_magnitude_keeping_output,
                             output_at_width, run_with_inputs_cut, weight_copies)


def _deit():
    return informative_model("deit_tiny_patch16_224", depth=3, img_size=64)


def _zeroing_reference(model, heads: int, hidden: int, x):
    """The original model with heads >= ``heads`` zeroed before each ``proj`` and hidden units
    >= ``hidden`` zeroed before each ``fc2``."""
    cuts = [(m.proj, heads * m.head_dim) for m in model.modules()
            if isinstance(m, ElasticAttention)]
    cuts += [(m.fc2, hidden) for m in model.modules() if isinstance(m, ElasticMlp)]
    return run_with_inputs_cut(model, x, cuts)


def test_full_width_is_the_original_exactly_and_keys_are_unchanged():
    model, x = _deit()
    make_elastic_keeping_output(model, x)
    assert sum(isinstance(m, ElasticAttention) for m in model.modules()) == 3
    assert sum(isinstance(m, ElasticMlp) for m in model.modules()) == 3


@pytest.mark.parametrize("ratio, heads, hidden", [(0.75, 2, 576), (0.5, 2, 384), (0.34, 1, 261),
                                                  (0.01, 1, 8)])
def test_reduced_width_equals_zeroing_the_dropped_units(ratio, heads, hidden):
    model, x = _deit()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    got_w = set_width(model, ratio)
    assert got_w["heads"] == [(heads, 3)] * 3 and got_w["hidden"] == [(hidden, 768)] * 3
    y = output_at_width(model, x, ratio)
    assert_close_scaled(y, _zeroing_reference(model, heads, hidden, x))
    assert_clearly_differs(y, full)  # the width changed the logits


def test_heads_and_hidden_set_apart():
    model, x = _deit()
    make_elastic(model)
    set_width(model, 1.0, mlp_ratio=0.25)
    assert widths(model) == {"heads": [(3, 3)] * 3, "hidden": [(192, 768)] * 3}
    y = output_at_width(model, x, 1.0, mlp_ratio=0.25)
    assert_close_scaled(y, _zeroing_reference(model, 3, 192, x))


def test_weights_are_sliced_as_views_not_copied():
    """At a reduced width no op copies a weight: the profiler sees no copy, clone, cat or
    contiguous of a tensor as large as the smallest block weight (the activations copied at
    this size, 2 x 17 tokens, are far smaller)."""
    model, x = _deit()
    make_elastic(model)
    set_width(model, 0.5)
    smallest_weight = min(p.numel() for n, p in model.named_parameters()
                          if n.endswith("weight") and p.dim() == 2 and "blocks" in n)
    copies = weight_copies(model, x, min_numel=smallest_weight)
    assert not copies, copies


def test_magnitude_order_keeps_the_full_width_output_and_puts_the_largest_first():
    model, x = _deit()
    make_elastic(model)
    applied = order_by_magnitude_keeping_output(model, x)
    assert len(applied) == 6
    assert_largest_first(model, (ElasticAttention, ElasticMlp))


def test_a_partitioned_elastic_model_runs_stage_by_stage():
    assert_partitioned_equals_whole(*_deit(), ["blocks.1"])


@pytest.mark.parametrize("bad, match", [(0, r"width ratio; allowed: a number in \(0, 1\]"),
                                        (1.5, r"allowed: a number in \(0, 1\]"),
                                        (-0.1, r"\(0, 1\]"), (True, r"\(0, 1\]")])
def test_a_ratio_outside_0_1_is_named(bad, match):
    model, _ = _deit()
    make_elastic(model)
    with pytest.raises(ElasticError, match=match):
        set_width(model, bad)
    assert widths(model)["heads"] == [(3, 3)] * 3  # nothing changed


def test_bad_counts_and_models_are_named():
    model, _ = _deit()
    make_elastic(model)
    attn = next(m for m in model.modules() if isinstance(m, ElasticAttention))
    assert_count_refused(attn.set_heads, 4, "heads", 3)  # k > h
    with pytest.raises(ElasticError, match=r"'resnet' has no elastic layers; allowed: \['edgevit', 'efficientvit_b', "
                       r"'efficientvit_m', 'eva', 'tiny_vit', 'vit'\]"):
        make_elastic(lapdtr.create_model("resnet18"))
    with pytest.raises(ElasticError, match="make_elastic"):
        set_width(lapdtr.create_model("deit_tiny_patch16_224", depth=1), 0.5)
    # a norm over every head cannot drop part of them exactly: refused, nothing changed
    attn.norm = nn.LayerNorm(attn.attn_dim)
    with pytest.raises(ElasticError, match="scale_norm"):
        set_width(model, 0.5)
    assert widths(model)["hidden"] == [(768, 768)] * 3
