"""Test helpers for the runtime tests: a predictable neighbour-merging stand-in for the planner's
``redistribute`` (so fault tests know which rank takes over), and the single-process references
the distributed runs are compared with."""
from __future__ import annotations

import copy

import torch

import lapdtr
from lapdtr.runtime import request_input
from lapdtr.runtime.steps import Codec


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


def reference_model(cfg):
    """The single-process model a run of ``cfg`` is compared with: ``cfg.checkpoint``'s weights
    (e.g. :func:`informative_checkpoint`), else the seeded init the runtime writes by default."""
    torch.manual_seed(cfg.seed)
    model = lapdtr.create_model(cfg.model, **cfg.model_kwargs)
    if cfg.checkpoint is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cfg.checkpoint), strict=True)
    return model.eval()


def reference_outputs(cfg, n_requests: int | None = None, model=None):
    model = model if model is not None else reference_model(cfg)
    img = cfg.img_size or 224
    with torch.no_grad():
        return [model(request_input(cfg.seed, i, cfg.batch_size, img)) for i in range(n_requests or cfg.requests)]


def informative_checkpoint(path, model: str, model_kwargs: dict | None = None,
                           img_size: int | None = None) -> str:
    """A run checkpoint on which every unit shows in the logits (``lapdtr.testing``)."""
    from lapdtr.testing import write_informative_checkpoint

    return str(write_informative_checkpoint(path, model, model_kwargs=model_kwargs or {},
                                            img_size=img_size))


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
    """The run's outputs equal the single-process model's.

    With ``cfg.checkpoint`` (informative weights): ``assert_close_scaled`` (tolerance relative
    to the size of each request's logits), and the same comparison is shown, in this process on
    the first requests' inputs, to reject the model with any one unit skipped or perturbed.
    Without one (seeded timm init, where a unit may be invisible): ``atol`` absolute."""
    from lapdtr.models import units
    from lapdtr.testing import assert_close_scaled, assert_sees_every_unit

    outs = load_outputs(out_dir)
    model = reference_model(cfg)
    ref = reference_outputs(cfg, model=model)
    assert sorted(outs) == sorted(f"request{i}" for i in range(cfg.requests))
    if cfg.checkpoint is None:
        for i, r in enumerate(ref):
            torch.testing.assert_close(outs[f"request{i}"], r, atol=atol, rtol=0)
        return
    for i, r in enumerate(ref):
        assert_close_scaled(outs[f"request{i}"], r, msg=f"request{i}")
    img = cfg.img_size or 224
    k = min(2, cfg.requests)  # a subset of the compared requests: the check stays conservative
    x = torch.cat([request_input(cfg.seed, i, cfg.batch_size, img) for i in range(k)])
    assert_sees_every_unit(model, x, torch.cat(ref[:k]), unit_list=units(model, img))


def kill_rank1_soon_after_it_starts(rank: int) -> None:
    """``init_fn``: rank 1 SIGKILLs itself 30 ms after its first item, wherever it then is
    (computing, sending, receiving or idle). Unit runs are counted (:func:`count_unit_runs`)."""
    import os
    import signal
    import threading

    from lapdtr.runtime import worker

    install_stub_planner(rank)
    count_unit_runs(rank)
    if rank != 1:
        return
    original = worker.Worker.process

    def process(self, msg):
        if not getattr(self, "_timer", None):
            self._timer = threading.Timer(0.03, os.kill, (os.getpid(), signal.SIGKILL))
            self._timer.start()
        return original(self, msg)

    worker.Worker.process = process


# ------------------------------------------------------------------ where recovery resumed

