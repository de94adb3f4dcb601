"""Overhead of running a model as lapdtr stages in one process vs the plain timm model.

For each model and batch size: wall time of ``model(x)`` and of the stages in sequence (cut
into ``--stages`` stages of about equal unit count), measured in interleaved pairs (one call of
each, the order alternating from pair to pair) so both see the same machine load. The ratio
reported is the median of the per-pair ratios stages / model; its spread is the width of the
95% bootstrap confidence interval of that median (``--bootstrap`` resamples of the pairs). Pairs
are added until that width is below ``--target-spread`` (0.02: the 2% the target tests) or a
cap is reached (``--max-repeats`` pairs or ``--max-seconds`` per row), which the output says.
Prints the ratios with their spread and saves them as JSON. Target: ratio <= 1.02 ("yes" where
the whole interval is at or below 1.02, "NO" where it is above, "within noise" otherwise).

    python benchmarks/overhead.py --out runs/bench/overhead.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import lapdtr
from lapdtr._fmt import fmt_time, table

MODELS = ["deit_tiny_patch16_224", "tiny_vit_5m_224", "efficientvit_m0", "edgevit_xxs", "resnet50"]
TARGET = 1.02


def bootstrap_ci(ratios, resamples: int = 2000, level: float = 0.95, seed: int = 0):
    """``level`` bootstrap confidence interval of the median of ``ratios`` (percentile method,
    fixed seed)."""
    r = np.asarray(ratios, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(r), size=(resamples, len(r)))
    med = np.median(r[idx], axis=1)
    lo, hi = np.quantile(med, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bench(model_name: str, batch: int, num_stages: int, *, min_repeats: int = 10,
          max_repeats: int = 1000, max_seconds: float = 90.0, target_spread: float = 0.02,
          warmup: int = 3, resamples: int = 2000) -> dict:
    torch.manual_seed(0)
    model = lapdtr.create_model(model_name)
    ul = lapdtr.units(model)
    n = len(ul)
    cuts = sorted({max(1, min(n - 1, round(n * k / num_stages))) for k in range(1, num_stages)})
    stages = lapdtr.partition(model, cuts, unit_list=ul)
    x = torch.randn(batch, *ul[0].in_shape[1:])

    def run_stages(t):
        for s in stages:
            t = s(t)
        return t

    max_repeats = max(2, max_repeats)
    min_repeats = max(2, min(min_repeats, max_repeats))
    with torch.inference_mode():
        assert torch.equal(model(x), run_stages(x))
        for _ in range(warmup):
            model(x)
            run_stages(x)
        t_model, t_stages, ratios = [], [], []
        lo = hi = float("nan")
        t_start, next_check, cap = time.perf_counter(), min_repeats, None
        while True:
            order = [(model, t_model), (run_stages, t_stages)]
            if len(ratios) % 2:
                order.reverse()
            for fn, acc in order:
                t0 = time.perf_counter()
                fn(x)
                acc.append(time.perf_counter() - t0)
            ratios.append(t_stages[-1] / t_model[-1])
            k = len(ratios)
            elapsed = time.perf_counter() - t_start
            capped = k >= max_repeats or elapsed >= max_seconds
            if k >= next_check or (capped and k >= 2):
                lo, hi = bootstrap_ci(ratios, resamples)
                next_check = k + max(1, k // 10)  # re-check after 10% more pairs
                if hi - lo < target_spread:
                    break
            if capped:
                cap = f"{max_repeats} pairs" if k >= max_repeats else f"{max_seconds:g} s"
                break
    m, s = statistics.median(t_model), statistics.median(t_stages)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else (ratios[0],) * 3
    return {"model": model_name, "batch": batch, "num_units": n, "cuts": cuts,
            "model_time_s": m, "stages_time_s": s, "ratio": statistics.median(ratios),
            "ratio_ci95": [lo, hi], "spread": hi - lo,
            "spread_method": f"width of the 95% bootstrap CI ({resamples} resamples) of the "
                             "median per-pair ratio",
            "target_spread": target_spread, "converged": hi - lo < target_spread,
            "cap_reached": cap, "ratio_iqr": [q1, q3], "ratio_of_medians": s / m,
            "repeats": len(ratios), "seconds": time.perf_counter() - t_start,
            "verdict": ("yes" if hi <= TARGET else "NO" if lo > TARGET else "within noise")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--stages", type=int, default=4, help="number of stages to cut into")
    p.add_argument("--min-repeats", type=int, default=10,
                   help="pairs measured before the spread is first checked")
    p.add_argument("--max-repeats", type=int, default=1000, help="cap: pairs per row")
    p.add_argument("--max-seconds", type=float, default=90.0, help="cap: seconds per row")
    p.add_argument("--target-spread", type=float, default=0.02,
                   help="stop once the ratio's 95%% CI is narrower than this")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="runs/bench/overhead.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"ratio: median of per-pair ratios stages / model; spread: width of its 95% bootstrap "
          f"CI; pairs added until the spread is < {a.target_spread:g} or a cap "
          f"({a.max_repeats} pairs, {a.max_seconds:g} s per row)", flush=True)
    results = []
    for name in a.models:
        for b in a.batches:
            r = bench(name, b, a.stages, min_repeats=a.min_repeats, max_repeats=a.max_repeats,
                      max_seconds=a.max_seconds, target_spread=a.target_spread,
                      warmup=a.warmup, resamples=a.bootstrap)
            results.append(r)
            lo, hi = r["ratio_ci95"]
            stop = (f"spread < {a.target_spread:g} after {r['repeats']} pairs" if r["converged"]
                    else f"CAP REACHED (cap {r['cap_reached']}: {r['repeats']} pairs in "
                         f"{r['seconds']:.0f} s) before the spread fell under "
                         f"{a.target_spread:g}")
            print(f"{name:24s} batch {b:3d}: model {fmt_time(r['model_time_s'])}, "
                  f"stages {fmt_time(r['stages_time_s'])}, ratio {r['ratio']:.4f} "
                  f"[95% CI {lo:.4f}, {hi:.4f}], spread {r['spread']:.4f}: {stop}", flush=True)
    rows = [[r["model"], r["batch"], len(r["cuts"]) + 1, r["repeats"], fmt_time(r["model_time_s"]),
             fmt_time(r["stages_time_s"]), f"{r['ratio']:.4f}",
             f"{r['ratio_ci95'][0]:.4f}-{r['ratio_ci95'][1]:.4f}", f"{r['spread']:.4f}",
             f"spread < {a.target_spread:g}" if r["converged"] else f"CAP ({r['cap_reached']})",
             r["verdict"]] for r in results]
    print(table(["model", "batch", "stages", "pairs", "timm model", "lapdtr stages", "ratio",
                 "95% CI", "spread", "stopped by", f"<= {TARGET}"], rows))
    capped = [f"{r['model']} batch {r['batch']}" for r in results if not r["converged"]]
    if capped:
        print(f"cap reached before the spread fell under {a.target_spread:g}: {', '.join(capped)}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "overhead", "target_ratio": TARGET, "target_spread": a.target_spread,
        "ratio": "median of per-pair ratios stages / model (pairs interleaved, order "
                 "alternating)",
        "spread": "width of the 95% bootstrap CI of that median", "results": results,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor()}}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
