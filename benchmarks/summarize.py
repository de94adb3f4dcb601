"""Feature summarization at a stage boundary: bytes sent, and the summarizer's time against the
stage's compute.

(a) Bytes. The boundary after ``blocks.{cut-1}`` of ``--model`` (default deit_small_patch16_224
    at 224 px: 197 tokens x 384 channels, 302,592 bytes in fp32) encoded by
    ``lapdtr.summarize.BoundaryCodec`` for every keep ratio x wire format: the packet's payload
    bytes (``codec.nbytes``), the bytes of its ``pack_packet`` message (tensor headers and
    16-byte alignment included), and the payload over the unsummarized fp32 boundary. Exact
    counts (checked against an encoded packet), independent of the machine.

(b) Time at batch 1. The first stage (embed and blocks 0 .. cut-1, random weights, eval) timed
    alone, and the summarizer on its output: the importance from the last block's attention
    (q, k captured by ``AttentionProbe`` during the stage), ``codec.encode`` and
    ``codec.decode``. Median of ``--repeats`` runs each, timed in turn within each repeat.
    Ratio summarizer / stage, target <= 5% (printed PASS / MISS, not an assertion). On a CPU the
    PyTorch reference path runs (Triton compiles for GPUs only); with CUDA available, both the
    reference (``LAPDTR_KERNELS=0``) and the Triton kernels (``LAPDTR_KERNELS=1``) are timed.
    Numbers depend on the machine and its load (the JSON keeps the load average).

    python benchmarks/summarize.py                 # writes benchmarks/results/summarize.json
    python benchmarks/summarize.py --quick --out /tmp/s.json
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _report import write_report  # benchmarks/_report.py (the script's folder)

import torch

import lapdtr
from lapdtr._fmt import fmt_time, table
from lapdtr.runtime.wire import pack_packet
from lapdtr.summarize import (WIRE_FORMATS, AttentionProbe, attention_source, codec_for_unit,
                              importance_kind, nbytes)

KEEPS = [1.0, 0.75, 0.5, 0.25, 0.1]
TARGET_TIME_RATIO = 0.05


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bytes_section(model, unit, keeps, wires) -> list[dict]:
    rows = []
    x = None
    for keep in keeps:
        for wire in wires:
            c = codec_for_unit(model, unit, keep=keep, wire=wire)
            if x is None:
                x = torch.randn(1, *c.shape)
            packet = c.encode(x, torch.rand(1, c.n_tokens))
            if nbytes(packet) != c.nbytes(1) or pack_packet(packet).numel() != c.packet_nbytes(1):
                raise AssertionError(f"codec byte count disagrees with its packet at keep={keep}, "
                                     f"wire={wire}")
            rows.append({"keep": keep, "wire": wire, "kept_tokens": c.num_prefix + c.k,
                         "fused_tokens": int(c.summarizes), "payload_bytes": c.nbytes(1),
                         "message_bytes": c.packet_nbytes(1), "fp32_bytes": c.dense_nbytes(1),
                         "ratio": c.nbytes(1) / c.dense_nbytes(1)})
    return rows


def print_bytes(rows) -> None:
    print(table(["keep", "wire", "tokens sent", "payload B", "message B", "/ fp32"],
                [[r["keep"], r["wire"], r["kept_tokens"] + r["fused_tokens"], r["payload_bytes"],
                  r["message_bytes"], f"{100 * r['ratio']:.1f}%"] for r in rows]))


def time_section(model, stage, unit, keeps, wires, device, paths, repeats, warmup) -> dict:
    x = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:], device=device)
    attn = attention_source(model, unit)
    kind = importance_kind(model)
    codecs = {(k, w): codec_for_unit(model, unit, keep=k, wire=w) for k in keeps for w in wires}
    samples = {"stage": []}
    samples.update({(p, k, w): [] for p in paths for (k, w) in codecs})
    with torch.no_grad(), AttentionProbe(attn, kind) as probe:
        def run_stage():
            return stage(x)

        def run_summarizer(codec, b):
            imp = probe.importance() if codec.summarizes else None
            return codec.decode(codec.encode(b, imp))

        b = run_stage()
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            b = run_stage()
            _sync(device)
            if i >= warmup:
                samples["stage"].append(time.perf_counter() - t0)
            for p in paths:
                os.environ["LAPDTR_KERNELS"] = p
                for key, codec in codecs.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    run_summarizer(codec, b)
                    _sync(device)
                    if i >= warmup:
                        samples[(p, *key)].append(time.perf_counter() - t0)
    os.environ.pop("LAPDTR_KERNELS", None)
    stage_s = statistics.median(samples["stage"])
    rows = []
    for p in paths:
        for (k, w) in codecs:
            s = statistics.median(samples[(p, k, w)])
            rows.append({"path": {"0": "reference", "1": "triton"}[p], "keep": k, "wire": w,
                         "summarizer_s": s, "ratio": s / stage_s,
                         "target_met": s / stage_s <= TARGET_TIME_RATIO})
    return {"stage_s": stage_s, "rows": rows}


def print_time(res) -> None:
    print(f"stage alone: {fmt_time(res['stage_s'])}")
    print(table(["path", "keep", "wire", "summarizer", "/ stage", "target"],
                [[r["path"], r["keep"], r["wire"], fmt_time(r["summarizer_s"]),
                  f"{100 * r['ratio']:.2f}%", "PASS" if r["target_met"] else "MISS"]
                 for r in res["rows"]]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--cut", type=int, default=6,
                    help="the boundary is after blocks.(cut-1), i.e. the second stage starts at "
                         "blocks.cut (default 6)")
    ap.add_argument("--keeps", type=float, nargs="+", default=KEEPS)
    ap.add_argument("--wires", nargs="+", default=list(WIRE_FORMATS), choices=WIRE_FORMATS)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 repeats, 1 warm-up")
    ap.add_argument("--out", default="benchmarks/results/summarize.json",
                    help="the JSON file (or a directory: DIR/summarize.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    report = {"benchmark": "summarize", "python": sys.version.split()[0],
              "torch": torch.__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "device": str(device), "load_average_at_start": load,
              "command": " ".join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:]))}
    model = lapdtr.create_model(args.model, img_size=args.img_size).eval()
    ul = lapdtr.units(model, args.img_size)
    names = [u.name for u in ul]
    cut_name = f"blocks.{args.cut}"
    if cut_name not in names or args.cut < 1:
        raise SystemExit(f"--cut {args.cut}: {args.model} has blocks.1 .. "
                         f"blocks.{len(model.blocks) - 1} to start a second stage at")
    cut = names.index(cut_name)
    unit = ul[cut - 1]
    print(f"(a) bytes of the boundary after {unit.name} of {args.model} at {args.img_size} px "
          f"({' x '.join(map(str, unit.out_shape[1:]))} per item)", flush=True)
    report["bytes"] = {"boundary": unit.name, "shape": list(unit.out_shape[1:]),
                       "rows": bytes_section(model, unit, args.keeps, args.wires)}
    print_bytes(report["bytes"]["rows"])
    model = model.to(device)
    stage = lapdtr.partition(model, [cut], unit_list=ul)[0]
    paths = ["0", "1"] if device.type == "cuda" else ["0"]
    print(f"\n(b) time at batch 1 on {device} ({', '.join({'0': 'reference', '1': 'triton'}[p] for p in paths)}): "
          f"stage {stage.unit_names[0]} .. {stage.unit_names[-1]}", flush=True)
    res = time_section(model, stage, unit, args.keeps, args.wires, device, paths, args.repeats,
                       args.warmup)
    res["target_ratio"] = TARGET_TIME_RATIO
    report["time"] = res
    print_time(res)
    write_report(report, args.out, "summarize.json", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
