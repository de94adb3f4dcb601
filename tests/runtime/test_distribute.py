"""lapdtr.distribute from a user's own script (tests/runtime/scripts/dm_script.py, public API
only): under lapdtr launch and torchrun, a rank SIGKILLed by the driver mid-stream, a torchrun
restart resumed from the journal; and the driver's errors for bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lapdtr
from lapdtr.testing import assert_close_scaled

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

SCRIPT = Path(__file__).parent / "scripts" / "dm_script.py"
MODELS = ["deit_tiny_patch16_224", "efficientvit_m0", "edgevit_xxs", "resnet18"]


def _check(out: Path, name: str, n: int = 8):
    d = torch.load(out / f"{name}.pt")
    report = json.loads((out / f"{name}-report.json").read_text())
    assert len(d["got"]) == len(d["want"]) == n
    for i, (g, w) in enumerate(zip(d["got"], d["want"])):
        assert g.shape == w.shape, (name, i)
        assert_close_scaled(g, w, msg=f"{name} output {i}")
    return report


def _launch(args, timeout=400):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def test_distribute_under_lapdtr_launch_every_family(tmp_path):
    r = _launch([sys.executable, "-m", "lapdtr.cli", "launch", "--nproc", "3", str(SCRIPT),
                 str(tmp_path), ",".join(MODELS)])
    assert r.returncode == 0, r.stderr[-3000:]
    for name in MODELS:
        report = _check(tmp_path, name)
        assert report["completed"] == 8 and report["duplicates"] == 0 and not report["replans"]
        assert all(k["units"] for k in report["ranks"]), (name, "a rank got no units")


def test_distribute_survives_a_rank_killed_by_the_driver(tmp_path):
    r = _launch([sys.executable, "-m", "lapdtr.cli", "launch", "--nproc", "3", str(SCRIPT),
                 str(tmp_path), "resnet18", "--kill-rank", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1" in r.stderr and "SIGKILL" in r.stderr
    report = _check(tmp_path, "resnet18")
    assert report["completed"] == 8 and report["duplicates"] == 0
    assert [e["ranks"] for e in report["replans"]] == [[1]]
    assert [k["status"] for k in report["ranks"]] == ["ok", "failed", "ok"]
    # the survivors both keep working after the re-plan
    assert {s["rank"] for s in report["plan"]["stages"]} == {0, 2}


def test_distribute_in_the_users_own_process_group(tmp_path):
    """The script calls init_process_group("gloo") itself; distribute uses that group."""
    r = _launch([sys.executable, "-m", "lapdtr.cli", "launch", "--nproc", "2", str(SCRIPT),
                 str(tmp_path), "resnet18", "--init-group"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = _check(tmp_path, "resnet18")
    assert report["world_size"] == 2 and report["completed"] == 8


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_distribute_under_torchrun(tmp_path):
    r = _launch(["torchrun", "--standalone", "--nproc_per_node", "3", str(SCRIPT), str(tmp_path),
                 "deit_tiny_patch16_224"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = _check(tmp_path, "deit_tiny_patch16_224")
    assert report["world_size"] == 3 and report["completed"] == 8


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_torchrun_restart_resumes_from_the_journal(tmp_path):
    """Rank 1 is SIGKILLed after the third map output of the first attempt; torchrun restarts
    the workers; the second attempt yields the journaled outputs and computes only the rest."""
    r = _launch(["torchrun", "--standalone", "--nproc_per_node", "3", "--max-restarts", "1",
                 str(SCRIPT), str(tmp_path), "resnet18", "--journal"])
    assert r.returncode == 0, r.stderr[-3000:]
    report = _check(tmp_path, "resnet18")
    lines = (tmp_path / "resnet18-journal" / "journal.jsonl").read_text().splitlines()
    assert sorted(json.loads(l)["request"] for l in lines) == list(range(5))  # each once
    # the restarted attempt ran the 3 dm(x) batches and only the 2 map batches not journaled
    assert report["requests"] == 3 + 2 and report["completed"] == 5


# ------------------------------------------------------------------ one process, bad input

def _small():
    torch.manual_seed(0)
    return lapdtr.create_model("resnet18", num_classes=10)


def test_one_process_equals_the_model_and_map_keeps_order():
    """One rank: exactly model(x), for any batch size; micro-batched, allclose (fp32 kernels
    depend on the batch size), and in input order."""
    from lapdtr.testing import informative_weights_

    model = _small().eval()
    xs = [torch.randn(b, 3, 64, 64) for b in (1, 3, 2)]
    informative_weights_(model, seed=1, probe=xs[1])
    with torch.no_grad():
        want = [model(x) for x in xs]
    with lapdtr.distribute(_copy(model), img_size=64) as dm:
        assert dm.is_driver
        assert torch.equal(dm(xs[1]), want[1])
        assert all(torch.equal(y, w) for y, w in zip(dm.map(xs), want))
        assert dm.report().completed == 4
    assert dm.report().completed == 4  # the final report stays after close
    with lapdtr.distribute(_copy(model), img_size=64, micro_batches=2) as dm:
        ys = list(dm.map(xs))
    for y, w in zip(ys, want):
        assert_close_scaled(y, w)
    assert (ys[0] - want[1][:1]).abs().max() > 100 * 1e-5 * want[0].abs().max()  # order seen


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_bad_inputs_name_expected_and_got():
    with lapdtr.distribute(_small(), img_size=64) as dm:
        with pytest.raises(ValueError, match=r"expected shape \(batch, 3, 64, 64\).*got \(2, 3, 32, 32\)"):
            dm(torch.randn(2, 3, 32, 32))
        with pytest.raises(ValueError, match="expected dtype torch.float32, got torch.float64"):
            dm(torch.randn(2, 3, 64, 64, dtype=torch.float64))
        with pytest.raises(TypeError, match="expected a torch.Tensor"):
            dm("an image")
        assert dm(torch.randn(1, 3, 64, 64)).shape == (1, 10)  # nothing hung, still serving
        # in a stream: the batches before the bad one are answered, then it raises
        got = []
        with pytest.raises(ValueError, match=r"dm.map: batch 2: .*got \(1, 3, 32, 32\)"):
            for y in dm.map([torch.randn(2, 3, 64, 64), torch.randn(1, 3, 64, 64),
                             torch.randn(1, 3, 32, 32), torch.randn(1, 3, 64, 64)]):
                got.append(y.shape[0])
        assert got == [2, 1]
        assert dm(torch.randn(3, 3, 64, 64)).shape == (3, 10)
        assert dm.report().completed == 4  # the failed calls submitted nothing
    with pytest.raises(RuntimeError, match="closed"):
        dm(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="for the ranks that are not the driver"):
        dm.serve()


def test_a_plan_for_another_model_is_an_error(tmp_path):
    from lapdtr.plan.types import Plan, StagePlan

    plan = Plan(model="resnet50", strategy="cuts", devices=["rank0"],
                stages=[StagePlan(index=0, rank=0, device="rank0", units=["stem"])],
                img_size=64, batch_size=1, objective="none")
    plan.save(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="is for model 'resnet50'.*runs 'resnet18'"):
        lapdtr.distribute(_small(), img_size=64, plan=str(tmp_path / "plan.json"))
    with pytest.raises(ValueError, match="needs checkpoint="):
        lapdtr.distribute("resnet18")
    with pytest.raises(ValueError, match="micro_batches: expected an integer >= 1, got 0"):
        lapdtr.distribute(_small(), img_size=64, micro_batches=0)
    with pytest.raises(ValueError, match="driver=3 is not a rank of this job"):
        lapdtr.distribute(_small(), img_size=64, driver=3)
    with pytest.raises(ValueError, match="no_such_option"):
        lapdtr.distribute(_small(), img_size=64, no_such_option=1)


def test_journal_yields_recorded_outputs_and_refuses_another_model(tmp_path):
    xs = [torch.randn(2, 3, 64, 64) for _ in range(3)]
    with lapdtr.distribute(_small(), img_size=64) as dm:
        first = list(dm.map(xs, journal=tmp_path / "j"))
        n = dm.report().requests
    with lapdtr.distribute(_small(), img_size=64) as dm:
        again = list(dm.map(xs, journal=tmp_path / "j"))
        assert dm.report().requests == 0  # every output came from the journal
    assert n == 3 and all(torch.equal(a, b) for a, b in zip(first, again))
    torch.manual_seed(0)
    other = lapdtr.create_model("resnet10t", num_classes=10)
    with lapdtr.distribute(other, img_size=64) as dm:
        with pytest.raises(ValueError, match="j"):
            list(dm.map(xs, journal=tmp_path / "j"))
