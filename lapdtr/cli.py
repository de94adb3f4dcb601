"""The ``lapdtr`` command: ``models``, ``profile``, ``plan``, ``compare``, ``run``, ``demo``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._fmt import fmt_bytes, fmt_count, fmt_flops, fmt_time, table


def _cmd_models(args) -> int:
    from .models import list_adapters, list_supported_models

    supported = list_supported_models()
    for a in list_adapters():
        names = supported[a.name]
        print(f"{a.name:14s} {a.description}")
        print(f"{'':14s} patterns: {', '.join(a.patterns)}")
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

    prof = profile_model(args.model, img_size=args.img_size, batch_size=args.batch,
                         dtype=args.dtype, repeats=args.repeats, use_cache=not args.no_cache,
                         cache_dir=args.cache_dir, progress=sys.stderr.isatty())
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
    if args.out:
        out = Path(args.out)
        prof.save(out / "profile.json")
        dev = measure_device()
        dev.save(out / "device.json")
        print(f"wrote {out / 'profile.json'} and {out / 'device.json'} "
              f"(this device: {dev.gflops:.1f} GFLOP/s measured, "
              f"{fmt_bytes(dev.memory_bytes)} available)")
    return 0


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
    pr.set_defaults(func=_cmd_profile)

    for mod in ("lapdtr.plan.cli", "lapdtr.runtime.cli"):
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
