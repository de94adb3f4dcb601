"""Elastic heads and MLP widths for TinyViT: per-head bias tables, interleaved qkv, NormMlp."""
import pytest
import torch

import lapdtr
from lapdtr.elastic import (ElasticError, ElasticNormMlp, ElasticTinyAttention, count_for,
                            make_elastic, order_by_magnitude_, set_width, widths)
from lapdtr.testing import assert_close_scaled, informative_weights_

from elastic_helpers import run_with_inputs_cut


def _tiny():
    torch.manual_seed(0)
    m = lapdtr.create_model("tiny_vit_5m_224", img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # bias tables start at zero in timm: make every head's table count
        for mod in m.modules():
            if hasattr(mod, "attention_biases"):
                mod.attention_biases.normal_(0, 0.5)
    informative_weights_(m, seed=1, probe=x)
    for mod in m.modules():
        if hasattr(mod, "attention_bias_cache"):
            mod.attention_bias_cache = {}
    return m, x


def _zeroing_reference(model, ratio, x):
    cuts = [(m.proj, count_for(ratio, m.num_heads) * m.val_dim) for m in model.modules()
            if isinstance(m, ElasticTinyAttention)]
    cuts += [(m.fc2, count_for(ratio, m.hidden_features)) for m in model.modules()
             if isinstance(m, ElasticNormMlp)]
    return run_with_inputs_cut(model, x, cuts)


def test_full_width_is_the_original_and_keys_are_unchanged():
    model, x = _tiny()
    with torch.no_grad():
        want = model(x)
    keys = list(model.state_dict())
    make_elastic(model)
    assert sum(isinstance(m, ElasticTinyAttention) for m in model.modules()) == 10
    assert sum(isinstance(m, ElasticNormMlp) for m in model.modules()) == 10
    assert list(model.state_dict()) == keys
    set_width(model, 0.5)
    set_width(model, 1.0)
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.2])
def test_reduced_width_equals_zeroing_the_dropped_heads_and_units(ratio):
    model, x = _tiny()
    make_elastic(model)
    with torch.no_grad():
        full = model(x)
    w = set_width(model, ratio)
    assert [k for k, _ in w["heads"]] == [count_for(ratio, h) for _, h in w["heads"]]
    with torch.no_grad():
        y = model(x)
    set_width(model, 1.0)
    assert_close_scaled(y, _zeroing_reference(model, ratio, x))
    assert (y - full).abs().max() > 100 * 2e-5 * full.abs().max()


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
            score = mod.magnitude()
            assert torch.all(score[:-1] >= score[1:])
    with torch.no_grad():
        assert_close_scaled(model(x), full)
    set_width(model, 0.5)
    with torch.no_grad():
        y = model(x)
    set_width(model, 1.0)
    assert_close_scaled(y, _zeroing_reference(model, 0.5, x))


def test_no_weight_is_copied_at_a_reduced_width(monkeypatch):
    """Every weight the elastic layers multiply by at a reduced width is a view of a parameter
    (its storage is the parameter's), and the bias tables are views of timm's cache."""
    import torch.nn.functional as F

    model, x = _tiny()
    make_elastic(model)
    set_width(model, 0.5)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = []
    real = F.linear

    def linear(inp, weight, bias=None):
        seen.append(weight.untyped_storage().data_ptr() in params)
        return real(inp, weight, bias)

    monkeypatch.setattr(F, "linear", linear)
    with torch.no_grad():
        model(x)
    assert len(seen) == 4 * 10 + 1 and all(seen), seen  # qkv, proj, fc1, fc2 per block; head
    attn = next(m for m in model.modules() if isinstance(m, ElasticTinyAttention))
    cached = attn.get_attention_biases(x.device)
    assert cached[:2].untyped_storage().data_ptr() == cached.untyped_storage().data_ptr()


def test_bad_widths_are_named():
    model, _ = _tiny()
    make_elastic(model)
    attn = next(m for m in model.modules() if isinstance(m, ElasticTinyAttention))
    with pytest.raises(ElasticError, match=rf"heads={attn.num_heads + 1}; allowed: 1\.\.{attn.num_heads}"):
        attn.set_heads(attn.num_heads + 1)
    with pytest.raises(ElasticError, match=r"\(0, 1\]"):
        set_width(model, 0)
    assert all(k == h for k, h in widths(model)["heads"])
