"""Overhead of running a model as lapdtr stages in one process vs the plain timm model.

For each model and batch size: median wall time of ``model(x)`` and of the stages in sequence
(cut into ``--stages`` stages of about equal unit count), measured interleaved so both see the
same machine load. Prints the ratios and saves them as JSON. Target: ratio <= 1.02.

    python benchmarks/overhead.py --out runs/bench/overhead.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lapdtr
from lapdtr._fmt import fmt_time, table

MODELS = ["deit_tiny_patch16_224", "tiny_vit_5m_224", "efficientvit_m0", "edgevit_xxs", "resnet50"]


def bench(model_name: str, batch: int, num_stages: int, repeats: int, warmup: int) -> dict:
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

    with torch.inference_mode():
        assert torch.equal(model(x), run_stages(x))
        for _ in range(warmup):
            model(x)
            run_stages(x)
        t_model, t_stages = [], []
        for i in range(repeats):
            order = [(model, t_model), (run_stages, t_stages)]
            if i % 2:
                order.reverse()
            for fn, acc in order:
                t0 = time.perf_counter()
                fn(x)
                acc.append(time.perf_counter() - t0)
    m, s = statistics.median(t_model), statistics.median(t_stages)
    return {"model": model_name, "batch": batch, "num_units": n, "cuts": cuts,
            "model_time_s": m, "stages_time_s": s, "ratio": s / m, "repeats": repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--stages", type=int, default=4, help="number of stages to cut into")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="runs/bench/overhead.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results = []
    for name in a.models:
        for b in a.batches:
            r = bench(name, b, a.stages, a.repeats if b == 1 else max(3, a.repeats // 3), a.warmup)
            results.append(r)
            print(f"{name:24s} batch {b:3d}: model {fmt_time(r['model_time_s'])}, "
                  f"stages {fmt_time(r['stages_time_s'])}, ratio {r['ratio']:.4f}", flush=True)
    rows = [[r["model"], r["batch"], len(r["cuts"]) + 1, fmt_time(r["model_time_s"]),
             fmt_time(r["stages_time_s"]), f"{r['ratio']:.4f}",
             "yes" if r["ratio"] <= 1.02 else "NO"] for r in results]
    print(table(["model", "batch", "stages", "timm model", "lapdtr stages", "ratio", "<= 1.02"],
                rows))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "overhead", "target_ratio": 1.02, "results": results,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor()}}, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
