"""Pipeline inference on ``torch.distributed`` ranks, with a control plane on the rendezvous store
and recovery from dead or drained ranks (Algorithm 3 of LAP-DTR per item).

One function, :func:`run_rank`, is what every rank runs, whether spawned locally or by torchrun.
Rank 0 is the coordinator: it prepares the checkpoint and the plan, feeds the requests, collects
the outputs, watches heartbeats and energy telemetry, and re-plans; it may run stages too.

Work is split into *items* (request ``r``, micro-batch ``b``: item ``r * m + b``). A message
carries an item and the unit its receiver starts at, so after a re-plan any rank can resume an
item from any cached boundary: the holder of the furthest boundary re-sends it to the rank that
now owns the next unit. Store keys (under the run prefix): ``join/<rank>``, ``setup``, ``go``,
``epoch`` (bumped on every control change), ``state`` (JSON: gen, stop, abort), ``plan/<gen>``,
``tele/<rank>`` (heartbeat time and energy telemetry), ``g/<gen>/inv/<rank>``,
``g/<gen>/resume``, ``report/<rank>``, ``error/<rank>``.

Control without polling. After every control change the coordinator sends each follower a
control message on the data path (``Transport.send_control``: its epoch, and how far items are
done), so followers block on their message queue and read the store only when told to; the
coordinator also sends one every ``_PUBLISH_S`` while items complete, so followers release
finished sends and evict their caches. A follower looks at the store by itself only after
``_SAFETY_POLL_S`` without any message, and learns of the coordinator's death from its stream
ending (a ``gone`` message). On a machine with fewer cores than ranks this matters: a store
round trip every few milliseconds on every rank costs the stages measurable throughput.

Failures. A gloo process group keeps working for point-to-point traffic between the survivors
when a member dies (only ops with the dead rank fail), so the runtime keeps one group for the
whole run and tells the plan generations apart by the generation in every header (a message of
an older generation is received and dropped, so every send completes); only receiver threads
block on a peer, so a dead peer cannot hang a rank's main loop. The
alternatives cost more: a fresh process group per generation needs every survivor to
rendezvous again, and routing boundaries through the coordinator doubles every transfer. (NCCL
point-to-point ignores tags and communicators do not survive a member's death, so with the
``nccl`` backend the pipeline runs without re-planning: an event that needs one ends the run
with an error saying so.) Detection takes up to
``heartbeat_timeout_s`` for a dead rank and one telemetry round for a drained one; each
``ReplanEvent`` in the report records both times.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..plan.types import Plan, StagePlan
from ..profile.types import DeviceProfile
from .config import RunConfig
from .report import RankReport, ReplanEvent, RunReport, percentile
from .stages import RankModel, build_host, check_checkpoint, default_checkpoint_path, write_checkpoint
from .placement import Placement, apply_placement, place_rank, tune_malloc
from .transport import CONTROL, DATA, GONE, BoundaryCache, Transport

__all__ = ["run_rank", "build_plan_from_cuts", "check_plan", "request_input", "default_devices",
           "RendezvousError"]


class RendezvousError(RuntimeError):
    """A rank did not join, or the run was aborted by another rank."""


def request_input(cfg: RunConfig, request: int, img_size: int, in_chans: int = 3) -> torch.Tensor:
    """The deterministic synthetic input of ``request`` (what every run of this config sees)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + request)
    return torch.randn(cfg.batch_size, in_chans, img_size, img_size, generator=g)


def default_devices(world_size: int) -> list[DeviceProfile]:
    return [DeviceProfile(name=f"rank{r}", kind="cpu") for r in range(world_size)]


