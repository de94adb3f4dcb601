"""Elastic widths: does latency follow FLOPs, and does sandwich training keep the accuracy?

(a) Latency. For deit_small_patch16_224 and tiny_vit_5m_224 (224 px, random weights, eval,
    ``lapdtr.elastic.make_elastic``) at batch 1 and 32 on this CPU: the whole model's forward at
    widths 1.0 / 0.75 / 0.5 / 0.25 (``set_width(model, r)``: heads and hidden units at r,
    rounded per layer to ``max(1, round(r·h))``, so the *realised* widths are printed: DeiT-S
    has 6 heads, so 0.75 runs 4/6 heads (``round(4.5) = 4``) and 0.25 runs 2/6), timed in turn
    within each repeat (a machine whose speed drifts shifts every width alike), median of the
    repeats; next to it the FLOPs ratio that ``profile_model(widths=[...])`` counts at the same
    realised widths (whole model, batch 1: every op's FLOPs grow linearly with the batch, so the
    ratio is the batch-32 ratio too). Target per row: latency ratio <= 1.15 x FLOPs ratio,
    printed PASS / MISS (not an assertion; running faster than the FLOPs predict passes).
    TinyViT falls short at 0.5 and 0.25: its convolutions (the MBConv stage, every block's
    depthwise ``local_conv``, patch embedding, downsampling) are not elastic and run at a far
    lower FLOP/s than its linears (with their BatchNorm and GELU, about 40% of its CPU time at
    full width under torch.profiler, about 30% of its FLOPs), so its latency falls less than its
    FLOPs; DeiT-S, all linears and attention, follows its FLOPs.

(b) Accuracy on the digits. A small DeiT (deit_tiny_patch16_224 with depth 4, 4 heads so that
    the four widths are 4/3/2/1 heads exactly, patch 8, 32 px, 10 classes) is trained plainly
    (``train_elastic_digits(sandwich=False)``, i.e. ``train_digits_checkpoint``) for
    ``--plain-epochs``; from that checkpoint, two continuations of ``--ft-epochs`` with the same
    optimizer, schedule and learning rate ``--ft-lr``: one WITH the sandwich rule (heads and
    hidden units ordered once by DynaBERT importance on 256 training images, then largest +
    smallest + 2 random widths per step, in-place distillation) and one WITHOUT it (full width
    only). Each is evaluated on the digits test split at the four widths (heads and hidden at the
    same ratio); the plain checkpoints also after reordering by importance (what a plainly
    trained model gets at best without elastic training). Target: the elastic model at 50%
    width loses <= 2 points against its own full width; the plain ones lose far more.
    ``--scratch`` also trains the sandwich from the seeded initial weights for
    ``--plain-epochs`` (no plain pre-training), for comparison: with this budget it converges
    far more slowly (59% at full width after 15 epochs here), hence DynaBERT's order.

Training runs on one torch thread (as ``train_digits_checkpoint``), latency on ``--threads``
(default 1: on a 2-core machine shared with other jobs, torch's two OpenMP threads wait on each
other whenever the other job holds a core, and a DeiT-S forward at batch 1 went from 0.13 s to
1.4 s, with reduced widths no faster). Numbers depend on the machine and its load (the JSON keeps
the load average).

    python benchmarks/elastic.py                    # all; writes benchmarks/results/elastic.json
    python benchmarks/elastic.py --latency-only --quick
    python benchmarks/elastic.py --accuracy-only --plain-epochs 5 --ft-epochs 2 --out /tmp/e.json
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _report import write_report  # benchmarks/_report.py (the script's folder)

import torch

import lapdtr
from lapdtr._fmt import fmt_time, table
from lapdtr.elastic import make_elastic, order_by_importance_, set_width
from lapdtr.elastic.curve import realised
from lapdtr.elastic.train import evaluate_widths, train_elastic_digits
from lapdtr.profile import profile_model

WIDTHS = [1.0, 0.75, 0.5, 0.25]
LATENCY_MODELS = ["deit_small_patch16_224", "tiny_vit_5m_224"]
TARGET_LAT_OVER_FLOPS = 1.15
TARGET_LOSS_AT_HALF = 0.02  # top-1 points (as a fraction) lost at 50% width, elastic model
DIGITS_MODEL = "deit_tiny_patch16_224"
DIGITS_KW = {"depth": 4, "num_heads": 4, "patch_size": 8}
DIGITS_IMG = 32


def _pairs(pairs) -> str:
    return ",".join(f"{k}/{h}" for k, h in pairs)


def time_widths(model, x, widths, warmup: int, repeats: int) -> dict:
    """Median forward seconds per width, widths timed in turn within each repeat."""
    with torch.no_grad():
        for w in widths:
            set_width(model, w)
            for _ in range(warmup):
                model(x)
        ts = {w: [] for w in widths}
        for _ in range(repeats):
            for w in widths:
                set_width(model, w)
                t0 = time.perf_counter()
                model(x)
                ts[w].append(time.perf_counter() - t0)
    set_width(model, 1.0)
    return {w: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
            for w, v in ts.items()}


def latency_section(models, batches, widths, repeats: dict, warmup: dict) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = lapdtr.create_model(name).eval()
        img = lapdtr.models.default_img_size(model)
        t0 = time.perf_counter()
        prof = profile_model(copy.deepcopy(model), img_size=img, batch_size=1, widths=widths,
                             repeats=1, warmup=0, use_cache=False)
        prof_s = time.perf_counter() - t0
        full_flops = prof.model_flops
        make_elastic(model)
        real = {}
        for w in widths:
            set_width(model, w)
            real[w] = realised(model)
        set_width(model, 1.0)
        for b in batches:
            x = torch.randn(b, 3, img, img, generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            lat = time_widths(model, x, widths, warmup[b], repeats[b])
            wall = time.perf_counter() - t0
            for w in widths:
                fr = prof.at_width(w).model_flops / full_flops
                lr = lat[w]["median_s"] / lat[1.0]["median_s"]
                rows.append({
                    "model": name, "img_size": img, "batch": b, "width": w,
                    "heads": real[w]["heads"], "hidden": real[w]["hidden"],
                    "flops": prof.at_width(w).model_flops, "flops_ratio": fr,
                    "latency_s": lat[w]["median_s"], "latency_min_s": lat[w]["min_s"],
                    "latency_max_s": lat[w]["max_s"], "latency_ratio": lr,
                    "latency_over_flops": lr / fr,
                    "target_met": lr <= TARGET_LAT_OVER_FLOPS * fr,
                    "repeats": repeats[b], "warmup": warmup[b], "timing_wall_s": wall,
                    "profile_s": prof_s})
            print(f"  {name} batch {b}: timed in {wall:.1f} s", flush=True)
    return rows


def print_latency(rows) -> None:
    print(f"\n(a) latency / full vs FLOPs / full (target: latency ratio <= "
          f"{TARGET_LAT_OVER_FLOPS} x FLOPs ratio), torch threads {torch.get_num_threads()}")
    out = []
    for r in rows:
        out.append([r["model"], r["batch"], f"{r['width']:g}", _pairs(r["heads"]),
                    _pairs(r["hidden"]), f"{r['flops_ratio']:.3f}", fmt_time(r["latency_s"]),
                    f"{r['latency_ratio']:.3f}", f"{r['latency_over_flops']:.3f}",
                    "PASS" if r["target_met"] else "MISS"])
    print(table(["model", "batch", "width", "heads (realised)", "hidden (realised)",
                 "FLOPs/full", "latency", "lat/full", "lat/FLOPs", "target"], out,
                align="lrrllrrrrl"))


def _curve_of(path, widths, order: bool) -> dict:
    """Test top-1 per width of the checkpoint at ``path``, optionally after reordering its
    heads and hidden units by importance on 256 training images."""
    from lapdtr.data import DataConfig, build_loader, digits_images, digits_split
    from lapdtr.data.sources import _load_digits, model_data_config
    from lapdtr.runtime.stages import load_model

    kw = dict(DIGITS_KW, num_classes=10, img_size=DIGITS_IMG)
    model = make_elastic(load_model(DIGITS_MODEL, path, kw))
    if order:
        cfg = model_data_config(model, DIGITS_IMG)
        calib = digits_split()[0][:256]
        x = digits_images(calib, DIGITS_IMG, in_chans=cfg["input_size"][0], mean=cfg["mean"],
                          std=cfg["std"])
        order_by_importance_(model, [(x, _load_digits()[1][torch.as_tensor(calib)])])
    test = build_loader(DataConfig(kind="digits", split="test"), model, img_size=DIGITS_IMG,
                        batch_size=256)
    return evaluate_widths(model, test, widths)


def _entry(label, res, widths, curve=None) -> dict:
    acc = curve if curve is not None else res["accuracy"]
    acc = {f"{w:g}": acc[f"{w:.6f}"] for w in widths}
    return {"label": label, "train_s": res.get("train_s"), "epochs": res.get("epochs"),
            "sandwich": res.get("sandwich"), "accuracy": acc,
            "loss_at_half_points": 100 * (acc["1"] - acc["0.5"]) if "0.5" in acc else None}


def accuracy_section(args, ckpt_dir: Path) -> dict:
    widths = WIDTHS
    common = dict(img_size=DIGITS_IMG, model_kwargs=DIGITS_KW, batch_size=args.batch_size,
                  eval_widths=widths, seed=args.seed)
    runs = []

    def train(label, path, **kw):
        print(f"  training {label} ...", flush=True)
        res = train_elastic_digits(DIGITS_MODEL, ckpt_dir / path, **common, **kw)
        print(f"    {res['train_s']:.1f} s, full-width top-1 {100 * res['test_top1']:.2f}%",
              flush=True)
        return res

    plain = train("plain", "plain.safetensors", epochs=args.plain_epochs, lr=args.lr,
                  sandwich=False)
    runs.append(_entry(f"plain ({args.plain_epochs} ep)", plain, widths))
    runs.append(_entry(f"plain ({args.plain_epochs} ep), reordered by importance", plain,
                       widths, _curve_of(plain["path"], widths, order=True)))
    ft_plain = train("plain continued", "plain-ft.safetensors", epochs=args.ft_epochs,
                     lr=args.ft_lr, sandwich=False, init_checkpoint=plain["path"])
    runs.append(_entry(f"plain + {args.ft_epochs} ep plain", ft_plain, widths))
    runs.append(_entry(f"plain + {args.ft_epochs} ep plain, reordered by importance", ft_plain,
                       widths, _curve_of(ft_plain["path"], widths, order=True)))
    elastic = train("elastic (sandwich)", "elastic.safetensors", epochs=args.ft_epochs,
                    lr=args.ft_lr, sandwich=True, order="importance", n_random=args.n_random,
                    init_checkpoint=plain["path"])
    runs.append(_entry(f"plain + {args.ft_epochs} ep sandwich (elastic)", elastic, widths))
    if args.scratch:
        scratch = train("sandwich from scratch", "scratch.safetensors",
                        epochs=args.plain_epochs, lr=args.lr, sandwich=True, order="importance",
                        n_random=args.n_random)
        runs.append(_entry(f"sandwich from scratch ({args.plain_epochs} ep)", scratch, widths))
    el = runs[4]
    plain_losses = [r["loss_at_half_points"] for r in runs[:4]]
    return {"model": DIGITS_MODEL, "model_kwargs": dict(DIGITS_KW, num_classes=10,
                                                         img_size=DIGITS_IMG),
            "img_size": DIGITS_IMG, "widths": widths, "batch_size": args.batch_size,
            "plain_epochs": args.plain_epochs, "lr": args.lr, "ft_epochs": args.ft_epochs,
            "ft_lr": args.ft_lr, "n_random": args.n_random, "seed": args.seed, "runs": runs,
            "elastic_loss_at_half_points": el["loss_at_half_points"],
            "plain_loss_at_half_points": plain_losses,
            "target_met": el["loss_at_half_points"] <= 100 * TARGET_LOSS_AT_HALF
            and min(plain_losses) > el["loss_at_half_points"]}


def print_accuracy(acc) -> None:
    ws = [f"{w:g}" for w in acc["widths"]]
    print(f"\n(b) digits test top-1 per width ({acc['model']} {acc['model_kwargs']}), heads "
          f"and hidden at the same ratio; loss at 50% = top-1(1.0) - top-1(0.5)")
    rows = [[r["label"], *(f"{100 * r['accuracy'][w]:.2f}" for w in ws),
             f"{r['loss_at_half_points']:.2f}",
             "-" if r["train_s"] is None or "reordered" in r["label"] else f"{r['train_s']:.0f}"]
            for r in acc["runs"]]
    print(table(["model", *(f"w={w}" for w in ws), "loss@0.5 (pts)", "train s"], rows,
                align="l" + "r" * (len(ws) + 2)))
    print(f"target (elastic loses <= {100 * TARGET_LOSS_AT_HALF:.0f} points at 50%, the plain "
          f"ones more): {'met' if acc['target_met'] else 'MISSED'} (elastic "
          f"{acc['elastic_loss_at_half_points']:.2f}, plain "
          f"{', '.join(f'{v:.2f}' for v in acc['plain_loss_at_half_points'])})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    part = ap.add_mutually_exclusive_group()
    part.add_argument("--latency-only", action="store_true", help="part (a) only")
    part.add_argument("--accuracy-only", action="store_true", help="part (b) only")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: batch 1 only, 3 repeats; 2 + 1 training epochs")
    ap.add_argument("--models", nargs="+", default=LATENCY_MODELS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per width at batch 1")
    ap.add_argument("--repeats-large", type=int, default=3,
                    help="timed runs per width at batches > 1 (default 3: keeps batch 32 short)")
    ap.add_argument("--plain-epochs", type=int, default=15)
    ap.add_argument("--ft-epochs", type=int, default=8,
                    help="epochs of the continuations (sandwich and plain)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of plain training")
    ap.add_argument("--ft-lr", type=float, default=5e-4,
                    help="learning rate of the continuations")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the latency part (default 1)")
    ap.add_argument("--n-random", dest="n_random", type=int, default=2,
                    help="random widths per sandwich step besides the largest and smallest")
    ap.add_argument("--scratch", action="store_true",
                    help="also train the sandwich from scratch for --plain-epochs")
    ap.add_argument("--checkpoints", default=None,
                    help="keep the trained checkpoints in DIR (default: a temporary directory)")
    ap.add_argument("--out", default="benchmarks/results/elastic.json",
                    help="the JSON file (or a directory: DIR/elastic.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.repeats = [1], 3
        args.plain_epochs, args.ft_epochs = 2, 1
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    report = {"benchmark": "elastic", "python": sys.version.split()[0],
              "torch": torch.__version__, "machine": platform.machine(),
              "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "load_average_at_start": load,
              "command": " ".join([Path(sys.argv[0]).name] + list(argv or sys.argv[1:]))}
    if not args.accuracy_only:
        print(f"(a) latency: {', '.join(args.models)} at batch {args.batches}", flush=True)
        rows = latency_section(args.models, args.batches, WIDTHS,
                               {b: (args.repeats if b == 1 else args.repeats_large)
                                for b in args.batches},
                               {b: (3 if b == 1 else 1) for b in args.batches})
        report["latency"] = {"widths": WIDTHS, "target_latency_over_flops":
                             TARGET_LAT_OVER_FLOPS, "rows": rows,
                             "passed": sum(r["target_met"] for r in rows if r["width"] < 1),
                             "checked": sum(1 for r in rows if r["width"] < 1)}
        print_latency(rows)
        print(f"{report['latency']['passed']}/{report['latency']['checked']} reduced-width rows "
              f"meet the target")
    if not args.latency_only:
        print(f"\n(b) accuracy: {DIGITS_MODEL} {DIGITS_KW} at {DIGITS_IMG} px on the digits",
              flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = Path(args.checkpoints) if args.checkpoints else Path(tmp)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            report["accuracy"] = accuracy_section(args, ckpt_dir)
        print_accuracy(report["accuracy"])
    write_report(report, args.out, "elastic.json", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
