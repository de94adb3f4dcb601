"""Sandwich-rule training: a step runs the widths it says (largest, smallest, random ones in
between), the students learn from the largest width's detached predictions, gradients add up
over one optimizer step; the smallest width learns on a fixed batch; the digits trainer's
checkpoint loads into the unmodified timm model, and without the sandwich it is
train_digits_checkpoint's."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lapdtr
from lapdtr.data import train_digits_checkpoint
from lapdtr.elastic import ElasticAttention, ElasticError, ElasticMlp, make_elastic, set_width
from lapdtr.elastic.train import (distill_loss, sandwich_step, sandwich_widths,
                                  train_elastic_digits)

WIDTHS = [1.0, 0.75, 0.5, 0.25]
# a DeiT with 4 heads, so the four widths are 4, 3, 2, 1 heads exactly
TINY = dict(depth=2, num_heads=4, embed_dim=32, patch_size=8)


def _model():
    torch.manual_seed(0)
    m = lapdtr.create_model("deit_tiny_patch16_224", img_size=16, num_classes=5, **TINY)
    return make_elastic(m).train()


def _batch(n=16):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def _record_widths(model):
    """The (heads, hidden) of the first block each time the model runs forward."""
    attn = next(m for m in model.modules() if isinstance(m, ElasticAttention))
    mlp = next(m for m in model.modules() if isinstance(m, ElasticMlp))
    seen = []
    handle = model.register_forward_pre_hook(
        lambda mod, args: seen.append((attn.heads_now, mlp.hidden_now)))
    return seen, handle


def test_sandwich_widths_are_largest_smallest_then_random_between():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        run = sandwich_widths([0.5, 1.0, 0.25, 0.75], 2, g)
        assert run[:2] == [1.0, 0.25] and len(run) == 4
        assert set(run[2:]) <= {0.75, 0.5}
    draws = [w for _ in range(50) for w in sandwich_widths(WIDTHS, 2, g)[2:]]
    assert set(draws) == {0.75, 0.5}  # both middle widths come up
    assert sandwich_widths(WIDTHS, 0) == [1.0, 0.25]
    assert sandwich_widths([1.0, 0.5], 3) == [1.0, 0.5]  # nothing in between
    assert sandwich_widths([1.0], 2) == [1.0]
    with pytest.raises(ElasticError, match=r"n_random: -1; allowed: an integer >= 0"):
        sandwich_widths(WIDTHS, -1)
    with pytest.raises(ElasticError, match=r"1\.5 is not a width ratio; allowed"):
        sandwich_widths([1.0, 1.5])
    with pytest.raises(ElasticError, match="non-empty list"):
        sandwich_widths([])


def test_sandwich_step_runs_the_widths_it_claims_and_restores_the_width():
    model = _model()
    set_width(model, 0.5)
    before = lapdtr.elastic.widths(model)
    seen, handle = _record_widths(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = []
    opt.step = (lambda orig: lambda *a, **k: (steps.append(1), orig(*a, **k))[1])(opt.step)
    x, y = _batch()
    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(5):
            seen.clear()
            res = sandwich_step(model, x, y, opt, WIDTHS, n_random=2, generator=g)
            assert len(res["widths"]) == len(res["losses"]) == 4
            assert res["widths"][:2] == [1.0, 0.25]
            assert seen == [(round(4 * w), round(128 * w)) for w in res["widths"]]
            assert res["loss"] == pytest.approx(sum(res["losses"]))
    finally:
        handle.remove()
    assert len(steps) == 5  # one optimizer step per sandwich step
    assert lapdtr.elastic.widths(model) == before


def test_students_learn_from_the_largest_widths_detached_predictions():
    model = _model()
    x, y = _batch()
    res = sandwich_step(model, x, y, None, WIDTHS, n_random=1,
                        generator=torch.Generator().manual_seed(0), zero_grad=False, step=False)
    got = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    # the same losses and gradients by hand: CE at full width, KL to its detached logits below
    model.zero_grad(set_to_none=True)
    set_width(model, 1.0)
    teacher = model(x)
    ce = F.cross_entropy(teacher, y)
    ce.backward()
    want_losses = [ce.detach()]
    for w in res["widths"][1:]:
        set_width(model, w)
        s = model(x)
        loss = F.kl_div(F.log_softmax(s, -1), F.softmax(teacher.detach(), -1),
                        reduction="batchmean")
        loss.backward()
        want_losses.append(loss.detach())
    set_width(model, 1.0)
    assert res["losses"] == pytest.approx([v.item() for v in want_losses], rel=1e-4, abs=1e-6)
    assert res["losses"][1] > 0
    for p, gr in got.items():
        torch.testing.assert_close(gr, p.grad, rtol=1e-4, atol=1e-6)
    # the teacher's logits get no gradient from the students
    t = torch.randn(4, 5, requires_grad=True)
    distill_loss(torch.randn(4, 5, requires_grad=True), t).backward()
    assert t.grad is None


def _ce_at(model, w, x, y):
    set_width(model, w)
    with torch.no_grad():
        v = F.cross_entropy(model(x), y).item()
    set_width(model, 1.0)
    return v


def test_smallest_width_loss_goes_down_on_a_fixed_batch():
    model = _model()
    x, y = _batch(32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = _ce_at(model, 0.25, x, y)
    for i in range(25):  # in-place distillation: it learns the labels through the teacher
        sandwich_step(model, x, y, opt, WIDTHS, generator=torch.Generator().manual_seed(i))
    assert _ce_at(model, 0.25, x, y) < 0.5 * start
    # against the labels (no distillation), the loss a step reports for it falls step by step
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    small = [sandwich_step(model, x, y, opt, WIDTHS, inplace_distill=False,
                           generator=torch.Generator().manual_seed(i))["losses"][1]
             for i in range(10)]
    assert small[-1] < 0.7 * small[0]
    assert sum(b < a for a, b in zip(small, small[1:])) >= 8


def test_sandwich_step_needs_elastic_layers_and_labels():
    plain = lapdtr.create_model("deit_tiny_patch16_224", img_size=16, num_classes=5, **TINY)
    x, y = _batch(4)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.raises(ElasticError, match="no elastic layers; call lapdtr.elastic.make_elastic"):
        sandwich_step(plain, x, y, opt, WIDTHS)
    with pytest.raises(ElasticError, match="y is None"):
        sandwich_step(make_elastic(plain), x, None, opt, WIDTHS)
    with pytest.raises(ElasticError, match="optimizer is None"):
        sandwich_step(plain, x, y, None, WIDTHS)


DIGITS_KW = dict(depth=1, num_heads=4, embed_dim=32, patch_size=8)


def test_elastic_digits_checkpoint_loads_into_the_unmodified_model(tmp_path):
    path = tmp_path / "deit-elastic.safetensors"
    res = train_elastic_digits("deit_tiny_patch16_224", path, img_size=16, epochs=1,
                               model_kwargs=DIGITS_KW, batch_size=128)
    assert res["sandwich"] and res["widths"] == WIDTHS and res["ordered_layers"] == 2
    assert sorted(float(k) for k in res["accuracy"]) == sorted(WIDTHS)
    assert all(0 <= v <= 1 for v in res["accuracy"].values())
    sd = load_file(str(path))
    plain = lapdtr.create_model("deit_tiny_patch16_224", **res["model_kwargs"])
    assert set(sd) == set(plain.state_dict())
    plain.load_state_dict(sd, strict=True)
    assert not any(isinstance(m, (ElasticAttention, ElasticMlp)) for m in plain.modules())
    from lapdtr.data import DataConfig, build_loader, reference_accuracy

    test = build_loader(DataConfig(kind="digits", split="test"), plain, img_size=16,
                        batch_size=256)
    assert reference_accuracy(plain, test)["top1"] == res["test_top1"] \
        == res["accuracy"]["1.000000"]
    make_elastic(plain)  # made elastic again, it runs every trained width as reported
    for w in WIDTHS:
        set_width(plain, w)
        assert reference_accuracy(plain, test)["top1"] == res["accuracy"][f"{w:.6f}"]
    assert len(set(res["accuracy"].values())) > 1


def test_without_the_sandwich_it_is_train_digits_checkpoint(tmp_path):
    kw = dict(img_size=16, epochs=1, model_kwargs=DIGITS_KW, batch_size=128, seed=2)
    a = train_elastic_digits("deit_tiny_patch16_224", tmp_path / "a.safetensors",
                             sandwich=False, **kw)
    b = train_digits_checkpoint("deit_tiny_patch16_224", tmp_path / "b.safetensors", **kw)
    sa, sb = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["test_top1"] == b["test_top1"] and a["order"] is None and not a["sandwich"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"order: 'random'; allowed: \['importance', "
                                         r"'magnitude', None\]"):
        train_elastic_digits("deit_tiny_patch16_224", tmp_path / "x.safetensors", order="random")
    with pytest.raises(ValueError, match="epochs: expected an integer >= 0"):
        train_elastic_digits("deit_tiny_patch16_224", tmp_path / "x.safetensors", epochs=-1)
    with pytest.raises(ValueError, match="no elastic layers"):
        train_elastic_digits("resnet10t", tmp_path / "x.safetensors", epochs=0)
