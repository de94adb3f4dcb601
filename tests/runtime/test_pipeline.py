"""Multi-rank runs on local gloo ranks: equivalence, killed and drained ranks, rendezvous errors.

Outputs are compared on informative weights (no unit invisible; the comparison is shown to
reject any one unit skipped or perturbed). Recovery tests check where each in-flight item
resumed (the furthest boundary a survivor had cached) and, from every rank's log of its stage
runs (``count_unit_runs``), that no unit ran more often than that resume needs."""
import time

import pytest
import yaml

from lapdtr.runtime import FaultSpec, RendezvousError, RunConfig, run

from runtime_helpers import (assert_outputs_match, assert_replans_keep_survivors_busy,
                             assert_resumed_from_furthest, count_unit_runs, informative_checkpoint,
                             load_unit_runs, never_join, stub_planner_and_count)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


@pytest.mark.parametrize("name, kw, img, world, cuts, batch, mbs", [
    ("deit_tiny_patch16_224", {"depth": 4}, None, 2, [3], 2, 2),
    ("efficientvit_m0", {}, 128, 3, ["stages.1.downsample", "stages.2.downsample"], 1, 1),
    ("resnet18", {}, 64, 4, [2, 4, 7], 3, 3),
])
def test_pipeline_equals_single_process(tmp_path, name, kw, img, world, cuts, batch, mbs):
    ckpt = informative_checkpoint(tmp_path / "ckpt.safetensors", name, kw, img)
    cfg = RunConfig(model=name, model_kwargs=kw, img_size=img, world_size=world, cuts=cuts,
                    requests=4, batch_size=batch, micro_batches=mbs, out=str(tmp_path),
                    save_outputs=True, checkpoint=ckpt)
    r = run(cfg, timeout_s=200, init_fn=count_unit_runs)
    assert r.completed == 4 and r.duplicates == 0 and not r.replans
    assert [k.items for k in r.ranks] == [4 * mbs] * world
    assert all(k.bytes_sent > 0 for k in r.ranks)
    assert_resumed_from_furthest(r, load_unit_runs(tmp_path, r))  # every unit once per item
    assert_outputs_match(cfg, tmp_path)
    assert (tmp_path / "report.json").exists() and (tmp_path / "timeline.png").exists()


@pytest.fixture(scope="module")
def deit_ckpt(tmp_path_factory):
    return informative_checkpoint(tmp_path_factory.mktemp("ckpt") / "deit4.safetensors",
                                  "deit_tiny_patch16_224", {"depth": 4})


def _deit(tmp_path, ckpt=None, **kw):
    base = dict(model="deit_tiny_patch16_224", model_kwargs={"depth": 4}, requests=8,
                out=str(tmp_path), save_outputs=True, heartbeat_timeout_s=1.0,
                heartbeat_interval_s=0.05, checkpoint=ckpt)
    base.update(kw)
    return RunConfig(**base)


def _devices(tmp_path, meter: str) -> str:
    """Three equal devices of 8 MB each: deit_tiny at depth 4 (8.6 MB of weights, 1.8 MB peak
    activation) needs two of them, so a re-plan that loses one must use both survivors."""
    devices = {"devices": [
        {"name": f"dev{i}", "kind": "simulated", "gflops": 10.0, "memory": "8MB",
         "power_active_w": 5.0, "power_idle_w": 1.0, "energy_budget_j": 1000,
         "energy_min_j": 100, "meter": meter} for i in range(3)],
        "default_link": {"bandwidth": "100Mbps", "latency_ms": 2}}
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(devices))
    return str(path)


