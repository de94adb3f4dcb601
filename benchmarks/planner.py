"""Planner wall time, exactness and certified optimality gap, on device sets of a few kinds and on
fully heterogeneous ones; and the greedy baseline's gap.

Device sets (``--sets``):

- ``kinds``: Jetson-TX2-, Xavier-NX-, Raspberry-Pi-4-like devices and a GPU node (the hardware of
  the LAP-DTR and Tang & Stefanov seeds); devices of one kind are identical, so the exact search
  merges them into 4 classes.
- ``distinct``: the same kinds with ``gflops * (1 + 0.001 * i)``: every device differs a little
  (no two are interchangeable).
- ``varied``: every device drawn on its own: GFLOP/s log-uniform in [10, 20000], joules per FLOP
  log-uniform in [5e-12, 5e-10] (power = that * GFLOP/s), memory log-uniform in [1, 16] GiB,
  J/byte log-uniform in [1e-9, 3e-8].

The model is a synthetic profile whose parameters exceed every single device's memory (1.5x the
largest), so plans need several stages. Per (set, size, seed, objective) the script times
``lapdtr`` (default: exact; ``--gap-tol`` to allow a certified gap) and reports whether the plan is
proven optimal (``exact``), else its certified gap ``(objective - lower bound) / lower bound``
(the lower bound is proven by the planner: relaxation, Lagrangian bound, search frontier). For
the energy objective it also times ``lapdtr-greedy`` (Algorithm 2) and reports its energy over the
optimum (``greedy_gap_vs_lb``: over the lower bound); greedy may hold non-consecutive units on a
device or break a budget (``greedy_constraints_met``), so its gap can be negative. On the
``kinds`` set at <= 24 units it times ``vertical`` (the MILP, ``max-device-energy``). Wall times
are medians of ``--repeats`` runs for up to 100 units, one run above; on a machine shared with
other work they are noisy (the JSON keeps the load average at the start).

    python benchmarks/planner.py --out bench_out          # prints a table, writes planner.json
    python benchmarks/planner.py --quick --out /tmp/p     # small sizes, one seed: a few seconds
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from lapdtr.plan import create_plan
from lapdtr.profile.types import DeviceProfile, LinkProfile, ModelProfile, UnitProfile

SIZES = [(4, 24), (8, 100), (64, 1000)]
QUICK_SIZES = [(4, 12), (8, 40)]
TARGET_S = {(4, 24): 0.010, (8, 100): 1.0, (64, 1000): 10.0}
SETS = ("kinds", "distinct", "varied")
OBJECTIVES = ("energy", "max-device-energy", "latency")
GOAL_GAP = 1e-3  # the energy goal: exact or a certified gap within 0.1%, under the size's target

# (name, GFLOP/s, memory bytes, active W, J/byte): edge figures of the seeds' hardware
DEVICE_TYPES = [
    ("jetson-tx2", 460.0, 4 * 2**30, 4.5, 1.0e-8),
    ("xavier-nx", 1100.0, 6 * 2**30, 10.0, 8.0e-9),
    ("rpi4", 13.5, 2 * 2**30, 6.4, 2.0e-8),
    ("gpu-node", 15000.0, 16 * 2**30, 250.0, 2.0e-9),
]


def _device(name, gf, mem, pw, epb):
    return DeviceProfile(name=name, kind="simulated", gflops=gf, memory_bytes=int(mem),
                         power_active_w=pw, power_idle_w=pw / 4, energy_per_byte_j=epb,
                         links=[LinkProfile("*", 12.5e6, 2e-3)])


def make_devices(num: int, seed: int = 0, *, mem_scale: float = 1.0,
                 spread: float = 0.0) -> list[DeviceProfile]:
    """``num`` devices of the 4 kinds (the first 4 one of each, then drawn); ``spread`` > 0 makes
    every device distinct: ``gflops * (1 + spread * i)``."""
    r = random.Random(seed)
    devs = []
    for i in range(num):
        kind, gf, mem, pw, epb = DEVICE_TYPES[i % len(DEVICE_TYPES)] if i < len(DEVICE_TYPES) \
            else r.choice(DEVICE_TYPES)
        devs.append(_device(f"{kind}-{i}", gf * (1 + spread * i), mem * mem_scale, pw, epb))
    return devs


def make_varied_devices(num: int, seed: int = 0) -> list[DeviceProfile]:
    """``num`` devices, every figure drawn on its own (see the module docstring)."""
    r = random.Random(10_007 + seed)
    devs = []
    for i in range(num):
        gf = 10 ** r.uniform(1.0, math.log10(20000.0))
        jpf = 10 ** r.uniform(math.log10(5e-12), math.log10(5e-10))
        mem = 2 ** r.uniform(30.0, 34.0)
        epb = 10 ** r.uniform(-9.0, math.log10(3e-8))
        devs.append(_device(f"dev-{i}", gf, mem, jpf * gf * 1e9, epb))
    return devs


def device_set(name: str, num: int, seed: int) -> list[DeviceProfile]:
    if name == "kinds":
        return make_devices(num, seed)
    if name == "distinct":
        return make_devices(num, seed, spread=0.001)
    if name == "varied":
        return make_varied_devices(num, seed)
    raise ValueError(f"unknown device set {name!r}; allowed: {', '.join(SETS)}")


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


_OBJ_KEY = {"energy": "total_energy_j", "max-device-energy": "max_device_energy_j",
            "latency": "latency_s"}


def run(sizes=SIZES, seed: int = 0, repeats: int = 3, *, sets=SETS, objectives=OBJECTIVES,
        gap_tol: float = 0.0, greedy: bool = True, vertical: bool = True) -> list[dict]:
    """One row per (set, size, objective) for this seed."""
    rows = []
    warm = make_devices(2, seed)
    create_plan(make_model(4, seed, total_param_bytes=1.0), warm, strategy="lapdtr")  # imports
    for set_name in sets:
        for m, n in sizes:
            devices = device_set(set_name, m, seed)
            mem = sorted(d.memory_bytes for d in devices)
            # more parameters than the largest device holds: at least two stages
            model = make_model(n, seed, total_param_bytes=1.5 * mem[-1])
            reps = repeats if n <= 100 else 1
            for objective in objectives:
                t_opt, opt = timed(lambda: create_plan(model, devices, strategy="lapdtr",
                                                       objective=objective, gap_tol=gap_tol), reps)
                meta = opt.meta
                target = TARGET_S.get((m, n))
                row = {"set": set_name, "devices": m, "units": n, "seed": seed,
                       "objective": objective, "lapdtr_s": t_opt, "target_s": target,
                       "within_target": None if target is None else t_opt < target,
                       "exact": meta["exact"], "gap": meta["gap"],
                       "lower_bound": meta["lower_bound"],
                       "objective_value": meta["objective_value"], "gap_tol": meta["gap_tol"],
                       "solver": meta["solver"], "expansions": meta["expansions"],
                       "device_classes": meta["device_classes"], "stages": len(opt.stages),
                       "value": meta[_OBJ_KEY[objective]]}
                if objective == "energy":
                    row["goal_met"] = (None if target is None else bool(
                        (meta["exact"] or meta["gap"] <= GOAL_GAP) and t_opt < target))
                    if greedy:
                        t_g, g = timed(lambda: create_plan(model, devices,
                                                           strategy="lapdtr-greedy"), reps)
                        e_g = g.meta["total_energy_j"]
                        row.update({"greedy_s": t_g, "greedy_energy_j": e_g,
                                    "greedy_gap": e_g / meta["total_energy_j"] - 1.0,
                                    "greedy_gap_vs_lb": e_g / meta["lower_bound"] - 1.0,
                                    "greedy_constraints_met": g.meta["constraints_met"]})
                if vertical and objective == "max-device-energy" and n <= 24 \
                        and set_name == "kinds":  # the MILP baseline, on the smallest size
                    t_v, _ = timed(lambda: create_plan(model, devices, strategy="vertical",
                                                       objective="max-device-energy"), 1)
                    row["vertical_s"] = t_v
                rows.append(row)
    return rows


def _fmt_s(t):
    return f"{t * 1e3:8.1f}ms" if t < 1 else f"{t:8.2f}s "


def print_table(rows) -> None:
    print(f"{'set':>8} {'dev':>4} {'units':>5} {'seed':>4} {'objective':>17} {'time':>10} "
          f"{'target':>7} {'exact':>5} {'gap':>9} {'value':>11} {'lower bnd':>11} {'stg':>4} "
          f"{'solver':>17} {'greedy gap':>10}")
    for r in rows:
        tgt = f"{r['target_s']:6.2f}s" if r["target_s"] is not None else f"{'-':>7}"
        gap = "0" if r["exact"] else f"{r['gap'] * 100:.3f}%"
        gg = f"{r['greedy_gap'] * 100:9.2f}%" if "greedy_gap" in r else f"{'-':>10}"
        print(f"{r['set']:>8} {r['devices']:>4} {r['units']:>5} {r['seed']:>4} "
              f"{r['objective']:>17} {_fmt_s(r['lapdtr_s']):>10} {tgt} {str(r['exact']):>5} "
              f"{gap:>9} {r['objective_value']:>11.5g} {r['lower_bound']:>11.5g} "
              f"{r['stages']:>4} {r['solver'][:17]:>17} {gg}")


def summary(rows) -> dict:
    """Per (set, size, objective): exact count, largest certified gap, time range."""
    out = {}
    for r in rows:
        k = f"{r['set']} {r['devices']}x{r['units']} {r['objective']}"
        s = out.setdefault(k, {"runs": 0, "exact": 0, "max_gap": 0.0, "min_s": math.inf,
                               "max_s": 0.0})
        s["runs"] += 1
        s["exact"] += bool(r["exact"])
        s["max_gap"] = max(s["max_gap"], 0.0 if r["exact"] else r["gap"])
        s["min_s"] = min(s["min_s"], r["lapdtr_s"])
        s["max_s"] = max(s["max_s"], r["lapdtr_s"])
        if "goal_met" in r and r["goal_met"] is not None:
            s["goal_met"] = s.get("goal_met", True) and r["goal_met"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="write DIR/planner.json")
    p.add_argument("--seeds", type=int, default=3, help="instances per size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help=f"sizes {QUICK_SIZES}, one seed, one repeat (a smoke run)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated DEVICESxUNITS, e.g. 4x24,64x1000")
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated of {SETS}")
    p.add_argument("--objectives", default=",".join(OBJECTIVES),
                   help=f"comma-separated of {OBJECTIVES}")
    p.add_argument("--gap-tol", type=float, default=0.0,
                   help="the planner's gap_tol (0: exact unless its search limits stop it)")
    p.add_argument("--no-greedy", action="store_true", help="skip the lapdtr-greedy baseline")
    p.add_argument("--no-vertical", action="store_true",
                   help="skip timing the vertical MILP (kinds set, <= 24 units)")
    args = p.parse_args(argv)
    sizes = SIZES
    if args.sizes:
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in args.sizes.split(",")]
    elif args.quick:
        sizes = QUICK_SIZES
    seeds = 1 if args.quick else args.seeds
    repeats = 1 if args.quick else args.repeats
    sets = [s for s in args.sets.split(",") if s]
    objectives = [o for o in args.objectives.split(",") if o]
    for s in sets:
        if s not in SETS:
            p.error(f"unknown set {s!r}; allowed: {', '.join(SETS)}")
    for o in objectives:
        if o not in OBJECTIVES:
            p.error(f"unknown objective {o!r}; allowed: {', '.join(OBJECTIVES)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    all_rows = []
    for seed in range(seeds):
        all_rows += run(sizes, seed=seed, repeats=repeats, sets=sets, objectives=objectives,
                        gap_tol=args.gap_tol, greedy=not args.no_greedy,
                        vertical=not (args.no_vertical or args.quick))
    print_table(all_rows)
    summ = summary(all_rows)
    print()
    for k, s in summ.items():
        goal = "" if "goal_met" not in s else f"  goal (exact or gap <= {GOAL_GAP:.1%} within " \
                                              f"target): {'met' if s['goal_met'] else 'NOT met'}"
        print(f"{k:>40}: {s['exact']}/{s['runs']} exact, largest certified gap "
              f"{s['max_gap'] * 100:.3f}%, {s['min_s']:.3g}-{s['max_s']:.3g} s{goal}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {"benchmark": "planner", "python": sys.version.split()[0],
                  "machine": platform.machine(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "load_average_at_start": load,
                  "command": " ".join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:])),
                  "settings": {"sizes": [list(s) for s in sizes], "seeds": seeds,
                               "repeats": repeats, "sets": sets, "objectives": objectives,
                               "gap_tol": args.gap_tol, "goal_gap": GOAL_GAP},
                  "total_s": time.perf_counter() - t0, "rows": all_rows, "summary": summ}
        (out / "planner.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out / 'planner.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
