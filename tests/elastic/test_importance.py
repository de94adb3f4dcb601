"""Calibration-data importance (DynaBERT): head scores are |dL/d mask|, checked against a
central difference; ordering by them keeps the full-width output and beats the reverse order at
a reduced width; the model comes back as it was."""
import pytest
import torch
import torch.nn.functional as F

import lapdtr
from lapdtr.elastic import (ElasticAttention, ElasticError, ElasticMlp, importance,
                            make_elastic, order_by_importance_, set_width)
from lapdtr.testing import assert_close_scaled

from elastic_helpers import informative_model


def _deit():
    m, x = informative_model("deit_tiny_patch16_224", size=32, batch=8, depth=2, img_size=32,
                             patch_size=8, num_classes=5)
    y = torch.randint(0, 5, (8,))
    return make_elastic(m), x, y


def _loss_with_head_scaled(model, attn, h, scale, x, y):
    def hook(mod, args):
        a = args[0].clone()
        a[..., h * attn.head_dim:(h + 1) * attn.head_dim] *= scale
        return (a,)
    handle = attn.proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return F.cross_entropy(model(x), y, reduction="sum").item()
    finally:
        handle.remove()


def test_head_scores_are_the_mask_gradient():
    model, x, y = _deit()
    model.double()
    x = x.double()
    scores = importance(model, [(x, y)])
    eps = 1e-4
    for name, mod in model.named_modules():
        if isinstance(mod, ElasticAttention):
            for h in range(mod.num_heads):
                d = (_loss_with_head_scaled(model, mod, h, 1 + eps, x, y)
                     - _loss_with_head_scaled(model, mod, h, 1 - eps, x, y)) / (2 * eps)
                assert scores[name][h].item() == pytest.approx(abs(d), rel=1e-5, abs=1e-9)


def test_hidden_scores_are_weight_times_gradient():
    model, x, y = _deit()
    scores = importance(model, [(x, y)])
    mlp_name, mlp = next((n, m) for n, m in model.named_modules() if isinstance(m, ElasticMlp))
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    want = ((mlp.fc1.weight * mlp.fc1.weight.grad).abs().sum(1)
            + (mlp.fc1.bias * mlp.fc1.bias.grad).abs()
            + (mlp.fc2.weight * mlp.fc2.weight.grad).abs().sum(0))
    torch.testing.assert_close(scores[mlp_name], want.detach())


def test_the_model_comes_back_as_it_was():
    model, x, y = _deit()
    model.requires_grad_(False)
    set_width(model, 0.5)
    importance(model, x)  # no targets: the model's own top-1
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not model.training
    assert all(m.heads_now == 2 for m in model.modules() if isinstance(m, ElasticAttention))


def test_ordering_keeps_full_width_and_beats_the_reverse_order():
    model, x, y = _deit()
    with torch.no_grad():
        full = model(x)
    reverse = {n: s.argsort() for n, s in importance(model, [(x, y)]).items()}
    applied = order_by_importance_(model, [(x, y)])
    assert len(applied) == 4
    with torch.no_grad():
        assert_close_scaled(model(x), full)

    def loss_at(ratio):
        set_width(model, ratio)
        with torch.no_grad():
            out = F.cross_entropy(model(x), y).item()
        set_width(model, 1.0)
        return out

    best = loss_at(1 / 3)
    # undo and apply the least-important-first order instead
    for name, mod in model.named_modules():
        if name in applied:
            inv = torch.empty(len(applied[name]), dtype=torch.long)
            inv[torch.tensor(applied[name])] = torch.arange(len(applied[name]))
            mod.reorder_(inv)
            mod.reorder_(reverse[name])
    worst = loss_at(1 / 3)
    assert best < worst, (best, worst)


def test_no_elastic_layers_or_no_data_is_named():
    with pytest.raises(ElasticError, match="make_elastic"):
        importance(lapdtr.create_model("resnet18"), torch.randn(1, 3, 32, 32))
    model, _, _ = _deit()
    with pytest.raises(ElasticError, match="no batches"):
        importance(model, [])


def test_efficientvit_b_heads_are_masked_in_every_branch():
    """LiteMLA's heads meet at proj in one range per branch: the scores are the gradient of a
    scale on head h's channels in every range (timm runs LiteMLA's attention in float32 even
    on a double model, too coarse for a central difference: the gradient is taken here)."""
    from lapdtr.elastic.efficientvit_b import ElasticLiteMLA

    m, x = informative_model("efficientvit_b0", size=32, num_classes=5)
    make_elastic(m)
    y = torch.tensor([1, 3])
    scores = importance(m, [(x, y)])
    name, attn = next((n, a) for n, a in m.named_modules() if isinstance(a, ElasticLiteMLA))
    branches = 1 + len(attn.aggreg)
    assert branches >= 2
    scale = torch.ones(attn.num_heads, requires_grad=True)

    def hook(mod, args):
        ch = torch.cat([scale.repeat_interleave(attn.dim)] * branches)
        return (args[0] * ch.view(1, -1, 1, 1),)

    handle = attn.proj.register_forward_pre_hook(hook)
    try:
        F.cross_entropy(m(x), y, reduction="sum").backward()
    finally:
        handle.remove()
    torch.testing.assert_close(scores[name], scale.grad.abs())
