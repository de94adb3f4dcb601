"""The report of a pipeline run, assembled on the coordinator from its own record and every
other rank's (``report/<rank>`` on the store; the last telemetry of a rank that died)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from .report import RankReport, RunReport, percentile

__all__ = ["pipeline_report", "save_outputs"]


def _failed_rank(r: int, t: dict) -> RankReport:
    return RankReport(rank=r, device=t.get("device", f"rank{r}"), status="failed",
                      units=t.get("units", []), items=t.get("items", 0),
                      compute_s=t.get("compute_s", 0.0), bytes_sent=t.get("bytes_sent", 0),
                      bytes_received=t.get("bytes_received", 0), energy_j=t.get("energy_j", 0.0),
                      remaining_j=t.get("remaining_j"), drained_j=t.get("drained_j", 0.0),
                      energy_min_j=t.get("energy_min_j", 0.0),
                      energy_label=t.get("energy_label", "none"))


def pipeline_report(co, wall: float, *, wait_s: float, status: str = "ok",
                    meta: dict | None = None, live: dict | None = None) -> RunReport:
    """``co`` is the run's ``Coordinator``; ``wait_s`` bounds the wait for the other ranks'
    reports (a rank that has none by then is reported failed). With ``live`` (rank ->
    telemetry), a run still going: ranks without a report are reported ``running`` from their
    latest telemetry."""
    from ..plan import idle_ranks

    w, st, cfg = co.w, co.st, co.cfg
    ranks = {w.rank: w.finish_report(status)}
    deadline = time.time() + wait_s
    for r in range(w.world_size):
        if r == w.rank:
            continue
        if r in co.failed:
            ranks[r] = _failed_rank(r, co.failed[r])
            continue
        if live is not None and not st.has("report", r):
            t = live.get(r, {})
            ranks[r] = RankReport(rank=r, device=t.get("device", f"rank{r}"), status="running",
                                  items=t.get("items", 0), compute_s=t.get("compute_s", 0.0),
                                  bytes_sent=t.get("bytes_sent", 0),
                                  bytes_received=t.get("bytes_received", 0),
                                  energy_j=t.get("energy_j", 0.0),
                                  remaining_j=t.get("remaining_j"),
                                  energy_label=t.get("energy_label", "none"))
            continue
        while not st.has("report", r) and time.time() < deadline:
            time.sleep(1e-3)
        ranks[r] = RankReport(**st.get_json("report", r)) if st.has("report", r) else RankReport(
            rank=r, status="failed")
    ranks = [ranks[r] for r in sorted(ranks)]
    for k in ranks:
        k.items_per_s = k.items / wall if wall > 0 else 0.0
    lat, done_s = co.latencies, co.done_s
    submitted = co.n_requests
    completed = len(lat)
    labels = {k.energy_label for k in ranks if k.energy_label != "none"}
    return RunReport(
        model=cfg.model, mode=cfg.mode, world_size=w.world_size, requests=submitted,
        batch_size=cfg.batch_size, micro_batches=w.m, wall_s=wall,
        throughput_rps=completed / wall if wall > 0 else 0.0,
        latency_p50_s=percentile(lat, 50), latency_p95_s=percentile(lat, 95),
        latency_mean_s=sum(lat) / len(lat) if lat else 0.0,
        bytes_sent=sum(k.bytes_sent for k in ranks),
        bytes_received=sum(k.bytes_received for k in ranks),
        energy_j=sum(k.energy_j for k in ranks),
        energy_label=(labels.pop() if len(labels) == 1 else ("mixed" if labels else "none")),
        compute_s=sum(k.compute_s for k in ranks), comm_s=sum(k.comm_s for k in ranks),
        completed=completed, duplicates=co.duplicates, lost=submitted - completed,
        ranks=ranks, replans=co.replans, plan=w.plan.to_dict(),
        meta={"checkpoint": str(w.model.checkpoint), "img_size": w.img_size,
              "backend": dist.get_backend(), "torch": torch.__version__,
              "data_path": "gloo/nccl point-to-point: int64 header and payload (on gloo, "
                           "a payload that fits the pre-posted receive goes first; "
                           "transport.py)",
              "request_done_s": done_s, "max_inflight": co.window,
              "coordinator": w.rank,
              # launched ranks the plan gives nothing, not counting those that failed or left
              "idle_ranks": [r for r in idle_ranks(w.plan, w.world_size)
                             if r not in co.failed and r not in co.left],
              "ranks_share_cores": bool(w.placement and w.placement.oversubscribed),
              "malloc_tuned": w.malloc_tuned, **(meta or {})})


def save_outputs(co, path: str | Path) -> None:
    """Every completed request's output, as ``request<i>`` in a safetensors file."""
    from safetensors.torch import save_file

    outs = {f"request{req}": co.output(req).contiguous() for req in co.answered()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(outs, str(path))
