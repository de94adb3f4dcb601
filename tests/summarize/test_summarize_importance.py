"""Token importance recomputed from q and k equals the explicit softmax attention of timm's
Attention (its fused_attn=False path, probabilities read by a hook on attn_drop); the streamed
received attention equals the full one; attention sources of the vit adapter; errors."""
import pytest
import timm
import torch
from timm.models.vision_transformer import Attention

from lapdtr import units
from lapdtr.summarize import (AttentionProbe, attention_importance, attention_source,
                              cls_importance, importance, importance_kind, qk,
                              received_attention, received_attention_ref)
from lapdtr.testing import informative_weights_


def explicit_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T · scale) of timm's explicit path: (B, H, N, N)."""
    seen = []
    h = attn.attn_drop.register_forward_hook(lambda m, a, out: seen.append(out))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        attn(x)
    finally:
        attn.fused_attn = fused
        h.remove()
    return seen[0]


@pytest.fixture(params=[False, True], ids=["plain", "qk_norm"])
def attn(request):
    torch.manual_seed(1)
    a = Attention(72, num_heads=3, qkv_bias=True, qk_norm=request.param,
                  norm_layer=torch.nn.LayerNorm).eval()
    informative_weights_(a, seed=3)
    return a


@pytest.mark.parametrize("n", [17, 50])
def test_cls_row_equals_explicit_attention(attn, n):
    x = torch.randn(2, n, 72) * 2
    with torch.no_grad():
        p = explicit_attention(attn, x)
        got = attention_importance(attn, x, "cls")
    assert got.shape == (2, n)
    torch.testing.assert_close(got, p[:, :, 0].mean(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(1), torch.ones(2))


@pytest.mark.parametrize("n", [17, 150])
def test_received_attention_equals_explicit_attention(attn, n):
    x = torch.randn(2, n, 72) * 2
    with torch.no_grad():
        p = explicit_attention(attn, x)
        got = attention_importance(attn, x, "received")
        q, k = qk(attn, x)
        streamed = {b: received_attention_ref(q, k, attn.scale, block=b) for b in (7, 64, n)}
    want = p.mean(2).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for b, r in streamed.items():
        torch.testing.assert_close(r, want, rtol=1e-5, atol=1e-7, msg=f"block {b}")


def test_importance_is_differentiable(attn):
    x = (torch.randn(1, 17, 72) * 2).requires_grad_()
    (attention_importance(attn, x, "cls")[:, 1:].square().sum()
     + attention_importance(attn, x, "received").square().sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def deit():
    m = timm.create_model("deit_tiny_patch16_224", img_size=64, depth=3, num_classes=10).eval()
    return informative_weights_(m, seed=0)


def test_probe_in_model_forward(deit):
    """The probe on blocks.1's qkv gives the importance of blocks.1's input tokens."""
    x = torch.randn(2, 3, 64, 64)
    attn = attention_source(deit, "blocks.1")
    assert attn is deit.blocks[1].attn
    seen = {}
    h = deit.blocks[1].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad(), AttentionProbe(attn, importance_kind(deit)) as probe:
        deit(x)
        got = probe.importance()
    h.remove()
    with torch.no_grad():
        want = explicit_attention(attn, deit.blocks[1].norm1(seen["x"]))[:, :, 0].mean(1)
    assert got.shape == (2, 17)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not attn.qkv._forward_hooks  # removed on exit


def test_attention_source_by_unit_and_errors(deit):
    ul = units(deit, 64)
    assert attention_source(deit, ul[2]) is deit.blocks[1].attn
    assert attention_source(deit, 3) is deit.blocks[2].attn
    for bad in ("embed", "head", "blocks.3"):
        with pytest.raises(ValueError, match=r"has no attention; units with one: blocks.0 .. blocks.2"):
            attention_source(deit, bad)
    resnet = timm.create_model("resnet10t", num_classes=10)
    with pytest.raises(ValueError, match=r"the resnet adapter offers no attention source.*vit"):
        attention_source(resnet, "layer1")


def test_importance_kind_and_errors(deit):
    assert importance_kind(deit) == "cls"
    avg = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, class_token=False,
                            global_pool="avg")
    assert importance_kind(avg) == "received"
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"kind 'max' is not supported; supported: cls, received"):
        importance(q, q, "max")
    with pytest.raises(ValueError, match=r"\(B, heads, N, head_dim\)"):
        cls_importance(q[0], q[0])
    with pytest.raises(ValueError, match=r"row 5 is not a token index \(0..4\)"):
        cls_importance(q, q, row=5)
    with pytest.raises(RuntimeError, match="has not run"):
        with AttentionProbe(deit.blocks[0].attn) as p:
            p.importance()
    assert torch.allclose(received_attention(q, q).sum(1), torch.ones(1))


@pytest.mark.parametrize("name,kw,img,want", [
    ("deit_tiny_patch16_224", {"depth": 2}, 224, {"blocks.0": "blocks.0.attn",
                                                  "blocks.1": "blocks.1.attn"}),
    ("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64}, 64,
     {"blocks.0": "blocks.0.attn", "blocks.1": "blocks.1.attn"}),
    ("efficientvit_b0", {}, 64, {"stages.2.blocks.1": "stages.2.blocks.1.context_module.main",
                                 "stages.2.blocks.2": "stages.2.blocks.2.context_module.main",
                                 "stages.3.blocks.1": "stages.3.blocks.1.context_module.main",
                                 "stages.3.blocks.2": "stages.3.blocks.2.context_module.main"}),
])
def test_adapters_name_the_attention_of_each_unit(name, kw, img, want):
    import lapdtr

    m = lapdtr.create_model(name, **kw)
    ul = units(m, img)
    assert {u.name: u.attention for u in ul if u.attention} == want
    for u in ul:
        if u.attention:
            assert attention_source(m, u) is m.get_submodule(u.attention)
            assert attention_source(m, u.name) is m.get_submodule(u.attention)
