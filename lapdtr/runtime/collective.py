"""``tensor`` and ``ensemble`` modes inside a run: every rank steps through the requests in lock
step and calls :func:`lapdtr.runtime.tensor.run_tensor` or
:func:`lapdtr.runtime.ensemble.run_ensemble`, rank 0 feeding inputs and keeping the outputs.

These modes are built on collectives, which no process group survives a member's death, so they
have no re-planning: a dead rank ends the run with an error (use ``pipeline`` mode for that).
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..profile.types import DeviceProfile
from .config import RunConfig
from .control import (RendezvousError, StoreView, client, publish_abort, wait_all, wait_key)
from .report import RankReport, RunReport, percentile
from .stages import RankModel

__all__ = ["ensemble_model_names", "run_collective_mode", "run_collective_rank"]


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
    from .prepare import request_input

    report = w.report
    lat = []
    t_start = time.time()
    for req in range(cfg.num_requests):
        x = (request_input(cfg.seed, req, cfg.batch_size, img_size).to(w.device) if rank == 0
             else None)
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
        w.meter.record_compute(dt)
        if rank == 0:
            co_outputs[req] = y.cpu()
            lat.append(dt)
    return report, lat, time.time() - t_start


class ModeWorker:
    """A rank of a tensor or ensemble run: the whole (sub-)model, a meter, a report."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, setup: dict,
                 device: torch.device):
        from ..energy import create_meter_for_device

        self.device, self.t0 = device, setup["t0"]
        name = cfg.model if cfg.mode == "tensor" else ensemble_model_names(cfg, world_size)[rank]
        rm = RankModel(name, setup["checkpoints"][rank], model_kwargs=cfg.model_kwargs,
                       img_size=setup["img_size"], device=device)
        rm.load_units([u.name for u in rm.units])
        self.model = rm.host
        self.devices = [DeviceProfile.from_dict(d) for d in setup["devices"]]
        dev = self.devices[rank]
        self.report = RankReport(rank=rank, device=dev.name, units=[u.name for u in rm.units],
                                 param_bytes=rm.param_bytes(), weights_loaded_bytes=rm.param_bytes())
        self.meter = create_meter_for_device(dev)
        self.report.energy_label = self.meter.label
        self.proportions = self.weights = None
        if cfg.mode == "tensor":
            from .tensor import proportions_from_devices

            given = setup.get("proportions")  # the config's, or its plan's channel shares
            self.proportions = list(given) if given is not None else \
                proportions_from_devices(self.devices)
        elif cfg.aggregator == "weighted":
            from .ensemble import weights_from_devices

            self.weights = weights_from_devices(self.devices)


def run_collective_rank(cfg: RunConfig, rank: int, world_size: int, host: str, port: int,
                        prefix: str) -> RunReport | None:
    """One rank of a tensor or ensemble run (rank 0 prepares, feeds and reports)."""
    from .prepare import prepare
    from .session import device_for, resolve_backend

    st = StoreView(client(host, port, max(60.0, cfg.join_timeout_s * 2)), prefix)
    try:
        st.set(("join", rank), repr(time.time()))
        if rank == 0:
            if not wait_all(st, "join", world_size, cfg.join_timeout_s):
                missing = [r for r in range(world_size) if not st.has("join", r)]
                raise RendezvousError(f"rank(s) {missing} did not join within "
                                      f"{cfg.join_timeout_s} s (world_size={world_size})")
            setup = prepare(cfg, world_size)
            st.set("state", json.dumps({"gen": 0}))
            st.set("setup", json.dumps(setup))
        else:
            wait_key(st, ("setup",), None)
            setup = st.get_json("setup")
        backend = resolve_backend(cfg)
        dist.init_process_group(backend, store=dist.PrefixStore(prefix + "pg", st.s), rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=max(60.0, cfg.join_timeout_s)))
        try:
            return _collective_rank(cfg, rank, world_size, st, setup, device_for(backend, rank))
        finally:
            dist.destroy_process_group()
    except BaseException as e:
        publish_abort(st, rank, f"rank {rank}: {type(e).__name__}: {e}")
        raise


def _collective_rank(cfg, rank, world_size, st: StoreView, setup, device):
    w = ModeWorker(cfg, rank, world_size, setup, device)
    outputs: dict[int, torch.Tensor] = {}
    rep, lat, wall = run_collective_mode(w, outputs, cfg, rank, world_size, setup["img_size"])
    durations = [t1 - t0 for *_, t0, t1 in rep.timeline]
    rep.stage_p50_s, rep.stage_p95_s = percentile(durations, 50), percentile(durations, 95)
    rep.items_per_s = rep.items / wall if wall > 0 else 0.0
    if cfg.mode == "tensor":
        from .tensor import get_tensor_comm_stats

        rep.bytes_sent = int(get_tensor_comm_stats(w.model)["bytes_sent"])
    rep.energy_j, rep.remaining_j = w.meter.energy_j(), w.meter.remaining_j()
    st.set(("report", rank), json.dumps(rep.__dict__))
    if rank != 0:
        return None
    ranks = [rep]
    for r in range(1, world_size):
        wait_key(st, ("report", r), cfg.join_timeout_s)
        ranks.append(RankReport(**st.get_json("report", r)))
    labels = {k.energy_label for k in ranks if k.energy_label != "none"}
    report = RunReport(
        model=cfg.model, mode=cfg.mode, world_size=world_size, requests=cfg.num_requests,
        batch_size=cfg.batch_size, micro_batches=1, wall_s=wall,
        throughput_rps=len(lat) / wall if wall > 0 else 0.0,
        latency_p50_s=percentile(lat, 50), latency_p95_s=percentile(lat, 95),
        latency_mean_s=sum(lat) / len(lat) if lat else 0.0,
        bytes_sent=sum(k.bytes_sent for k in ranks), bytes_received=0,
        energy_j=sum(k.energy_j for k in ranks),
        energy_label=(labels.pop() if len(labels) == 1 else ("mixed" if labels else "none")),
        compute_s=sum(k.compute_s for k in ranks), comm_s=0.0, completed=len(lat),
        duplicates=0, lost=cfg.num_requests - len(lat), ranks=ranks,
        meta={"checkpoints": setup["checkpoints"], "img_size": setup["img_size"],
              "backend": dist.get_backend(), "torch": torch.__version__,
              "proportions": w.proportions, "aggregator": cfg.aggregator,
              "note": "compute_s includes the collectives of tensor/ensemble mode"})
    if cfg.save_outputs:
        from safetensors.torch import save_file

        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({f"request{r}": y.contiguous() for r, y in outputs.items()},
                  str(out / "outputs.safetensors"))
    return report
