"""``tensor`` and ``ensemble`` modes inside a run: every rank steps through the requests in lock
step and calls :func:`lapdtr.runtime.tensor.run_tensor` or
:func:`lapdtr.runtime.ensemble.run_ensemble`, rank 0 feeding inputs and keeping the outputs.

These modes are built on collectives, which no process group survives a member's death, so they
have no re-planning: a dead rank ends the run with an error (use ``pipeline`` mode for that).
"""
from __future__ import annotations

import time

import torch

from .config import RunConfig
from .report import RankReport

__all__ = ["ensemble_model_names", "run_collective_mode"]


def ensemble_model_names(cfg: RunConfig, world_size: int) -> list[str]:
    """The model each rank runs in ensemble mode (``ensemble_models``, or ``model`` everywhere)."""
    names = cfg.ensemble_models or [cfg.model]
    if len(names) not in (1, world_size):
        raise ValueError(f"ensemble_models: {len(names)} models for {world_size} ranks; give one, "
                         f"or one per rank")
    return [names[0]] * world_size if len(names) == 1 else list(names)


def run_collective_mode(w, co_outputs: dict, cfg: RunConfig, rank: int, world_size: int,
                        img_size: int) -> tuple[RankReport, list[float], float]:
    """Run every request in ``cfg.mode``; returns this rank's report, the per-request latencies
    (rank 0) and the wall time. ``w`` is the rank's ``_ModeWorker``."""
    from .pipeline import request_input

    report = w.report
    lat = []
    t_start = time.time()
    for req in range(cfg.requests):
        x = request_input(cfg, req, img_size).to(w.device) if rank == 0 else None
        t0 = time.time()
        c0 = time.perf_counter()
        if cfg.mode == "tensor":
            from .tensor import run_tensor

            y = run_tensor(w.model, x, proportions=w.proportions, rank=rank,
                           world_size=world_size, src=0)
        else:
            from .ensemble import run_ensemble

            y = run_ensemble(w.model, x, aggregator=cfg.aggregator, rank=rank,
                             world_size=world_size, weights=w.weights, dst=0, src=0)
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)
        dt = time.perf_counter() - c0
        report.items += 1
        report.compute_s += dt
        report.timeline.append([req, 0, 0, t0 - w.t0, t0 + dt - w.t0])
        if w.meter is not None and hasattr(w.meter, "record_compute"):
            w.meter.record_compute(dt)
        if rank == 0:
            co_outputs[req] = y.cpu()
            lat.append(dt)
    return report, lat, time.time() - t_start
