import json

import pytest
import torch

from lapdtr.plan.types import Plan
from lapdtr.runtime import (BoundaryCache, RankReport, ReplanEvent, RunReport, build_plan_from_cuts,
                            check_plan, format_report, plot_timeline)
from lapdtr.runtime.prepare import default_devices, request_input
from lapdtr.runtime.config import RunConfig


def test_cache_keeps_latest_boundary_per_item_within_budget(tmp_path):
    c = BoundaryCache(budget_bytes=3 * 400)
    for k in range(3):
        c.put(k, 1, torch.full((100,), float(k)))
    c.put(1, 2, torch.full((100,), 10.0))  # a later boundary of item 1 replaces the earlier one
    assert c.inventory() == {0: 1, 1: 2, 2: 1}
    assert c.bytes == 1200
    c.put(3, 1, torch.zeros(100))  # over budget: the oldest is dropped
    assert 0 not in c.inventory() and c.dropped == 1
    assert c.evict_below(3) == [1, 2] and c.inventory() == {3: 1}

    s = BoundaryCache(budget_bytes=400, spill_dir=str(tmp_path), tag="r1")
    s.put(0, 4, torch.arange(100.0))
    s.put(1, 5, torch.ones(100))
    assert s.spilled == 1 and s.inventory() == {0: 4, 1: 5}
    u, x = s.get(0)
    assert u == 4 and torch.equal(x, torch.arange(100.0))
    s.evict_below(2)
    assert not list(tmp_path.iterdir())


def test_plan_checks_name_the_problem():
    names = ["embed", "blocks.0", "blocks.1", "head"]
    devs = default_devices(3)
    plan = build_plan_from_cuts("m", names, ["blocks.0", 3], devs, img_size=224, batch_size=1)
    assert [(s.rank, s.units) for s in plan.stages] == [(0, ["embed"]), (1, ["blocks.0", "blocks.1"]),
                                                        (2, ["head"])]
    check_plan(plan, names, 3)
    with pytest.raises(ValueError, match=r"needs ranks \[0, 1, 2\] but only 2 rank\(s\) were "
                                         r"launched.*rank\(s\) \[2\] do not exist"):
        check_plan(plan, names, 2, "plan p.json")
    bad = Plan.from_dict(plan.to_dict())
    bad.stages[1].units = ["blocks.1", "blocks.0"]
    with pytest.raises(ValueError, match="do not list the units of 'm' once each, in order"):
        check_plan(bad, names, 3)
    wide = Plan.from_dict(plan.to_dict())
    wide.stages[0].width = 0.5
    with pytest.raises(ValueError, match=r"stage 0 asks width=0.5"):
        check_plan(wide, names, 3)


def test_request_inputs_are_deterministic():
    cfg = RunConfig(batch_size=2)
    a, b = request_input(cfg.seed, 5, cfg.batch_size, 32), request_input(cfg.seed, 5, cfg.batch_size, 32)
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32)
    assert not torch.equal(a, request_input(cfg.seed, 6, cfg.batch_size, 32))


def _report():
    ranks = [RankReport(rank=0, device="a", units=["embed", "blocks.0"], items=4, compute_s=0.5,
                        energy_j=2.0, remaining_j=8.0, energy_label="modelled",
                        timeline=[[0, 0, 2, 0.0, 0.1], [1, 0, 2, 0.1, 0.2]]),
             RankReport(rank=1, device="b", status="left", units=["head"], items=2,
                        timeline=[[0, 2, 3, 0.1, 0.15]])]
    return RunReport(model="m", mode="pipeline", world_size=2, requests=2, batch_size=1,
                     micro_batches=1, wall_s=1.0, throughput_rps=2.0, latency_p50_s=0.1,
                     latency_p95_s=0.2, latency_mean_s=0.12, bytes_sent=10, bytes_received=10,
                     energy_j=2.0, energy_label="modelled", compute_s=0.5, comm_s=0.1,
                     completed=2, duplicates=0, lost=0, ranks=ranks,
                     replans=[ReplanEvent(1, "low_energy", ["b"], [1], 0.5, moves=[{"unit": "head"}],
                                          resumed={"2": 1})])


def test_report_round_trip_table_and_timeline(tmp_path):
    r = _report()
    r.save(tmp_path / "report.json")
    again = RunReport.load(tmp_path / "report.json")
    assert again == r
    assert json.loads((tmp_path / "report.json").read_text())["replans"][0]["kind"] == "low_energy"
    text = format_report(r)
    assert "re-plan gen 1" in text and "low_energy on b" in text and "modelled" in text
    png = plot_timeline(r, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
