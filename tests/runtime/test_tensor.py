"""Tensor mode: uneven head / hidden-unit / channel splits equal the unsharded layers and models."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st
from torch import nn

import lapdtr
from lapdtr.plan.types import DevicePrediction, Plan, Shard, StagePlan
from lapdtr.profile.types import DeviceProfile
from lapdtr.runtime.tensor import (ShardedAttention, ShardedConv2d, ShardedMlp,
                                   apply_tensor_split, get_tensor_comm_stats, list_tensor_shards,
                                   proportions_from_plan, reference_tensor_split, run_tensor,
                                   split_counts, split_ranges)

from lapdtr.testing import assert_close_scaled, assert_sees_every_unit, informative_weights_

from runtime_helpers import init_gloo, spawn

ATOL = 1e-5


# ------------------------------------------------------------------------ rounding proportions

@pytest.mark.parametrize("total,props,want", [
    (3, [1, 1], [2, 1]),               # 3 heads over 2 ranks
    (12, [5, 4, 3], [5, 4, 3]),
    (12, [0.5, 0.3, 0.2], [6, 4, 2]),
    (10, [1, 0, 0], [8, 1, 1]),        # a zero share still gets one unit
    (3, [0.01, 0.01, 100], [1, 1, 1]),
    (64, [0.99, 0.01], [63, 1]),
])
def test_split_counts(total, props, want):
    assert split_counts(total, props) == want
    ranges = split_ranges(total, props)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(b - a == c for (a, b), c in zip(ranges, want))


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 300),
       props=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=6))
def test_split_counts_properties(total, props):
    if sum(props) <= 0 or total < len(props):
        with pytest.raises(ValueError):
            split_counts(total, props)
        return
    counts = split_counts(total, props)
    assert sum(counts) == total and min(counts) >= 1
    ideal = [total * p / sum(props) for p in props]
    # never more than one unit from the ideal share, except where the minimum of one forces it
    assert all(abs(c - x) < 1 + len(props) for c, x in zip(counts, ideal))
    assert all(abs(c - x) < 1 for c, x in zip(counts, ideal) if x >= 1) or min(ideal) < 1


@pytest.mark.parametrize("props,match", [
    ([1, -1], "-1"), ([0, 0], "sum to 0"), ([float("nan"), 1], "nan"), ([], "non-empty"),
    (["a", 1], "list of numbers"),
])
def test_split_counts_bad_proportions(props, match):
    with pytest.raises(ValueError, match=match):
        split_counts(12, props)


def test_more_ranks_than_heads():
    with pytest.raises(ValueError, match="3 units cannot be split over 4 ranks"):
        split_counts(3, [1, 1, 1, 1], what="attention")


# ------------------------------------------------------------------------ per-layer math

def _attention(dim=96, heads=12, **kw):
    from timm.layers import Attention

    torch.manual_seed(0)
    return Attention(dim, num_heads=heads, qkv_bias=True, **kw).eval()


@pytest.mark.parametrize("heads,props", [(3, [1, 1]), (12, [5, 4, 3]), (12, [0.1, 0.1, 0.8]),
                                         (5, [1, 2]), (7, [3, 1, 1, 2])])
def test_sharded_attention_math(heads, props):
    attn = _attention(dim=8 * heads, heads=heads)
    x = torch.randn(2, 11, 8 * heads)
    torch.testing.assert_close(reference_tensor_split(attn, x, proportions=props), attn(x),
                               atol=ATOL, rtol=0)


def test_sharded_attention_qk_norm_gate_and_mask():
    from timm.layers import Attention

    torch.manual_seed(1)
    attn = Attention(48, num_heads=6, qkv_bias=True, qk_norm=True, gated=True,
                     norm_layer=nn.LayerNorm).eval()
    x = torch.randn(2, 9, 48)
    mask = torch.randn(2, 6, 9, 9)  # a per-head additive mask is sliced with the heads
    for props in ([1, 2], [3, 2, 1]):
        torch.testing.assert_close(reference_tensor_split(attn, x, proportions=props), attn(x),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(
            reference_tensor_split(attn, x, proportions=props, attn_mask=mask),
            attn(x, attn_mask=mask), atol=ATOL, rtol=0)


def test_sharded_attention_shapes_and_names():
    attn = _attention(dim=96, heads=12)
    s = ShardedAttention(attn, ranges=split_ranges(12, [5, 4, 3]), rank=1)
    assert (s.start, s.stop, s.num_heads) == (5, 9, 4)
    assert s.qkv.weight.shape == (3 * 4 * 8, 96) and s.proj.weight.shape == (96, 32)
    # the rank holds exactly its heads' rows of q, k and v
    w = attn.qkv.weight.view(3, 12, 8, 96)[:, 5:9].reshape(-1, 96)
    assert torch.equal(s.qkv.weight, w)
    assert set(s.state_dict()) >= {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_sharded_attention_rejects_scale_norm():
    from timm.layers import Attention

    attn = Attention(48, num_heads=6, scale_norm=True, norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match="scale_norm"):
        reference_tensor_split(attn, torch.randn(1, 4, 48), proportions=[1, 1])


@pytest.mark.parametrize("hidden,props", [(768, [0.7, 0.3]), (37, [5, 4, 3]), (4, [1, 1, 1, 1])])
def test_sharded_mlp_math(hidden, props):
    from timm.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(24, hidden).eval()
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(reference_tensor_split(mlp, x, proportions=props), mlp(x),
                               atol=ATOL, rtol=0)
    s = ShardedMlp(mlp, ranges=split_ranges(hidden, props), rank=len(props) - 1)
    assert s.fc1.weight.shape[0] == s.fc2.weight.shape[1] == s.stop - s.start


def test_glu_mlp_is_rejected():
    from timm.layers import GluMlp

    with pytest.raises(ValueError, match="cannot split GluMlp|splits timm Mlp"):
        reference_tensor_split(GluMlp(8, 16), torch.randn(1, 2, 8), proportions=[1, 1])


@pytest.mark.parametrize("conv,props", [
    (nn.Conv2d(5, 13, 3, padding=1), [0.6, 0.4]),
    (nn.Conv2d(8, 7, 3, stride=2, padding=1, bias=False), [1, 1, 5]),
    (nn.Conv2d(6, 9, 3, padding=1, groups=3), [2, 1]),          # grouped: whole groups
    (nn.Conv2d(7, 14, 3, padding=1, groups=7), [3, 2, 2]),      # depthwise, multiplier 2
    (nn.Conv2d(4, 6, 1, dilation=2, padding="same"), [1, 1]),
])
def test_sharded_conv_math(conv, props):
    torch.manual_seed(0)
    conv = conv.eval()
    x = torch.randn(2, conv.in_channels, 9, 10)
    torch.testing.assert_close(reference_tensor_split(conv, x, proportions=props), conv(x),
                               atol=ATOL, rtol=0)


def test_sharded_conv_and_linear_slices():
    conv = nn.Conv2d(3, 10, 3)
    s = ShardedConv2d(conv, ranges=split_ranges(10, [0.5, 0.3, 0.2]), rank=1)
    assert torch.equal(s.weight, conv.weight[5:8]) and torch.equal(s.bias, conv.bias[5:8])
    lin = nn.Linear(6, 11)
    x = torch.randn(4, 6)
    torch.testing.assert_close(reference_tensor_split(lin, x, proportions=[3, 1]), lin(x),
                               atol=ATOL, rtol=0)


def test_unsupported_layer():
    with pytest.raises(ValueError, match="cannot split BatchNorm2d"):
        reference_tensor_split(nn.BatchNorm2d(4), torch.randn(1, 4, 2, 2), proportions=[1, 1])


# ------------------------------------------------------------------------ plans and models

def _plan(shards=(), predictions=()):
    return Plan(model="deit_tiny_patch16_224", strategy="horizontal", devices=["a", "b"],
                stages=[StagePlan(0, 0, "a", ["blocks.0"])], shards=list(shards),
                predictions=list(predictions))


def test_proportions_from_plan():
    plan = _plan([Shard("blocks.0", 0, "channels", 0, 2), Shard("blocks.0", 1, "channels", 2, 3),
                  Shard("blocks.1", 0, "channels", 0, 6), Shard("blocks.1", 1, "channels", 6, 12),
                  Shard("blocks.0", 0, "rows", 0, 100)])
    assert proportions_from_plan(plan, unit="blocks.0") == pytest.approx([2 / 3, 1 / 3])
    assert proportions_from_plan(plan) == pytest.approx([(2 / 3 + 0.5) / 2, (1 / 3 + 0.5) / 2])
    # round trip through JSON keeps the proportions
    assert proportions_from_plan(Plan.from_dict(plan.to_dict())) == proportions_from_plan(plan)
    with pytest.raises(ValueError, match="blocks.7"):
        proportions_from_plan(plan, unit="blocks.7")
    devs = [DeviceProfile(name="a", kind="cpu", gflops=30.0),
            DeviceProfile(name="b", kind="cpu", gflops=10.0)]
    assert proportions_from_plan(_plan(), devices=devs) == pytest.approx([0.75, 0.25])
    preds = [DevicePrediction("b", 1, flops=100), DevicePrediction("a", 0, flops=300)]
    assert proportions_from_plan(_plan(predictions=preds)) == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError, match="no 'channels' shards"):
        proportions_from_plan(_plan())


def test_apply_tensor_split_errors_leave_model_intact():
    model = lapdtr.create_model("deit_tiny_patch16_224", depth=2, img_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="3 units cannot be split over 4 ranks"):
        apply_tensor_split(model, proportions=[1, 1, 1, 1], rank=0, world_size=4)
    with pytest.raises(ValueError, match="world_size is 3"):
        apply_tensor_split(model, proportions=[1, 1], rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank 2"):
        apply_tensor_split(model, proportions=[1, 1], rank=2, world_size=2)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_apply_tensor_split_unsupported_family():
    model = lapdtr.create_model("efficientvit_m0")
    with pytest.raises(ValueError, match="does not support the 'efficientvit_m' family"):
        apply_tensor_split(model, proportions=[1, 1], rank=0, world_size=2)


def test_apply_tensor_split_replaces_layers_single_rank():
    """world_size 1 needs no group: every layer wrapped, holding all of its units."""
    ref = _randomize(lapdtr.create_model("resnet18"), size=32)
    model = copy.deepcopy(ref)
    apply_tensor_split(model, proportions=[1.0], rank=0, world_size=1)
    shards = list_tensor_shards(model)
    assert {s.unit for s in shards} >= {"conv1", "layer1.0.conv1", "layer4.1.conv2",
                                         "layer2.0.downsample.0", "fc"}
    assert all(s.start == 0 and s.rank == 0 for s in shards)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        assert_close_scaled(model(x), want)
    assert_sees_every_unit(ref, x, want)
    assert get_tensor_comm_stats(model) == {"bytes_sent": 0, "num_collectives": 0}


# ------------------------------------------------------------------------ real gloo ranks

def _randomize(model: nn.Module, size: int = 64, seed: int = 0) -> nn.Module:
    """Weights where no unit is invisible: timm zero-initializes biases, BN statistics and the
    last BN scale of each residual branch (a scrambled ``conv2`` would leave ResNet's output
    unchanged); redraw them all so a bias added twice, never, or to the wrong channels shows."""
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return informative_weights_(model, seed=seed, probe=probe)


def _init(rank: int, world_size: int, port: int):
    init_gloo(rank, world_size, port)


def _tensor_worker(rank, world_size, port, props):
    _init(rank, world_size, port)
    try:
        # ViT: outputs, input gradients and sharded weight gradients equal the unsharded model's
        torch.manual_seed(0)
        ref = _randomize(lapdtr.create_model("deit_tiny_patch16_224", depth=2, img_size=64))
        model = copy.deepcopy(ref)
        x = torch.randn(2, 3, 64, 64)
        if rank == 0:  # the comparisons below would see any one unit skipped or perturbed
            assert_sees_every_unit(ref, x)
        xr = x.clone().requires_grad_(True)
        ref(xr).square().sum().backward()
        apply_tensor_split(model, proportions=props, rank=rank, world_size=world_size)
        assert isinstance(model.blocks[1].attn, ShardedAttention)
        xs = x.clone().requires_grad_(True)
        out = model(xs)
        assert_close_scaled(out, ref(x))
        out.square().sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad, atol=1e-4, rtol=1e-4)
        sa, ra = model.blocks[0].attn, ref.blocks[0].attn
        rows = ra.qkv.weight.grad.view(3, ra.num_heads, ra.head_dim, -1)[:, sa.start:sa.stop]
        torch.testing.assert_close(sa.qkv.weight.grad, rows.reshape(-1, rows.shape[-1]),
                                   atol=1e-4, rtol=1e-4)
        sm, rm = model.blocks[1].mlp, ref.blocks[1].mlp
        torch.testing.assert_close(sm.fc2.weight.grad, rm.fc2.weight.grad[:, sm.start:sm.stop],
                                   atol=1e-4, rtol=1e-4)
        # run_tensor with the input on rank 0 only (broadcast with a shape header)
        y = run_tensor(model, x if rank == 0 else None, proportions=props, rank=rank,
                       world_size=world_size, src=0)
        assert_close_scaled(y, ref(x).detach())
        heads = [s for s in list_tensor_shards(model) if s.unit == "blocks.0.attn"]
        assert heads[0].stop - heads[0].start == split_counts(3, props)[rank]
        stats = get_tensor_comm_stats(model)
        assert stats["num_collectives"] == 2 * 2 * 2 and stats["bytes_sent"] > 0

        # ResNet18: every conv and the classifier split by output channels, gathered
        torch.manual_seed(1)
        cnn = _randomize(lapdtr.create_model("resnet18", num_classes=37), seed=1)
        xc = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            want = cnn(xc)
        if rank == 0:
            assert_sees_every_unit(cnn, xc, want)
        got = run_tensor(cnn, xc, proportions=props, rank=rank, world_size=world_size)
        assert isinstance(cnn.layer3[0].conv2, ShardedConv2d)
        assert cnn.layer3[0].conv2.weight.shape[0] == split_counts(256, props)[rank]
        assert_close_scaled(got, want)
        # MobileNetV3 (depthwise convs split by groups, SE convs, linear head)
        torch.manual_seed(2)
        mnv = _randomize(lapdtr.create_model("mobilenetv3_small_050"), seed=2)
        with torch.no_grad():
            want = mnv(xc)
        if rank == 0:
            assert_sees_every_unit(mnv, xc, want)
        got = run_tensor(mnv, xc, proportions=props, rank=rank, world_size=world_size)
        assert_close_scaled(got, want)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("props", [[0.7, 0.3], [0.5, 0.3, 0.2]])
def test_tensor_mode_across_ranks(props):
    spawn(_tensor_worker, len(props), props)