def build_plan_from_cuts(model_name: str, unit_names: list[str], cuts, devices: list[DeviceProfile],
                         *, img_size: int, batch_size: int) -> Plan:
    """A pipeline plan that puts stage ``i`` (between consecutive ``cuts``) on rank ``i``."""
    from ..models.base import Unit, resolve_cuts

    fake = [Unit(i, n, "block", (n,), None) for i, n in enumerate(unit_names)]
    idx = resolve_cuts(fake, cuts)
    bounds = [0, *idx, len(unit_names)]
    if len(bounds) - 1 > len(devices):
        raise ValueError(f"cuts make {len(bounds) - 1} stages but only {len(devices)} devices")
    stages = [StagePlan(index=i, rank=i, device=devices[i].name, units=unit_names[a:b])
              for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return Plan(model=model_name, strategy="cuts", devices=[d.name for d in devices],
                stages=stages, img_size=img_size, batch_size=batch_size, objective="none",
                meta={"cuts": idx})


def check_plan(plan: Plan, unit_names: list[str], world_size: int, where: str = "plan") -> None:
    """A pipeline plan must cover the model's units in order, on launched ranks, at full width."""
    if not plan.stages:
        raise ValueError(f"{where}: has no stages")
    ranks = sorted({s.rank for s in plan.stages})
    extra = [r for r in ranks if r >= world_size or r < 0]
    if extra:
        raise ValueError(f"{where}: needs ranks {ranks} but only {world_size} rank(s) were "
                         f"launched (ranks 0..{world_size - 1}); rank(s) {extra} do not exist")
    flat = [u for s in sorted(plan.stages, key=lambda s: s.index) for u in s.units]
    if flat != list(unit_names):
        unknown = [u for u in flat if u not in unit_names]
        raise ValueError(f"{where}: its stages do not list the units of {plan.model!r} once each, in "
                         f"order" + (f"; unknown unit(s) {unknown}" if unknown else "")
                         + f"; units are: {', '.join(unit_names)}")
    for s in plan.stages:
        if s.width != 1.0 or s.keep_ratio != 1.0:
            raise ValueError(
                f"{where}: stage {s.index} asks width={s.width}, keep_ratio={s.keep_ratio}; the "
                "pipeline runtime runs full width without summarization (allowed: 1.0, 1.0)")


def stage_settings(stage: StagePlan, remaining_j: float | None) -> tuple[float, float]:
    """Algorithm 3's per-request hook: the (width, keep_ratio) a stage runs at for its energy.

    The plan fixes both (validated to 1.0 by :func:`check_plan`); an energy-driven width
    controller replaces this function when elastic layers are wired into the runtime.
    """
    return stage.width, stage.keep_ratio


class _Store:
    """Key helpers over a store client (all keys live under one run prefix)."""

    def __init__(self, store, prefix: str):
        self.s, self.p = store, prefix

    def k(self, *parts) -> str:
        return self.p + "/".join(str(p) for p in parts)

    def set(self, key, value: str):
        self.s.set(self.k(key) if isinstance(key, str) else self.k(*key), value)

    def get_json(self, *parts):
        return json.loads(self.s.get(self.k(*parts)))

    def has(self, *parts) -> bool:
        return self.s.check([self.k(*parts)])

    def add(self, key: str, n: int) -> int:
        return self.s.add(self.k(key), n)


def _wait_key(st: _Store, parts, timeout_s: float | None, abort_check=True):
    t0 = time.time()
    sleep = 1e-4
    while not st.has(*parts):
        if abort_check and st.has("abort"):
            raise RendezvousError(st.s.get(st.k("abort")).decode())
        if timeout_s is not None and time.time() - t0 > timeout_s:
            return False
        time.sleep(sleep)
        sleep = min(sleep * 2, 0.01)
    return True


def _client(host: str, port: int, timeout_s: float = 86400.0):
    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


class _Heartbeat(threading.Thread):
    """Writes ``tele/<rank>`` (wall time ``hb`` and energy telemetry) every interval."""

    def __init__(self, host, port, prefix, rank, interval_s, telemetry):
        super().__init__(daemon=True)
        self.store = _Store(dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                          timeout=datetime.timedelta(seconds=60)), prefix)
        self.rank, self.interval_s, self.telemetry = rank, interval_s, telemetry
        self.stopped = threading.Event()

    def beat(self):
        self.store.set(("tele", self.rank), json.dumps(self.telemetry()))

    def run(self):
        while not self.stopped.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # the store is gone: the run is over
                return


class _Watcher(threading.Thread):
    """Rank 0: reads every rank's telemetry and the abort key every interval, off the main
    thread (whose store round trips would otherwise sit between stages and outputs)."""

    def __init__(self, host, port, prefix, world_size, interval_s):
        super().__init__(daemon=True)
        self.store = _Store(_client(host, port, 60.0), prefix)
        self.ranks, self.interval_s = list(range(1, world_size)), interval_s
        self.tele: dict[int, dict] = {}
        self.abort: str | None = None
        self.error: str | None = None
        self.stopped = threading.Event()

    def read(self) -> None:
        st = self.store
        if st.has("abort"):
            self.abort = st.s.get(st.k("abort")).decode()
        if self.ranks:  # every rank wrote its telemetry before the run started
            vals = st.s.multi_get([st.k("tele", r) for r in self.ranks])
            self.tele = {r: json.loads(v) for r, v in zip(self.ranks, vals)}  # one swap

    def run(self):
        while not self.stopped.wait(self.interval_s):
            try:
                self.read()
            except Exception as e:  # the coordinator's monitor() raises it
                self.error = f"{type(e).__name__}: {e}"
                return


