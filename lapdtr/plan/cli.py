"""``lapdtr plan`` and ``lapdtr compare``: plan a model onto a device file, and chart the
partitioning strategies the way Tang & Stefanov do (maximum per-device energy normalized to one
device, for 2..K devices)."""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

from .cost import OBJECTIVES
from .idle import IdleRanksWarning

__all__ = ["add_plan_commands", "main", "cmd_plan", "cmd_compare", "compare_strategies",
           "COMPARE_STRATEGIES", "format_summarization"]

COMPARE_STRATEGIES = ("data", "horizontal", "sequential", "vertical")


def _load_devices(path):
    from ..profile.devices import load_devices

    return load_devices(path)


def _profile(args, widths=None):
    """Model instance, its units and its profile (cached by ``profile_model``)."""
    from ..models import create_model, units
    from ..profile import profile_model

    model = create_model(args.model, img_size=args.img_size)  # families built for one size
    prof = profile_model(model, img_size=args.img_size, batch_size=args.batch,
                         repeats=args.repeats, warmup=0, cache_dir=args.cache_dir,
                         widths=widths)
    return model, units(model, prof.img_size), prof


def _width_arg(text):
    """``--width``: ``auto`` or a ratio in (0, 1]."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--width {text!r}: allowed: 'auto' or a ratio in (0, 1]") from None


def _keep_arg(text):
    """``--keep``: a keep ratio in (0, 1] for every boundary that can be summarized (default 1)."""
    if text is None:
        return 1.0
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--keep {text!r}: allowed: a ratio in (0, 1] (1.0 keeps every token)") \
            from None


def _accuracy_arg(path):
    """``--accuracy FILE``: ``{width: accuracy}`` from JSON (``lapdtr elastic-curve``'s
    ``elastic_curve.json``, whose ``accuracy`` map it reads, or a plain mapping)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--accuracy {path}: no such file (allowed: a JSON file mapping width "
                         f"ratios to accuracies, e.g. lapdtr elastic-curve's elastic_curve.json)")
    data = json.loads(p.read_text())
    if isinstance(data, dict) and isinstance(data.get("accuracy"), dict):
        data = data["accuracy"]
    try:
        return {float(k): float(v) for k, v in data.items()}
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"--accuracy {path}: expected a JSON object of width -> accuracy "
                         f"(or one with an 'accuracy' object), got {str(data)[:80]}") from None


def _strategy_kwargs(strategy, model, unit_list) -> dict:
    from ..energy.analytical import estimate_inner_exchange_bytes, estimate_unit_windows

    if strategy == "data":
        return {"windows": estimate_unit_windows(model, unit_list)}
    if strategy in ("horizontal", "hybrid"):
        return {"inner_bytes": estimate_inner_exchange_bytes(model, unit_list)}
    return {}


def _default_objective(strategy: str) -> str:
    from .registry import get_planner

    objs = get_planner(strategy).objectives
    return "energy" if "energy" in objs else objs[0]


def _compress(names: list[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)} units)"


def format_plan(plan) -> str:
    from .._fmt import fmt_bytes, fmt_flops, fmt_time, table

    rows = []
    for s in plan.stages:
        nsh = sum(1 for sh in plan.shards if sh.rank == s.rank)
        rows.append([s.index, s.rank, s.device, _compress(s.units), nsh or ""])
    out = [f"plan: {plan.model} -> {len(plan.devices)} device(s), strategy {plan.strategy}, "
           f"objective {plan.objective}",
           table(["stage", "rank", "device", "units", "shards"], rows, "rrlll"), ""]
    prow = [[p.rank, p.device, f"{p.energy_j:.4g}", f"{p.compute_energy_j:.4g}",
             f"{p.comm_energy_j:.4g}", fmt_time(p.latency_s), fmt_bytes(p.memory_bytes),
             fmt_bytes(p.bytes_sent), fmt_bytes(p.bytes_received), fmt_flops(p.flops)]
            for p in plan.predictions]
    out.append(table(["rank", "device", "energy J", "compute J", "comm J", "busy", "memory",
                      "sent", "received", "flops"], prow, "rlrrrrrrrr"))
    m = plan.meta
    out.append(f"total {m['total_energy_j']:.4g} J/request, max per device "
               f"{m['max_device_energy_j']:.4g} J, end-to-end latency {fmt_time(m['latency_s'])}"
               f"{'' if m.get('exact', True) else _not_proven(m)}")
    return "\n".join(out)


def format_summarization(plan) -> str:
    """One line per cut boundary of a plan priced summarized (``meta['summarization']``)."""
    m = plan.meta.get("summarization")
    if not m:
        return ""
    lines = [f"boundaries priced summarized, wire {m['wire']} (downstream FLOPs as profiled):"]
    for unit, b in m["boundaries"].items():
        lines.append(f"  after {unit}: keep {b['keep']:g}, {b['wire']}, {b['bytes']} B "
                     f"(profiled {b['profiled_bytes']} B): {b['why']}")
    if not m["boundaries"]:
        lines.append("  (no stage boundary: one stage)")
    return "\n".join(lines)