def count_unit_runs(rank: int = 0) -> None:
    """``init_fn``: every rank appends one line per stage run to ``<out>/unit-runs-rank<r>.txt``:
    ``start <item> <first unit> <end unit> <generation>`` before it and ``done ...`` after it
    computed (a rank below E_min refuses the item: no ``done``). One ``os.write`` a line, so a
    SIGKILLed rank leaves whole lines; its ``start`` lines are what it ran or was running."""
    import os

    from lapdtr.runtime import worker

    original = worker.Worker.process

    def process(self, msg):
        fd = getattr(self, "_runs_fd", None)
        if fd is None:
            fd = self._runs_fd = os.open(os.path.join(self.cfg.out, f"unit-runs-rank{self.rank}.txt"),
                                         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        rec = f"{msg.item} {msg.unit} {self.end_of[msg.unit]} {self.gen}\n"
        os.write(fd, ("start " + rec).encode())
        items = self.report.items
        original(self, msg)
        if self.report.items > items:
            os.write(fd, ("done " + rec).encode())

    worker.Worker.process = process


def stub_planner_and_count(rank: int) -> None:
    """``init_fn``: :func:`install_stub_planner` and :func:`count_unit_runs`."""
    install_stub_planner(rank)
    count_unit_runs(rank)


def load_unit_runs(out_dir, report) -> dict[int, list[tuple[int, int, int, int]]]:
    """Item -> ``(rank, generation, first unit, end unit)`` of every stage run the ranks logged
    (:func:`count_unit_runs`): what a live rank computed, what a failed rank ran or was running."""
    from pathlib import Path

    failed = {k.rank for k in report.ranks if k.status == "failed"}
    runs: dict[int, list] = {}
    for path in sorted(Path(out_dir).glob("unit-runs-rank*.txt")):
        rank = int(path.stem.removeprefix("unit-runs-rank"))
        want = "start" if rank in failed else "done"
        for line in path.read_text().splitlines():
            tag, *vals = line.split()
            if tag == want:
                item, u, e, gen = map(int, vals)
                runs.setdefault(item, []).append((rank, gen, u, e))
    return runs


def unit_runs_from_timelines(report) -> dict[int, list[tuple[int, int, int, int]]]:
    """The same from the ranks' report timelines, for a run with one re-plan whose ranks all
    reported (a drain, no kill; the timelines carry no generation). A survivor's run of an
    item at or past the unit it resumed from counts as after the re-plan, every other run as
    before it: a survivor that had already run such a unit then shows it twice after the
    re-plan, which :func:`assert_resumed_from_furthest` rejects."""
    assert len(report.replans) <= 1, "timelines cannot tell apart the runs of two re-plans"
    assert all(k.status != "failed" for k in report.ranks), "a failed rank has no timeline"
    ev = report.replans[0] if report.replans else None
    survivors = _survivors(ev) if ev else set()
    runs: dict[int, list] = {}
    for k in report.ranks:
        for item, u, e, *_ in k.timeline:
            start = ev.resume_points.get(str(item)) if ev else None
            after = start is not None and k.rank in survivors and u >= start[0]
            runs.setdefault(item, []).append((k.rank, ev.generation if after else 0, u, e))
    return runs


def _survivors(ev) -> set[int]:
    """Ranks whose cached boundaries a re-plan reads: the coordinator and the new plan's ranks
    (a rank left without units leaves, its cache with it)."""
    return {0} | {s["rank"] for s in ev.stages}


def assert_resumed_from_furthest(report, runs) -> dict[int, dict[int, int]]:
    """Recovery resumed every in-flight item from the furthest boundary a survivor had cached,
    and ran no unit more often than that resume needs. ``runs``: :func:`load_unit_runs` or
    :func:`unit_runs_from_timelines`. Returns, per re-plan generation, {resumed-from unit:
    items}.

    Per item, the re-plans that resumed it split its runs into segments (generation ranges);
    a segment's runs must tile its units exactly once from where it (re)started (0, or the unit
    it resumed from), the last one to the end of the model; and each resume point must be the
    furthest end of any run before that re-plan on a rank whose cache the re-plan read
    (the coordinator's input, unit 0, otherwise). So no unit before the furthest cached boundary
    runs twice, and a unit past it runs again only if a rank taken out at that re-plan ran it."""
    n = sum(len(s["units"]) for s in report.plan["stages"])
    total = report.requests * report.micro_batches
    assert set(runs) <= set(range(total)), f"runs of unknown items {sorted(set(runs) - set(range(total)))}"
    figures = {}
    for ev in report.replans:
        pts = {int(k): v for k, v in ev.resume_points.items()}
        assert sum(ev.resumed.values()) == len(pts), (ev.resumed, ev.resume_points)
        wrong = {k: v for k, v in pts.items() if v[0] != v[1]}
        assert not wrong, (f"re-plan {ev.generation}: items resumed from an earlier boundary than "
                           f"the furthest cached ([from, cached]): {wrong}")
        figures[ev.generation] = {}
        for k, (u, _) in sorted(pts.items()):
            figures[ev.generation][u] = figures[ev.generation].get(u, 0) + 1
    for k in range(total):
        segs = [(0, 0)] + [(ev.generation, ev.resume_points[str(k)][0]) for ev in report.replans
                           if str(k) in ev.resume_points]
        for i, (g, start) in enumerate(segs):
            g_next = segs[i + 1][0] if i + 1 < len(segs) else float("inf")
            pos = start
            for rank, gen, u, e in sorted((r for r in runs.get(k, []) if g <= r[1] < g_next),
                                          key=lambda r: (r[2], r[3])):
                assert u == pos, (f"item {k}, generations [{g}, {g_next}): rank {rank} ran units "
                                  f"[{u}, {e}) but the item was at unit {pos} (a unit ran twice "
                                  f"or was skipped); its runs: {sorted(runs.get(k, []))}")
                pos = e
            if i + 1 == len(segs):
                assert pos == n, (f"item {k} ran up to unit {pos} of {n} after generation {g}; "
                                  f"its runs: {sorted(runs.get(k, []))}")
                continue
            ev = next(e for e in report.replans if e.generation == g_next)
            alive = _survivors(ev)
            furthest = max([0] + [e for r, gen, u, e in runs.get(k, [])
                                  if gen < g_next and r in alive])
            assert segs[i + 1][1] == furthest, (
                f"re-plan {g_next} resumed item {k} from unit {segs[i + 1][1]}, but the ranks it "
                f"read ({sorted(alive)}) had run it up to unit {furthest}; its runs: "
                f"{sorted(runs.get(k, []))}")
    return figures


def assert_replans_keep_survivors_busy(report, out_dir) -> None:
    """Each re-plan's ``moves`` are exactly the units whose rank changed from the plan before
    (``plan.json`` for the first), the ranks it took out hold nothing, and every other rank of
    the plan before still holds units (the tests' devices are sized so that the objective
    cannot put the whole model on fewer of them)."""
    from pathlib import Path

    from lapdtr.plan.types import Plan

    prev = Plan.load(Path(out_dir) / "plan.json").unit_to_rank()
    for ev in report.replans:
        new = {u: s["rank"] for s in ev.stages for u in s["units"]}
        assert set(new) == set(prev)
        moved = {(u, prev[u], new[u]) for u in new if prev[u] != new[u]}
        assert {(m["unit"], m["from_rank"], m["to_rank"]) for m in ev.moves} == moved, ev.moves
        assert not set(ev.ranks) & set(new.values()), f"re-plan {ev.generation} kept {ev.ranks}"
        idle = set(prev.values()) - set(ev.ranks) - set(new.values())
        assert not idle, f"re-plan {ev.generation} left surviving rank(s) {sorted(idle)} idle"
        prev = new


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args):
    """Run ``fn(rank, world_size, port, *args)`` on ``world_size`` local processes.

    Spawned, not forked: a forked copy of the pytest process carries whatever earlier tests
    loaded (scikit-learn/scipy's OpenMP runtime from the data tests), and such a child
    segfaulted in test_ensemble. Spawn re-imports torch / timm (~3 s a rank on 2 cores).
    """
    import torch.multiprocessing as mp

    mp.start_processes(_then_exit, args=(fn, world_size, free_port(), *args), nprocs=world_size,
                       join=True, start_method="spawn")