def _prepare(cfg: RunConfig, st: _Store, world_size: int):
    """Coordinator setup: checkpoint, devices, plan. Returns the setup dict all ranks read."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    host, ul = build_host(cfg.model, cfg.model_kwargs, cfg.img_size)
    from ..models.base import default_img_size

    img_size = cfg.img_size or default_img_size(host)
    if cfg.checkpoint is None:
        ckpt = default_checkpoint_path(out, cfg.model, cfg.seed, cfg.model_kwargs)
        if not ckpt.exists():
            write_checkpoint(ckpt, cfg.model, model_kwargs=cfg.model_kwargs, seed=cfg.seed)
    else:
        ckpt = Path(cfg.checkpoint)
    check_checkpoint(ckpt, host, cfg.model)
    if cfg.devices is not None:
        from ..profile.devices import load_devices

        devices = load_devices(cfg.devices)
    else:
        devices = default_devices(world_size)
    if cfg.mode != "pipeline":
        return _prepare_collective(cfg, world_size, out, ckpt, img_size, devices)
    names = [u.name for u in ul]
    if cfg.plan is not None:
        plan = Plan.load(cfg.plan)
        where = f"plan {cfg.plan}"
        if cfg.devices is None:
            devices = [DeviceProfile(name=n) for n in plan.devices]
        elif [d.name for d in devices] != list(plan.devices):
            raise ValueError(f"{where}: is for devices {list(plan.devices)}, but {cfg.devices} "
                             f"lists {[d.name for d in devices]} (same names, in rank order)")
    elif cfg.cuts is not None:
        plan = build_plan_from_cuts(cfg.model, names, cfg.cuts, devices, img_size=img_size,
                                    batch_size=cfg.batch_size // cfg.micro_batches)
        where = "plan from cuts"
    else:
        from ..plan import create_plan

        plan = create_plan(_profile(cfg, img_size), devices, strategy=cfg.strategy,
                           objective=cfg.objective)
        where = f"plan from strategy {cfg.strategy!r}"
    if plan.model != cfg.model:
        raise ValueError(f"{where}: is for model {plan.model!r}, the config runs {cfg.model!r}")
    check_plan(plan, names, world_size, where)
    plan.save(out / "plan.json")
    return {"checkpoint": str(ckpt), "img_size": img_size, "plan": plan.to_dict(),
            "devices": [d.to_dict() for d in devices], "t0": time.time()}


def _prepare_collective(cfg, world_size, out, ckpt, img_size, devices):
    if len(devices) < world_size:
        raise ValueError(f"devices: {len(devices)} device(s) for {world_size} ranks; mode "
                         f"{cfg.mode!r} runs one device per rank")
    ckpts = [str(ckpt)] * world_size
    if cfg.mode == "ensemble":
        from .collective import ensemble_model_names
        from .ensemble import list_aggregators

        if cfg.aggregator not in list_aggregators():
            raise ValueError(f"aggregator: {cfg.aggregator!r} is not allowed; allowed: "
                             f"{list_aggregators()}")
        ckpts = []
        for r, name in enumerate(ensemble_model_names(cfg, world_size)):
            path = default_checkpoint_path(out, name, cfg.seed + r, cfg.model_kwargs)
            if not path.exists():
                write_checkpoint(path, name, model_kwargs=cfg.model_kwargs, seed=cfg.seed + r)
            ckpts.append(str(path))
    return {"checkpoint": str(ckpt), "checkpoints": ckpts, "img_size": img_size, "plan": None,
            "devices": [d.to_dict() for d in devices[:world_size]], "t0": time.time()}


_PROFILES: dict = {}


def _profile(cfg: RunConfig, img_size: int):
    key = (cfg.model, json.dumps(cfg.model_kwargs, sort_keys=True), img_size)
    if key not in _PROFILES:
        from ..models.base import create_model
        from ..profile import profile_model

        model = create_model(cfg.model, **cfg.model_kwargs)
        _PROFILES[key] = profile_model(model, img_size=img_size,
                                       batch_size=max(1, cfg.batch_size // cfg.micro_batches))
    return _PROFILES[key]


class _Worker:
    """State of one rank during a pipeline run."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, st: _Store, setup: dict,
                 device: torch.device, placement: Placement | None = None,
                 malloc_tuned: bool = False):
        self.cfg, self.rank, self.world_size, self.st = cfg, rank, world_size, st
        self.device = device
        self.img_size = setup["img_size"]
        self.devices = [DeviceProfile.from_dict(d) for d in setup["devices"]]
        self.t0 = setup["t0"]
        self.plan = Plan.from_dict(setup["plan"])
        self.model = RankModel(cfg.model, setup["checkpoint"], model_kwargs=cfg.model_kwargs,
                               img_size=self.img_size, device=device)
        self.n = self.model.num_units
        self.m = cfg.micro_batches
        self.total = cfg.requests * self.m
        self.transport = Transport(rank, device)
        self.cache = BoundaryCache(cfg.cache_budget_bytes, cfg.spill_dir, tag=f"rank{rank}")
        self.gen = 0
        self.epoch = 0
        self.done_upto = 0
        self.report = RankReport(rank=rank)
        self.weights_loaded = 0
        self.meter = None
        self.energy_min_j = 0.0
        self.fired: set[int] = set()
        self.refused = 0
        self.below_since: float | None = None
        self.cpu0 = _cpu_time()
        self.placement = placement
        self.malloc_tuned = malloc_tuned
        self._apply_plan(self.plan)
        self._make_meter()
        for i, f in enumerate(cfg.faults):
            if f.kind == "drain" and f.rank == rank and not hasattr(self.meter, "drain"):
                raise ValueError(f"faults[{i}]: 'drain' needs a battery on rank {rank}, but its "
                                 f"device {self.report.device!r} has no 'simulated' meter")

    # -- plan -------------------------------------------------------------------------------
    def _apply_plan(self, plan: Plan) -> None:
        self.plan = plan
        idx = self.model.unit_index
        self.owner = [0] * self.n
        self.stage_of = [None] * self.n
        self.end_of = [0] * self.n
        for s in plan.stages:
            ids = [idx[u] for u in s.units]
            for i in ids:
                self.owner[i], self.stage_of[i], self.end_of[i] = s.rank, s, ids[-1] + 1
        mine = [u for s in plan.stages_of_rank(self.rank) for u in s.units]
        self.model.release_units([u for u in self.model.loaded if u not in mine])
        self.weights_loaded += self.model.load_units(mine)
        self.report.units = mine

    @torch.no_grad()
    def warm_up(self) -> None:
        """Run each own stage once on zeros of its input shape (untimed, unmetered), so the
        first request does not pay for lazy initialization."""
        mb = -(-self.cfg.batch_size // self.m)
        for s in self.plan.stages_of_rank(self.rank):
            a = self.model.unit_index[s.units[0]]
            shape = (mb, *self.model.units[a].in_shape[1:])
            self.model.run(torch.zeros(shape, device=self.device), a, self.end_of[a])

    def _make_meter(self) -> None:
        stages = self.plan.stages_of_rank(self.rank)
        name = stages[0].device if stages else None
        dev = next((d for d in self.devices if d.name == name), None)
        if dev is None and self.rank < len(self.devices) and not stages:
            dev = self.devices[self.rank]
        self.report.device = dev.name if dev is not None else f"rank{self.rank}"
        if dev is None or dev.meter == "null":
            return
        from ..energy import create_meter_for_device

        self.meter = create_meter_for_device(dev)
        self.energy_min_j = dev.energy_min_j
        self.report.energy_label = "measured" if self.meter.measured else "modelled"

    def telemetry(self) -> dict:
        m = self.meter
        if self.below_since is None and self.below_min():
            self.below_since = time.time()
        return {"hb": time.time(), "below_since": self.below_since,
                "energy_j": m.energy_j() if m else 0.0,
                "remaining_j": m.remaining_j() if m else None,
                "energy_min_j": self.energy_min_j, "items": self.report.items,
                "device": self.report.device, "energy_label": self.report.energy_label,
                "bytes_sent": self.transport.bytes_sent,
                "bytes_received": self.transport.bytes_received,
                "compute_s": self.report.compute_s}

    # -- per item (Algorithm 3) -------------------------------------------------------------
    def _faults(self, item: int) -> None:
        req = item // self.m
        for i, f in enumerate(self.cfg.faults):
            if f.rank != self.rank or req < f.at_request or i in self.fired:
                continue
            self.fired.add(i)
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "drain" and self.meter is not None and hasattr(self.meter, "drain"):
                rem = self.meter.remaining_j() or 0.0
                self.meter.drain(max(0.0, rem - self.energy_min_j) + 1e-3 * max(1.0, rem))

    def below_min(self) -> bool:
        if self.meter is None:
            return False
        rem = self.meter.remaining_j()
        return rem is not None and rem < self.energy_min_j

    def process(self, msg) -> None:
        """Run this rank's units from ``msg.unit`` to its stage's end and send the result on.

        Below E_min a rank refuses work: it tells the coordinator at once and drops the item,
        which its sender still holds in its cache and re-sends to the new owner after re-planning.
        """
        if self.cfg.faults:
            self._faults(msg.item)
        if self.meter is not None and msg.nbytes and hasattr(self.meter, "record_bytes"):
            self.meter.record_bytes(received=msg.nbytes)
        if self.meter is not None and self.below_min():
            self.refused += 1
            if self.refused == 1:
                self.st.set(("tele", self.rank), json.dumps(self.telemetry()))
            return
        u = msg.unit
        e = self.end_of[u]
        stage_settings(self.stage_of[u], self.meter.remaining_j() if self.meter else None)
        x = msg.tensor if self.device.type == "cpu" else msg.tensor.to(self.device)
        t0 = time.time()
        c0 = time.perf_counter()
        y = self.model.run(x, u, e)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - c0
        self.report.compute_s += dt
        self.report.items += 1
        self.report.timeline.append([msg.item, u, e, t0 - self.t0, t0 + dt - self.t0])
        if self.meter is not None and hasattr(self.meter, "record_compute"):
            self.meter.record_compute(dt)
        self.cache.put(msg.item, e, y)
        dst = self.owner[e] if e < self.n else 0
        sent = self.transport.send(dst, msg.item, e, y)
        if self.meter is not None and sent and hasattr(self.meter, "record_bytes"):
            self.meter.record_bytes(sent=sent)

    def idle(self, dt: float) -> None:
        self.report.idle_s += dt
        if self.meter is not None and hasattr(self.meter, "record_idle"):
            self.meter.record_idle(dt)

    # -- control ----------------------------------------------------------------------------
    def mark_done(self, done: int) -> None:
        """Items below ``done`` are complete: finish their sends, drop their cached boundaries."""
        if done > self.done_upto:
            self.transport.release(range(self.done_upto, done))
            self.cache.evict_below(done)
            self.done_upto = done

    def read_state(self, epoch: int | None = None) -> dict | None:
        """The control state if its epoch moved past this rank's (``epoch`` from a control
        message, else read from the store), else ``None``."""
        if epoch is None:
            epoch = int(self.st.s.get(self.st.k("epoch")))
        if epoch <= self.epoch:
            return None
        self.epoch = epoch
        return self.st.get_json("state")

    def inventory(self) -> dict[int, int]:
        return {k: u for k, u in self.cache.inventory().items() if k >= self.done_upto}

    def resume(self, entries) -> None:
        """Re-send the cached boundaries the coordinator picked to their new owners."""
        for item, u in entries:
            _, x = self.cache.get(item, self.device)
            dst = self.owner[u] if u < self.n else 0
            self.transport.send(dst, item, u, x)

    def finish_report(self, status: str) -> RankReport:
        r = self.report
        r.status = status
        r.cpu_s = _cpu_time() - self.cpu0
        if self.placement is not None and self.placement.cpus:
            r.cpus = list(self.placement.cpus)
        r.comm_s = self.transport.comm_time_s + self.transport.recv_time_s
        r.bytes_sent, r.bytes_received = self.transport.bytes_sent, self.transport.bytes_received
        r.messages_sent = self.transport.messages_sent
        r.messages_received = self.transport.messages_received
        if self.meter is not None:
            r.energy_j, r.remaining_j = self.meter.energy_j(), self.meter.remaining_j()
        r.param_bytes = self.model.param_bytes()
        r.weights_loaded_bytes = self.weights_loaded
        r.cache_peak_bytes = self.cache.peak_bytes
        durations = [t1 - t0 for *_, t0, t1 in r.timeline]
        r.stage_p50_s, r.stage_p95_s = percentile(durations, 50), percentile(durations, 95)
        r.cache_spilled, r.cache_dropped = self.cache.spilled, self.cache.dropped
        return r


_PUBLISH_S = 0.05  # how often the coordinator tells followers how far items are done
_OVERDUE_S = 0.05  # a busy coordinator interrupts its work for duties this late
_SAFETY_POLL_S = 1.0  # a follower with no message for this long looks at the store itself


def _cpu_time() -> float:
    """CPU time of this process (user + system, all threads)."""
    t = os.times()
    return t.user + t.system


def _next_message(w: _Worker, until: float):
    """The next message, waiting at most until ``until`` (monotonic); idle time is metered."""
    msg = w.transport.poll()
    if msg is None:
        t0 = time.monotonic()
        msg = w.transport.poll(timeout_s=max(1e-4, until - t0))
        w.idle(time.monotonic() - t0)
    return msg


def _follower_loop(w: _Worker) -> str:
    """Every rank but the coordinator: process messages, follow control changes."""
    while True:
        msg = _next_message(w, time.monotonic() + _SAFETY_POLL_S)
        if msg is not None and msg.kind == DATA:
            w.process(msg)
            continue
        epoch = None
        if msg is not None and msg.kind == CONTROL:
            w.mark_done(msg.unit)
            epoch = msg.item
        state = w.read_state(epoch)
        if msg is not None and msg.kind == GONE and msg.src == 0 and state is None:
            state = w.st.get_json("state")
            if not (state.get("stop") or state.get("abort")):
                raise RendezvousError("rank 0 (the coordinator) is gone: its stream to rank "
                                      f"{w.rank} ended without a goodbye ({msg.error})")
        if state is None:
            continue
        if state.get("abort"):
            raise RendezvousError(state["abort"])
        if state["gen"] > w.gen:
            if not _follow_replan(w, state["gen"]):
                return "left"
            continue
        if state.get("stop"):
            return "ok"


def _follow_replan(w: _Worker, gen: int) -> bool:
    plan = Plan.from_dict(w.st.get_json("plan", gen))
    w.transport.set_generation(gen)
    w.gen = gen
    if not plan.stages_of_rank(w.rank):
        return False
    w.st.set(("g", gen, "inv", w.rank), json.dumps(w.inventory()))
    w._apply_plan(plan)
    while not w.st.has("g", gen, "resume"):
        state = w.read_state()
        if state is not None and state["gen"] > gen:  # another failure during recovery
            return _follow_replan(w, state["gen"])
        if state is not None and state.get("abort"):
            raise RendezvousError(state["abort"])
        time.sleep(1e-3)
    resume = w.st.get_json("g", gen, "resume")
    w.resume(resume.get(str(w.rank), []))
    return True


class _Coordinator:
    """Rank 0: feeds items, collects outputs, watches ranks, re-plans."""

    def __init__(self, w: _Worker, st: _Store):
        self.w, self.st, self.cfg = w, st, w.cfg
        cfg = w.cfg
        self.outputs: dict[int, torch.Tensor] = {}
        self.issue_time: dict[int, float] = {}
        self.done_time: dict[int, float] = {}
        self.next_item = 0
        self.done_mark = 0
        self.duplicates = 0
        over = w.placement is not None and w.placement.oversubscribed
        # ranks that share cores compete less with fewer items in flight (benchmarks/pipeline.py)
        self.window = cfg.max_inflight or (len(w.plan.stages) + 2 if over
                                           else 2 * len(w.plan.stages) + 2 * w.m)
        self.active = sorted({s.rank for s in w.plan.stages} - {0})
        self.failed: dict[int, dict] = {}
        self.left: list[int] = []
        self.replans: list[ReplanEvent] = []
        self.telemetry: dict[int, dict] = {}
        self.next_monitor = 0.0
        self.next_publish = 0.0
        self.pushed = (-1, -1)  # (epoch, done) last sent to the followers
        self.bar = None
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.requests, desc=f"{cfg.model} on {w.world_size} ranks",
                            unit="req")
        self._req_cache: dict[int, list[torch.Tensor]] = {}

    def bump(self, **state):
        cur = self.st.get_json("state")
        cur.update(state)
        self.st.set("state", json.dumps(cur))
        self.w.epoch = self.st.add("epoch", 1)
        self.push()

    def push(self) -> None:
        """Send every live follower the control epoch and how far items are done."""
        w = self.w
        now = (w.epoch, self.done_mark)
        if now == self.pushed:
            return
        self.pushed = now
        for r in range(1, w.world_size):
            if r not in self.failed and r not in self.left:
                w.transport.send_control(r, w.epoch, self.done_mark)

    def _input(self, item: int) -> torch.Tensor:
        req, mb = divmod(item, self.w.m)
        if req not in self._req_cache:
            self._req_cache = {req: list(torch.tensor_split(
                request_input(self.cfg, req, self.w.img_size), self.w.m))}
        return self._req_cache[req][mb]

    def issue(self) -> None:
        """Feed items up to the in-flight window. When this rank runs the first unit, it feeds
        one item at a time (the next once the last has started), so making inputs does not
        delay the first stage's work."""
        w = self.w
        while self.next_item < w.total and self.next_item - self.done_count() < self.window:
            if w.owner[0] == w.rank and any(m.unit == 0 for m in w.transport.local):
                return
            k = self.next_item
            x = self._input(k).to(w.device)
            self.issue_time[k] = time.time()
            w.transport.send(w.owner[0], k, 0, x)
            self.next_item += 1

    def done_count(self) -> int:
        return len(self.outputs)

    def collect(self, msg) -> None:
        k = msg.item
        if k in self.outputs:
            self.duplicates += 1
            return
        self.outputs[k] = msg.tensor.cpu()
        self.done_time[k] = time.time()
        req = k // self.w.m
        if self.bar is not None and all((req * self.w.m + b) in self.outputs for b in range(self.w.m)):
            self.bar.update(1)
        while self.done_mark in self.outputs:
            self.done_mark += 1

    def publish_done(self) -> None:
        """Tell the ranks how far every item is done (they release sends and evict caches);
        every ``_PUBLISH_S`` rather than per item."""
        self.w.mark_done(self.done_mark)
        self.push()

    # -- monitoring and re-planning ---------------------------------------------------------
    def monitor(self) -> None:
        if self.watcher.abort:  # a rank failed with an error (not a fault): end the run
            raise RendezvousError(self.watcher.abort)
        if self.watcher.error:  # stale telemetry would read as every rank dying
            raise RuntimeError(f"rank 0 cannot read the ranks' telemetry from the store: "
                               f"{self.watcher.error}")
        seen = self.watcher.tele
        self.telemetry.update({r: seen[r] for r in self.active if r in seen})
        now = time.time()
        dead, low = [], []
        for r in self.active:
            hb = self.telemetry[r]["hb"]
            if now - hb > self.cfg.heartbeat_timeout_s:
                dead.append((r, now - hb))
                continue
            t = self.telemetry[r]
            if t.get("remaining_j") is not None and t["remaining_j"] < t["energy_min_j"]:
                low.append((r, max(0.0, now - (t.get("below_since") or now))))
        w = self.w
        if w.below_min() and w.plan.stages_of_rank(0) and 0 not in self.left:
            low.append((0, max(0.0, now - (w.telemetry()["below_since"] or now))))
        if dead:
            self.replan("failure", [r for r, _ in dead], detect_s=max(a for _, a in dead))
        elif low:
            self.replan("low_energy", [r for r, _ in low], detect_s=max(a for _, a in low))

    def _device_of(self, r: int) -> str:
        s = self.w.plan.stages_of_rank(r)
        return s[0].device if s else f"rank{r}"

    def replan(self, kind: str, ranks: list[int], detect_s: float) -> None:
        from ..plan.redistribute import RedistributionEvent, redistribute

        w = self.w
        t_start = time.time()
        names = [self._device_of(r) for r in ranks]
        if dist.get_backend() != "gloo":
            raise RuntimeError(f"{kind} of {names}: re-planning needs the gloo backend (tagged "
                               f"point-to-point); this run uses {dist.get_backend()!r}")
        # the planner sees every device's current energy (device i is rank i)
        devices = list(w.devices)
        tele = dict(self.telemetry)
        if w.meter is not None:
            tele[0] = w.telemetry()
        for r, t in tele.items():
            if r < len(devices) and t.get("remaining_j") is not None:
                devices[r] = DeviceProfile.from_dict({**devices[r].to_dict(),
                                                      "energy_remaining_j": t["remaining_j"]})
        # ranks that failed or left earlier have no process to come back to: keep them out
        gone = [d.name for r, d in enumerate(devices) if r in self.failed or r in self.left]
        new_plan = redistribute(w.plan, _profile(self.cfg, w.img_size), devices,
                                RedistributionEvent(kind=kind, devices=names + [
                                    n for n in gone if n not in names]))
        check_plan(new_plan, [u.name for u in w.model.units], w.world_size,
                   f"re-plan after {kind} of {names}")
        if any(new_plan.stages_of_rank(r) for r in ranks):
            raise RuntimeError(f"redistribute kept units on {names} after a {kind} event")
        for r in ranks:
            if kind == "failure":
                self.failed[r] = {**self.telemetry.get(r, {}),
                                  "units": [u for st in w.plan.stages_of_rank(r) for u in st.units]}
            else:
                self.left.append(r)
        gen = w.gen + 1
        self.st.set(("plan", gen), json.dumps(new_plan.to_dict()))
        self.bump(gen=gen)
        w.transport.set_generation(gen)
        w.gen = gen
        old_plan = w.plan
        w._apply_plan(new_plan)
        self.active = sorted({s.rank for s in new_plan.stages} - {0})
        # gather what every survivor has cached (a rank that does not answer is dead too)
        inv: dict[int, dict[int, int]] = {}
        deadline = time.time() + self.cfg.heartbeat_timeout_s + 5.0
        for r in self.active:
            while not self.st.has("g", gen, "inv", r):
                if time.time() > deadline:
                    raise RuntimeError(f"rank {r} did not report its cache after re-plan {gen}")
                time.sleep(1e-3)
            inv[r] = {int(k): u for k, u in self.st.get_json("g", gen, "inv", r).items()}
        inv[0] = {k: u for k, u in w.inventory().items()}
        resume: dict[str, list] = {}
        resumed_at: dict[str, int] = {}
        points: dict[str, list[int]] = {}  # item -> [resumed from, furthest boundary cached]
        for k in range(self.next_item):
            if k in self.outputs:
                continue
            best_u, best_r = 0, 0
            for r, held in inv.items():
                if k in held and held[k] > best_u:
                    best_u, best_r = held[k], r
            resume.setdefault(str(best_r), []).append([k, best_u])
            resumed_at[str(best_u)] = resumed_at.get(str(best_u), 0) + 1
            points[str(k)] = [best_u, max([0] + [held[k] for held in inv.values() if k in held])]
        self.st.set(("g", gen, "resume"), json.dumps(resume))
        for k, u in resume.get("0", []):
            if u == 0:
                # inputs are not kept: request_input makes the same tensor again
                w.transport.send(w.owner[0], k, 0, self._input(k).to(w.device))
            else:
                w.resume([[k, u]])
        self.replans.append(ReplanEvent(
            generation=gen, kind=kind, devices=names, ranks=ranks, time_s=t_start - w.t0,
            detect_s=detect_s, recovery_s=time.time() - t_start,
            moves=list(new_plan.meta.get("moves", [])), resumed=resumed_at, resume_points=points,
            stages=[{"rank": s.rank, "device": s.device, "units": s.units} for s in new_plan.stages]))
        del old_plan

    def duties(self, now: float) -> None:
        """Publish progress and watch the ranks, when due."""
        if now >= self.next_publish:
            self.next_publish = now + _PUBLISH_S
            self.publish_done()
        if now >= self.next_monitor:
            self.next_monitor = now + self.watcher.interval_s
            self.monitor()

    def loop(self) -> None:
        """Feed, compute, collect; the periodic duties run while this rank waits for a message,
        or once they are ``_OVERDUE_S`` late on a rank that never waits."""
        w = self.w
        while self.done_count() < w.total:
            self.issue()
            msg = w.transport.poll()
            now = time.monotonic()
            due = min(self.next_publish, self.next_monitor)
            if now >= due + (0.0 if msg is None else _OVERDUE_S):
                self.duties(now)
                due = min(self.next_publish, self.next_monitor)
                if msg is not None and msg.gen != w.gen:  # polled before a re-plan: the
                    w.transport.drop_stale()  # resume already re-sent its item
                    msg = None
            if msg is None:
                msg = _next_message(w, due)
            if msg is None or msg.kind != DATA:  # a follower's stream ending is seen by monitor()
                continue
            if msg.unit == w.n:
                self.collect(msg)
            else:
                w.process(msg)
        if self.bar is not None:
            self.bar.close()


