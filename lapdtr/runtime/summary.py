"""Summarized boundaries in the pipeline runtime: the run config's ``summarize`` block, the checks
of a plan's keep ratios, and :class:`SummaryCodec`, the codec of the worker's per-item chain.

A stage's ``keep_ratio`` (``StagePlan``) applies to its output: the tokens the next stage gets.
With ``keep_ratio < 1`` the stage's last unit must have an attention source
(:func:`lapdtr.summarize.attention_source`, ``SOURCE_FAMILIES``). After a token output the next
stage takes the shorter sequence ``[prefix, kept..., fused]`` (restore rule ``tokens``); after a
map (hierarchical models), or tokens of a RoPE ``Eva`` (whose blocks rotate each position by its
own row of the rotary table), it takes the full grid, kept tokens at their places and the fused
token at every other (restore rule ``dense``, :func:`lapdtr.summarize.restore_rule`). The wire
format (``summarize.wire``) applies to every boundary the codec can encode (tokens, maps); other
boundaries and the last stage's output go as they are, in fp32.

Packets describe themselves (wire format from the dtype, summarized or not from the part
count), so decoding needs no plan: after a re-plan a cached packet resumes at its boundary's new
owner as it was encoded, and :meth:`Codec.reencode` stays the identity.

What this departs from in :mod:`lapdtr.summarize`: ToMe's proportional attention
(``BoundaryCodec.attn_bias``) is not passed to the next stage's blocks here (their units take
one tensor); the fused token attends like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .._validate import check_fields
from ..summarize import (WIRE_FORMATS, BoundaryCodec, Summary, attention_source, check_keep,
                         check_wire, decode_tensor, importance_kind, probe_for, restore_dense,
                         restore_rule, tokens_to_map)
from ..summarize.wire import wire_of_dtype, wire_parts
from .steps import Codec, Packet

__all__ = ["SummarizeConfig", "SummaryCodec", "settle_plan", "check_keep_ratios",
           "carry_keep_ratios", "boundary_layout"]

_LAYOUTS = {"tokens": "tokens", "map": "map", "map_nhwc": "map_nhwc"}


def boundary_layout(unit) -> str | None:
    """The codec layout of the boundary after ``unit`` (``None``: one the codec cannot encode)."""
    return _LAYOUTS.get(unit.out_format)


@dataclass
class SummarizeConfig:
    """The ``summarize`` block of a run config.

    ``keep``: the keep ratio of every cut, or a mapping from a cut (the unit the next stage starts
    with, as ``cuts`` names it) to its keep ratio (cuts not named keep every token). Left at 1.0, a plan file's own
    ``keep_ratio`` s stand. ``wire``: the wire format of every boundary
    (``lapdtr.summarize.WIRE_FORMATS``)."""

    keep: float | dict = 1.0
    wire: str = "fp32"

    @classmethod
    def parse(cls, d, where: str = "summarize") -> "SummarizeConfig":
        if isinstance(d, SummarizeConfig):
            return d.validate(where)
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping with keys keep, wire; got {d!r}")
        check_fields(cls, d, where)
        return cls(**d).validate(where)

    def validate(self, where: str = "summarize") -> "SummarizeConfig":
        try:
            check_wire(self.wire)
        except ValueError as e:
            raise ValueError(f"{where}.wire: {e}") from None
        keeps = self.keep.items() if isinstance(self.keep, dict) else [(None, self.keep)]
        for name, k in keeps:
            key = f"{where}.keep" + (f"[{name!r}]" if name is not None else "")
            try:
                check_keep(k)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return self

    def keep_at(self, cut: str) -> float:
        """The keep ratio of the boundary before unit ``cut``."""
        if isinstance(self.keep, dict):
            return float(self.keep.get(cut, 1.0))
        return float(self.keep)

    def stamp(self, plan) -> None:
        """Set the keep ratio of every stage but the last from ``keep``."""
        stages = sorted(plan.stages, key=lambda s: s.index)
        if isinstance(self.keep, dict):
            cuts = [s.units[0] for s in stages[1:]]
            unknown = sorted(set(self.keep) - set(cuts))
            if unknown:
                raise ValueError(f"summarize.keep: {unknown} are not cuts of the plan; its cuts "
                                 f"(the units its stages after the first start with): {cuts}")
        for s, nxt in zip(stages, stages[1:]):
            s.keep_ratio = self.keep_at(nxt.units[0])
        plan.meta["wire"] = self.wire


def _summarizable(host, unit) -> bool:
    try:
        attention_source(host, unit)
    except ValueError:
        return False
    return boundary_layout(unit) is not None


def carry_keep_ratios(old, new, host, unit_list, cfg: SummarizeConfig | None) -> None:
    """After a re-plan: each stage of ``new`` but the last keeps the ratio its end unit had in
    ``old`` (or the config gives it), where that boundary can be summarized; the wire format
    carries over."""
    by_name = {u.name: u for u in unit_list}
    before = {s.units[-1]: s.keep_ratio for s in old.stages}
    stages = sorted(new.stages, key=lambda s: s.index)
    for s, nxt in zip(stages, [*stages[1:], None]):
        end = s.units[-1]
        keep = cfg.keep_at(nxt.units[0]) if nxt is not None and cfg is not None \
            and cfg.keep != 1.0 else before.get(end, 1.0)
        s.keep_ratio = keep if nxt is not None and _summarizable(host, by_name[end]) else 1.0
    if "wire" in old.meta:
        new.meta["wire"] = old.meta["wire"]


def settle_plan(cfg, plan, host, unit_list) -> None:
    """A run's plan with the config's ``summarize`` applied (its keep ratios stamped on the cuts,
    its wire format in ``plan.meta``), then checked (:func:`check_keep_ratios`)."""
    summ = cfg.summarize
    if summ is not None:
        if summ.keep != 1.0:
            summ.stamp(plan)
        plan.meta["wire"] = summ.wire
    check_keep_ratios(plan, host, unit_list, "summarize" if summ is not None else "plan")


def check_keep_ratios(plan, host, unit_list, where: str = "plan") -> None:
    """Every ``keep_ratio < 1`` of ``plan`` is on a stage whose output can be summarized: not the
    last stage, and its last unit has an attention source and a token output."""
    stages = sorted(plan.stages, key=lambda s: s.index)
    by_name = {u.name: u for u in unit_list}
    for i, s in enumerate(stages):
        try:
            keep = check_keep(s.keep_ratio)
        except ValueError as e:
            raise ValueError(f"{where}: stage {s.index} keep_ratio: {e}") from None
        if keep == 1.0:
            continue
        if i == len(stages) - 1:
            raise ValueError(f"{where}: stage {s.index} is the last (it outputs the model's "
                             f"result) and asks keep_ratio={keep}; allowed there: 1.0")
        last = by_name[s.units[-1]]
        try:
            attention_source(host, last)
        except ValueError as e:
            raise ValueError(f"{where}: stage {s.index} asks keep_ratio={keep} after unit "
                             f"{last.name!r}, but the next stage cannot take fewer tokens and "
                             f"there is no restore rule for it: {e}") from None
        if boundary_layout(last) is None:
            raise ValueError(f"{where}: stage {s.index} asks keep_ratio={keep} after unit "
                             f"{last.name!r}, which outputs {last.out_format}; summarized "
                             "boundaries carry tokens or maps")


class SummaryCodec(Codec):
    """The boundary codec of a rank: summarization at the keep ratio the ``settings`` step chose
    (the stage's ``keep_ratio``) and the run's wire format.

    :meth:`arm` (the chain's ``arm`` step, before the units run) hooks the attention of the
    stage's last unit when it will summarize; :meth:`encode` ranks the tokens by what that
    attention computed, keeps the top ones and fuses the rest (``BoundaryCodec``, static per
    boundary, so packets of a boundary have the same shapes)."""

    name = "summarize"

    def __init__(self, host, unit_list: Sequence, wire: str = "fp32"):
        self.host, self.units, self.wire = host, list(unit_list), check_wire(wire)
        self.n = len(self.units)
        self.kind = importance_kind(host)
        self.num_prefix = int(getattr(host, "num_prefix_tokens", 0))
        self._probes: dict[int, object] = {}  # AttentionProbe / RopeAttentionProbe
        self._codecs: dict[tuple, BoundaryCodec] = {}

    # -- the chain's hooks ------------------------------------------------------------------
    def arm(self, work) -> None:
        if work.keep_ratio == 1.0 or work.end >= self.n:
            return
        last = work.end - 1
        if last not in self._probes:
            self._probes[last] = probe_for(attention_source(self.host, self.units[last]),
                                           self.kind)
        self._probes[last].clear()

    def codec_for(self, unit: int, shape: tuple[int, ...], keep: float) -> BoundaryCodec | None:
        """The codec of the boundary before ``unit`` for a per-item ``shape`` (``None``: the
        boundary goes as it is)."""
        layout = boundary_layout(self.units[unit - 1])
        if layout is None or unit >= self.n:
            return None
        key = (unit, shape, keep)
        if key not in self._codecs:
            self._codecs[key] = BoundaryCodec(
                shape, keep=keep, wire=self.wire, layout=layout,
                num_prefix=self.num_prefix if layout == "tokens" else 0,
                restore=restore_rule(self.host, layout))
        return self._codecs[key]

    def encode(self, y: torch.Tensor, *, unit: int, keep: float = 1.0) -> Packet:
        if unit >= self.n or (keep == 1.0 and self.wire == "fp32"):
            return Packet((y,))
        codec = self.codec_for(unit, tuple(y.shape[1:]), keep)
        if codec is None:
            if keep != 1.0:
                raise RuntimeError(f"unit {self.units[unit - 1].name!r} outputs "
                                   f"{self.units[unit - 1].out_format}: it cannot be summarized")
            return Packet((y,))
        imp = self._probes[unit - 1].importance() if codec.summarizes else None
        return Packet(tuple(codec.encode(y, imp)))

    def decode(self, packet: Packet, *, unit: int) -> torch.Tensor:
        t = packet.tensors
        wire = wire_of_dtype(t[0].dtype)
        if wire is None:
            raise ValueError(f"a packet for unit {unit} starts with a {t[0].dtype} tensor; wire "
                             f"formats: {', '.join(WIRE_FORMATS)}")
        if len(t) == 1 and wire == "fp32":
            return t[0]
        n = wire_parts(wire)
        body = decode_tensor(t[:n], wire, torch.float32)
        layout = boundary_layout(self.units[unit - 1])
        if layout == "tokens":
            if len(t) == n or restore_rule(self.host, layout) == "tokens":
                return body  # summarized: [prefix, kept..., fused], the shorter sequence
            P = self.num_prefix  # dense (RoPE Eva): every position back, measured at batch 1
            return restore_dense(Summary(body[:, :P], body[:, P:-1], t[n].long(), body[:, -1:],
                                         self.units[unit - 1].out_shape[1] - P))
        shape = self.units[unit - 1].out_shape  # a map keeps its grid: measured at batch 1
        hw = (shape[2], shape[3]) if layout == "map" else (shape[1], shape[2])
        if len(t) > n:  # summarized map: the kept tokens back at their places, the fused elsewhere
            body = restore_dense(Summary(body[:, :0], body[:, :-1], t[n].long(), body[:, -1:],
                                         hw[0] * hw[1]))
        return tokens_to_map(body, layout, hw) if (len(t) > n or wire == "int8") else body

    def close(self) -> None:
        for p in self._probes.values():
            p.remove()
        self._probes.clear()