def _then_exit(rank, fn, *args):
    """``fn``, then ``os._exit``: a gloo receive still pending in a rank's teardown (a peer's
    goodbye not yet in) aborts a normal interpreter exit ("terminate called without an active
    exception") after the rank did everything it was asked; the exit code still tells."""
    import os
    import sys
    import traceback

    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_gloo(rank: int, world_size: int, port: int, timeout_s: float = 60.0) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def stop_rank1_then_wake(rank: int) -> None:
    """``init_fn``: rank 1 is SIGSTOPped 50 ms after its first item and SIGCONTed 4 s later
    (past the heartbeat timeout, so it has been declared dead and re-planned around). Writes
    ``LAPDTR_TEST_OUT/rank1-exit.json`` from an ``atexit`` hook if it ends by returning."""
    import os
    import subprocess
    import threading

    from lapdtr.runtime import worker

    install_stub_planner(rank)
    if rank != 1:
        return
    original = worker.Worker.process
    started = threading.Event()

    def process(self, msg):
        if not started.is_set():
            started.set()
            subprocess.Popen(["sh", "-c", f"sleep 0.05; kill -STOP {os.getpid()}; sleep 4; "
                                          f"kill -CONT {os.getpid()}"])
        return original(self, msg)

    worker.Worker.process = process


class SplitCodec(Codec):
    """A codec whose packets hold three tensors: the boundary's flat halves and an int64 tag
    (the unit it is for, then the shape). Decoding checks all three came and the tag's unit."""

    name = "split-test"

    def encode(self, y, *, unit, keep=1.0):
        from lapdtr.runtime.steps import Packet

        flat = y.reshape(-1)
        h = flat.numel() // 2
        return Packet((flat[:h].clone(), flat[h:].clone(),
                       torch.tensor([unit, *y.shape], dtype=torch.int64)))

    def decode(self, packet, *, unit):
        a, b, tag = packet.tensors
        assert int(tag[0]) == unit, (int(tag[0]), unit)
        return torch.cat([a, b]).reshape(tag[1:].tolist())

    def reencode(self, packet, *, unit):
        return packet


def split_codec_everywhere(rank: int) -> None:
    """``init_fn``: every rank's worker uses :class:`SplitCodec` (and the stub planner)."""
    from lapdtr.runtime import worker

    install_stub_planner(rank)
    original = worker.Worker.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.codec = SplitCodec()

    worker.Worker.__init__ = init