def _device_for(backend: str, rank: int) -> torch.device:
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


def run_rank(cfg: RunConfig, rank: int, world_size: int, host: str, port: int,
             prefix: str = "lapdtr/") -> RunReport | None:
    """Run one rank of ``cfg``. Returns the ``RunReport`` on rank 0 (``None`` elsewhere)."""
    store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(60.0, cfg.join_timeout_s * 2)))
    st = _Store(store, prefix)
    try:
        return _run_rank(cfg, rank, world_size, st, host, port, prefix)
    except BaseException as e:
        msg = f"rank {rank}: {type(e).__name__}: {e}"
        try:
            st.set(("error", rank), msg)
            if not st.has("abort"):
                st.set("abort", msg)
                cur = st.get_json("state") if st.has("state") else {"gen": 0}
                cur["abort"] = msg
                st.set("state", json.dumps(cur))
                st.add("epoch", 1)
        except Exception:
            pass
        raise


def _run_rank(cfg, rank, world_size, st: _Store, host, port, prefix):
    malloc_tuned = tune_malloc() if cfg.tune_malloc else False
    st.set(("join", rank), repr(time.time()))
    if rank == 0:
        if not _wait_all(st, "join", world_size, cfg.join_timeout_s):
            missing = [r for r in range(world_size) if not st.has("join", r)]
            raise RendezvousError(f"rank(s) {missing} did not join within {cfg.join_timeout_s} s "
                                  f"(world_size={world_size})")
        setup = _prepare(cfg, st, world_size)
        st.add("epoch", 0)  # exists before any rank reads it
        st.set("state", json.dumps({"gen": 0}))
        st.set("setup", json.dumps(setup))
    else:
        _wait_key(st, ("setup",), None)
        setup = st.get_json("setup")
    backend = resolve_backend(cfg)
    placement = None
    if backend == "gloo":  # before the process group, whose threads inherit the pinning
        placement = place_rank(int(os.environ.get("LOCAL_RANK", rank)),
                               int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                               cfg.threads_per_rank, cfg.pin_cpus)
        apply_placement(placement)
    dist.init_process_group(backend, store=dist.PrefixStore(prefix + "pg", st.s), rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=max(60.0, cfg.join_timeout_s)))
    try:
        if cfg.mode != "pipeline":
            return _run_collective_rank(cfg, rank, world_size, st, setup,
                                        _device_for(backend, rank))
        w = _Worker(cfg, rank, world_size, st, setup, _device_for(backend, rank), placement,
                    malloc_tuned)
        hb = _Heartbeat(host, port, prefix, rank, cfg.heartbeat_interval_s, w.telemetry)
        hb.beat()
        if rank != 0:  # nobody watches the coordinator's heartbeat: it reads its own telemetry
            hb.start()
        w.warm_up()
        st.set(("ready", rank), "1")
        if rank == 0:
            if not _wait_all(st, "ready", world_size, cfg.join_timeout_s):
                missing = [r for r in range(world_size) if not st.has("ready", r)]
                raise RendezvousError(f"rank(s) {missing} did not load their stages within "
                                      f"{cfg.join_timeout_s} s (join_timeout_s)")
            st.set("go", "1")
        else:
            _wait_key(st, ("go",), None)
        w.cpu0 = _cpu_time()
        helpers = [hb]
        try:
            if rank == 0:
                co = _Coordinator(w, st)
                co.watcher = _Watcher(host, port, prefix, world_size, cfg.heartbeat_interval_s)
                helpers.append(co.watcher)
                co.watcher.read()
                co.watcher.start()
                t_start = co.t_start = time.time()
                co.loop()
                wall = time.time() - t_start
                co.bump(stop=True)
                _stop(helpers)
                w.transport.close()
                return _finish(co, w, st, wall)
            status = _follower_loop(w)
            _stop(helpers)
            w.transport.close()
            st.set(("report", rank), json.dumps(w.finish_report(status).__dict__))
            return None
        finally:
            _stop(helpers)
    finally:
        dist.destroy_process_group()


