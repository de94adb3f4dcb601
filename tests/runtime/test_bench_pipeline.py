"""``benchmarks/pipeline.py`` runs end to end on a tiny setting and saves what it prints."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bounds_and_trial_order():
    b = _bench_module()
    assert [b.trial_order(t, "gpipe") for t in range(3)] == [
        ["lapdtr", "gpipe"], ["gpipe", "lapdtr"], ["lapdtr", "gpipe"]]
    # 3 stages of 1, 2, 1 s, 8 micro-batches (2 batches of 4): the stream cannot end before
    # 1 + 2 + 1 + 7 * 2 = 18 s; flushing after each batch, 2 * (4 + 3 - 1) * 2 = 24 s
    e = b.bounds([1.0, 2.0, 1.0], 8, 4, 2, wall=18.0, cores=3)
    assert e["steady_bound_s"] == 18.0 and e["efficiency_steady"] == 1.0
    assert e["flushed_bound_s"] == 24.0 and e["efficiency_flushed"] == pytest.approx(24 / 18)
    assert e["efficiency_steady_cores"] == 1.0  # 8 * 4 / 3 s of work on 3 cores < 18 s
    # one core for the three stages: 8 * 4 = 32 s of work
    assert b.bounds([1.0, 2.0, 1.0], 8, 4, 2, wall=40.0, cores=1)["efficiency_steady_cores"] == 0.8
    s = b.spread([1.0, 3.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["half_range"]) == (2.0, 1.0, 3.0, 1.0)


@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_pipeline_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), "--depth", "2",
                           "--ranks", "2", "--micro-batches", "2", "--batch", "2", "--requests",
                           "2", "--trials", "2", "--latency-trials", "1", "--latency-requests",
                           "2", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=860, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "pipeline.json").read_text())
    (row,), (lat,) = res["throughput"], res["latency"]
    assert (row["p"], row["m"]) == (2, 2) and row["lapdtr_img_s"] > 0 and row["gpipe_img_s"] > 0
    assert row["cpu_vs_gpipe"] > 0 and 0 < row["busy"] <= 1.5 and 0 < row["gpipe_busy"] <= 1.5
    # engine order alternates per trial, and is recorded
    assert row["trial_order"] == [["lapdtr", "gpipe"], ["gpipe", "lapdtr"]]
    assert [t["order"] for t in row["trials"]] == row["trial_order"]
    # stage compute in thread CPU time, the wall-clock figure beside it
    assert row["stage_cpu_clock"] == "thread_time" and len(row["stage_cpu_s"]) == 2
    assert all(0 < c for c in row["stage_cpu_s"]) and all(0 < w for w in row["stage_wall_s"])
    # 2 batches of 2 micro-batches streamed; the steady-state (no flush) bound beside the
    # flushed-bubble one
    assert row["micro_batches_streamed"] == 4
    assert 0 < row["efficiency_steady"] <= 1.2 and row["efficiency_flushed"] > 0
    assert row["efficiency_steady"] <= row["efficiency_steady_cores"] + 1e-9
    assert row["steady_bound_img_s"] > 0 and row["flushed_bound_img_s"] > 0
    for key in ("efficiency_steady", "efficiency_steady_cores", "efficiency_flushed",
                "efficiency_steady_wall", "vs_gpipe", "cpu_vs_gpipe", "busy", "gpipe_busy"):
        s = row["spread"][key]
        assert len(s["trials"]) == 2 and s["min"] <= s["median"] <= s["max"], key
        assert row[key] == s["median"], key
    assert lat["latency_s"] > 0 and lat["bare_latency_s"] > 0 and lat["compute_cpu_s"] > 0
    assert lat["trial_order"] == [["lapdtr", "bare"]]
    assert all(t["dm_p50_s"] > 0 for t in lat["trials"])  # dm(x) from a user's script
    for key in ("vs_bare", "ratio_cpu", "ratio_wall", "overhead_vs_bare_per_boundary_us",
                "dm_vs_run"):
        assert len(lat["spread"][key]["trials"]) == 1 and lat[key] == lat["spread"][key]["median"]
    assert res["boundary_overhead"]["lapdtr_one_way_us"] > 0 and res["malloc"] == "tuned"
    for text in ("vs gpipe", "eff/steady (no flush)", "eff/flushed bubble", "per-boundary overhead"):
        assert text in proc.stdout, text
