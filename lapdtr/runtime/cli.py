"""``lapdtr run`` and ``lapdtr demo``: distributed inference on local ranks.

``add_runtime_commands(subparsers)`` registers both on the ``lapdtr`` command; ``main(argv)``
runs them standalone (``python -m lapdtr.runtime.cli demo``).
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["add_runtime_commands", "main", "demo_config_path"]


def demo_config_path() -> Path:
    """``configs/demo.yaml``, installed as ``lapdtr.configs`` (the embedded default of
    ``lapdtr demo``)."""
    from importlib.resources import files

    return Path(str(files("lapdtr.configs") / "demo.yaml"))


def _overrides(args) -> dict:
    keys = ("out", "requests", "world_size", "checkpoint", "micro_batches", "batch_size")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _cmd_run(args) -> int:
    from .config import load_run_config
    from .launch import run

    cfg = load_run_config(args.config, **_overrides(args))
    if args.progress:
        cfg.progress = True
    run(cfg, echo=True)
    print(f"\nreport, plan and plots in {cfg.out}/")
    return 0


def _cmd_demo(args) -> int:
    from .config import load_run_config
    from .launch import run

    path = demo_config_path()
    if not path.exists():
        raise ValueError(f"the demo recipe {path} is missing from this lapdtr install; "
                         "reinstall lapdtr (pip install -e . from a checkout)")
    cfg = load_run_config(path, **_overrides(args))
    if cfg.devices is not None and not Path(cfg.devices).is_absolute():
        cfg.devices = str(path.parents[1] / cfg.devices)
    if args.no_plots:
        cfg.plots = False
    print(f"lapdtr demo: {cfg.model} on {cfg.world_size} local CPU ranks "
          f"({cfg.devices}), {cfg.num_requests} requests; weights: "
          f"{cfg.checkpoint or f'random (seed {cfg.seed})'}")
    run(cfg, echo=True)
    print(f"\nreport.json, plan.json, timeline.png and energy.png in {cfg.out}/")
    return 0


def add_runtime_commands(subparsers) -> None:
    """Register ``run`` and ``demo`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("run", help="distributed inference on local ranks from a YAML config")
    p.add_argument("--config", required=True, help="run config (configs/*.yaml)")
    p.add_argument("--out", help="output directory (overrides the config's out)")
    p.add_argument("--requests", type=int)
    p.add_argument("--world-size", dest="world_size", type=int)
    p.add_argument("--micro-batches", dest="micro_batches", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--checkpoint", help="safetensors (or torch weights-only) checkpoint")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_cmd_run)

    d = subparsers.add_parser(
        "demo", help="deit_tiny on 3 simulated battery devices; one drains mid-run")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--checkpoint", help="weights for deit_tiny_patch16_224 (default: random)")
    d.add_argument("--requests", type=int)
    d.add_argument("--no-plots", action="store_true")
    d.set_defaults(func=_cmd_demo)


def main(argv=None) -> int:
    """Run these commands standalone: the ``lapdtr`` command with the same arguments."""
    from ..cli import main as lapdtr_main

    return lapdtr_main(argv)


if __name__ == "__main__":
    sys.exit(main())
