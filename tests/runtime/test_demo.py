"""``lapdtr demo`` end to end (the embedded default: 200 requests; the phone's battery, drained
by the power model alone, narrows its width twice and then takes it below E_min)."""
import json

import pytest

from lapdtr.runtime import RunReport
from lapdtr.runtime.cli import main

from runtime_helpers import (assert_replans_keep_survivors_busy, assert_resumed_from_furthest,
                             unit_runs_from_timelines)

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def test_demo_streams_all_requests_through_a_redistribution(tmp_path, capsys):
    # its wall time (target: under 2 minutes) is measured by running `lapdtr demo`, not here
    assert main(["demo", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "200/200 requests" in text and "low_energy on phone" in text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["completed"] == 200 and report["duplicates"] == 0
    assert [e["kind"] for e in report["replans"]] == ["low_energy"]
    assert report["energy_label"] == "modelled"
    phone = [r for r in report["ranks"] if r["device"] == "phone"][0]
    assert phone["status"] == "left" and phone["remaining_j"] < phone["energy_min_j"]
    # nothing injected: the phone's energy used is its whole fall from E_max
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["faults"] == [] and phone["drained_j"] == 0.0
    assert phone["energy_j"] + phone["remaining_j"] == pytest.approx(phone["energy_budget_j"])
    # two width steps, narrowing, each at less energy than the one before, before the re-plan
    steps = phone["widths"]
    replan_s = report["replans"][0]["time_s"]
    assert [w for _, w in steps] == [pytest.approx(2 / 3), pytest.approx(1 / 3)], steps
    assert all(t < replan_s for t, _ in steps)
    trace = phone["energy_trace"]
    left_at = [([e for t, e in trace if t <= ts] or [None])[-1] for ts, _ in steps]
    assert left_at[0] is not None and left_at[0] < phone["energy_budget_j"] * 5 / 6 + 1e-9
    assert left_at[1] < phone["energy_budget_j"] / 2 + 1e-9 and left_at[1] < left_at[0]
    assert "widths on r1 phone: 2/3 at" in text
    assert report["meta"]["idle_ranks"] == []  # the phone left; it is not an idle rank
    assert "idle:" not in text
    for name in ("timeline.png", "energy.png", "plan.json", "config.json"):
        assert (tmp_path / name).exists()
    # the re-plan: the planner's moves leave both other devices with units (neither holds the
    # model alone), and every in-flight item resumed from the furthest boundary cached for it,
    # no unit run more often than that needs (every rank reported its timeline)
    r = RunReport.load(tmp_path / "report.json")
    assert_replans_keep_survivors_busy(r, tmp_path)
    figures = assert_resumed_from_furthest(r, unit_runs_from_timelines(r))
    # the items the phone refused resumed at its first unit, the boundary rank 0 had cached
    from lapdtr.plan.types import Plan

    plan = Plan.load(tmp_path / "plan.json")
    order = [u for s in sorted(plan.stages, key=lambda s: s.index) for u in s.units]
    phone_first = order.index(plan.stages_of_rank(phone["rank"])[0].units[0])
    assert [phone_first, phone_first] in r.replans[0].resume_points.values(), figures
