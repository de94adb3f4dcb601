"""What the elastic tests share: a probe model on informative weights, a model run with the
inputs of some layers cut (the zeroing reference), and the checks every elastic family repeats
(full width is the original, a partitioned model runs stage by stage, no weight is copied,
magnitude order keeps the output, bad counts and ratios are named)."""
from contextlib import contextmanager

import pytest
import torch

import lapdtr
from lapdtr.elastic import ElasticError, make_elastic, order_by_magnitude_, set_width, widths
from lapdtr.testing import assert_close_scaled, informative_weights_

# ops that copy their input: a weight seen by one of them was not sliced as a view
COPY_OPS = ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous", "aten::_to_copy",
            "aten::index")


def clear_bias_caches(model):
    """Empty timm's eval-mode attention bias caches (TinyViT, EfficientViT-M)."""
    for mod in model.modules():
        if hasattr(mod, "attention_bias_cache"):
            mod.attention_bias_cache = {}


def informative_model(name, *, size=64, batch=2, bias_tables=False, **kw):
    """``lapdtr.create_model(name, **kw)`` in eval mode on informative weights (seed 1, measured
    on the probe) and a ``(batch, 3, size, size)`` probe batch, both drawn after seed 0. With
    ``bias_tables``, the attention bias tables (which timm zero-inits) are drawn N(0, 0.5) first
    so that every head's table counts; the bias caches are left empty."""
    torch.manual_seed(0)
    m = lapdtr.create_model(name, **kw).eval()
    x = torch.randn(batch, 3, size, size)
    if bias_tables:
        with torch.no_grad():
            for mod in m.modules():
                if hasattr(mod, "attention_biases"):
                    mod.attention_biases.normal_(0, 0.5)
    informative_weights_(m, seed=1, probe=x)  # no block invisible in the logits
    clear_bias_caches(m)
    return m, x


def zero_inputs_from(d, *, dim=-1, width=None, ranges=1):
    """Forward pre-hook zeroing entries ``d:`` along ``dim`` of a module's input (``dim=1``:
    channel-first maps); with ``width``, entries ``d..width`` of each of ``ranges`` consecutive
    ranges of ``width``."""
    def cut(m, args):
        (a,) = args
        a = a.clone()
        index = [slice(None)] * a.dim()
        for s in range(ranges):
            index[dim] = slice(d, None) if width is None else slice(s * width + d, (s + 1) * width)
            a[tuple(index)] = 0
        return (a,)
    return cut


@contextmanager
def inputs_cut(cuts, *, dim=-1):
    """Within the block, the input of each ``(module, d)`` or ``(module, d, width, ranges)`` in
    ``cuts`` is cut by :func:`zero_inputs_from` along ``dim``."""
    hooks = []
    try:
        for mod, d, *ranges in cuts:
            hooks.append(mod.register_forward_pre_hook(
                zero_inputs_from(d, dim=dim, **dict(zip(("width", "ranges"), ranges)))))
        yield
    finally:
        for h in hooks:
            h.remove()


def run_with_inputs_cut(model, x, cuts, *, dim=-1):
    """``model(x)`` (no grad) with the input features ``d:`` along ``dim`` of each ``(module,
    d)`` in ``cuts`` zeroed (see :func:`inputs_cut`): dropped heads before ``proj``, dropped
    hidden units before ``fc2``; ``dim=1`` for channel-first maps."""
    with inputs_cut(cuts, dim=dim), torch.no_grad():
        return model(x)


def output_at_width(model, x, ratio, mlp_ratio=None):
    """``model(x)`` (no grad) at ``set_width(model, ratio, mlp_ratio=mlp_ratio)``; the model is
    put back to full width after."""
    set_width(model, ratio, mlp_ratio=mlp_ratio)
    with torch.no_grad():
        y = model(x)
    set_width(model, 1.0)
    return y


def assert_clearly_differs(y, other, scale=None):
    """``y`` and ``other`` differ by over 100 times the comparison tolerance, relative to the
    largest value of ``scale`` (default: ``other``): the change is visible, not rounding."""
    scale = other if scale is None else scale
    assert (y - other).abs().max() > 100 * 2e-5 * scale.abs().max()


