"""The life of one rank in a pipeline run, shared by ``lapdtr run`` (:func:`run_rank`) and
``lapdtr.distribute``: join, set-up (the coordinator prepares and publishes it), process group,
worker, heartbeat, warm-up, ready/go; then the coordinator drives and the others follow; then
the report.

The coordinator is the *driver* rank (rank 0 unless said otherwise). An error on any rank is
published on the store (``error/<rank>``, ``abort``) so the others end with it instead of
waiting.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import RunConfig
from .control import (Heartbeat, RendezvousError, StoreView, Watcher, client, publish_abort,
                      stop_threads, wait_all, wait_key)
from .coordinator import Coordinator
from .placement import apply_placement, place_rank, tune_malloc
from .report import RankReport, RunReport
from .worker import Worker, cpu_time, follower_loop

__all__ = ["PipelineSession", "run_rank", "resolve_backend", "device_for"]


def device_for(backend: str, rank: int) -> torch.device:
    if backend == "nccl":
        n = torch.cuda.device_count()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % n)
    return torch.device("cpu")


def resolve_backend(cfg: RunConfig) -> str:
    if cfg.backend != "auto":
        if cfg.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend: 'nccl' needs CUDA, which is not available; allowed here: "
                             "['auto', 'gloo']")
        return cfg.backend
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


class PipelineSession:
    """One rank of a pipeline run. ``prepare_fn()`` (coordinator only) returns the setup dict;
    ``model_fn(setup, device)`` builds this rank's ``RankModel`` (default: from the setup's
    checkpoint); ``profile_fn()`` gives the model profile a re-plan needs."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, host: str, port: int,
                 prefix: str, *, prepare_fn, profile_fn, model_fn=None, coordinator: int = 0,
                 own_group: bool = True):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.host, self.port, self.prefix = host, port, prefix
        self.coordinator = coordinator
        self.is_coordinator = rank == coordinator
        self.prepare_fn, self.profile_fn, self.model_fn = prepare_fn, profile_fn, model_fn
        self.own_group = own_group
        self.st = StoreView(client(host, port, max(60.0, cfg.join_timeout_s * 2)), prefix)
        self.w: Worker | None = None
        self.co: Coordinator | None = None
        self.helpers: list = []
        self.t_start = 0.0
        self.group_up = False

    def fail(self, e: BaseException) -> None:
        publish_abort(self.st, self.rank, f"rank {self.rank}: {type(e).__name__}: {e}")

    def start(self) -> None:
        cfg, st, rank, world = self.cfg, self.st, self.rank, self.world_size
        malloc_tuned = tune_malloc() if cfg.tune_malloc else False
        st.set(("join", rank), repr(time.time()))
        if self.is_coordinator:
            if not wait_all(st, "join", world, cfg.join_timeout_s):
                missing = [r for r in range(world) if not st.has("join", r)]
                raise RendezvousError(f"rank(s) {missing} did not join within "
                                      f"{cfg.join_timeout_s} s (world_size={world})")
            setup = self.prepare_fn()
            st.add("epoch", 0)  # exists before any rank reads it
            st.set("state", json.dumps({"gen": 0}))
            st.set("setup", json.dumps(setup))
        else:
            wait_key(st, ("setup",), None)
            setup = st.get_json("setup")
        self.setup = setup
        backend = resolve_backend(cfg) if self.own_group else dist.get_backend()
        placement = None
        if backend == "gloo" and self.own_group:  # before the group, whose threads inherit it
            placement = place_rank(int(os.environ.get("LOCAL_RANK", rank)),
                                   int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                   cfg.threads_per_rank, cfg.pin_cpus)
            apply_placement(placement)
        if self.own_group:
            dist.init_process_group(backend, store=dist.PrefixStore(self.prefix + "pg", st.s),
                                    rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=max(60.0,
                                                                           cfg.join_timeout_s)))
            self.group_up = True
        device = device_for(backend, rank)
        model = self.model_fn(setup, device) if self.model_fn is not None else None
        w = self.w = Worker(cfg, rank, world, st, setup, device, placement, malloc_tuned,
                            model=model, coordinator=self.coordinator)
        hb = Heartbeat(self.host, self.port, self.prefix, rank, cfg.heartbeat_interval_s,
                       w.telemetry)
        hb.beat()
        self.helpers.append(hb)
        if not self.is_coordinator:  # nobody watches the coordinator's heartbeat
            w.heartbeat = hb
            hb.start()
        w.warm_up()
        st.set(("ready", rank), "1")
        if self.is_coordinator:
            if not wait_all(st, "ready", world, cfg.join_timeout_s):
                missing = [r for r in range(world) if not st.has("ready", r)]
                raise RendezvousError(f"rank(s) {missing} did not load their stages within "
                                      f"{cfg.join_timeout_s} s (join_timeout_s)")
            st.set("go", "1")
        else:
            wait_key(st, ("go",), None)
        w.cpu0 = cpu_time()
        if self.is_coordinator:
            watcher = Watcher(self.host, self.port, self.prefix, world, cfg.heartbeat_interval_s,
                              coordinator=self.coordinator)
            self.helpers.append(watcher)
            watcher.read()
            watcher.start()
            self.co = Coordinator(w, st, watcher, profile_fn=self.profile_fn,
                                  progress_total=setup.get("requests") if cfg.progress else None,
                                  desc=f"{cfg.model} on {world} ranks")
            self.t_start = self.co.t_start = time.time()

    def serve(self) -> str:
        """A follower: work until the coordinator stops the run; publishes this rank's report."""
        status = follower_loop(self.w)
        stop_threads(self.helpers)
        self.w.transport.close()
        self.st.set(("report", self.rank), json.dumps(self.w.finish_report(status).__dict__))
        return status

    def finish(self, *, meta: dict | None = None) -> RunReport:
        """The coordinator: stop every rank and assemble the report."""
        from .assemble import pipeline_report

        wall = time.time() - self.t_start
        self.co.bump(stop=True)
        if self.co.bar is not None:
            self.co.bar.close()
        stop_threads(self.helpers)
        self.w.transport.close()
        return pipeline_report(self.co, wall, wait_s=self.cfg.heartbeat_timeout_s + 10.0,
                               meta=meta)

    def close(self) -> None:
        stop_threads(self.helpers)
        if self.group_up:
            self.group_up = False
            dist.destroy_process_group()


