"""EViT top-k summarization: static k, prefix always kept, sorted indices, the fused token an
importance-weighted mean; keep 1 is the identity for both restore rules; ToMe's log(size) bias
equals attention over the tokens the fused one stands for; errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from lapdtr.summarize import (gather_fuse, gather_fuse_ref, keep_count, map_to_tokens,
                              restore_dense, restore_tokens, size_bias, summarize, tokens_to_map)


@pytest.mark.parametrize("keep,n,k", [(1.0, 16, 16), (0.5, 16, 8), (0.1, 16, 2), (0.01, 16, 1),
                                      (0.25, 196, 49), (0.7, 3, 2)])
def test_keep_count(keep, n, k):
    assert keep_count(keep, n) == k


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, 2, float("nan"), "0.5", True, None])
def test_keep_outside_range_is_an_error(bad):
    with pytest.raises(ValueError, match=r"keep ratio .* must lie in \(0, 1\]"):
        keep_count(bad, 16)


def test_keep_one_is_identity():
    x = torch.randn(2, 17, 8)
    s = summarize(x, None, 1.0, num_prefix=1)
    assert s.fused_size == 0 and s.fused.shape == (2, 0, 8)
    assert torch.equal(restore_tokens(s), x)
    assert torch.equal(restore_dense(s), x)
    assert size_bias(1, s.k, s.fused_size) is None


def test_top_k_and_fused_token():
    torch.manual_seed(0)
    B, P, Np, C = 2, 2, 15, 6
    x = torch.randn(B, P + Np, C)
    imp = torch.rand(B, P + Np)
    s = summarize(x, imp, 0.4, num_prefix=P)
    k = keep_count(0.4, Np)
    assert s.kept.shape == (B, k, C) and s.indices.shape == (B, k) and s.fused.shape == (B, 1, C)
    assert s.fused_size == Np - k
    assert torch.equal(s.prefix, x[:, :P])
    for b in range(B):
        want = sorted(torch.argsort(imp[b, P:], descending=True)[:k].tolist())
        assert s.indices[b].tolist() == want
        assert torch.equal(s.kept[b], x[b, P:][want])
        rest = [i for i in range(Np) if i not in want]
        w = imp[b, P:][rest]
        fused = (w[:, None] * x[b, P:][rest]).sum(0) / w.sum()
        torch.testing.assert_close(s.fused[b, 0], fused)
    seq = restore_tokens(s)
    assert seq.shape == (B, P + k + 1, C)
    dense = restore_dense(s)
    assert dense.shape == x.shape
    assert torch.equal(dense[:, :P], x[:, :P])
    for b in range(B):
        kept = set(s.indices[b].tolist())
        for i in range(Np):
            want = x[b, P + i] if i in kept else s.fused[b, 0]
            assert torch.equal(dense[b, P + i], want)
    # importance given for the patch tokens only: the same summary
    s2 = summarize(x, imp[:, P:], 0.4, num_prefix=P)
    assert torch.equal(s2.indices, s.indices) and torch.equal(s2.fused, s.fused)


def test_shapes_are_static_across_inputs():
    shapes = {tuple(restore_tokens(summarize(torch.randn(3, 50, 4), torch.rand(3, 50), 0.3)).shape)
              for _ in range(5)}
    assert shapes == {(3, 1 + 15 + 1, 4)}


def test_proportional_attention_bias():
    """Attention over [kept..., fused] with log(size) on the fused key equals attention over
    the sequence in which the fused token appears size times (ToMe)."""
    torch.manual_seed(0)
    P, k, m, H, D = 1, 5, 7, 2, 8
    q = torch.randn(1, H, P + k + 1, D, dtype=torch.float64)
    kk = torch.randn(1, H, P + k + 1, D, dtype=torch.float64)
    v = torch.randn(1, H, P + k + 1, D, dtype=torch.float64)
    bias = size_bias(P, k, m, dtype=torch.float64)
    assert bias.shape == (1, 1, 1, P + k + 1) and bias[0, 0, 0, -1] == math.log(m)
    short = F.scaled_dot_product_attention(q, kk, v, attn_mask=bias)
    rep = lambda t: torch.cat([t, t[:, :, -1:].expand(-1, -1, m - 1, -1)], 2)
    full = F.scaled_dot_product_attention(q, rep(kk), rep(v))
    torch.testing.assert_close(short, full)


def test_gather_fuse_gradients():
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4, 8], [1, 2, 3]])
    w = torch.rand(2, 9, dtype=torch.float64).scatter(1, idx, 0.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: gather_fuse(a, b, idx), (x, w))
    kept, fused = gather_fuse_ref(x, w, idx)
    assert kept.dtype == fused.dtype == torch.float64


def test_training_gradient_reaches_kept_and_fused_tokens():
    x = torch.randn(1, 11, 4, requires_grad=True)
    imp = torch.rand(1, 11)
    restore_tokens(summarize(x, imp, 0.5)).sum().backward()
    assert (x.grad[0, 0] == 1).all()  # the class token
    assert x.grad.abs().sum(-1).gt(0).all()  # kept tokens get 1, fused ones their weight


@pytest.mark.parametrize("layout,shape", [("map", (2, 5, 3, 4)), ("map_nhwc", (2, 3, 4, 5))])
def test_map_round_trip(layout, shape):
    x = torch.randn(*shape)
    t = map_to_tokens(x, layout)
    assert t.shape == (2, 12, 5)
    assert torch.equal(tokens_to_map(t, layout, (3, 4)), x)


def test_errors():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="needs their importance"):
        summarize(x, None, 0.5)
    with pytest.raises(ValueError, match=r"must be \[2, 10\] or \[2, 9\]"):
        summarize(x, torch.rand(2, 7), 0.5)
    with pytest.raises(ValueError, match=r"num_prefix=10 must lie in 0..9"):
        summarize(x, torch.rand(2, 10), 0.5, num_prefix=10)
    with pytest.raises(ValueError, match=r"tokens \(B, N, C\)"):
        summarize(x[0], torch.rand(10), 0.5)
    with pytest.raises(ValueError, match="layout 'nchw' is not supported; supported: tokens, map"):
        map_to_tokens(x, "nchw")
