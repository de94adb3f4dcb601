"""Launch a run: spawn local ranks (``run``) or join a torchrun job (``run_torchrun``).

Either way the control plane is a ``TCPStore``: in a local run the launching process hosts it (so
it outlives any rank), under torchrun it is the agent's store (``MASTER_ADDR``/``MASTER_PORT``).
Rank 0 writes ``report.json``, ``config.json``, ``plan.json``, and the plots into ``cfg.out``.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

from .config import RunConfig
from .report import RunReport, format_report, plot_energy, plot_timeline

__all__ = ["run", "run_torchrun", "write_outputs"]


def _entry(rank: int, cfg_dict: dict, world_size: int, host: str, port: int, prefix: str,
           init_fn=None) -> None:
    from .session import run_rank

    if init_fn is not None:
        init_fn(rank)
    from .transport import exit_now_if_stuck

    cfg = RunConfig.from_dict(cfg_dict)
    report = run_rank(cfg, rank, world_size, host, port, prefix)
    if report is not None:
        write_outputs(cfg, report, echo=False)
    exit_now_if_stuck(0)


def write_outputs(cfg: RunConfig, report: RunReport, *, echo: bool = True) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report.save(out / "report.json")
    with open(out / "config.json", "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    if cfg.plots:
        plot_timeline(report, out / "timeline.png")
        if report.energy_label != "none":
            plot_energy(report, out / "energy.png")
    if echo:
        print(format_report(report))
    return out


def run(cfg: RunConfig, *, echo: bool = False, timeout_s: float | None = None,
        init_fn=None) -> RunReport:
    """Spawn ``cfg.world_size`` local ranks, run ``cfg``, and return rank 0's ``RunReport``.

    ``init_fn(rank)``, a picklable module-level function, runs first in every rank process
    (instrumentation, or patching in a planner under test).
    A rank that dies from an injected fault does not fail the run; rank 0 failing does, with
    its error message (which names the rank, key or file at fault): ``ValueError`` for bad input
    (config, plan, checkpoint), ``RendezvousError`` for a rank that never joined.
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    if report_path.exists():
        report_path.unlink()
    host = "127.0.0.1"
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    prefix = f"lapdtr/{os.getpid()}-{time.time_ns()}/"
    ctx = mp.start_processes(_entry, args=(cfg.to_dict(), cfg.world_size, host, store.port, prefix, init_fn),
                             nprocs=cfg.world_size, join=False, start_method="spawn")
    procs = ctx.processes
    t0 = time.time()
    try:
        while procs[0].is_alive():
            procs[0].join(0.05)
            if timeout_s is not None and time.time() - t0 > timeout_s:
                raise TimeoutError(f"run did not finish within {timeout_s} s")
            if store.check([prefix + "abort"]):
                procs[0].join(5.0)
                break
        if procs[0].exitcode != 0 or not report_path.exists():
            key = prefix + "abort"
            msg = store.get(key).decode() if store.check([key]) else (
                f"rank 0 exited with code {procs[0].exitcode}")
            raise _error_from(msg)
        for p in procs[1:]:
            p.join(10.0)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5.0)
            if p.is_alive():
                p.kill()
    report = RunReport.load(report_path)
    if echo:
        print(format_report(report))
    return report


def _error_from(msg: str) -> Exception:
    """The exception a rank reported (``rank N: Type: message``): user errors stay
    ``ValueError``, rendezvous failures ``RendezvousError``, anything else ``RuntimeError``."""
    from .control import RendezvousError

    kind = msg.split(": ", 2)[1] if msg.count(": ") >= 2 else ""
    return {"ValueError": ValueError, "RendezvousError": RendezvousError}.get(kind, RuntimeError)(msg)


def job_from_env(hint: str):
    """``(rank, world_size, host, port, server)`` of a job launched by torchrun or
    ``lapdtr launch`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). Where no
    launcher hosts the store (``TORCHELASTIC_USE_AGENT_STORE`` / ``LAPDTR_STORE_HOSTED``), rank 0
    hosts it and ``server`` holds it (keep it alive for the job); else ``server`` is ``None``."""
    import torch.distributed as dist

    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except KeyError as e:
        raise ValueError(f"environment variable {e.args[0]} is not set: {hint}") from None
    hosted = (os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
              or os.environ.get("LAPDTR_STORE_HOSTED") == "1")
    server = None
    if not hosted and rank == 0:
        server = dist.TCPStore(host, port, is_master=True, wait_for_workers=False)
    host = "127.0.0.1" if host == "localhost" else socket.gethostbyname(host)
    return rank, world_size, host, port, server


def run_torchrun(cfg: RunConfig) -> RunReport | None:
    """One rank of a torchrun job (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    from .session import run_rank

    rank, world_size, host, port, server = job_from_env(
        "run under torchrun (torchrun --nproc_per_node N infer/run.py --config ...)")
    if cfg.world_size != world_size:
        cfg.world_size = world_size
        cfg.validate()
    if cfg.resume is None:  # a job torchrun may restart resumes from its journal
        cfg.resume = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt > 0 and cfg.faults:  # the fault happened; the restarted workers run without it
        if rank == 0:
            print(f"lapdtr: restart {attempt}: the config's injected faults fired in the first "
                  "attempt and are not injected again", file=sys.stderr)
        cfg.faults = []
    prefix = (f"lapdtr/{os.environ.get('TORCHELASTIC_RUN_ID', 'env')}/"
              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
    report = run_rank(cfg, rank, world_size, host, port, prefix)
    if report is not None:
        write_outputs(cfg, report, echo=True)
    del server
    return report


def main_torchrun(argv=None) -> int:
    """``infer/run.py``: ``--config PATH`` plus ``--key value`` overrides of the config."""
    import argparse

    from .config import load_run_config

    p = argparse.ArgumentParser(description="lapdtr distributed inference (one torchrun rank)")
    p.add_argument("--config", required=True)
    p.add_argument("--out")
    p.add_argument("--requests", type=int)
    args = p.parse_args(argv)
    from .transport import exit_now_if_stuck

    cfg = load_run_config(args.config, out=args.out, requests=args.requests)
    run_torchrun(cfg)
    sys.stdout.flush()
    exit_now_if_stuck(0)
    return 0