def _stop(threads) -> None:
    """Stop and join the store helper threads: one still inside a store call when the process
    exits would abort it ("terminate called without an active exception")."""
    for t in threads:
        t.stopped.set()
    for t in threads:
        if t.is_alive():
            t.join(5.0)


def _wait_all(st: _Store, key: str, world_size: int, timeout_s: float) -> bool:
    """Wait until every rank has set ``key/<rank>``; ``False`` after ``timeout_s``."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if st.has("abort"):
            raise RendezvousError(st.s.get(st.k("abort")).decode())
        if all(st.has(key, r) for r in range(world_size)):
            return True
        time.sleep(0.01)
    return False


def _finish(co: _Coordinator, w: _Worker, st: _Store, wall: float) -> RunReport:
    cfg = co.cfg
    ranks = [w.finish_report("ok")]
    ranks[0].items_per_s = ranks[0].items / wall if wall > 0 else 0.0
    others = sorted(set(range(1, w.world_size)))
    deadline = time.time() + cfg.heartbeat_timeout_s + 10.0
    for r in others:
        if r in co.failed:
            t = co.failed[r]
            ranks.append(RankReport(rank=r, device=t.get("device", f"rank{r}"), status="failed",
                                    units=t.get("units", []), items=t.get("items", 0), compute_s=t.get("compute_s", 0.0),
                                    bytes_sent=t.get("bytes_sent", 0),
                                    bytes_received=t.get("bytes_received", 0),
                                    energy_j=t.get("energy_j", 0.0),
                                    remaining_j=t.get("remaining_j"),
                                    energy_label=t.get("energy_label", "none")))
            continue
        while not st.has("report", r) and time.time() < deadline:
            time.sleep(1e-3)
        if st.has("report", r):
            ranks.append(RankReport(**st.get_json("report", r)))
        else:
            ranks.append(RankReport(rank=r, status="failed"))
        ranks[-1].items_per_s = ranks[-1].items / wall if wall > 0 else 0.0
    m = w.m
    lat, done_s = [], []
    for req in range(cfg.requests):
        ks = range(req * m, req * m + m)
        if all(k in co.done_time for k in ks):
            lat.append(max(co.done_time[k] for k in ks) - min(co.issue_time[k] for k in ks))
            done_s.append(max(co.done_time[k] for k in ks) - co.t_start)
    completed = len(lat)
    labels = {k.energy_label for k in ranks if k.energy_label != "none"}
    report = RunReport(
        model=cfg.model, mode=cfg.mode, world_size=w.world_size, requests=cfg.requests,
        batch_size=cfg.batch_size, micro_batches=m, wall_s=wall,
        throughput_rps=completed / wall if wall > 0 else 0.0,
        latency_p50_s=percentile(lat, 50), latency_p95_s=percentile(lat, 95),
        latency_mean_s=sum(lat) / len(lat) if lat else 0.0,
        bytes_sent=sum(k.bytes_sent for k in ranks),
        bytes_received=sum(k.bytes_received for k in ranks),
        energy_j=sum(k.energy_j for k in ranks),
        energy_label=(labels.pop() if len(labels) == 1 else ("mixed" if labels else "none")),
        compute_s=sum(k.compute_s for k in ranks), comm_s=sum(k.comm_s for k in ranks),
        completed=completed, duplicates=co.duplicates, lost=cfg.requests - completed,
        ranks=ranks, replans=co.replans, plan=w.plan.to_dict(),
        meta={"checkpoint": str(w.model.checkpoint), "img_size": w.img_size,
              "backend": dist.get_backend(), "torch": torch.__version__,
              "data_path": "gloo/nccl point-to-point: int64 header and payload (on gloo, "
                           "a payload that fits the pre-posted receive goes first; "
                           "transport.py)",
              "request_done_s": done_s, "max_inflight": co.window,
              "ranks_share_cores": bool(w.placement and w.placement.oversubscribed),
              "malloc_tuned": w.malloc_tuned})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.save_outputs:
        from safetensors.torch import save_file

        outs = {f"request{req}": torch.cat([co.outputs[req * m + b] for b in range(m)]).contiguous()
                for req in range(cfg.requests) if all((req * m + b) in co.outputs for b in range(m))}
        save_file(outs, str(out / "outputs.safetensors"))
    return report


class _ModeWorker:
    """A rank of a tensor or ensemble run: the whole (sub-)model, a meter, a report."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, setup: dict,
                 device: torch.device):
        from .collective import ensemble_model_names

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
        self.meter = None
        if dev.meter != "null":
            from ..energy import create_meter_for_device

            self.meter = create_meter_for_device(dev)
            self.report.energy_label = "measured" if self.meter.measured else "modelled"
        self.proportions = self.weights = None
        if cfg.mode == "tensor":
            from .tensor import proportions_from_devices

            self.proportions = (list(cfg.proportions) if cfg.proportions is not None
                                else proportions_from_devices(self.devices))
        elif cfg.aggregator == "weighted":
            from .ensemble import weights_from_devices

            self.weights = weights_from_devices(self.devices)