def _not_proven(meta) -> str:
    if "gap" in meta and meta.get("lower_bound") is not None:
        return f" (not proven optimal: at most {meta['gap']:.3%} above the optimum, certified)"
    return " (not proven optimal)"


def cmd_plan(args) -> int:
    from .plot import plot_plan
    from .registry import create_plan, get_planner

    get_planner(args.strategy)  # unknown strategy: error before profiling
    width = _width_arg(getattr(args, "width", None))
    accuracy = _accuracy_arg(getattr(args, "accuracy", None))
    if accuracy is not None and width != "auto":
        raise ValueError("--accuracy is for --width auto (Algorithm 1 weighs it per width)")
    from .summarized import check_summarization, is_default

    keep, wire = check_summarization(_keep_arg(getattr(args, "keep", None)),
                                     getattr(args, "wire", None) or "fp32", args.strategy)
    summarize = not is_default(keep, wire)
    if summarize and width == "auto":
        raise ValueError("--keep / --wire price one plan's boundaries; with --width auto "
                         "(Algorithm 1 over widths) they are not supported; allowed: a fixed "
                         "--width, or no --width")
    devices = _load_devices(args.devices)
    model, unit_list, prof = _profile(args, widths=None if width in (None, 1.0) else "all")
    if width not in (None, 1.0) and len(prof.widths) == 1:
        from ..elastic.api import FAMILIES

        raise ValueError(f"--width {args.width}: {args.model!r} ({prof.family}) has no elastic "
                         f"layers; allowed: 1.0 (elastic families: {sorted(FAMILIES)})")
    objective = args.objective or _default_objective(args.strategy)
    kw = _strategy_kwargs(args.strategy, model, unit_list)
    kw.update(strategy=args.strategy, objective=objective,
              latency_target_s=args.latency_target, horizon_requests=args.horizon)
    if summarize:
        from .summarized import plan_summarized
        from .widths import stamp_widths

        if width not in (None, 1.0):
            from ..elastic import count_for

            h = len(prof.widths)
            prof = prof.at_width(count_for(width, h) / h)
        plan = plan_summarized(prof, devices, model, unit_list, keep=keep, wire=wire, **kw)
        if width not in (None, 1.0):
            stamp_widths(plan, prof.width)
            plan.meta["width_priced"] = "measured per unit at this width (profile_model widths)"
    elif width == "auto":
        from .widths import plan_widths

        plan = plan_widths(prof, devices, accuracy=accuracy, **kw)
    elif width not in (None, 1.0):
        from ..elastic import count_for
        from .widths import plan_at_width

        h = len(prof.widths)  # the k/h ratios of the attention with the fewest heads
        plan = plan_at_width(prof, devices, count_for(width, h) / h, **kw)
    else:
        plan = create_plan(prof, devices, **kw)
    print(format_plan(plan))
    sel = plan.meta.get("width_selection")
    if "width" in plan.meta:
        print(f"width {plan.meta['width']:.4g} on every stage (priced on the profile at that "
              f"width)" + ("" if not sel else
                           f"; chosen by Algorithm 1 among {[c['width'] for c in sel['candidates']]}"
                           f", accuracy: {sel['accuracy_source']}"
                           + (f"; no plan at {list(sel['refused'])}" if sel["refused"] else "")))
    if summarize:
        print(format_summarization(plan))
    if args.out:
        out = Path(args.out)
        plan.save(out / "plan.json")
        plot_plan(plan, [u.name for u in prof.units], out / "plan.png")
        print(f"wrote {out / 'plan.json'} and {out / 'plan.png'}")
    return 0


def _devices_for(devices, k: int):
    """The first ``k`` devices of the file; if it lists fewer, copies of them in turn."""
    out = []
    for j in range(k):
        d = devices[j % len(devices)]
        if j >= len(devices):
            d = dataclasses.replace(d, name=f"{d.name}-copy{j // len(devices)}", links=list(d.links))
        out.append(d)
    if k > len(devices):  # copies talk over the first device's links
        from ..profile.types import LinkProfile

        ref = next((l for dev in devices for l in dev.links), None)
        for d in out:
            if ref is not None:
                d.links = [LinkProfile("*", ref.bytes_per_s, ref.latency_s)]
    return out


