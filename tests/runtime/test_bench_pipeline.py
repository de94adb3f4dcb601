"""``benchmarks/pipeline.py`` runs end to end on a tiny setting and saves what it prints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def test_pipeline_benchmark_smoke(tmp_path):
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "pipeline.py"), "--depth", "2",
                           "--ranks", "2", "--micro-batches", "2", "--batch", "2", "--requests",
                           "2", "--trials", "1", "--latency-requests", "2", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=280, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "pipeline.json").read_text())
    (row,), (lat,) = res["throughput"], res["latency"]
    assert (row["p"], row["m"]) == (2, 2) and row["lapdtr_img_s"] > 0 and row["gpipe_img_s"] > 0
    assert row["cpu_vs_gpipe"] > 0 and 0 < row["busy"] <= 1.5 and 0 < row["gpipe_busy"] <= 1.5
    assert lat["latency_s"] > 0 and lat["bare_latency_s"] > 0
    assert res["boundary_overhead"]["lapdtr_one_way_us"] > 0 and res["malloc"] == "tuned"
    assert "vs gpipe" in proc.stdout and "per-boundary overhead" in proc.stdout
