"""Summarization of timm's Eva (RoPE ViTs, DINOv3, EVA-02, Sapiens2): the probe's importance is
the block's own softmax attention (q and k rotated by the block's rotary table, grouped kv heads
repeated, elastic first heads), read off timm's explicit path; a summarized Eva boundary is
restored dense (every position back, so each kept token keeps its own rotation) and equals an
independent top-k / fuse / scatter computed from that explicit attention."""
import pytest
import torch

import lapdtr
from lapdtr.summarize import (RopeAttentionProbe, attention_source, codec_for_unit,
                              importance_kind, probe_for, restore_rule, summarized_forward)
from lapdtr.testing import informative_weights_

IMG = 64
# name -> create_model kwargs beyond depth=3, img_size=64, num_classes=10
CASES = {
    "vit_small_patch16_rope_224": {},             # AttentionRope, class token
    "vit_small_patch16_dinov3": {},               # EvaAttention, class + 4 register tokens
    "eva02_tiny_patch14_224": {},                 # q/v bias, separate-bias qkv
    "vit_small_patch16_rope_mixed_224": {},       # per-head rotary tables (RoPE-Mixed)
    "vit_medium_patch16_rope_reg1_gap_256": {},   # no class token: attention received
    # separate q/k/v projections, grouped-query attention in blocks.1 (6 q / 3 kv heads)
    "vit_base_patch16_sapiens2": {"embed_dim": 192, "num_heads": 6, "num_kv_heads": (6, 3, 6)},
}


def _model(name):
    torch.manual_seed(0)
    m = lapdtr.create_model(name, depth=3, img_size=IMG, num_classes=10, **CASES[name]).eval()
    x = torch.randn(2, 3, IMG, IMG)
    informative_weights_(m, seed=1, probe=x)
    return m, x


def _explicit(attn, run):
    """``run()`` with ``attn`` on timm's explicit path; its softmax probabilities (B, H, N, N)."""
    seen = []
    h = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            out = run()
    finally:
        attn.fused_attn = True
        h.remove()
    return seen[0], out


def _rank(A, kind):
    return A[:, :, 0].mean(1) if kind == "cls" else A.mean(2).mean(1)


@pytest.mark.parametrize("name", list(CASES))
def test_probe_importance_is_the_blocks_explicit_attention(name):
    m, x = _model(name)
    kind = importance_kind(m)
    assert kind == ("received" if name.endswith("gap_256") else "cls")
    for i in range(3):
        attn = attention_source(m, f"blocks.{i}")
        with probe_for(attn, kind) as probe:
            assert isinstance(probe, RopeAttentionProbe)
            A, _ = _explicit(attn, lambda: m(x))
            got = probe.importance()
        want = _rank(A, kind)
        assert got.shape == (2, m.num_prefix_tokens + (IMG // m.patch_embed.patch_size[0]) ** 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # it is not the attention without RoPE: dropping the table changes the ranking scores
        with probe_for(attn, kind) as probe:
            with torch.no_grad():
                m(x)
            probe._rope = None
            assert (probe.importance() - want).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_mixed_224", "vit_base_patch16_sapiens2",
                                  "vit_small_patch16_dinov3"])
def test_probe_follows_an_elastic_attention_at_reduced_width(name):
    from lapdtr.elastic import make_elastic, set_width

    m, x = _model(name)
    make_elastic(m)
    set_width(m, 0.5)
    attn = attention_source(m, "blocks.1")
    with probe_for(attn, "cls") as probe:
        A, _ = _explicit(attn, lambda: m(x))
        got = probe.importance()
    assert A.shape[1] < attn.num_heads  # the reduced width ran
    torch.testing.assert_close(got, _rank(A, "cls"), rtol=1e-5, atol=1e-6)


def _dense_reference(m, ul, x, cut, keep):
    """Stage 0 up to ``cut`` on timm's explicit path, its tokens ranked by the explicit
    attention of its last block, top-k patch tokens kept at their positions and every other
    position filled with their importance-weighted mean; then the rest of the units."""
    P = m.num_prefix_tokens
    attn = attention_source(m, ul[cut - 1])

    def first():
        y = x
        for u in ul[:cut]:
            y = u.fn(m, y)
        return y
    A, y = _explicit(attn, first)
    scores = _rank(A, importance_kind(m))[:, P:]
    n = scores.shape[1]
    k = max(1, round(keep * n))
    top = scores.topk(k, dim=1).indices
    patches = y[:, P:]
    w = scores.clone()
    w.scatter_(1, top, 0.0)
    fused = (w.unsqueeze(-1) * patches).sum(1) / w.sum(1, keepdim=True)
    dense = fused.unsqueeze(1).expand_as(patches).clone()
    dense.scatter_(1, top.unsqueeze(-1).expand(-1, -1, y.shape[-1]),
                   patches.gather(1, top.unsqueeze(-1).expand(-1, -1, y.shape[-1])))
    z = torch.cat([y[:, :P], dense], dim=1)
    with torch.no_grad():
        for u in ul[cut:]:
            z = u.fn(m, z)
    return z


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_rope_224",
                                  "vit_medium_patch16_rope_reg1_gap_256"])
def test_a_summarized_eva_boundary_is_restored_dense(name):
    m, x = _model(name)
    ul = lapdtr.units(m, IMG)
    cut = [u.name for u in ul].index("blocks.2")  # after blocks.1
    assert restore_rule(m, "tokens") == "dense"
    codec = codec_for_unit(m, ul[cut - 1], keep=0.25, wire="fp32")
    assert codec.restore == "dense" and codec.summarizes
    assert codec.out_shape() == tuple(ul[cut - 1].out_shape[1:])  # the full sequence
    # 16 patches at keep 0.25: 4 kept and one fused token, plus the prefix tokens
    P = m.num_prefix_tokens
    assert codec.nbytes(1) == (P + 4 + 1) * m.embed_dim * 4 + 4 * 2
    with torch.no_grad():
        full = m(x)
        assert torch.equal(summarized_forward(m, [cut], x, [(1.0, "fp32")], unit_list=ul), full)
        got = summarized_forward(m, [cut], x, [(0.25, "fp32")], unit_list=ul)
    want = _dense_reference(m, ul, x, cut, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    assert (got - full).abs().max() > 1e-2 * full.abs().max()  # the summary is not a no-op


def test_a_plain_vit_still_takes_the_shorter_sequence():
    m = lapdtr.create_model("deit_tiny_patch16_224", depth=2, img_size=IMG).eval()
    assert restore_rule(m, "tokens") == "tokens" and restore_rule(m, "map") == "dense"