def compare_strategies(prof, devices, *, max_devices: int, strategies=COMPARE_STRATEGIES,
                       strategy_kwargs=None) -> dict:
    """Maximum per-device energy per strategy for 1..K devices, normalized to one device (the
    whole model on the first device). A strategy that cannot place the model on k devices (memory,
    energy) gets ``None`` and its reason."""
    from .registry import create_plan

    if max_devices < 1:
        raise ValueError(f"max_devices must be >= 1, got {max_devices}")
    strategy_kwargs = strategy_kwargs or {}
    base = create_plan(prof, _devices_for(devices, 1), strategy="sequential",
                       objective="max-device-energy").meta["max_device_energy_j"]
    ks = list(range(1, max_devices + 1))
    res = {"model": prof.model, "num_devices": ks, "single_device_energy_j": base,
           "energy_label": "modelled",
           "energy_model": "Tang & Stefanov analytical model: unit FLOPs and bytes from the "
                           "profile, device GFLOP/s, power and J/byte from the device file",
           "devices": [d.name for d in _devices_for(devices, max_devices)],
           "normalized": {}, "max_device_energy_j": {}, "errors": {}}
    for s in strategies:
        objective = "max-device-energy" if s in ("sequential", "vertical", "lapdtr") else \
            _default_objective(s)
        vals, absolute = [], []
        for k in ks:
            try:
                with warnings.catch_warnings():  # the sweep reports energies, not idle ranks
                    warnings.simplefilter("ignore", IdleRanksWarning)
                    p = create_plan(prof, _devices_for(devices, k), strategy=s,
                                    objective=objective, **strategy_kwargs.get(s, {}))
                e = p.meta["max_device_energy_j"]
                vals.append(e / base)
                absolute.append(e)
            except ValueError as err:
                vals.append(None)
                absolute.append(None)
                res["errors"].setdefault(s, {})[str(k)] = str(err)
        res["normalized"][s] = vals
        res["max_device_energy_j"][s] = absolute
    return res


def cmd_compare(args) -> int:
    from .plot import plot_compare
    from .registry import get_planner

    strategies = args.strategies.split(",") if args.strategies else list(COMPARE_STRATEGIES)
    for s in strategies:
        get_planner(s)
    devices = _load_devices(args.devices)
    model, unit_list, prof = _profile(args)
    kw = {s: _strategy_kwargs(s, model, unit_list) for s in strategies}
    res = compare_strategies(prof, devices, max_devices=args.max_devices, strategies=strategies,
                             strategy_kwargs=kw)
    head = "devices " + " ".join(f"{s:>11}" for s in strategies)
    print(f"{prof.model}: max per-device energy / one device ({res['single_device_energy_j']:.4g} "
          f"J/request), modelled ({res['energy_model']})")
    print(head)
    for j, k in enumerate(res["num_devices"]):
        cells = [res["normalized"][s][j] for s in strategies]
        print(f"{k:>7} " + " ".join(f"{c:>11.3f}" if c is not None else f"{'-':>11}"
                                    for c in cells))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(res, indent=2))
        plot_compare(res, out / "compare.png")
        print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return 0


def _common(p):
    p.add_argument("--model", required=True, help="a supported timm model name")
    p.add_argument("--devices", required=True, help="device file (YAML), list order = ranks")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the profile (default 1)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per unit when profiling")
    p.add_argument("--cache-dir", default=None, help="profile cache (default ~/.cache/lapdtr)")
    p.add_argument("--out", default=None, help="output directory")


def add_plan_commands(subparsers) -> None:
    """Register ``plan`` and ``compare`` on an argparse subparsers object."""
    from .registry import list_planners

    p = subparsers.add_parser("plan", help="plan a model onto devices; table, plan.json, plan.png")
    _common(p)
    p.add_argument("--strategy", default="lapdtr", choices=list_planners())
    p.add_argument("--objective", default=None, choices=list(OBJECTIVES),
                   help="default: energy (or the strategy's own criterion)")
    p.add_argument("--latency-target", type=float, default=None, help="seconds per request")
    p.add_argument("--horizon", type=int, default=1,
                   help="requests each device's remaining energy must cover")
    p.add_argument("--width", default=None,
                   help="elastic width of every stage: a ratio in (0, 1] (rounded to a head "
                        "count), or 'auto': Algorithm 1 picks among the model's widths")
    p.add_argument("--accuracy", default=None,
                   help="with --width auto: JSON of width -> accuracy (lapdtr elastic-curve)")
    p.add_argument("--keep", default=None,
                   help="price stage boundaries summarized: keep this ratio in (0, 1] of the "
                        "patch tokens after units with an attention source (default 1.0)")
    p.add_argument("--wire", default=None,
                   help="wire format of stage boundaries: fp32 (default), fp16, bf16 or int8")
    p.set_defaults(func=cmd_plan)
    c = subparsers.add_parser("compare", help="Tang & Stefanov chart: max per-device energy per "
                                              "strategy for 1..K devices")
    _common(c)
    c.add_argument("--max-devices", type=int, required=True)
    c.add_argument("--strategies", default=None,
                   help=f"comma-separated (default: {','.join(COMPARE_STRATEGIES)})")
    c.set_defaults(func=cmd_compare)


def main(argv=None) -> int:
    """Run these commands standalone: the ``lapdtr`` command with the same arguments."""
    from ..cli import main as lapdtr_main

    return lapdtr_main(argv)


if __name__ == "__main__":
    sys.exit(main())