def run_rank(cfg: RunConfig, rank: int, world_size: int, host: str, port: int,
             prefix: str = "lapdtr/") -> RunReport | None:
    """Run one rank of ``cfg``. Returns the ``RunReport`` on rank 0 (``None`` elsewhere)."""
    if cfg.mode != "pipeline":
        from .collective import run_collective_rank

        return run_collective_rank(cfg, rank, world_size, host, port, prefix)
    from .prepare import prepare, profile_for

    feed = None

    def prepare_fn():
        nonlocal feed
        from .feed import RunFeed
        from .stages import build_host

        setup = prepare(cfg, world_size)
        host, _ = build_host(cfg.model, cfg.model_kwargs, setup["img_size"])
        # the inputs are checked (a missing data root, a journal of another run) before any rank
        # loads its stages
        feed = RunFeed(cfg, host, setup["img_size"], checkpoint=setup["checkpoint"])
        setup["requests"] = feed.total
        return setup

    def profile_fn(widths=None):
        return profile_for(cfg.model, cfg.model_kwargs, s.setup["img_size"],
                           max(1, cfg.batch_size // cfg.micro_batches), widths=widths)

    s = PipelineSession(cfg, rank, world_size, host, port, prefix, prepare_fn=prepare_fn,
                        profile_fn=profile_fn)
    try:
        try:
            s.start()
            if not s.is_coordinator:
                s.serve()
                return None
            co = s.co
            co.extend(feed.batches())
            while not co.finished():
                co.step()
                feed.drain(co)
            feed.drain(co)
            report = s.finish()
            feed.close()
            report.meta.update(feed.meta(feed.reference()))
            if cfg.save_outputs:
                feed.save_outputs(Path(cfg.out) / "outputs.safetensors")
            return report
        finally:
            if feed is not None:
                feed.close()
            s.close()
    except BaseException as e:
        s.fail(e)
        raise
