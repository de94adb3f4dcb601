"""The coordinator of a pipeline run (the driver rank, rank 0 unless said otherwise): feeds
inputs, collects outputs, watches ranks, re-plans (Algorithm 3 of LAP-DTR per item).

Work is split into *items*: every input batch submitted (a *request*) is cut into up to
``micro_batches`` items, numbered in submission order. A message carries an item and the unit
its receiver starts at, so after a re-plan any rank can resume an item from any cached boundary:
the holder of the furthest boundary re-sends it to the rank that now owns the next unit. The
coordinator keeps every in-flight input until its item completes (within the in-flight window),
so an item no rank holds a boundary of is made again from its input.

Inputs come from a *source* (:meth:`Coordinator.extend`: an iterator of batches, pulled as the
window frees, as ``lapdtr run`` does with its synthetic requests or a data set) or one batch at
a time (:meth:`Coordinator.submit`, as ``DistributedModel`` does); :meth:`step` advances the
pipeline by one message, so a caller can run it until the outputs it wants are in.
"""
from __future__ import annotations

import json
import time
from collections import deque

import torch
import torch.distributed as dist

from ..profile.types import DeviceProfile
from .control import RendezvousError, StoreView
from .report import ReplanEvent
from .steps import Packet
from .transport import DATA
from .worker import Worker, next_message

__all__ = ["Coordinator", "PUBLISH_S", "OVERDUE_S"]

PUBLISH_S = 0.05  # how often the coordinator tells followers how far items are done
OVERDUE_S = 0.05  # a busy coordinator interrupts its work for duties this late


