"""A worker's per-item step as an explicit ordered chain:

    decode what arrived -> settings for this item -> arm the codec -> run the units
    -> encode the boundary -> cache -> send

Each step is a callable ``step(worker, item)`` on an :class:`ItemWork` that it reads and fills.
Features extend the chain (``Worker.chain``) by replacing or inserting steps, not by adding
branches to the worker's loop: elastic widths replace :class:`Settings`' policy, summarized
boundaries, wire dtypes and transfer matrices are :class:`Codec` s of :class:`Encode` /
:class:`Decode`.

A boundary on the wire is a :class:`Packet` (one or more tensors); caches hold packets, so a
resume after a re-plan can re-encode a cached boundary for the new next stage where a codec
needs it (:meth:`Codec.reencode`; the identity codec does not).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

__all__ = ["Packet", "Codec", "IdentityCodec", "ItemWork", "Decode", "Settings", "Arm",
           "RunUnits", "Encode", "CacheBoundary", "Send", "FullWidth", "default_chain"]


@dataclass
class Packet:
    """What crosses one stage boundary: ``tensors`` (the identity codec sends one)."""

    tensors: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class Codec:
    """Turns a stage's output into the packet sent to the next stage, and back."""

    name = "codec"

    def arm(self, work: "ItemWork") -> None:
        """Before the units run (e.g. hook the attention that ranks the output tokens)."""

    def encode(self, y: torch.Tensor, *, unit: int, keep: float = 1.0) -> Packet:
        """The packet of ``y``, the input of ``unit``, keeping ``keep`` of its tokens."""
        raise NotImplementedError

    def decode(self, packet: Packet, *, unit: int) -> torch.Tensor:
        raise NotImplementedError

    def reencode(self, packet: Packet, *, unit: int) -> Packet:
        """A cached packet for a new next stage (after a re-plan): unchanged by default."""
        return packet


class IdentityCodec(Codec):
    """The boundary tensor itself, unchanged."""

    name = "identity"

    def encode(self, y: torch.Tensor, *, unit: int, keep: float = 1.0) -> Packet:
        if keep != 1.0:
            raise RuntimeError(f"the identity codec sends every token (keep 1.0); asked "
                               f"keep={keep} for unit {unit}: lapdtr.runtime.summary.SummaryCodec "
                               "summarizes")
        return Packet((y,))

    def decode(self, packet: Packet, *, unit: int) -> torch.Tensor:
        (x,) = packet.tensors
        return x


@dataclass
class ItemWork:
    """One item's pass through a rank's units: filled step by step."""

    item: int
    unit: int  # the first unit to run
    end: int  # one past the last unit of the stage
    packet: Packet
    x: torch.Tensor | None = None
    width: float = 1.0
    keep_ratio: float = 1.0
    y: torch.Tensor | None = None
    out: Packet | None = None
    dst: int = 0
    sent_bytes: int = 0
    extra: dict = field(default_factory=dict)


class Decode:
    """The packet that arrived, as the tensor the first unit takes (on this rank's device).
    Unit 0 takes the model's input as the coordinator sent it: no codec made it."""

    def __call__(self, w, work: ItemWork) -> None:
        x = work.packet.tensors[0] if work.unit == 0 else w.codec.decode(work.packet,
                                                                         unit=work.unit)
        work.x = x if w.device.type == "cpu" else x.to(w.device)


class Settings:
    """The (width, keep ratio) this item runs at, from the stage plan and the rank's energy
    (``policy(stage, remaining_j)``; ``prepare.stage_settings`` by default)."""

    def __init__(self, policy=None):
        if policy is None:
            from .prepare import stage_settings as policy
        self.policy = policy

    def __call__(self, w, work: ItemWork) -> None:
        width, keep = self.policy(w.stage_of[work.unit], w.meter.remaining_j())
        if (width, keep) != (1.0, 1.0) and not w.model.supports(width=width, keep_ratio=keep):
            raise RuntimeError(f"rank {w.rank}: stage settings width={width}, keep_ratio={keep} "
                               f"for item {work.item}, which this model's units do not run "
                               "(widths < 1 need elastic layers, keep ratios < 1 an attention "
                               "source: lapdtr.elastic.FAMILIES, lapdtr.summarize.SOURCE_FAMILIES)")
        work.width, work.keep_ratio = width, keep


class Arm:
    """The codec's preparation for this item (``Codec.arm``), before the units run."""

    def __call__(self, w, work: ItemWork) -> None:
        w.codec.arm(work)


class RunUnits:
    """Units ``[unit, end)`` on the decoded input; timed and metered."""

    def __call__(self, w, work: ItemWork) -> None:
        t0 = time.time()
        if w.widths.apply(work.width):  # the elastic layers, at the width Settings chose
            w.report.widths.append([t0 - w.t0, work.width])
        c0 = time.perf_counter()
        work.y = w.model.run(work.x, work.unit, work.end)
        if w.device.type == "cuda":
            torch.cuda.synchronize(w.device)
        dt = time.perf_counter() - c0
        w.report.compute_s += dt
        w.report.items += 1
        w.report.timeline.append([work.item, work.unit, work.end, t0 - w.t0, t0 + dt - w.t0])
        w.meter.record_compute(dt)


class Encode:
    """The stage output as the packet for the next stage (or the coordinator)."""

    def __call__(self, w, work: ItemWork) -> None:
        work.out = w.codec.encode(work.y, unit=work.end, keep=work.keep_ratio)


class CacheBoundary:
    """Keep the packet until the item is done: a re-plan resumes the item from it."""

    def __call__(self, w, work: ItemWork) -> None:
        w.cache.put(work.item, work.end, work.out)


class Send:
    """To the owner of the next unit, or to the coordinator after the last unit."""

    def __call__(self, w, work: ItemWork) -> None:
        work.dst = w.owner[work.end] if work.end < w.n else w.coordinator
        work.sent_bytes = w.send_packet(work.dst, work.item, work.end, work.out)
        if work.sent_bytes:
            w.meter.record_bytes(sent=work.sent_bytes)
            if work.end < w.n:
                u = w.model.units[work.end - 1]  # its out_shape: the boundary unsummarized
                w.report.count_boundary(u.name, work.sent_bytes, work.out,
                                        4 * work.y.shape[0] * math.prod(u.out_shape[1:]),
                                        work.keep_ratio)


class FullWidth:
    """The width hook of a rank without elastic layers: full width, always."""

    width = 1.0

    def apply(self, width: float) -> bool:
        return False


def default_chain() -> list:
    return [Decode(), Settings(), Arm(), RunUnits(), Encode(), CacheBoundary(), Send()]
