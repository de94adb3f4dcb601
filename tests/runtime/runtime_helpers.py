"""Test helpers for the runtime tests: a predictable neighbour-merging stand-in for the planner's
``redistribute`` (so fault tests know which rank takes over), and the single-process references
the distributed runs are compared with."""
from __future__ import annotations

import copy

import torch

import lapdtr
from lapdtr.runtime.pipeline import request_input


def _redistribute(plan, model_profile, devices, event):
    """Give each removed device's units to the nearest surviving stage before it (else after)."""
    new = copy.deepcopy(plan)
    gone = set(event.devices)
    stages = sorted(new.stages, key=lambda s: s.index)
    moves = []
    keep = [s for s in stages if s.device not in gone]
    for i, s in enumerate(stages):
        if s.device not in gone:
            continue
        before = [t for t in stages[:i] if t.device not in gone]
        target = before[-1] if before else [t for t in stages[i + 1:] if t.device not in gone][0]
        for u in s.units:
            moves.append({"unit": u, "from_rank": s.rank, "to_rank": target.rank})
        if before:
            target.units = target.units + s.units
        else:
            target.units = s.units + target.units
    for j, s in enumerate(keep):
        s.index = j
    new.stages = keep
    new.meta = {**new.meta, "moves": moves}
    return new


def install_stub_planner(rank: int = 0) -> None:
    """``init_fn`` for ``lapdtr.runtime.run``: re-plans merge a lost stage into its neighbour."""
    import importlib

    importlib.import_module("lapdtr.plan.redistribute").redistribute = _redistribute


def reference_outputs(cfg, n_requests: int | None = None):
    torch.manual_seed(cfg.seed)
    model = lapdtr.create_model(cfg.model, **cfg.model_kwargs)
    img = cfg.img_size or 224
    with torch.no_grad():
        return [model(request_input(cfg, i, img)) for i in range(n_requests or cfg.requests)]


def never_join(rank: int) -> None:
    """``init_fn`` for a run in which rank 2 exits before joining the rendezvous."""
    import os

    install_stub_planner(rank)
    if rank == 2:
        os._exit(0)


def load_outputs(out_dir):
    from safetensors.torch import load_file

    return load_file(f"{out_dir}/outputs.safetensors")


def assert_outputs_match(cfg, out_dir, atol=1e-5):
    outs = load_outputs(out_dir)
    ref = reference_outputs(cfg)
    assert sorted(outs) == sorted(f"request{i}" for i in range(cfg.requests))
    for i, r in enumerate(ref):
        torch.testing.assert_close(outs[f"request{i}"], r, atol=atol, rtol=0)


def kill_rank1_soon_after_it_starts(rank: int) -> None:
    """``init_fn``: rank 1 SIGKILLs itself 30 ms after its first item, wherever it then is
    (computing, sending, receiving or idle)."""
    import os
    import signal
    import threading

    from lapdtr.runtime import pipeline

    install_stub_planner(rank)
    if rank != 1:
        return
    original = pipeline._Worker.process

    def process(self, msg):
        if not getattr(self, "_timer", None):
            self._timer = threading.Timer(0.03, os.kill, (os.getpid(), signal.SIGKILL))
            self._timer.start()
        return original(self, msg)

    pipeline._Worker.process = process


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, port, *args)`` on ``world_size`` local processes.

    Fork where there is one: the ranks inherit the imported torch / timm (spawn re-imports them,
    ~3 s a rank on a 2-core machine). The parent must not have a process group or CUDA open.
    """
    import torch.multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(fn, args=(world_size, free_port(), *args), nprocs=world_size, join=True,
                       start_method=method)


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 60.0) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
