"""``benchmarks/planner.py`` runs on a tiny setting and saves every field it reports."""
import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ROW_FIELDS = {"set", "devices", "units", "seed", "objective", "lapdtr_s", "target_s",
              "within_target", "exact", "gap", "lower_bound", "objective_value", "gap_tol",
              "solver", "expansions", "device_classes", "stages", "value"}
ENERGY_FIELDS = {"goal_met", "greedy_s", "greedy_energy_j", "greedy_gap", "greedy_gap_vs_lb",
                 "greedy_constraints_met"}


def _bench():
    path = ROOT / "benchmarks" / "planner.py"
    spec = importlib.util.spec_from_file_location("bench_planner", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_planner_benchmark_smoke(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--sizes", "3x8,6x20", "--seeds", "1", "--repeats", "1",
                       "--no-vertical", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "planner.json").read_text())
    assert res["benchmark"] == "planner" and res["cpu_count"] >= 1
    assert res["settings"]["sizes"] == [[3, 8], [6, 20]] and res["settings"]["gap_tol"] == 0.0
    rows = res["rows"]
    # every device set x size x objective, each row with every field
    assert {(r["set"], r["devices"], r["objective"]) for r in rows} == {
        (s, m, o) for s in bench.SETS for m in (3, 6) for o in bench.OBJECTIVES}
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        if r["objective"] == "energy":
            assert ENERGY_FIELDS <= set(r), ENERGY_FIELDS - set(r)
        assert r["lapdtr_s"] > 0 and r["stages"] >= 1
        lb, v = r["lower_bound"], r["objective_value"]
        assert 0 < lb <= v * (1 + 1e-12) and math.isfinite(v)
        if r["exact"]:
            assert r["gap"] == 0.0 and lb == v
        else:
            assert math.isclose(r["gap"], (v - lb) / lb, rel_tol=1e-9)
    # the distinct and varied sets have no two devices alike
    assert all(r["device_classes"] == r["devices"] for r in rows if r["set"] != "kinds")
    assert len(res["summary"]) == len(bench.SETS) * 2 * len(bench.OBJECTIVES)
    assert "largest certified gap" in printed and "wrote" in printed
