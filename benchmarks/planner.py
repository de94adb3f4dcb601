"""Planner wall time and the greedy baseline's optimality gap.

Instances: a heterogeneous edge set (Jetson-TX2-, Xavier-NX- and Raspberry-Pi-4-like devices, the
hardware of the LAP-DTR and Tang & Stefanov seeds) and a synthetic model profile whose parameters
exceed every single device's memory, so plans need several stages. For each size
(devices, units) the script times ``lapdtr`` (exact A*), ``lapdtr-greedy`` (Algorithm 2) and, on
the smallest size, ``vertical``; the gap is ``greedy energy / optimal energy - 1`` per request.

    python benchmarks/planner.py --out bench_out            # prints a table, writes planner.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from lapdtr.plan import create_plan
from lapdtr.profile.types import DeviceProfile, LinkProfile, ModelProfile, UnitProfile

SIZES = [(4, 24), (8, 100), (64, 1000)]
TARGET_S = {(4, 24): 0.010, (8, 100): 1.0, (64, 1000): 10.0}

# (name, GFLOP/s, memory bytes, active W, J/byte): edge figures of the seeds' hardware
DEVICE_TYPES = [
    ("jetson-tx2", 460.0, 4 * 2**30, 4.5, 1.0e-8),
    ("xavier-nx", 1100.0, 6 * 2**30, 10.0, 8.0e-9),
    ("rpi4", 13.5, 2 * 2**30, 6.4, 2.0e-8),
    ("gpu-node", 15000.0, 16 * 2**30, 250.0, 2.0e-9),
]


def make_devices(num: int, seed: int = 0, *, mem_scale: float = 1.0) -> list[DeviceProfile]:
    r = random.Random(seed)
    devs = []
    for i in range(num):
        kind, gf, mem, pw, epb = DEVICE_TYPES[i % len(DEVICE_TYPES)] if i < len(DEVICE_TYPES) \
            else r.choice(DEVICE_TYPES)
        devs.append(DeviceProfile(name=f"{kind}-{i}", kind="simulated", gflops=gf,
                                  memory_bytes=int(mem * mem_scale), power_active_w=pw,
                                  power_idle_w=pw / 4, energy_per_byte_j=epb,
                                  links=[LinkProfile("*", 12.5e6, 2e-3)]))
    return devs


def make_model(num_units: int, seed: int = 0, *, total_param_bytes: float) -> ModelProfile:
    r = random.Random(seed)
    weights = [r.uniform(0.2, 1.8) for _ in range(num_units)]
    s = sum(weights)
    units, prev = [], 602_112  # a 224x224x3 fp32 image
    for i, w in enumerate(weights):
        out = r.choice([150_528, 301_056, 602_112, 1_204_224])
        units.append(UnitProfile(
            index=i, name=f"blocks.{i}", kind="block", modules=[f"blocks.{i}"], in_format="tokens",
            out_format="tokens", in_shape=[1, 196, 768], out_shape=[1, 196, 768],
            flops=int(r.uniform(0.3e9, 3e9)), num_params=0,
            param_bytes=int(total_param_bytes * w / s), in_bytes=prev, out_bytes=out,
            peak_bytes=prev + 4 * out, latency_s=0.0))
        prev = out
    return ModelProfile(model=f"synthetic-{num_units}", family="synthetic", img_size=224,
                        batch_size=1, dtype="float32", device="cpu", units=units,
                        total_flops=sum(u.flops for u in units), model_flops=0,
                        total_latency_s=0.0)


def timed(fn, repeats: int):
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def run(sizes=SIZES, seed: int = 0, repeats: int = 3) -> list[dict]:
    rows = []
    for m, n in sizes:
        devices = make_devices(m, seed)
        mem = sorted(d.memory_bytes for d in devices)
        # more parameters than the largest device holds: at least two stages
        model = make_model(n, seed, total_param_bytes=1.5 * mem[-1])
        reps = repeats if n <= 100 else 1
        create_plan(make_model(4, seed, total_param_bytes=1.0), devices[:2],
                    strategy="lapdtr")  # warm-up: imports and registry
        t_opt, opt = timed(lambda: create_plan(model, devices, strategy="lapdtr"), reps)
        t_greedy, greedy = timed(lambda: create_plan(model, devices, strategy="lapdtr-greedy"),
                                 reps)
        e_opt, e_greedy = opt.meta["total_energy_j"], greedy.meta["total_energy_j"]
        row = {"devices": m, "units": n, "lapdtr_s": t_opt, "target_s": TARGET_S.get((m, n)),
               "within_target": t_opt < TARGET_S.get((m, n), float("inf")),
               "exact": opt.meta["exact"], "expansions": opt.meta["expansions"],
               "stages": len(opt.stages), "greedy_s": t_greedy,
               "optimal_energy_j": e_opt, "greedy_energy_j": e_greedy,
               "greedy_gap": e_greedy / e_opt - 1.0,
               "greedy_constraints_met": greedy.meta["constraints_met"]}
        if n <= 24:
            t_v, v = timed(lambda: create_plan(model, devices, strategy="vertical",
                                               objective="max-device-energy"), 1)
            row["vertical_s"] = t_v
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write DIR/planner.json")
    p.add_argument("--seeds", type=int, default=3, help="instances per size (gap statistics)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    all_rows = []
    for seed in range(args.seeds):
        all_rows += [dict(r, seed=seed) for r in run(seed=seed, repeats=args.repeats)]
    print(f"{'devices':>7} {'units':>5} {'seed':>4} {'lapdtr':>10} {'target':>7} {'exact':>5} "
          f"{'stages':>6} {'greedy':>9} {'E opt (J)':>10} {'E greedy':>10} {'gap':>8}")
    for r in all_rows:
        print(f"{r['devices']:>7} {r['units']:>5} {r['seed']:>4} {r['lapdtr_s'] * 1e3:>8.2f}ms "
              f"{r['target_s']:>6.2f}s {str(r['exact']):>5} {r['stages']:>6} "
              f"{r['greedy_s'] * 1e3:>7.2f}ms {r['optimal_energy_j']:>10.4f} "
              f"{r['greedy_energy_j']:>10.4f} {r['greedy_gap'] * 100:>7.2f}%")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "planner", "python": sys.version.split()[0],
                  "machine": platform.machine(), "processor": platform.processor(),
                  "rows": all_rows}
        (out / "planner.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'planner.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
