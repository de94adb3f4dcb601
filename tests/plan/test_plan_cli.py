"""``lapdtr plan`` / ``lapdtr compare`` run standalone through ``lapdtr.plan.cli.main``."""
from __future__ import annotations

import json

import pytest

from lapdtr.plan import Plan
from lapdtr.plan.cli import main

DEVICES = """\
description: two TX2-like boards and a Raspberry-Pi-like board
devices:
  - {name: tx2-a, kind: jetson, gflops: 665.6, memory: 8GiB, power_active_w: 15.0,
     energy_per_byte_j: 4.0e-9}
  - {name: tx2-b, kind: jetson, gflops: 665.6, memory: 8GiB, power_active_w: 15.0,
     energy_per_byte_j: 4.0e-9}
  - {name: rpi, kind: cpu, gflops: 13.5, memory: 4GiB, power_active_w: 6.4,
     energy_per_byte_j: 2.0e-8}
default_link: {bandwidth: 1Gbps, latency_ms: 0.2}
"""


@pytest.fixture()
def devices_file(tmp_path):
    p = tmp_path / "devices.yaml"
    p.write_text(DEVICES)
    return p


@pytest.fixture(scope="module")
def cache_dir():
    import os

    return os.path.join(os.environ["LAPDTR_CACHE"], "profiles")  # set by tests/conftest.py


def _args(devices_file, cache_dir, *extra):
    return ["--model", "resnet18", "--img-size", "64", "--devices", str(devices_file),
            "--cache-dir", str(cache_dir), *extra]


@pytest.mark.parametrize("strategy", ["lapdtr", "horizontal", "data"])
def test_plan_command_prints_and_writes(strategy, devices_file, cache_dir, tmp_path, capsys):
    out = tmp_path / f"out-{strategy}"
    rc = main(["plan", *_args(devices_file, cache_dir, "--strategy", strategy, "--out", str(out))])
    assert rc == 0
    text = capsys.readouterr().out
    assert "energy J" in text and "tx2-a" in text and "memory" in text and "sent" in text
    plan = Plan.load(out / "plan.json")
    assert plan.strategy == strategy and plan.model == "resnet18" and plan.img_size == 64
    assert (out / "plan.png").stat().st_size > 1000
    if strategy != "lapdtr":
        assert plan.shards


def test_compare_command_writes_the_chart(devices_file, cache_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", *_args(devices_file, cache_dir, "--max-devices", "4", "--strategies",
                                 "data,horizontal,sequential,vertical", "--out", str(out))])
    assert rc == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["num_devices"] == [1, 2, 3, 4] and res["energy_label"] == "modelled"
    assert res["devices"][3] == "tx2-a-copy1"  # the file's devices repeat beyond its length
    for s in ("data", "horizontal", "sequential", "vertical"):
        assert res["normalized"][s][0] == pytest.approx(1.0)
    for v, q in zip(res["normalized"]["vertical"], res["normalized"]["sequential"]):
        assert v <= q * (1 + 1e-9)
    assert (out / "compare.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "max per-device energy / one device" in printed and "modelled" in printed


def test_cli_errors_name_the_problem(devices_file, cache_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["plan", *_args(devices_file, cache_dir, "--strategy", "nope")])
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEVICES.replace("power_active_w: 6.4", "power_active_w: 6.4, colour: red"))
    assert main(["plan", *_args(bad, cache_dir)]) == 2
    assert "colour" in capsys.readouterr().err
    neg = tmp_path / "neg.yaml"
    neg.write_text(DEVICES.replace("memory: 4GiB", "memory: -4"))
    assert main(["plan", *_args(neg, cache_dir)]) == 2
    assert "memory" in capsys.readouterr().err
    assert main(["plan", *_args(devices_file, cache_dir, "--strategy", "vertical",
                               "--objective", "latency")]) == 2
    assert "objective 'latency'" in capsys.readouterr().err


def test_format_plan_states_a_certified_gap():
    from lapdtr.plan import create_plan
    from lapdtr.plan.cli import format_plan

    from plan_instances import make_devices, make_model

    mp = make_model(30, 21)
    devices = make_devices(8, 21, spread=0.005, mem_scale=2.0)
    exact = create_plan(mp, devices, strategy="lapdtr", objective="max-device-energy")
    assert exact.meta["exact"] and "not proven" not in format_plan(exact)
    stopped = create_plan(mp, devices, strategy="lapdtr", objective="max-device-energy",
                          max_expansions=3)
    assert not stopped.meta["exact"]
    assert f"at most {stopped.meta['gap']:.3%} above the optimum" in format_plan(stopped)


def test_plan_command_at_widths(devices_file, cache_dir, tmp_path, capsys):
    base = ["--model", "deit_tiny_patch16_224", "--img-size", "64", "--devices",
            str(devices_file), "--cache-dir", str(cache_dir)]
    out = tmp_path / "w"
    assert main(["plan", *base, "--width", "0.4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    plan = Plan.load(out / "plan.json")
    assert [s.width for s in plan.stages] == [pytest.approx(1 / 3)] * len(plan.stages)
    assert "width 0.3333 on every stage" in text  # 0.4 of 3 heads rounds to 1
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"accuracy": {"1.0": 0.9, "0.666667": 0.89, "0.333333": 0.5}}))
    assert main(["plan", *base, "--width", "auto", "--accuracy", str(acc), "--out",
                 str(out)]) == 0
    sel = Plan.load(out / "plan.json").meta["width_selection"]
    assert sel["accuracy_source"] == "given" and len(sel["candidates"]) == 3
    assert "chosen by Algorithm 1" in capsys.readouterr().out
    for extra, msg in ((["--width", "1.5"], r"not a width ratio"),
                       (["--width", "half"], "allowed: 'auto' or a ratio"),
                       (["--width", "0.5", "--accuracy", str(acc)], "--accuracy is for --width"),
                       (["--width", "auto", "--accuracy", str(tmp_path / "no.json")],
                        "no such file")):
        assert main(["plan", *base, *extra]) == 2
        assert msg in capsys.readouterr().err
    assert main(["plan", *_args(devices_file, cache_dir, "--width", "0.5")]) == 2
    assert "'resnet18' (resnet) has no elastic layers; allowed: 1.0" in capsys.readouterr().err