def make_elastic_keeping_output(model, x):
    """``make_elastic(model)``, checking that the state-dict keys are unchanged and the output on
    ``x`` is the original's exactly, also after a round trip through half width; returns that
    output."""
    with torch.no_grad():
        want = model(x)
    keys = list(model.state_dict())
    make_elastic(model)
    assert list(model.state_dict()) == keys  # checkpoints and load_units keep working
    with torch.no_grad():
        assert torch.equal(model(x), want)
    set_width(model, 0.5)
    set_width(model, 1.0)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    return want


def assert_partitioned_equals_whole(model, x, cuts, ratio=0.5):
    """``make_elastic(model)`` at width ``ratio``: ``lapdtr.partition(model, cuts)``'s stages
    run in sequence give ``model(x)`` exactly."""
    make_elastic(model)
    set_width(model, ratio)
    with torch.no_grad():
        want = model(x)
        y = x
        for s in lapdtr.partition(model, cuts):
            y = s(y)
    assert torch.equal(y, want)


def weight_copies(model, x, *, shapes=None, min_numel=None, warmup=False):
    """The ``(op, input shape)`` of every op in :data:`COPY_OPS` that the profiler sees in
    ``model(x)`` (no grad) on an input shaped as one of ``shapes`` or of at least ``min_numel``
    elements. With ``warmup``, one run first (which fills timm's eval-mode caches)."""
    from torch.profiler import ProfilerActivity, profile

    def matches(shape):
        if not shape:
            return False
        if shapes is not None and tuple(shape) in shapes:
            return True
        return min_numel is not None and torch.Size(shape).numel() >= min_numel

    with torch.no_grad():
        if warmup:
            model(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            model(x)
    return [(e.name, shape) for e in prof.events() if e.name in COPY_OPS
            for shape in e.input_shapes if matches(shape)]


def spy_weights(monkeypatch, owner, name, at=1):
    """Replace ``owner.name`` (``F.linear``, ``torch.matmul``, ...) with a spy that records the
    tensor it is given at position ``at`` (or as ``weight=``; ``None`` if none); returns the list
    it records into."""
    real = getattr(owner, name)
    seen = []

    def spy(*a, **k):
        seen.append(a[at] if len(a) > at else k.get("weight"))
        return real(*a, **k)

    monkeypatch.setattr(owner, name, spy)
    return seen


def views_of_parameters(model, tensors):
    """Per tensor: whether it is ``None`` or shares the storage of one of ``model``'s
    parameters (a view, not a copy)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return [t is None or t.untyped_storage().data_ptr() in params for t in tensors]


def order_by_magnitude_keeping_output(model, x):
    """``order_by_magnitude_(model)``, checking that the output on ``x`` is kept (up to float
    summation order); returns the permutations it applied."""
    with torch.no_grad():
        full = model(x)
    applied = order_by_magnitude_(model)
    with torch.no_grad():
        assert_close_scaled(model(x), full)
    return applied


def assert_largest_first(model, types):
    """The magnitude scores of each of ``model``'s layers of ``types`` are in descending
    order."""
    for mod in model.modules():
        if not isinstance(mod, types):
            continue
        score = mod.magnitude()
        assert torch.all(score[:-1] >= score[1:])


def assert_count_refused(setter, k, what, total):
    """``setter(k)`` raises an ElasticError naming ``what=k`` and the allowed ``1..total``."""
    with pytest.raises(ElasticError, match=rf"{what}={k}; allowed: 1\.\.{total}"):
        setter(k)


def assert_ratio_refused(model, ratio, **kw):
    """``set_width(model, ratio, **kw)`` raises an ElasticError naming the range (0, 1]."""
    with pytest.raises(ElasticError, match=r"\(0, 1\]"):
        set_width(model, ratio, **kw)


def assert_full_width(model):
    """Every elastic layer runs all its heads and hidden units."""
    w = widths(model)
    assert all(k == h for k, h in w["heads"] + w["hidden"])
