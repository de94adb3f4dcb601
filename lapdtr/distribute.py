"""``lapdtr.distribute``: a model split across the ranks of a job, called like a module.

Call it with the same arguments on every rank (after ``torchrun``, ``lapdtr launch``, or your
own ``init_process_group``)::

    with lapdtr.distribute(model, cuts=["blocks.4", "blocks.8"]) as dm:
        if dm.is_driver:
            for images, labels in loader:
                logits = dm(images)

On the driver rank (rank 0 unless ``driver=`` says otherwise) ``dm(x)`` returns what
``model(x)`` returns (allclose across ranks), ``dm.map(batches)`` streams batches and yields
the outputs in input order; on every other rank entering the context (or ``dm.serve()``) serves
until the driver closes. Killed or drained ranks are re-planned around as in ``lapdtr run``: the
driver keeps every in-flight input, so nothing is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["distribute", "DistributedModel"]

_CALLS = {"n": 0}  # distribute() calls in this process: part of the store prefix


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return name or type(model).__name__


def _structure(model: nn.Module) -> str:
    """A digest of the model's parameter and buffer names, shapes and dtypes."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
    return h.hexdigest()[:16]


def _job_env():
    """(rank, world_size, host, port, own_group, server): from an existing process group, the
    launcher's environment, or a one-rank job in this process."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        host = os.environ.get("MASTER_ADDR")
        port = os.environ.get("MASTER_PORT")
        if host is None or port is None:
            raise ValueError("lapdtr.distribute: a process group exists but MASTER_ADDR / "
                             "MASTER_PORT are not set; the control plane needs the job's store "
                             "address (set them, or let lapdtr.distribute create the group)")
        return rank, world, _resolve(host), int(port), False, None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from .runtime.launch import job_from_env

        rank, world, host, port, server = job_from_env("run under torchrun or lapdtr launch")
        return rank, world, host, port, True, server
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    return 0, 1, "127.0.0.1", server.port, True, server


def _resolve(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else socket.gethostbyname(host)


def distribute(model, *, plan=None, cuts=None, devices=None, strategy: str = "lapdtr",
               objective: str = "energy", backend: str = "auto", checkpoint=None,
               model_kwargs: dict | None = None, img_size: int | None = None,
               micro_batches: int = 1, max_inflight: int | None = None, driver: int = 0,
               out: str | None = None, **options) -> "DistributedModel":
    """Split ``model`` across the job's ranks; returns a :class:`DistributedModel`.

    ``model``: an ``nn.Module`` built identically on every rank (each rank keeps only its
    stages' weights and frees the rest: the module is consumed), or a model name with
    ``checkpoint=`` (each rank loads only its weights). The plan comes from ``plan`` (a
    ``plan.json``), ``cuts`` (stage ``i`` on rank ``i``), or the planner (``strategy``,
    ``objective``) on ``devices`` (a device file; default: identical ranks). Other ``options``
    are ``RunConfig`` fields (``heartbeat_timeout_s``, ``cache_budget_bytes``, ...)."""
    from .runtime.config import RunConfig

    if isinstance(model, str):
        if checkpoint is None:
            raise ValueError(f"lapdtr.distribute({model!r}): a model name needs checkpoint= (a "
                             "safetensors file of its weights); or pass the nn.Module itself")
        name, module = model, None
    elif isinstance(model, nn.Module):
        if checkpoint is not None:
            raise ValueError("lapdtr.distribute: checkpoint= goes with a model name; an nn.Module "
                             "brings its own weights")
        name, module = _model_name(model), model
    else:
        raise TypeError(f"lapdtr.distribute: model must be an nn.Module or a model name, got "
                        f"{type(model).__name__}")
    if "world_size" in options or "mode" in options:
        raise ValueError("lapdtr.distribute: world_size and mode come from the job (the ranks "
                         "launched; pipeline); do not pass them")
    from ._validate import check_int

    check_int("micro_batches", micro_batches, 1)
    rank, world, host, port, own_group, server = _job_env()
    if not 0 <= driver < world:
        raise ValueError(f"lapdtr.distribute: driver={driver} is not a rank of this job "
                         f"(ranks 0..{world - 1})")
    _CALLS["n"] += 1
    prefix = (f"lapdtr/dm/{os.environ.get('TORCHELASTIC_RUN_ID', 'job')}/"
              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_CALLS['n']}/")
    cfg = RunConfig.from_dict({
        "model": name, "model_kwargs": dict(model_kwargs or {}), "img_size": img_size,
        "world_size": world, "mode": "pipeline", "backend": backend, "devices": devices,
        "plan": plan,
        "cuts": list(cuts) if cuts is not None else None, "strategy": strategy,
        "objective": objective, "checkpoint": str(checkpoint) if checkpoint else None,
        "micro_batches": micro_batches, "max_inflight": max_inflight,
        "out": out or "<temporary>", "batch_size": options.pop("batch_size", micro_batches),
        "requests": 1, **options})
    cfg.validate()
    tmp = Path(tempfile.mkdtemp(prefix=f"lapdtr-rank{rank}-"))
    if out is None:
        cfg.out = str(tmp / "run")
    return DistributedModel(cfg, module, rank=rank, world=world, host=host, port=port,
                            prefix=prefix, own_group=own_group, server=server, driver=driver,
                            tmp=tmp)


_EXIT = {"armed": False, "failed": False}


def _guard_exit() -> None:
    """If a closed transport left a receiver blocked on a peer that never said goodbye (one
    declared dead while alive), end this process at exit with ``os._exit`` (1 after an uncaught
    exception, else 0) before the interpreter's teardown, which gloo would abort
    (``lapdtr.runtime.transport.exit_now_if_stuck``). A script's own ``sys.exit(n)`` code is
    then read as 0."""
    from .runtime.transport import stuck_peers

    if _EXIT["armed"] or not stuck_peers():
        return
    import atexit
    import sys

    _EXIT["armed"] = True
    hook = sys.excepthook

    def excepthook(*exc):
        _EXIT["failed"] = True
        hook(*exc)

    sys.excepthook = excepthook

    def at_exit():
        from .runtime.transport import exit_now_if_stuck

        exit_now_if_stuck(1 if _EXIT["failed"] else 0)

    atexit.register(at_exit)


class DistributedModel(nn.Module):
    """A model split across ranks. On the driver: ``dm(x)``, ``dm.map(...)``, ``dm.report()``,
    ``dm.close()``; elsewhere: ``dm.serve()`` (or enter the context)."""

    def __init__(self, cfg, module, *, rank, world, host, port, prefix, own_group, server,
                 driver, tmp: Path):
        super().__init__()
        from .runtime.session import PipelineSession

        self.cfg, self.rank, self.world_size, self.driver = cfg, rank, world, driver
        self._server, self._tmp = server, tmp
        self._closed = False
        self._final = None
        self._profile = None
        self.__dict__["_module"] = module  # not a submodule: consumed by the rank model
        structure = _structure(module) if module is not None else None
        self._structure = structure
        self._session = PipelineSession(
            cfg, rank, world, host, port, prefix, prepare_fn=self._prepare,
            profile_fn=self._profile_fn, model_fn=self._model_fn, coordinator=driver,
            own_group=own_group)
        try:
            self._session.start()
        except BaseException as e:
            self._session.fail(e)
            self._session.close()
            self._cleanup()
            raise
        self.__dict__["_module"] = None  # its weights now live in the rank model
        self._in_shape = tuple(self._session.w.model.units[0].in_shape[1:])
        self._dtype = next((p.dtype for p in self._session.w.model.host.parameters()),
                           torch.float32)

    # -- set-up (called by the session) -----------------------------------------------------
    def _profile_fn(self, widths=None):
        if self._profile is None or (widths is not None and len(self._profile.widths) == 1):
            # a model given by name: built by name, as lapdtr run does
            from .runtime.prepare import profile_for

            self._profile = profile_for(self.cfg.model, self.cfg.model_kwargs,
                                        self._session.setup["img_size"],
                                        max(1, self.cfg.batch_size // self.cfg.micro_batches),
                                        widths=widths)
        return self._profile

    def _prepare(self) -> dict:
        from .models.base import default_img_size, units
        from .runtime.prepare import load_run_devices, prepare, resolve_plan

        cfg = self.cfg
        if self._module is None:
            setup = prepare(cfg, self.world_size)
            setup["structure"] = None
            return setup
        img = cfg.img_size or default_img_size(self._module)
        names = [u.name for u in units(self._module, img)]
        # profiled now, while this rank holds every weight: the planner needs it, and so does a
        # re-plan after a failure (a model built by name could differ from the module given)
        from .profile import profile_model

        self._profile = profile_model(self._module, img_size=img,
                                      batch_size=max(1, cfg.batch_size // cfg.micro_batches),
                                      repeats=1, warmup=1,
                                      widths="all" if cfg.elastic is not None else None)
        devices = load_run_devices(cfg, self.world_size)
        plan, devices = resolve_plan(cfg, names, devices, self.world_size, img,
                                     profile_fn=lambda widths=None: self._profile)
        from .runtime.prepare import plan_has_widths
        from .runtime.summary import settle_plan

        settle_plan(cfg, plan, self._module, units(self._module, img))

        if plan_has_widths(plan) and len(self._profile.widths) == 1:  # a re-plan prices them
            self._profile = profile_model(self._module, img_size=img,
                                          batch_size=max(1, cfg.batch_size // cfg.micro_batches),
                                          repeats=1, warmup=1, widths="all")
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return {"checkpoint": None, "img_size": img, "plan": plan.to_dict(),
                "devices": [d.to_dict() for d in devices], "t0": time.time(),
                "structure": self._structure}

    def _model_fn(self, setup: dict, device):
        from .runtime.stages import RankModel

        if self._module is None:
            return RankModel(self.cfg.model, setup["checkpoint"],
                             model_kwargs=self.cfg.model_kwargs, img_size=setup["img_size"],
                             device=device)
        if setup.get("structure") not in (None, self._structure):
            raise ValueError(f"lapdtr.distribute: the model on rank {self.rank} "
                             f"({self.cfg.model}) is not the one on the driver (their parameter "
                             "names, shapes or dtypes differ); build it identically on every rank")
        return RankModel.from_module(self._module, self._tmp / "weights.safetensors",
                                     model_name=self.cfg.model, img_size=setup["img_size"],
                                     device=device)

    # -- the driver -------------------------------------------------------------------------
    @property
    def is_driver(self) -> bool:
        return self.rank == self.driver

    def _need_driver(self, what: str) -> None:
        if not self.is_driver:
            raise RuntimeError(f"{what} runs on the driver (rank {self.driver}); this is rank "
                               f"{self.rank}, which serves (dm.serve() or the with-block)")
        if self._closed:
            raise RuntimeError(f"{what}: this DistributedModel is closed")

    def _check(self, x) -> torch.Tensor:
        if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
            x = x[0]  # (input, target) from a DataLoader
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input: expected a torch.Tensor (or an (input, target) pair), got "
                            f"{type(x).__name__}")
        if x.dim() != len(self._in_shape) + 1 or tuple(x.shape[1:]) != self._in_shape:
            raise ValueError(f"input: expected shape (batch, {', '.join(map(str, self._in_shape))})"
                             f" for {self.cfg.model}, got {tuple(x.shape)}")
        if x.dtype != self._dtype:
            raise ValueError(f"input: expected dtype {self._dtype}, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError("input: an empty batch (batch size 0)")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._need_driver("dm(x)")
        x = self._check(x)
        co = self._session.co
        req = co.submit(x)
        try:
            co.run_until(lambda: co.request_done(req))
        except BaseException as e:
            self._abort(e)
            raise
        return co.output(req, pop=True)

    def map(self, iterable, *, micro_batches: int | None = None, max_inflight: int | None = None,
            journal=None):
        """Stream ``iterable`` (tensors, or ``(input, target)`` pairs) through the pipeline;
        yields the outputs in input order. ``max_inflight`` bounds the micro-batches in flight
        (default: the run's window). With ``journal`` (a directory), each output is recorded
        (fsynced) as it comes: a restarted job that calls ``map`` again with the same journal
        yields the recorded outputs without computing them again."""
        self._need_driver("dm.map(...)")
        co = self._session.co
        window = max_inflight or co.window
        m = micro_batches or self.cfg.micro_batches
        jr = self._journal(journal) if journal is not None else None
        src = enumerate(iterable)
        queue: deque = deque()  # (index, request or None for journaled)
        exhausted = False
        bad = None  # a batch of the wrong type, shape or dtype: raised after the ones before it
        try:
            while True:
                while not exhausted and len(queue) < 1 + window and \
                        co.in_flight() + len(co.pending) < window:
                    try:
                        i, b = next(src)
                    except StopIteration:
                        exhausted = True
                        break
                    if jr is not None and i in jr:
                        queue.append((i, None))
                        continue
                    try:
                        x = self._check(b)
                    except (TypeError, ValueError) as e:
                        # the run goes on: the batches before it are answered, then it raises
                        bad = type(e)(f"dm.map: batch {i}: {e}")
                        exhausted = True
                        break
                    queue.append((i, co.submit(x, micro_batches=m)))
                if not queue:
                    break
                i, req = queue[0]
                if req is None:
                    queue.popleft()
                    yield jr.output(i)
                    continue
                if co.request_done(req):
                    queue.popleft()
                    y = co.output(req, pop=True)
                    if jr is not None:
                        jr.record(i, y)
                    yield y
                    continue
                co.step()
        except GeneratorExit:
            raise
        except BaseException as e:
            self._abort(e)
            raise
        finally:
            if jr is not None:
                jr.close()
        if bad is not None:
            raise bad

    def _journal(self, path):
        from .runtime.journal import Journal

        plan = self.cfg.plan
        ckpt = self.cfg.checkpoint
        identity = {"model": self.cfg.model, "structure": self._structure,
                    "checkpoint": ({"path": str(Path(ckpt).resolve()),
                                    "bytes": Path(ckpt).stat().st_size} if ckpt else None),
                    "plan": (hashlib.sha256(Path(plan).read_bytes()).hexdigest()[:16]
                             if plan else None),
                    "cuts": self.cfg.cuts, "strategy": self.cfg.strategy,
                    "objective": self.cfg.objective}
        return Journal(path, identity)

    def report(self):
        """The ``RunReport`` so far (final once closed)."""
        if self._final is not None:
            return self._final
        self._need_driver("dm.report()")
        from .runtime.assemble import pipeline_report

        s = self._session
        return pipeline_report(s.co, time.time() - s.t_start, wait_s=0.0, status="running",
                               live=s.co.watcher.tele)

    def _abort(self, e: BaseException) -> None:
        if not self._closed:
            self._session.fail(e)

    # -- every rank -------------------------------------------------------------------------
    def serve(self) -> str:
        """A rank that is not the driver: work until the driver closes."""
        if self.is_driver:
            raise RuntimeError(f"dm.serve() is for the ranks that are not the driver (rank "
                               f"{self.driver}); the driver calls dm(x) or dm.map(...)")
        if self._closed:
            return "closed"
        try:
            status = self._session.serve()
        except BaseException as e:
            self._abort(e)
            raise
        finally:
            self._closed = True
            self._session.close()
            self._cleanup()
        return status

    def close(self):
        """The driver: stop every rank and return the final report."""
        if self._closed:
            return self._final
        if not self.is_driver:
            return self.serve()
        try:
            self._final = self._session.finish()
        finally:
            self._closed = True
            self._session.close()
            self._cleanup()
        return self._final

    def _cleanup(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        _guard_exit()

    def __enter__(self):
        if not self.is_driver:
            self.serve()
        return self

    def __exit__(self, et, ev, tb):
        if self.is_driver and et is not None and not self._closed:
            self._abort(ev)
            self._closed = True
            self._session.close()
            self._cleanup()
            return False
        self.close()
        return False