def _run_collective_rank(cfg, rank, world_size, st: _Store, setup, device):
    from .collective import run_collective_mode

    w = _ModeWorker(cfg, rank, world_size, setup, device)
    outputs: dict[int, torch.Tensor] = {}
    rep, lat, wall = run_collective_mode(w, outputs, cfg, rank, world_size, setup["img_size"])
    durations = [t1 - t0 for *_, t0, t1 in rep.timeline]
    rep.stage_p50_s, rep.stage_p95_s = percentile(durations, 50), percentile(durations, 95)
    rep.items_per_s = rep.items / wall if wall > 0 else 0.0
    if cfg.mode == "tensor":
        from .tensor import get_tensor_comm_stats

        rep.bytes_sent = int(get_tensor_comm_stats(w.model)["bytes_sent"])
    if w.meter is not None:
        rep.energy_j, rep.remaining_j = w.meter.energy_j(), w.meter.remaining_j()
    st.set(("report", rank), json.dumps(rep.__dict__))
    if rank != 0:
        return None
    ranks = [rep]
    for r in range(1, world_size):
        _wait_key(st, ("report", r), cfg.join_timeout_s)
        ranks.append(RankReport(**st.get_json("report", r)))
    labels = {k.energy_label for k in ranks if k.energy_label != "none"}
    report = RunReport(
        model=cfg.model, mode=cfg.mode, world_size=world_size, requests=cfg.requests,
        batch_size=cfg.batch_size, micro_batches=1, wall_s=wall,
        throughput_rps=len(lat) / wall if wall > 0 else 0.0,
        latency_p50_s=percentile(lat, 50), latency_p95_s=percentile(lat, 95),
        latency_mean_s=sum(lat) / len(lat) if lat else 0.0,
        bytes_sent=sum(k.bytes_sent for k in ranks), bytes_received=0,
        energy_j=sum(k.energy_j for k in ranks),
        energy_label=(labels.pop() if len(labels) == 1 else ("mixed" if labels else "none")),
        compute_s=sum(k.compute_s for k in ranks), comm_s=0.0, completed=len(lat),
        duplicates=0, lost=cfg.requests - len(lat), ranks=ranks,
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