def test_sigkill_middle_rank_mid_stream(tmp_path, deit_ckpt):
    cfg = _deit(tmp_path, deit_ckpt, world_size=3, cuts=[2, 4], devices=_devices(tmp_path, "null"),
                faults=[FaultSpec("kill", 1, 4)])
    r = run(cfg, timeout_s=200, init_fn=count_unit_runs)  # the planner's own redistribute
    assert r.completed == 8 and r.lost == 0 and r.duplicates == 0
    assert [(e.kind, e.ranks) for e in r.replans] == [("failure", [1])]
    assert r.replans[0].detect_s < 3.0
    assert r.ranks[1].status == "failed"
    assert_replans_keep_survivors_busy(r, tmp_path)
    assert_resumed_from_furthest(r, load_unit_runs(tmp_path, r))
    # rank 1 (units 2, 3) died on item 4: every item in flight then resumes from its furthest
    # boundary: 4, those issued after it, and those whose sends rank 1 had not got out, from
    # boundary 2 (rank 0 holds it); an item before 4 that rank 2 had finished but whose output
    # the coordinator had not yet taken (it is dropped as stale at the re-plan), from the
    # output itself (boundary 6, rank 2 holds it)
    points = r.replans[0].resume_points
    assert points.get("4") == [2, 2], points
    assert all(v == [2, 2] or (v == [6, 6] and int(k) < 4) for k, v in points.items()), points
    assert_outputs_match(cfg, tmp_path)


def test_kill_at_first_and_at_last_request(tmp_path, deit_ckpt):
    cfg = _deit(tmp_path, deit_ckpt, world_size=4, cuts=[2, 3, 5], micro_batches=2,
                batch_size=2, faults=[FaultSpec("kill", 1, 0), FaultSpec("kill", 3, 7)])
    r = run(cfg, timeout_s=200, init_fn=stub_planner_and_count)
    assert r.completed == 8 and r.duplicates == 0
    assert [(e.kind, e.ranks) for e in r.replans] == [("failure", [1]), ("failure", [3])]
    assert [k.status for k in r.ranks] == ["ok", "failed", "ok", "failed"]
    assert_resumed_from_furthest(r, load_unit_runs(tmp_path, r))
    # rank 1 (unit 2) died on item 0, which rank 0 had run to unit 2; rank 3 (unit 5) died on
    # item 14 (request 7), which rank 2 had run to unit 5
    assert r.replans[0].resume_points["0"] == [2, 2]
    assert r.replans[1].resume_points["14"] == [5, 5]
    assert_outputs_match(cfg, tmp_path)


def test_drained_battery_triggers_redistribution(tmp_path, deit_ckpt):
    cfg = _deit(tmp_path, deit_ckpt, world_size=3, cuts=[2, 4],
                devices=_devices(tmp_path, "simulated"), faults=[FaultSpec("drain", 2, 3)])
    r = run(cfg, timeout_s=200, init_fn=count_unit_runs)  # the planner's own redistribute
    assert r.completed == 8 and r.duplicates == 0
    assert [(e.kind, e.devices) for e in r.replans] == [("low_energy", ["dev2"])]
    assert r.ranks[2].status == "left" and r.ranks[2].remaining_j < 100
    assert r.energy_label == "modelled" and all(k.energy_j > 0 for k in r.ranks)
    assert_replans_keep_survivors_busy(r, tmp_path)
    assert_resumed_from_furthest(r, load_unit_runs(tmp_path, r))
    # rank 2 (units 4, 5) refused item 3 on; rank 1 had run it to unit 4
    assert r.replans[0].resume_points["3"] == [4, 4]
    assert_outputs_match(cfg, tmp_path)


def test_rank_that_never_joins_is_named(tmp_path):
    cfg = _deit(tmp_path, world_size=3, join_timeout_s=3.0)
    t0 = time.time()
    with pytest.raises(RendezvousError, match=r"rank\(s\) \[2\] did not join within 3.0 s"):
        run(cfg, timeout_s=120, init_fn=never_join)
    assert time.time() - t0 < 60


@pytest.mark.parametrize("bad", ["plan", "checkpoint"])
def test_bad_plan_or_checkpoint_fails_naming_it(tmp_path, bad):
    from lapdtr.plan.types import Plan, StagePlan
    from lapdtr.runtime import write_checkpoint

    kw = {}
    if bad == "plan":
        names = ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
        plan = Plan(model="deit_tiny_patch16_224", strategy="hand", devices=["a", "b", "c"],
                    stages=[StagePlan(i, i, "abc"[i], names[2 * i:2 * i + 2]) for i in range(3)])
        plan.save(tmp_path / "plan.json")
        kw["plan"] = str(tmp_path / "plan.json")
        match = r"plan .*plan.json: needs ranks \[0, 1, 2\] but only 2 rank\(s\) were launched"
    else:
        kw["checkpoint"] = str(write_checkpoint(tmp_path / "other.safetensors",
                                                "deit_tiny_patch16_224", model_kwargs={"depth": 2}))
        match = r"checkpoint .*other.safetensors' does not match model 'deit_tiny_patch16_224'"
    cfg = _deit(tmp_path, world_size=2, **kw)
    with pytest.raises(ValueError, match=match):
        run(cfg, timeout_s=120)


