"""The ``lapdtr`` command: ``models``, ``profile``, ``plan``, ``compare``, ``run``, ``demo``,
``launch``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._fmt import fmt_bytes, fmt_count, fmt_flops, fmt_time, table


def _cmd_models(args) -> int:
    from .models import list_adapters, list_supported_models

    supported = list_supported_models(progress=sys.stderr.isatty())
    total = sum(len(v) for v in supported.values())
    print(f"{total} timm model names in {len(supported)} families; a name is supported when an "
          f"adapter handles the class it builds (checked on the meta device)")
    for a in list_adapters():
        names = supported[a.name]
        print(f"{a.name:14s} {a.description}")
        print(f"{'':14s} classes: {', '.join(t.__name__ for t in a.model_types)}")
        if args.all:
            print(f"{'':14s} models ({len(names)}): {', '.join(names)}")
        else:
            shown = [n for n in a.examples if n in names]
            shown += [n for n in names if n not in shown][:max(0, 4 - len(shown))]
            more = f" ... (+{len(names) - len(shown)}, --all lists them)" if len(names) > len(shown) else ""
            print(f"{'':14s} models ({len(names)}): {', '.join(shown)}{more}")
    return 0


def _cmd_profile(args) -> int:
    from .profile import measure_device, profile_model

    widths = None
    if args.widths is not None:
        try:
            widths = "all" if args.widths == "all" else [float(w) for w in args.widths.split(",")]
        except ValueError:
            raise ValueError(f"--widths {args.widths!r}: allowed: 'all' or comma-separated "
                             f"ratios in (0, 1], e.g. 1,0.5") from None
    prof = profile_model(args.model, img_size=args.img_size, batch_size=args.batch,
                         dtype=args.dtype, repeats=args.repeats, use_cache=not args.no_cache,
                         cache_dir=args.cache_dir, progress=sys.stderr.isatty(), widths=widths)
    rows = [[u.index, u.name, u.kind, "x".join(map(str, u.out_shape)), fmt_flops(u.flops),
             fmt_count(u.num_params), fmt_bytes(u.param_bytes), fmt_bytes(u.out_bytes),
             fmt_bytes(u.peak_bytes), fmt_time(u.latency_s)] for u in prof.units]
    rows.append(["", "total", "", "", fmt_flops(prof.total_flops),
                 fmt_count(sum(u.num_params for u in prof.units)),
                 fmt_bytes(sum(u.param_bytes for u in prof.units)), "", "",
                 fmt_time(prof.total_latency_s)])
    print(f"{prof.model} ({prof.family}), input {prof.batch_size}x3x{prof.img_size}x{prof.img_size}"
          f" {prof.dtype} on {prof.device}; latency = median of {args.repeats} runs (measured)")
    print(table(["#", "unit", "kind", "output", "FLOPs", "params", "param bytes", "act bytes",
                 "peak bytes", "latency"], rows, align="rllrrrrrrr"))
    if len(prof.widths) > 1:
        wrows = [[f"{w:.4g}", fmt_flops(prof.at_width(w).total_flops),
                  f"{prof.at_width(w).total_flops / prof.total_flops:.3f}",
                  fmt_time(prof.at_width(w).total_latency_s),
                  f"{prof.at_width(w).total_latency_s / prof.total_latency_s:.3f}"]
                 for w in prof.widths]
        print(f"\nelastic widths (FLOPs by torch.utils.flop_counter, latency measured):")
        print(table(["width", "FLOPs", "of full", "latency", "of full"], wrows, align="rrrrr"))
    if args.out:
        out = Path(args.out)
        prof.save(out / "profile.json")
        dev = measure_device()
        dev.save(out / "device.json")
        print(f"wrote {out / 'profile.json'} and {out / 'device.json'} "
              f"(this device: {dev.gflops:.1f} GFLOP/s measured, "
              f"{fmt_bytes(dev.memory_bytes)} available)")
    return 0


def _cmd_launch(args) -> int:
    from .runtime.launcher import launch

    if not args.target:
        raise ValueError("name the script to run per rank (lapdtr launch --nproc N script.py "
                         "ARGS, or -m module ARGS)")
    if args.module:
        cmd = ["-m", args.target, *args.args]
    else:
        if not Path(args.target).is_file():
            raise ValueError(f"script {args.target} does not exist (cwd {Path.cwd()})")
        cmd = [sys.executable, args.target, *args.args]
    return launch(cmd, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                  master=args.master, driver=args.driver, grace_s=args.grace_s,
                  log_dir=args.log_dir)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="lapdtr", description=__doc__)
    p.add_argument("--version", action="version", version=f"lapdtr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("models", help="list the supported model families and models")
    m.add_argument("--all", action="store_true", help="list every model name")
    m.set_defaults(func=_cmd_models)

    pr = sub.add_parser("profile", help="per-unit FLOPs, bytes, memory and latency of a model")
    pr.add_argument("--model", required=True, help="a supported timm model name (lapdtr models)")
    pr.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    pr.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    pr.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    pr.add_argument("--repeats", type=int, default=5, help="timed runs per unit (median)")
    pr.add_argument("--out", default=None, help="write DIR/profile.json and DIR/device.json")
    pr.add_argument("--cache-dir", default=None, help="profile cache (default ~/.cache/lapdtr)")
    pr.add_argument("--no-cache", action="store_true", help="always measure afresh")
    pr.add_argument("--widths", default=None,
                    help="also at elastic widths: 'all' or comma-separated ratios (ViT families)")
    pr.set_defaults(func=_cmd_profile)

    la = sub.add_parser(
        "launch", help="run a script on N ranks that survive each other (torchrun-like)",
        description="Run python SCRIPT ARGS (or python -m MODULE ARGS) on --nproc local ranks "
                    "with torchrun's environment; node 0 hosts the TCPStore on MASTER_PORT, so it "
                    "outlives every rank. A rank dying is logged and the others keep running; the "
                    "exit status is the driver's (rank 0 unless --driver).")
    la.add_argument("--nproc", "--nproc-per-node", dest="nproc", type=int, required=True,
                    help="ranks on this node")
    la.add_argument("--nnodes", type=int, default=1, help="nodes (default 1)")
    la.add_argument("--node-rank", dest="node_rank", type=int, default=0,
                    help="this node's rank, 0..nnodes-1 (default 0)")
    la.add_argument("--master", default=None, help="HOST:PORT of node 0's store (needed with "
                    "--nnodes > 1; default 127.0.0.1 and a free port)")
    la.add_argument("--driver", type=int, default=None,
                    help="global rank whose exit ends the run (default $LAPDTR_DRIVER, else 0)")
    la.add_argument("--grace-s", dest="grace_s", type=float, default=10.0,
                    help="seconds the other ranks get after the driver exits (default 10)")
    la.add_argument("--log-dir", dest="log_dir", default=None,
                    help="write each rank's output to DIR/rank{N}.log")
    la.add_argument("-m", "--module", action="store_true",
                    help="run the target as a module (python -m)")
    la.add_argument("target", nargs="?", metavar="script.py", help="the script (or module)")
    la.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    la.set_defaults(func=_cmd_launch)

    for mod in ("lapdtr.plan.cli", "lapdtr.runtime.cli", "lapdtr.elastic.cli"):
        _register(sub, mod)  # plan, compare / run, demo
    return p


def _register(sub, module: str) -> None:
    import importlib

    mod = importlib.import_module(module)
    for name in dir(mod):
        if name.startswith("add_") and name.endswith("_commands"):
            getattr(mod, name)(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # user errors: say what is wrong, no traceback
        print(f"lapdtr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
