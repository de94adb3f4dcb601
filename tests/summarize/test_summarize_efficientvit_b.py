"""EfficientViT-B's multi-scale ReLU linear attention as an attention source: the attention each
position receives, computed in O(N d), equals the explicit N x N linear attention; the probe
reads q and k as LiteMLA attends with them (checked against the arguments of its own ``_attn``);
summarized EfficientViT-B maps restore dense."""
import pytest
import timm.models.efficientvit_mit as ev
import torch

import lapdtr
from lapdtr.summarize import (LinearAttentionProbe, attention_source, codec_for_unit,
                              importance_kind, linear_received_attention,
                              linear_received_attention_ref, probe_for, summarized_forward)
from lapdtr.testing import informative_weights_

IMG = 128


@pytest.mark.parametrize("shape", [(2, 3, 37, 8), (1, 16, 49, 16), (3, 1, 5, 3)])
def test_linear_received_attention_equals_the_explicit_matrix(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.relu(torch.randn(shape, generator=g))
    k = torch.relu(torch.randn(shape, generator=g))
    got = linear_received_attention(q, k, 1e-5)
    torch.testing.assert_close(got, linear_received_attention_ref(q, k, 1e-5), rtol=1e-5,
                               atol=1e-7)
    assert got.shape == (shape[0], shape[2])


def _model():
    torch.manual_seed(0)
    m = lapdtr.create_model("efficientvit_b0", num_classes=10).eval()
    x = torch.randn(2, 3, IMG, IMG)
    informative_weights_(m, seed=1, probe=x)
    return m, x


@pytest.mark.parametrize("name", ["stages.2.blocks.1", "stages.3.blocks.2"])
def test_probe_importance_is_litemlas_own_attention(name, monkeypatch):
    m, x = _model()
    assert importance_kind(m) == "received"
    attn = attention_source(m, name)
    assert isinstance(attn, ev.LiteMLA)
    seen = []
    real = ev.LiteMLA._attn

    def spy(self, q, k, v):
        if self is attn:
            seen.append((q, k))
        return real(self, q, k, v)
    monkeypatch.setattr(ev.LiteMLA, "_attn", spy)
    with probe_for(attn, "received") as probe, torch.no_grad():
        assert isinstance(probe, LinearAttentionProbe)
        m(x)
        got = probe.importance()
    (q, k), = seen
    want = linear_received_attention_ref(q, k, attn.eps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    H = IMG // {2: 16, 3: 32}[int(name[7])]
    assert got.shape == (2, H * H)
    assert got.std() > 0.05 * got.mean()  # the ranking is not flat


def test_a_summarized_efficientvit_b_map_is_restored_dense():
    m, x = _model()
    ul = lapdtr.units(m, IMG)
    cut = [u.name for u in ul].index("stages.3.blocks.0")  # after stages.2.blocks.2
    codec = codec_for_unit(m, ul[cut - 1], keep=0.25, wire="fp16")
    assert codec.restore == "dense" and codec.layout == "map" and codec.summarizes
    with torch.no_grad():
        full = m(x)
        assert torch.equal(summarized_forward(m, [cut], x, [(1.0, "fp32")], unit_list=ul), full)
        got = summarized_forward(m, [cut], x, [(0.25, "fp16")], unit_list=ul)
    assert got.shape == full.shape and (got - full).abs().max() > 1e-3 * full.abs().max()


def test_units_without_linear_attention_are_named():
    m, _ = _model()
    with pytest.raises(ValueError, match=r"unit 'stages.2.blocks.0' of the efficientvit_b model "
                                         r"has no attention; units with one: stages.2.blocks.1"):
        attention_source(m, "stages.2.blocks.0")
    with pytest.raises(ValueError, match=r"kind 'cls' is not supported for a linear attention"):
        LinearAttentionProbe(attention_source(m, "stages.2.blocks.1"), "cls")