def test_torchrun_entry_point(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "deit_tiny_patch16_224", "model_kwargs": {"depth": 2},
                                   "world_size": 2, "cuts": [2], "requests": 3,
                                   "out": str(tmp_path / "out"), "plots": False}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(root / "infer" / "run.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=200, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3/3 requests" in proc.stdout
    from lapdtr.runtime import RunReport

    r = RunReport.load(tmp_path / "out" / "report.json")
    assert r.completed == 3 and r.world_size == 2


def test_sigkill_at_an_arbitrary_moment(tmp_path, deit_ckpt):
    from runtime_helpers import kill_rank1_soon_after_it_starts

    cfg = _deit(tmp_path, deit_ckpt, world_size=3, cuts=[2, 4], requests=12, batch_size=2,
                micro_batches=2)
    r = run(cfg, timeout_s=200, init_fn=kill_rank1_soon_after_it_starts)
    assert r.completed == 12 and r.duplicates == 0
    assert [(e.kind, e.ranks) for e in r.replans] == [("failure", [1])]
    figures = assert_resumed_from_furthest(r, load_unit_runs(tmp_path, r))
    assert any(u > 0 for u in figures[1]), figures  # rank 0 had run some in-flight item to 2
    assert_outputs_match(cfg, tmp_path)


def test_a_rank_woken_after_it_was_declared_dead_exits_cleanly(tmp_path, deit_ckpt, capfd):
    """Rank 1 is SIGSTOPped mid-stream and SIGCONTed 4 s later, past the heartbeat timeout: the
    others re-plan around it and answer everything; it wakes, sees it was declared dead and
    leaves; no process aborts in its exit (gloo's receive from the stopped rank cannot be
    cancelled), and the outputs equal the single-process model's."""
    from runtime_helpers import stop_rank1_then_wake

    cfg = _deit(tmp_path, deit_ckpt, world_size=3, cuts=[2, 4], requests=40,
                heartbeat_timeout_s=1.0)
    r = run(cfg, timeout_s=200, init_fn=stop_rank1_then_wake)
    assert r.completed == 40 and r.duplicates == 0 and r.lost == 0
    assert [(e.kind, e.ranks) for e in r.replans] == [("failure", [1])]
    assert [k.status for k in r.ranks] == ["ok", "failed", "ok"]
    assert_outputs_match(cfg, tmp_path)
    import time

    deadline = time.time() + 15  # rank 1 wakes 4 s after it stopped; run() waits for it
    err = ""
    while time.time() < deadline and "declared dead" not in err:
        time.sleep(0.5)
        err += capfd.readouterr().err
    assert "rank 1 was declared dead by the coordinator" in err, err[-2000:]
    assert "terminate called" not in err, err[-2000:]


def test_packets_of_several_tensors_cross_ranks_and_resume(tmp_path, deit_ckpt):
    """A codec whose boundaries are three tensors: every message carries a packet (decode
    checks all three came), rank 1 is killed at item 4 and the items resume from cached
    packets; the outputs equal the single-process model's."""
    from runtime_helpers import split_codec_everywhere

    cfg = _deit(tmp_path, deit_ckpt, world_size=3, cuts=[2, 4], faults=[FaultSpec("kill", 1, 4)])
    r = run(cfg, timeout_s=200, init_fn=split_codec_everywhere)
    assert r.completed == 8 and r.duplicates == 0
    assert [(e.kind, e.ranks) for e in r.replans] == [("failure", [1])]
    assert all(v == [2, 2] for v in r.replans[0].resume_points.values())  # from cached packets
    assert_outputs_match(cfg, tmp_path)
