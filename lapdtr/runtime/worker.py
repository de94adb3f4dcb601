"""A rank of a pipeline run: its units, meter, transport and cache (:class:`Worker`), its
per-item chain (``steps``), and the loop every rank but the coordinator runs
(:func:`follower_loop`).

Below E_min a rank refuses work: it tells the coordinator at once and drops the item, which
its sender still holds in its cache and re-sends to the new owner after re-planning.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

from ..energy import NullMeter, create_meter_for_device
from ..plan.types import Plan
from ..profile.types import DeviceProfile
from .config import RunConfig
from .control import RendezvousError, StoreView
from .placement import Placement
from .report import RankReport, percentile
from .stages import RankModel
from .steps import FullWidth, IdentityCodec, ItemWork, Packet, Settings, default_chain
from .transport import CONTROL, DATA, GONE, BoundaryCache, Transport

__all__ = ["Worker", "follower_loop", "next_message", "cpu_time", "SAFETY_POLL_S"]

SAFETY_POLL_S = 1.0  # a follower with no message for this long looks at the store itself


def cpu_time() -> float:
    """CPU time of this process (user + system, all threads)."""
    t = os.times()
    return t.user + t.system


class Worker:
    """State of one rank during a pipeline run."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, st: StoreView, setup: dict,
                 device: torch.device, placement: Placement | None = None,
                 malloc_tuned: bool = False, model: RankModel | None = None,
                 coordinator: int = 0):
        self.cfg, self.rank, self.world_size, self.st = cfg, rank, world_size, st
        self.device = device
        self.coordinator = coordinator
        self.img_size = setup["img_size"]
        self.devices = [DeviceProfile.from_dict(d) for d in setup["devices"]]
        self.t0 = setup["t0"]
        self.plan = Plan.from_dict(setup["plan"])
        self.model = model if model is not None else RankModel(
            cfg.model, setup["checkpoint"], model_kwargs=cfg.model_kwargs,
            img_size=self.img_size, device=device)
        self.n = self.model.num_units
        self.m = cfg.micro_batches
        self.transport = Transport(rank, device)
        self.cache = BoundaryCache(cfg.cache_budget_bytes, cfg.spill_dir, tag=f"rank{rank}")
        self.codec = self._make_codec(cfg, self.plan)
        self.chain = default_chain()
        self.gen = 0
        self.epoch = 0
        self.done_upto = 0
        self.report = RankReport(rank=rank)
        self.weights_loaded = 0
        self.meter = NullMeter()
        self.energy_min_j = 0.0
        self.fired: set[int] = set()
        self.refused = 0
        self.below_since: float | None = None
        self.cpu0 = cpu_time()
        self.placement = placement
        self.malloc_tuned = malloc_tuned
        self.heartbeat = None
        self.widths = FullWidth()
        self._apply_plan(self.plan)
        self._make_meter()
        if cfg.elastic is not None:
            self._make_elastic(cfg.width_policy())
        elif any(s.width != 1.0 for s in self.plan.stages):  # the plan's widths, kept by
            from ..elastic import WidthPolicy                 # every re-plan

            self._make_elastic(WidthPolicy(kind="plan"))
        for i, f in enumerate(cfg.faults):
            if f.kind == "drain" and f.rank == rank and not self.meter.can_drain:
                raise ValueError(f"faults[{i}]: 'drain' needs a battery on rank {rank}, but its "
                                 f"device {self.report.device!r} has no 'simulated' meter")

    def _make_codec(self, cfg: RunConfig, plan: Plan):
        """Summarized boundaries (``summarize`` in the config, or keep ratios or a wire format
        in the plan, as ``lapdtr plan --keep/--wire`` writes them): a
        ``SummaryCodec``; otherwise every boundary as it is."""
        if cfg.summarize is None and plan.meta.get("wire", "fp32") == "fp32" and \
                all(s.keep_ratio == 1.0 for s in plan.stages):
            return IdentityCodec()
        from .summary import SummaryCodec

        wire = cfg.summarize.wire if cfg.summarize is not None else plan.meta.get("wire", "fp32")
        return SummaryCodec(self.model.host, self.model.units, wire)

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
        mb = max(1, -(-self.cfg.batch_size // self.m))
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
        if dev is None:
            return
        self.meter = create_meter_for_device(dev)
        self.energy_min_j = dev.energy_min_j
        self.report.energy_label = self.meter.label

    def _make_elastic(self, policy) -> None:
        """Elastic layers in this rank's model, and the Settings step asking the width
        controller for each item's width from this rank's energy."""
        from ..elastic import make_elastic
        from ..elastic.policy import EnergyWidths

        make_elastic(self.model.host)
        self.widths = EnergyWidths(policy, self.model.host, self.meter.budget_j,
                                   clock=lambda: time.time() - self.t0)
        self.chain = [Settings(self.widths) if isinstance(step, Settings) else step
                      for step in self.chain]

    def telemetry(self) -> dict:
        m = self.meter
        if self.below_since is None and self.below_min():
            self.below_since = time.time()
        now, remaining = time.time(), m.remaining_j()
        if remaining is not None:
            self._trace(now - self.t0, remaining)
        return {"hb": now, "below_since": self.below_since,
                "energy_j": m.energy_j(), "remaining_j": remaining, "drained_j": m.drained_j,
                "energy_min_j": self.energy_min_j, "items": self.report.items,
                "device": self.report.device, "energy_label": self.report.energy_label,
                "bytes_sent": self.transport.bytes_sent,
                "bytes_received": self.transport.bytes_received,
                "compute_s": self.report.compute_s, "width": self.widths.width}

    TRACE_POINTS = 2000

    def _trace(self, t_s: float, remaining_j: float) -> None:
        """Remaining energy over time, for the report's energy plot; halved (every other point
        kept) when it reaches ``TRACE_POINTS``, so a long run keeps its whole span."""
        tr = self.report.energy_trace
        if tr and t_s - tr[-1][0] < 0.02:  # several beats at once (telemetry on demand)
            return
        tr.append([round(t_s, 4), remaining_j])
        if len(tr) >= self.TRACE_POINTS:
            del tr[1:-1:2]

    # -- per item (Algorithm 3) -------------------------------------------------------------
    def _faults(self, item: int) -> None:
        req = item // self.m
        for i, f in enumerate(self.cfg.faults):
            if f.rank != self.rank or req < f.at_request or i in self.fired:
                continue
            self.fired.add(i)
            if f.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "drain" and self.meter.can_drain:
                rem = self.meter.remaining_j() or 0.0
                self.meter.drain(max(0.0, rem - self.energy_min_j) + 1e-3 * max(1.0, rem))

    def below_min(self) -> bool:
        rem = self.meter.remaining_j()
        return rem is not None and rem < self.energy_min_j

    def process(self, msg) -> None:
        """Run this rank's units from ``msg.unit`` to its stage's end and send the result on,
        through the per-item chain (``self.chain``: decode, settings, run, encode, cache,
        send)."""
        if self.cfg.faults:
            self._faults(msg.item)
        if msg.nbytes:
            self.meter.record_bytes(received=msg.nbytes)
        if self.below_min():
            self.refused += 1
            if self.refused == 1:
                self.st.set(("tele", self.rank), json.dumps(self.telemetry()))
            return
        packet = msg.tensor if isinstance(msg.tensor, Packet) else Packet((msg.tensor,))
        work = ItemWork(item=msg.item, unit=msg.unit, end=self.end_of[msg.unit], packet=packet)
        for step in self.chain:
            step(self, work)

    def send_packet(self, dst: int, item: int, unit: int, packet) -> int:
        """One packet to ``dst``; returns the bytes sent (0 when ``dst`` is this rank). A packet
        of one tensor goes as that tensor, one of several as one payload (``wire.pack_packet``)."""
        return self.transport.send(dst, item, unit,
                                   packet.tensors[0] if len(packet.tensors) == 1 else packet)

    def idle(self, dt: float) -> None:
        self.report.idle_s += dt
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
        """Re-send the cached boundaries the coordinator picked to their new owners (each packet
        re-encoded for its new next stage where the codec needs it)."""
        for item, u in entries:
            _, packet = self.cache.get(item, self.device)
            packet = self.codec.reencode(packet, unit=u)
            dst = self.owner[u] if u < self.n else self.coordinator
            self.send_packet(dst, item, u, packet)

    def finish_report(self, status: str) -> RankReport:
        r = self.report
        r.status = status
        r.cpu_s = cpu_time() - self.cpu0
        if self.placement is not None and self.placement.cpus:
            r.cpus = list(self.placement.cpus)
        r.comm_s = self.transport.comm_time_s + self.transport.recv_time_s
        r.bytes_sent, r.bytes_received = self.transport.bytes_sent, self.transport.bytes_received
        r.messages_sent = self.transport.messages_sent
        r.messages_received = self.transport.messages_received
        r.energy_j, r.remaining_j = self.meter.energy_j(), self.meter.remaining_j()
        r.drained_j = self.meter.drained_j
        r.energy_budget_j, r.energy_min_j = self.meter.budget_j, self.energy_min_j
        if r.remaining_j is not None:
            self._trace(time.time() - self.t0, r.remaining_j)
        r.param_bytes = self.model.param_bytes()
        r.weights_loaded_bytes = self.weights_loaded
        r.cache_peak_bytes = self.cache.peak_bytes
        durations = [t1 - t0 for *_, t0, t1 in r.timeline]
        r.stage_p50_s, r.stage_p95_s = percentile(durations, 50), percentile(durations, 95)
        r.cache_spilled, r.cache_dropped = self.cache.spilled, self.cache.dropped
        return r


def next_message(w: Worker, until: float):
    """The next message, waiting at most until ``until`` (monotonic); idle time is metered."""
    msg = w.transport.poll()
    if msg is None:
        t0 = time.monotonic()
        msg = w.transport.poll(timeout_s=max(1e-4, until - t0))
        w.idle(time.monotonic() - t0)
    return msg


def follower_loop(w: Worker) -> str:
    """Every rank but the coordinator: process messages, follow control changes. Returns
    ``"ok"`` when the coordinator stops the run, ``"left"`` when a re-plan gives this rank no
    units, ``"declared_dead"`` when this rank wakes to find it was declared dead (it was stopped
    past the heartbeat timeout) and re-planned around."""
    co = w.coordinator
    while True:
        if w.heartbeat is not None:
            w.heartbeat.check()
        msg = next_message(w, time.monotonic() + SAFETY_POLL_S)
        if msg is not None and msg.kind == DATA:
            w.process(msg)
            continue
        epoch = None
        if msg is not None and msg.kind == CONTROL:
            w.mark_done(msg.unit)
            epoch = msg.item
        state = w.read_state(epoch)
        if msg is not None and msg.kind == GONE and msg.src == co and state is None:
            state = w.st.get_json("state")
            if not (state.get("stop") or state.get("abort")):
                raise RendezvousError(f"rank {co} (the coordinator) is gone: its stream to rank "
                                      f"{w.rank} ended without a goodbye ({msg.error})")
        if state is None:
            continue
        if state.get("abort"):
            raise RendezvousError(state["abort"])
        if state["gen"] > w.gen:
            if w.rank in state.get("failed", []):  # stopped (SIGSTOP, a hang) past the timeout
                print(f"lapdtr: rank {w.rank} was declared dead by the coordinator (no heartbeat "
                      f"for over {w.cfg.heartbeat_timeout_s} s) and its units were re-planned "
                      "onto other ranks; it leaves the run", file=sys.stderr, flush=True)
                return "declared_dead"
            if not _follow_replan(w, state["gen"]):
                return "left"
            continue
        if state.get("stop"):
            return "ok"


def _follow_replan(w: Worker, gen: int) -> bool:
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