class Coordinator:
    """Feeds items, collects outputs, watches ranks, re-plans."""

    def __init__(self, w: Worker, st: StoreView, watcher, *, profile_fn, progress_total=None,
                 desc: str = ""):
        self.w, self.st, self.cfg = w, st, w.cfg
        self.watcher = watcher
        self.profile_fn = profile_fn  # () -> the model profile a re-plan uses
        cfg = w.cfg
        # per item, only while it is in flight (a long-lived DistributedModel keeps no record of
        # the items it answered, only each request's latency)
        self.outputs: dict[int, torch.Tensor] = {}  # until the request's output is taken
        self.issue_time: dict[int, float] = {}  # issued, not yet answered
        self.inputs: dict[int, torch.Tensor] = {}  # submitted, not yet answered
        self.item_request: dict[int, int] = {}
        self.done_above: set[int] = set()  # answered items at or above done_mark
        self.pending: deque[int] = deque()  # items submitted, not yet issued
        self.request_items: dict[int, range] = {}  # request -> its items, until taken
        self.req_left: dict[int, int] = {}  # request -> items not yet answered
        self.req_start: dict[int, float] = {}  # request -> when its first item was issued
        self.n_requests = 0  # requests ever submitted
        self.latencies: list[float] = []  # per request answered: last answer - first issue
        self.done_s: list[float] = []  # per request answered: when, since t_start
        self.next_item = 0  # items ever submitted
        self.issued = 0
        self.n_done = 0  # items answered (their outputs may have been handed out since)
        self.done_mark = 0
        self.duplicates = 0
        self._source = None
        self._source_batch = None
        over = w.placement is not None and w.placement.oversubscribed
        # ranks that share cores compete less with fewer items in flight (benchmarks/pipeline.py)
        self.window = cfg.max_inflight or (len(w.plan.stages) + 2 if over
                                           else 2 * len(w.plan.stages) + 2 * w.m)
        self.active = sorted({s.rank for s in w.plan.stages} - {w.rank})
        self.failed: dict[int, dict] = {}
        self.left: list[int] = []
        self.replans: list[ReplanEvent] = []
        self.telemetry: dict[int, dict] = {}
        self.next_monitor = 0.0
        self.next_publish = 0.0
        self.pushed = (-1, -1)  # (epoch, done) last sent to the followers
        self.t_start = time.time()
        self.bar = None
        if cfg.progress and progress_total:
            from tqdm import tqdm

            self.bar = tqdm(total=progress_total, desc=desc, unit="req")

    # -- inputs -----------------------------------------------------------------------------
    def submit(self, x: torch.Tensor, *, micro_batches: int | None = None) -> int:
        """Queue one input batch; returns its request number. It is cut into up to
        ``micro_batches`` (default: the run's) items along dimension 0."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"an input batch must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"an input batch needs a batch dimension of at least 1; got shape "
                             f"{tuple(x.shape)}")
        req = self.n_requests
        self.n_requests += 1
        chunks = torch.tensor_split(x, min(micro_batches or self.w.m, x.shape[0]))
        first = self.next_item
        for c in chunks:
            self.inputs[self.next_item] = c
            self.pending.append(self.next_item)
            self.item_request[self.next_item] = req
            self.next_item += 1
        self.request_items[req] = range(first, self.next_item)
        self.req_left[req] = len(chunks)
        return req

    def extend(self, batches) -> None:
        """Pull input batches from ``batches`` (an iterator) as the in-flight window frees."""
        self._source = iter(batches)

    def _refill(self) -> None:
        while self._source is not None and not self.pending and self.in_flight() < self.window:
            try:
                x = next(self._source)
            except StopIteration:
                self._source = None
                return
            self.submit(x)

    def in_flight(self) -> int:
        return self.issued - self.n_done

    def issue(self) -> None:
        """Feed items up to the in-flight window. When this rank runs the first unit, it feeds
        one item at a time (the next once the last has started), so making inputs does not
        delay the first stage's work."""
        w = self.w
        self._refill()
        while self.pending and self.in_flight() < self.window:
            if w.owner[0] == w.rank and any(m.unit == 0 for m in w.transport.local):
                return
            k = self.pending.popleft()
            now = self.issue_time[k] = time.time()
            self.req_start.setdefault(self.item_request[k], now)
            w.transport.send(w.owner[0], k, 0, self.inputs[k].to(w.device))
            self.issued += 1
            self._refill()

    # -- outputs ----------------------------------------------------------------------------
    def collect(self, msg) -> None:
        k = msg.item
        if k < self.done_mark or k in self.done_above or k not in self.issue_time:
            self.duplicates += 1
            return
        now = time.time()
        y = msg.tensor
        if isinstance(y, Packet):  # the last stage's codec sent several tensors
            y = self.w.codec.decode(y, unit=self.w.n)
        self.outputs[k] = y.cpu()
        self.n_done += 1
        del self.issue_time[k], self.inputs[k]
        req = self.item_request.pop(k)
        self.req_left[req] -= 1
        if not self.req_left[req]:
            del self.req_left[req]
            self.latencies.append(now - self.req_start.pop(req))
            self.done_s.append(now - self.t_start)
            if self.bar is not None:
                self.bar.update(1)
        self.done_above.add(k)
        while self.done_mark in self.done_above:
            self.done_above.discard(self.done_mark)
            self.done_mark += 1

    def request_done(self, req: int) -> bool:
        return 0 <= req < self.n_requests and req not in self.req_left

    def answered(self) -> list[int]:
        """The answered requests whose outputs are still held, in order."""
        return [r for r in self.request_items if r not in self.req_left]

    def output(self, req: int, *, pop: bool = False) -> torch.Tensor:
        """The output of request ``req`` (its items' outputs concatenated in order)."""
        ys = [self.outputs[i] for i in self.request_items[req]]
        if pop:
            for i in self.request_items.pop(req):
                del self.outputs[i]
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    def finished(self) -> bool:
        """Every input submitted (and the source exhausted) has its output."""
        return self._source is None and not self.pending and self.done_mark == self.next_item

    def publish_done(self) -> None:
        """Tell the ranks how far every item is done (they release sends and evict caches);
        every ``PUBLISH_S`` rather than per item."""
        self.w.mark_done(self.done_mark)
        self.push()

    # -- control ----------------------------------------------------------------------------
    def bump(self, **state):
        cur = self.st.get_json("state")
        cur.update(state)
        self.st.set("state", json.dumps(cur))
        self.w.epoch = self.st.add("epoch", 1)
        self.push()

    def followers(self) -> list[int]:
        w = self.w
        return [r for r in range(w.world_size)
                if r != w.rank and r not in self.failed and r not in self.left]

    def push(self) -> None:
        """Send every live follower the control epoch and how far items are done."""
        w = self.w
        now = (w.epoch, self.done_mark)
        if now == self.pushed:
            return
        self.pushed = now
        for r in self.followers():
            w.transport.send_control(r, w.epoch, self.done_mark)

    # -- monitoring and re-planning ---------------------------------------------------------
    def monitor(self) -> None:
        if self.watcher.abort:  # a rank failed with an error (not a fault): end the run
            raise RendezvousError(self.watcher.abort)
        if self.watcher.error:  # stale telemetry would read as every rank dying
            raise RuntimeError(f"rank {self.w.rank} cannot read the ranks' telemetry from the "
                               f"store: {self.watcher.error}")
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
        if w.below_min() and w.plan.stages_of_rank(w.rank) and w.rank not in self.left:
            low.append((w.rank, max(0.0, now - (w.telemetry()["below_since"] or now))))
        if dead:
            self.replan("failure", [r for r, _ in dead], detect_s=max(a for _, a in dead))
        elif low:
            self.replan("low_energy", [r for r, _ in low], detect_s=max(a for _, a in low))

    def _device_of(self, r: int) -> str:
        s = self.w.plan.stages_of_rank(r)
        return s[0].device if s else f"rank{r}"

    def replan(self, kind: str, ranks: list[int], detect_s: float) -> None:
        from ..plan.redistribute import RedistributionEvent, redistribute
        from .prepare import check_plan

        w = self.w
        t_start = time.time()
        names = [self._device_of(r) for r in ranks]
        if dist.get_backend() != "gloo":
            raise RuntimeError(f"{kind} of {names}: re-planning needs the gloo backend (tagged "
                               f"point-to-point); this run uses {dist.get_backend()!r}")
        # the planner sees every device's current energy (device i is rank i)
        devices = list(w.devices)
        tele = dict(self.telemetry)
        tele[w.rank] = w.telemetry()
        for r, t in tele.items():
            if r < len(devices) and t.get("remaining_j") is not None:
                devices[r] = DeviceProfile.from_dict({**devices[r].to_dict(),
                                                      "energy_remaining_j": t["remaining_j"]})
        # ranks that failed or left earlier have no process to come back to: keep them out
        gone = [d.name for r, d in enumerate(devices) if r in self.failed or r in self.left]
        from ..plan.widths import plan_width

        widths = "all" if plan_width(w.plan) != 1.0 else None
        prof = self.profile_fn(widths=widths) if widths else self.profile_fn()
        new_plan = redistribute(w.plan, prof, devices,
                                RedistributionEvent(kind=kind, devices=names + [
                                    n for n in gone if n not in names]))
        from ..elastic.policy import allowed_widths
        from .summary import carry_keep_ratios

        carry_keep_ratios(w.plan, new_plan, w.model.host, w.model.units, w.cfg.summarize)
        check_plan(new_plan, [u.name for u in w.model.units], w.world_size,
                   f"re-plan after {kind} of {names}", widths=allowed_widths(w.model.host))
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
        self.bump(gen=gen, failed=sorted(self.failed))  # a failed rank that wakes reads it
        w.transport.set_generation(gen)
        w.gen = gen
        w._apply_plan(new_plan)
        self.active = sorted({s.rank for s in new_plan.stages} - {w.rank})
        # gather what every survivor has cached (a rank that does not answer is dead too)
        inv: dict[int, dict[int, int]] = {}
        deadline = time.time() + self.cfg.heartbeat_timeout_s + 5.0
        for r in self.active:
            while not self.st.has("g", gen, "inv", r):
                if time.time() > deadline:
                    raise RuntimeError(f"rank {r} did not report its cache after re-plan {gen}")
                time.sleep(1e-3)
            inv[r] = {int(k): u for k, u in self.st.get_json("g", gen, "inv", r).items()}
        inv[w.rank] = dict(w.inventory())
        resume: dict[str, list] = {}
        resumed_at: dict[str, int] = {}
        points: dict[str, list[int]] = {}  # item -> [resumed from, furthest boundary cached]
        for k in sorted(self.issue_time):  # the items in flight
            best_u, best_r = 0, w.rank
            for r, held in inv.items():
                if k in held and held[k] > best_u:
                    best_u, best_r = held[k], r
            resume.setdefault(str(best_r), []).append([k, best_u])
            resumed_at[str(best_u)] = resumed_at.get(str(best_u), 0) + 1
            points[str(k)] = [best_u, max([0] + [held[k] for held in inv.values() if k in held])]
        self.st.set(("g", gen, "resume"), json.dumps(resume))
        for k, u in resume.get(str(w.rank), []):
            if u == 0:  # no rank holds a boundary of it: from its input, which is kept
                w.transport.send(w.owner[0], k, 0, self.inputs[k].to(w.device))
            else:
                w.resume([[k, u]])
        self.replans.append(ReplanEvent(
            generation=gen, kind=kind, devices=names, ranks=ranks, time_s=t_start - w.t0,
            detect_s=detect_s, recovery_s=time.time() - t_start,
            moves=list(new_plan.meta.get("moves", [])), resumed=resumed_at, resume_points=points,
            stages=[{"rank": s.rank, "device": s.device, "units": s.units, "width": s.width}
                    for s in new_plan.stages]))

    def duties(self, now: float) -> None:
        """Publish progress and watch the ranks, when due."""
        if now >= self.next_publish:
            self.next_publish = now + PUBLISH_S
            self.publish_done()
        if now >= self.next_monitor:
            self.next_monitor = now + self.watcher.interval_s
            self.monitor()

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> None:
        """Feed, then handle one message (compute or collect); the periodic duties run while
        this rank waits for a message, or once they are ``OVERDUE_S`` late on a rank that never
        waits."""
        w = self.w
        self.issue()
        msg = w.transport.poll()
        now = time.monotonic()
        due = min(self.next_publish, self.next_monitor)
        if now >= due + (0.0 if msg is None else OVERDUE_S):
            self.duties(now)
            due = min(self.next_publish, self.next_monitor)
            if msg is not None and msg.gen != w.gen:  # polled before a re-plan: the
                w.transport.drop_stale()  # resume already re-sent its item
                msg = None
        if msg is None:
            msg = next_message(w, due)
        if msg is None or msg.kind != DATA:  # a follower's stream ending is seen by monitor()
            return
        if msg.unit == w.n:
            self.collect(msg)
        else:
            w.process(msg)

    def run_until(self, done) -> None:
        while not done():
            self.step()

    def loop(self) -> None:
        """Until every input is answered."""
        self.run_until(self.finished)
        if self.bar is not None:
            self.bar.close()
