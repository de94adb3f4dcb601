"""Ensemble mode: aggregators, and the gloo run equal to the single-process definition."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lapdtr
from lapdtr.profile.types import DeviceProfile
from lapdtr.runtime import ensemble as ens
from lapdtr.runtime.ensemble import (aggregate, ensemble_reference, get_aggregator,
                                     list_aggregators, register_aggregator, run_ensemble,
                                     weights_from_devices)

from lapdtr.testing import assert_close_scaled, informative_weights_, scaled_atol

from runtime_helpers import init_gloo, spawn

NUM_CLASSES = 7


def test_builtin_aggregators_registered():
    assert {"mean", "vote", "weighted"} <= set(list_aggregators())


def test_mean_and_weighted():
    a, b = torch.tensor([[1.0, 4.0]]), torch.tensor([[3.0, 0.0]])
    torch.testing.assert_close(aggregate([a, b], aggregator="mean"), torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(aggregate([a, b], aggregator="weighted", weights=[3, 1]),
                               torch.tensor([[1.5, 3.0]]))
    # equal weights are the mean
    torch.testing.assert_close(aggregate([a, b], aggregator="weighted", weights=[2, 2]),
                               aggregate([a, b], aggregator="mean"))


def test_vote_majority_and_tie_break():
    # three members, two rows: row 0 votes 1,1,0 -> class 1 although member 2's logit for 0 is
    # huge; row 1 votes 0,2,1 (a three-way tie) -> class with the largest summed logit among them
    m0 = torch.tensor([[0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    m1 = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    m2 = torch.tensor([[99.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    out = aggregate([m0, m1, m2], aggregator="vote")
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    # the mean of logits would pick class 0 in row 0: vote is not mean in disguise
    assert aggregate([m0, m1, m2], aggregator="mean")[0].argmax() == 0
    # two-way tie between classes 1 and 2; class 0 has the largest summed logits but no vote
    t0, t1 = torch.tensor([[0.0, 2.0, 1.9]]), torch.tensor([[2.5, 0.0, 3.0]])
    assert aggregate([t0, t1], aggregator="vote").argmax(-1).item() == 2
    # weighted votes: member 2 outweighs members 0 and 1 together
    out = aggregate([m0, m1, m2], aggregator="vote", weights=[1, 1, 3])
    assert out[0].argmax().item() == 0


def test_aggregator_errors():
    x = [torch.zeros(1, 3), torch.zeros(1, 3)]
    with pytest.raises(ValueError, match="unknown aggregator 'median'; allowed: mean, vote"):
        aggregate(x, aggregator="median")
    with pytest.raises(ValueError, match="needs weights"):
        aggregate(x, aggregator="weighted")
    with pytest.raises(ValueError, match="takes no weights"):
        aggregate(x, aggregator="mean", weights=[1, 1])
    with pytest.raises(ValueError, match="3 weights"):
        aggregate(x, aggregator="weighted", weights=[1, 1, 1])
    with pytest.raises(ValueError, match="finite, >= 0 and not all 0"):
        aggregate(x, aggregator="weighted", weights=[-1, 2])
    with pytest.raises(ValueError, match="differ in shape"):
        aggregate([torch.zeros(1, 3), torch.zeros(1, 4)], aggregator="mean")
    with pytest.raises(ValueError, match="unknown aggregator"):
        ensemble_reference([nn.Identity()], torch.zeros(1, 3), "nope")


def test_register_aggregator(monkeypatch):
    monkeypatch.setattr(ens, "_AGGREGATORS", dict(ens._AGGREGATORS))

    @register_aggregator("max")
    def _max(outputs, weights=None):
        return torch.stack(outputs).amax(0)

    assert get_aggregator("max") is _max and "max" in list_aggregators()
    out = ensemble_reference([nn.Identity(), nn.Sequential()], torch.tensor([[1.0, -2.0]]), "max")
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="registered twice"):
        register_aggregator("max")(_max)


def test_weights_from_devices():
    devs = [DeviceProfile(name="a", kind="cpu", gflops=20.0),
            DeviceProfile(name="b", kind="gpu", gflops=60.0)]
    assert weights_from_devices(devs) == [20.0, 60.0]
    with pytest.raises(ValueError, match="gflops"):
        weights_from_devices([DeviceProfile(name="a", kind="cpu", gflops=0.0)])


# ------------------------------------------------------------------------ real gloo ranks

def _members(world_size: int) -> list[nn.Module]:
    """Different sub-models, one per rank: two small DeiTs of different depth and a ResNet, on
    weights where every unit shows (timm zero-initializes the DeiT head and ResNet's last BN
    scales, so members would hardly disagree)."""
    out = []
    for r in range(world_size):
        torch.manual_seed(100 + r)
        if r % 3 == 2:
            m = lapdtr.create_model("resnet18", num_classes=NUM_CLASSES)
        else:
            m = lapdtr.create_model("deit_tiny_patch16_224", depth=1 + r, img_size=32,
                                    num_classes=NUM_CLASSES)
        probe = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(r))
        out.append(informative_weights_(m, seed=100 + r, probe=probe))
    return out




def _ensemble_worker(rank, world_size, port):
    init_gloo(rank, world_size, port)
    try:
        models = _members(world_size)
        torch.manual_seed(0)
        x = torch.randn(16, 3, 32, 32)
        weights = [1.0 + r for r in range(world_size)]
        preds = torch.stack([m(x).argmax(-1) for m in models])
        assert (preds != preds[0]).any(), "members never disagree: the vote test would be vacuous"
        # the comparisons would see a member left out (every rank's output counts)
        full = ensemble_reference(models, x, "mean")
        for r in range(world_size):
            rest = ensemble_reference(models[:r] + models[r + 1:], x, "mean")
            assert (rest - full).abs().max() > 100 * scaled_atol(full), r
        for agg, w in (("mean", None), ("vote", None), ("vote", weights), ("weighted", weights)):
            want = ensemble_reference(models, x, agg, weights=w)
            got = run_ensemble(models, x, aggregator=agg, rank=rank, world_size=world_size,
                               weights=w)
            assert_close_scaled(got, want)
            # this rank's model only, input broadcast from rank 0, result on the last rank only
            last = world_size - 1
            got = run_ensemble(models[rank], x if rank == 0 else None, aggregator=agg,
                               rank=rank, world_size=world_size, weights=w, src=0, dst=last)
            if rank == last:
                assert_close_scaled(got, want)
            else:
                assert got is None
        # members whose outputs disagree in shape fail on every rank alike, without hanging
        odd = nn.Sequential(models[rank], nn.Linear(NUM_CLASSES, 3)) if rank == 1 else models[rank]
        with pytest.raises(ValueError, match="one shape and dtype; got rank 0"):
            run_ensemble(odd, x, aggregator="mean", rank=rank, world_size=world_size)
        with pytest.raises(ValueError, match="models for"):
            run_ensemble(models[:1], x, aggregator="mean", rank=rank, world_size=world_size)
        with pytest.raises(ValueError, match="allowed: mean, vote"):
            run_ensemble(models, x, aggregator="median", rank=rank, world_size=world_size)
        # the group still works after the errors
        got = run_ensemble(models, x, aggregator="mean", rank=rank, world_size=world_size)
        assert_close_scaled(got, ensemble_reference(models, x, "mean"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_ensemble_across_ranks(world_size):
    spawn(_ensemble_worker, world_size)
