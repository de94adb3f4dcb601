"""``benchmarks/overhead.py`` on a tiny setting: every row saves its ratio and spread, and says
when the cap stopped it before the spread fell under the target."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "benchmarks" / "overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bootstrap_and_early_stop():
    b = _bench_module()
    assert b.bootstrap_ci([1.0] * 5) == (1.0, 1.0)
    lo, hi = b.bootstrap_ci([0.9, 1.0, 1.1, 1.0, 0.95, 1.05])
    assert 0.9 <= lo <= 1.0 <= hi <= 1.1
    # a spread target any pair meets: stops at the minimum number of pairs (one torch thread:
    # two spin-waiting ones crawl on a loaded machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = b.bench("efficientvit_m0", 1, 2, min_repeats=3, max_repeats=50, target_spread=10.0,
                    warmup=1)
    finally:
        torch.set_num_threads(threads)
    assert r["converged"] and r["cap_reached"] is None and r["repeats"] == 3


@pytest.mark.timeout(120)
def test_overhead_benchmark_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    # a target no measurement meets: the cap (4 pairs) ends the row, and the output says so
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--models",
                           "efficientvit_m0", "--batches", "1", "--threads", "1", "--warmup", "1",
                           "--min-repeats", "3", "--max-repeats", "4", "--target-spread", "1e-9",
                           "--out", str(out)], capture_output=True, text=True, timeout=110,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["target_ratio"] == 1.02 and res["target_spread"] == 1e-9 and "bootstrap" in res["spread"]
    (row,) = res["results"]
    assert row["model"] == "efficientvit_m0" and row["batch"] == 1 and row["repeats"] == 4
    lo, hi = row["ratio_ci95"]
    assert row["ratio"] > 0 and lo <= row["ratio"] <= hi and row["spread"] == pytest.approx(hi - lo)
    assert not row["converged"] and row["cap_reached"] == "4 pairs"
    assert row["verdict"] in ("yes", "NO", "within noise")
    assert "CAP REACHED" in proc.stdout and "cap reached before the spread fell under" in proc.stdout
