"""Summarized boundaries through the distributed runtime: bytes sent per boundary (from each
run's report) and batch-1 latency, against the same run without summarization.

For 2 ranks (cut before blocks.6) and 3 ranks (cuts before blocks.4 and blocks.8) of
``--model`` (default deit_small_patch16_224, 224 px, seeded random weights), the pipeline
runtime (``lapdtr.runtime.run``, gloo ranks spawned on this machine) answers ``--requests``
batch-1 requests at each setting: unsummarized fp32, then ``summarize: {keep, wire}`` for each
``--settings`` pair. Printed and saved: per boundary the bytes the report counts as sent
(message headers included) and the payload over the unsummarized fp32 boundary; the run's
latency p50 / p95 and throughput, and the latency ratio to the unsummarized run (target: never
slower, i.e. <= 1.0, printed PASS / MISS, not asserted). Bytes are exact; times are measured on
this machine, whose ranks share its cores (the JSON keeps the load average).

    python benchmarks/summarize_runtime.py              # writes benchmarks/results/summarize_runtime.json
    python benchmarks/summarize_runtime.py --quick --out /tmp/sr.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from lapdtr._fmt import table
from lapdtr.runtime import RunConfig, run

LAYOUTS = {2: ["blocks.6"], 3: ["blocks.4", "blocks.8"]}
SETTINGS = [(0.5, "fp16"), (0.25, "int8")]


def one_run(args, world: int, setting, out: Path) -> dict:
    summarize = None if setting is None else {"keep": setting[0], "wire": setting[1]}
    cfg = RunConfig(model=args.model, img_size=args.img_size, world_size=world,
                    cuts=LAYOUTS[world], requests=args.requests, batch_size=1, out=str(out),
                    plots=False, predictions=False, summarize=summarize,
                    threads_per_rank=1).validate()
    r = run(cfg, timeout_s=900)
    bounds = {u: b for k in r.ranks for u, b in k.boundaries.items()}
    return {"world_size": world, "cuts": LAYOUTS[world],
            "keep": 1.0 if setting is None else setting[0],
            "wire": "fp32" if setting is None else setting[1],
            "completed": r.completed, "latency_p50_s": r.latency_p50_s,
            "latency_p95_s": r.latency_p95_s, "throughput_rps": r.throughput_rps,
            "bytes_sent": r.bytes_sent, "boundaries": bounds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 3], choices=sorted(LAYOUTS))
    ap.add_argument("--quick", action="store_true", help="8 requests, 2 ranks, one setting")
    ap.add_argument("--out", default="benchmarks/results/summarize_runtime.json")
    args = ap.parse_args(argv)
    settings = SETTINGS
    if args.quick:
        args.requests, args.worlds, settings = 8, [2], SETTINGS[:1]
    t0 = time.perf_counter()
    report = {"benchmark": "summarize_runtime", "python": sys.version.split()[0],
              "torch": torch.__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(),
              "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "command": " ".join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:])),
              "labels": {"bytes": "measured (exact, from the run report)",
                         "latency": "measured on this machine, ranks sharing its cores"},
              "runs": []}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            base = None
            for setting in [None, *settings]:
                tag = "fp32" if setting is None else f"{setting[0]}-{setting[1]}"
                res = one_run(args, world, setting, Path(tmp) / f"w{world}-{tag}")
                base = base or res
                res["latency_ratio"] = res["latency_p50_s"] / base["latency_p50_s"]
                report["runs"].append(res)
                for u, b in res["boundaries"].items():
                    rows.append([world, u, f"{res['keep']:g}", res["wire"], b["bytes"] // b["items"],
                                 f"{b['payload_bytes'] / b['dense_fp32_bytes']:.3f}",
                                 f"{res['latency_p50_s'] * 1e3:.1f}",
                                 f"{res['latency_ratio']:.2f}",
                                 "PASS" if res["latency_ratio"] <= 1.0 else "MISS"])
                print(f"ranks {world} keep {res['keep']:g} {res['wire']}: "
                      f"{res['completed']}/{args.requests} answered, p50 "
                      f"{res['latency_p50_s'] * 1e3:.1f} ms", flush=True)
    print()
    print(table(["ranks", "boundary after", "keep", "wire", "bytes/item sent",
                 "payload/fp32", "p50 ms", "p50 / unsummarized", "never slower"], rows))
    report["total_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out} ({report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
