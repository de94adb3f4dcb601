"""TinyViT window attention as an attention source: the probe's importance is the attention each
grid position receives in its window (relative-position bias included), read off the SDPA call
timm's block makes, put back on the grid by timm's own window partition (traced with position
tags), padding cropped; summarized TinyViT boundaries restore the dense map."""
import pytest
import timm.models.tiny_vit as tv
import torch

import lapdtr
from lapdtr.summarize import (WindowAttentionProbe, attention_source, codec_for_unit,
                              importance_kind, probe_for, summarized_forward)
from lapdtr.testing import informative_weights_


def _model(img):
    torch.manual_seed(0)
    m = lapdtr.create_model("tiny_vit_5m_224", img_size=img, num_classes=10).eval()
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "attention_biases"):
                mod.attention_biases.normal_(0, 0.5)  # timm zero-inits the bias tables
    informative_weights_(m, seed=1, probe=x)
    for mod in m.modules():
        if hasattr(mod, "attention_bias_cache"):
            mod.attention_bias_cache = {}
    return m, x


def _sdpa_probabilities(run, monkeypatch):
    """softmax(q k^T scale + mask) of every SDPA call timm's TinyViT attention makes in run()."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        seen.append((s + attn_mask).softmax(-1) if attn_mask is not None else s.softmax(-1))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(tv.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        run()
    monkeypatch.setattr(tv.F, "scaled_dot_product_attention", real)
    return seen


def _window_positions(block, H, W, C):
    """For each window slot of ``block`` on an H x W grid: the grid position it holds (row-major)
    or -1 for padding, traced through timm's own partition."""
    seen = []
    h = block.attn.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    tag = (torch.arange(H * W, dtype=torch.float32) + 1).view(1, H, W, 1).expand(1, H, W, C)
    try:
        with torch.no_grad():
            block(tag.contiguous())
    finally:
        h.remove()
    return seen[0][..., 0].round().long() - 1  # (windows, N)


@pytest.mark.parametrize("img", [224, 160])  # 160 px: 20 x 20 and 10 x 10 grids, padded windows
def test_window_importance_is_the_attention_received_in_each_window(img, monkeypatch):
    m, x = _model(img)
    assert importance_kind(m) == "received"
    ul = lapdtr.units(m, img)
    names = [u.name for u in ul]
    for name in ["stages.1.blocks.1", "stages.2.blocks.0", "stages.3.blocks.1"]:
        block = attention_source(m, name)
        assert block is m.stages[int(name[7])].blocks[int(name[-1])]
        stage = partition_upto(m, ul, names.index(name) + 1)
        with probe_for(block, "received") as probe:
            assert isinstance(probe, WindowAttentionProbe)
            A = _sdpa_probabilities(lambda: stage(x), monkeypatch)[-1]  # the block's own call
            got = probe.importance()
            B, H, W, C = probe._shape
        pos = _window_positions(block, H, W, C)
        per_slot = A.mean(2).mean(1)  # (B * windows, N)
        want = torch.zeros(B, H * W)
        nw = pos.shape[0]
        for b in range(B):
            for w in range(nw):
                keep = pos[w] >= 0
                want[b, pos[w][keep]] = per_slot[b * nw + w][keep]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert got.shape == (2, H * W) and (got > 0).all()


def partition_upto(m, ul, end):
    def run(x):
        for u in ul[:end]:
            x = u.fn(m, x)
        return x
    return run


def test_a_summarized_tiny_vit_map_is_restored_dense():
    m, x = _model(224)
    ul = lapdtr.units(m, 224)
    cut = [u.name for u in ul].index("stages.2.blocks.1") + 1  # after a map_nhwc block
    codec = codec_for_unit(m, ul[cut - 1], keep=0.25, wire="int8")
    assert codec.restore == "dense" and codec.layout == "map_nhwc" and codec.summarizes
    assert codec.out_shape() == tuple(ul[cut - 1].out_shape[1:])
    assert codec.nbytes(1) < 0.1 * codec.dense_nbytes(1)
    with torch.no_grad():
        full = m(x)
        assert torch.equal(summarized_forward(m, [cut], x, [(1.0, "fp32")], unit_list=ul), full)
        got = summarized_forward(m, [cut], x, [(0.25, "fp32")], unit_list=ul)
    assert got.shape == full.shape and (got - full).abs().max() > 1e-3 * full.abs().max()


def test_units_without_window_attention_are_named():
    m, _ = _model(224)
    with pytest.raises(ValueError, match=r"unit 'stages.0' of the tiny_vit model has no attention; "
                                         r"units with one: stages.1.blocks.0 .. stages.3.blocks.1"):
        attention_source(m, "stages.0")
    with pytest.raises(ValueError, match=r"kind 'cls' is not supported for a TinyViT window"):
        WindowAttentionProbe(m.stages[1].blocks[0], "cls")


def test_an_elastic_window_attention_is_ranked_by_the_heads_it_ran(monkeypatch):
    from lapdtr.elastic import make_elastic, set_width

    m, x = _model(224)
    make_elastic(m)
    set_width(m, 0.5)
    ul = lapdtr.units(m, 224)
    name = "stages.2.blocks.0"
    block = attention_source(m, name)
    stage = partition_upto(m, ul, [u.name for u in ul].index(name) + 1)
    with probe_for(block, "received") as probe:
        A = _sdpa_probabilities(lambda: stage(x), monkeypatch)[-1]
        got = probe.importance()
        assert A.shape[1] == block.attn.heads_now < block.attn.num_heads
        B, H, W, C = probe._shape
    assert H == W == block.window_size  # 14 x 14: one window, no partition
    torch.testing.assert_close(got, A.mean(2).mean(1).reshape(B, H * W), rtol=1e-5, atol=1e-7)
