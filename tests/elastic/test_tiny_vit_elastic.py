"""Elastic heads and MLP widths for TinyViT: per-head bias tables, interleaved qkv, NormMlp."""
import pytest
import torch

from lapdtr.elastic import (ElasticNormMlp, ElasticTinyAttention, count_for, make_elastic,
                            order_by_magnitude_, set_width)
from lapdtr.testing import assert_close_scaled

from elastic_helpers import (assert_clearly_differs, assert_count_refused, assert_full_width,
                             assert_largest_first, assert_ratio_refused, informative_model,
                             make_elastic_keeping_output, output_at_width, run_with_inputs_cut,
                             spy_weights, views_of_parameters)


def _tiny():
    # bias tables start at zero in timm: every head's table drawn so that it counts
    return informative_model("tiny_vit_5m_224", img_size=64, bias_tables=True)


def _zeroing_reference(model, ratio, x):
    cuts = [(m.proj, count_for(ratio, m.num_heads) * m.val_dim) for m in model.modules()
            if isinstance(m, ElasticTinyAttention)]
    cuts += [(m.fc2, count_for(ratio, m.hidden_features)) for m in model.modules()
             if isinstance(m, ElasticNormMlp)]
    return run_with_inputs_cut(model, x, cuts)


def test_full_width_is_the_original_and_keys_are_unchanged():
    model, x = _tiny()
    make_elastic_keeping_output(model, x)
    assert sum(isinstance(m, ElasticTinyAttention) for m in model.modules()) == 10
    assert sum(isinstance(m, ElasticNormMlp) for m in model.modules()) == 10


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.2])
def test_reduced_width_equals_zeroing_the_dropped_heads_and_units(ratio):
    model, x = _tiny()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    w = set_width(model, ratio)
    assert [k for k, _ in w["heads"]] == [count_for(ratio, h) for _, h in w["heads"]]
    y = output_at_width(model, x, ratio)
    assert_close_scaled(y, _zeroing_reference(model, ratio, x))
    assert_clearly_differs(y, full)


def test_bias_tables_are_per_head_and_reordering_clears_the_cache():
    model, x = _tiny()
    make_elastic(model)
    with torch.no_grad():
        model(x)  # fills the eval-mode bias caches
        full = model(x)
    order_by_magnitude_(model)
    for mod in model.modules():
        if isinstance(mod, ElasticTinyAttention):
            assert mod.attention_bias_cache == {}  # a stale cache would pair heads and tables wrong
    assert_largest_first(model, ElasticTinyAttention)
    with torch.no_grad():
        assert_close_scaled(model(x), full)
    y = output_at_width(model, x, 0.5)
    assert_close_scaled(y, _zeroing_reference(model, 0.5, x))


def test_no_weight_is_copied_at_a_reduced_width(monkeypatch):
    """Every weight the elastic layers multiply by at a reduced width is a view of a parameter
    (its storage is the parameter's), and the bias tables are views of timm's cache."""
    import torch.nn.functional as F

    model, x = _tiny()
    make_elastic(model)
    set_width(model, 0.5)
    weights = spy_weights(monkeypatch, F, "linear")
    with torch.no_grad():
        model(x)
    seen = views_of_parameters(model, weights)
    assert len(seen) == 4 * 10 + 1 and all(seen), seen  # qkv, proj, fc1, fc2 per block; head
    attn = next(m for m in model.modules() if isinstance(m, ElasticTinyAttention))
    cached = attn.get_attention_biases(x.device)
    assert cached[:2].untyped_storage().data_ptr() == cached.untyped_storage().data_ptr()


def test_bad_widths_are_named():
    model, _ = _tiny()
    make_elastic(model)
    attn = next(m for m in model.modules() if isinstance(m, ElasticTinyAttention))
    assert_count_refused(attn.set_heads, attn.num_heads + 1, "heads", attn.num_heads)
    assert_ratio_refused(model, 0)
    assert_full_width(model)
