"""``lapdtr demo`` end to end (the embedded default: 200 requests, one battery drained)."""
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
    assert phone["status"] == "left" and phone["remaining_j"] < 100
    assert report["meta"]["idle_ranks"] == []  # the phone left; it is not an idle rank
    assert "idle:" not in text
    for name in ("timeline.png", "energy.png", "plan.json", "config.json"):
        assert (tmp_path / name).exists()
    # the re-plan: the planner's moves leave both other devices with units (neither holds the
    # model alone), and every in-flight item resumed from the furthest boundary cached for it,
    # no unit run more often than that needs (every rank reported its timeline: a drain)
    r = RunReport.load(tmp_path / "report.json")
    assert_replans_keep_survivors_busy(r, tmp_path)
    figures = assert_resumed_from_furthest(r, unit_runs_from_timelines(r))
    # the phone refused request 100 (item 100) on; its first unit is where that item resumed
    from lapdtr.plan.types import Plan

    plan = Plan.load(tmp_path / "plan.json")
    order = [u for s in sorted(plan.stages, key=lambda s: s.index) for u in s.units]
    phone_first = order.index(plan.stages_of_rank(phone["rank"])[0].units[0])
    assert r.replans[0].resume_points["100"] == [phone_first, phone_first], figures
