"""Planning with summarized stage boundaries: the planner prices each boundary's bytes at its
keep ratio and wire format (:mod:`lapdtr.summarize`), so it can move a cut to where
summarization pays.

* :func:`price_boundaries` prices the boundary after every unit but the last
  (:class:`BoundaryPricing`): the exact payload bytes of the unit's :class:`BoundaryCodec`
  (``codec_for_unit(model, unit, keep=, wire=).nbytes(batch)`` at the profile's batch size).
  Tokens are dropped (keep < 1) only after a unit with an attention source
  (:func:`lapdtr.summarize.attention_source`: the ``blocks.i`` of the ``vit`` and ``eva``
  families) and a token layout; the other boundaries the codec takes (``tokens``, ``map``,
  ``map_nhwc``) are priced in the wire format at keep 1 (fp16 halves them, int8 is codes plus per-token float32
  scales); a boundary the codec does not take (``logits``, ...) or whose profiled bytes are not
  the codec's dense fp32 bytes (a profile in another dtype) keeps its profiled bytes.
* :func:`summarized_profile` is the profile with those bytes as the sending unit's
  ``out_bytes`` and the receiving unit's ``in_bytes`` (every planner reads one or the other).
* :func:`apply_summarization` stamps a plan: each stage whose output was priced summarized gets
  that ``keep_ratio``; the last stage (the model output) keeps 1.0; ``meta['wire']`` and
  ``meta['summarization']`` record the wire format and what each cut boundary assumed.
* :func:`plan_summarized`: the three, around ``create_plan``.

What is not priced (conservative, and said in ``meta['summarization']``): the units after a
summarized boundary keep their profiled FLOPs and latency, though with the ``tokens`` restore
they run on fewer tokens; the importance, top-k and quantization work of encoding and decoding
is not counted; ``peak_bytes`` is unchanged, so a whole unit's memory is as profiled. Only
pipeline strategies (:data:`PIPELINE_STRATEGIES`: whole units per device) are priced this way:
the channel, row and hybrid splits exchange partial tensors that no codec encodes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .types import Plan

__all__ = ["PIPELINE_STRATEGIES", "BoundaryPricing", "check_summarization", "price_boundaries",
           "summarized_profile", "apply_summarization", "plan_summarized", "is_default"]

PIPELINE_STRATEGIES = ("lapdtr", "lapdtr-greedy", "sequential", "vertical")
# lapdtr.summarize is imported where used: it imports lapdtr.runtime, which imports lapdtr.plan


@dataclass
class BoundaryPricing:
    """The boundary after unit ``unit`` (into ``next_unit``) as priced.

    ``keep``: the keep ratio priced (1.0 where no token is dropped); ``wire``: the wire format
    priced, or ``"raw"`` where the profiled bytes stand; ``summarizes``: tokens are dropped
    (the codec's ``k < N_patch``); ``profiled_bytes`` / ``bytes``: the boundary's bytes before /
    as priced, for the profile's batch; ``why``: what was assumed."""

    unit: str
    next_unit: str
    keep: float
    wire: str
    summarizes: bool
    profiled_bytes: int
    bytes: int
    why: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def is_default(keep=1.0, wire: str = "fp32") -> bool:
    """Whether ``keep``/``wire`` ask for nothing (every token, fp32): the plan as without."""
    keeps = keep.values() if isinstance(keep, dict) else [keep]
    return wire == "fp32" and all(k == 1.0 for k in keeps)


def check_summarization(keep=1.0, wire: str = "fp32", strategy: str | None = None):
    """``(keep, wire)`` validated: ``keep`` a ratio in (0, 1] or ``{unit name: ratio}``, ``wire``
    one of ``WIRE_FORMATS``; with ``strategy``, one of :data:`PIPELINE_STRATEGIES` unless nothing
    is asked. Each is a ``ValueError`` naming what is allowed."""
    from ..summarize import WIRE_FORMATS, check_keep

    if wire not in WIRE_FORMATS:
        raise ValueError(f"wire format {wire!r} is not supported; allowed: "
                         f"{', '.join(WIRE_FORMATS)}")
    if isinstance(keep, dict):
        keep = {str(k): check_keep(v) for k, v in keep.items()}
    else:
        keep = check_keep(keep)
    if strategy is not None and strategy not in PIPELINE_STRATEGIES and not is_default(keep, wire):
        raise ValueError(f"summarized boundaries (keep={keep}, wire={wire}) are priced for "
                         f"pipeline plans only; strategy {strategy!r} splits units across "
                         f"devices. Allowed strategies: {', '.join(PIPELINE_STRATEGIES)}")
    return keep, wire


def _source_error(model, unit) -> str | None:
    """Why the output of ``unit`` cannot be summarized (``None``: it can)."""
    from ..summarize import attention_source

    if unit.out_format != "tokens":
        return f"its output is {unit.out_format}, not tokens"
    try:
        attention_source(model, unit)
    except ValueError as e:
        return str(e)
    return None


def price_boundaries(model_profile, model, unit_list, *, keep=1.0,
                     wire: str = "fp32") -> list[BoundaryPricing]:
    """One :class:`BoundaryPricing` per boundary (after each unit but the last), in model order.

    ``keep``: one ratio for every boundary that can be summarized, or ``{unit name: ratio}``
    (the boundary after that unit; units not named keep 1.0). ``unit_list``: the model's units
    (``lapdtr.models.units(model, model_profile.img_size)``), named as the profile's. A keep
    below 1 where no boundary can be summarized, or named for a unit whose output cannot be, is a
    ``ValueError`` naming the units (or families) that can."""
    from ..summarize import SOURCE_FAMILIES, codec_for_unit

    keep, wire = check_summarization(keep, wire)
    names = [u.name for u in model_profile.units]
    if [u.name for u in unit_list] != names:
        raise ValueError(f"the units given ({[u.name for u in unit_list]}) are not the profile's "
                         f"({names}); pass units(model, {model_profile.img_size})")
    why_not = {u.name: _source_error(model, u) for u in unit_list[:-1]}
    can = [n for n, w in why_not.items() if w is None]
    if isinstance(keep, dict):
        unknown = [n for n in keep if n not in why_not]
        if unknown:
            raise ValueError(f"keep names unit(s) {unknown} with no boundary after them; "
                             f"boundaries that can be summarized: {can or 'none'}")
        bad = [n for n, k in keep.items() if k < 1.0 and why_not[n] is not None]
        if bad:
            raise ValueError(f"keep < 1 after {bad}: {why_not[bad[0]]}; allowed: keep 1.0 there, "
                             f"or a unit whose output can be summarized: {can or 'none'}")
        keeps = {n: keep.get(n, 1.0) for n in why_not}
    else:
        if keep < 1.0 and not can:
            first = next(iter(why_not.values()), "it has a single unit")
            raise ValueError(f"keep {keep:g} needs a boundary whose tokens an attention ranks; "
                             f"{model_profile.model!r} ({model_profile.family}) has none "
                             f"({first}). Allowed for it: keep 1.0 (a --wire format still "
                             f"applies); families with an attention source: "
                             f"{', '.join(SOURCE_FAMILIES)}")
        keeps = {n: (keep if why_not[n] is None else 1.0) for n in why_not}
    batch = model_profile.batch_size
    out = []
    for i, u in enumerate(unit_list[:-1]):
        nxt = model_profile.units[i + 1]
        profiled = int(nxt.in_bytes)
        k = keeps[u.name]
        try:
            codec = codec_for_unit(model, u, keep=k, wire=wire)
        except ValueError as e:
            out.append(BoundaryPricing(u.name, nxt.name, 1.0, "raw", False, profiled, profiled,
                                       f"profiled bytes: no codec ({e})"))
            continue
        dense = codec.dense_nbytes(batch)
        if dense != profiled or dense != int(model_profile.units[i].out_bytes):
            out.append(BoundaryPricing(
                u.name, nxt.name, 1.0, "raw", False, profiled, profiled,
                f"profiled bytes: the profile's {profiled} B are not the codec's dense fp32 "
                f"{dense} B (profile dtype {model_profile.dtype})"))
            continue
        why = (f"{codec.num_prefix} prefix + {codec.k} of {codec.n_patch} patch tokens + 1 fused,"
               f" {wire}, {str(codec.index_dtype).removeprefix('torch.')} indices"
               if codec.summarizes else
               f"every token, {wire}" + ("" if why_not[u.name] is None else
                                         f" (not summarizable: {why_not[u.name]})"))
        out.append(BoundaryPricing(u.name, nxt.name, k if codec.summarizes else 1.0, wire,
                                   codec.summarizes, profiled, codec.nbytes(batch), why))
    return out


def summarized_profile(model_profile, model, unit_list, *, keep=1.0, wire: str = "fp32",
                       boundaries: list[BoundaryPricing] | None = None):
    """A new ``ModelProfile`` whose boundary bytes are as :func:`price_boundaries` prices them
    (``boundaries``, if already priced): unit ``i``'s ``out_bytes`` and unit ``i + 1``'s
    ``in_bytes``. FLOPs, latency, parameters and ``peak_bytes`` are the profile's (see the module
    docstring). At keep 1 and fp32 it equals ``model_profile``."""
    if boundaries is None:
        boundaries = price_boundaries(model_profile, model, unit_list, keep=keep, wire=wire)
    units = list(model_profile.units)
    for i, b in enumerate(boundaries):
        if b.bytes != b.profiled_bytes:
            units[i] = dataclasses.replace(units[i], out_bytes=b.bytes)
            units[i + 1] = dataclasses.replace(units[i + 1], in_bytes=b.bytes)
    return dataclasses.replace(model_profile, units=units)


def apply_summarization(plan: Plan, boundaries: list[BoundaryPricing], *, wire: str,
                        keep=None) -> Plan:
    """Stamp ``plan`` (priced on :func:`summarized_profile` with these ``boundaries``): every
    stage whose last unit's boundary was priced summarized gets its ``keep_ratio``; the others,
    and the last stage (the model output), 1.0. ``meta['wire']`` is the wire format;
    ``meta['summarization']`` the keep asked, and per cut boundary (by sending unit) what was
    priced."""
    by_unit = {b.unit: b for b in boundaries}
    cuts = {}
    for s in plan.stages:
        b = by_unit.get(s.units[-1]) if s.units else None
        s.keep_ratio = float(b.keep) if b is not None and b.summarizes else 1.0
        if b is not None:
            cuts[b.unit] = b.to_dict()
    plan.meta["wire"] = wire
    plan.meta["summarization"] = {
        "wire": wire, "keep": keep,
        "boundaries": cuts,
        "bytes_priced": "exact codec payload (BoundaryCodec.nbytes) at the profile's batch; "
                        "pack_packet headers not counted",
        "flops_priced": "as profiled: units after a summarized boundary are not credited for "
                        "running on fewer tokens, and encode/decode work is not counted "
                        "(conservative)"}
    return plan


def plan_summarized(model_profile, devices, model, unit_list, *, keep=1.0, wire: str = "fp32",
                    strategy: str = "lapdtr", **kw) -> Plan:
    """``create_plan`` on :func:`summarized_profile`, stamped by :func:`apply_summarization`.
    ``kw`` go to ``create_plan``. A strategy that is not a pipeline (:data:`PIPELINE_STRATEGIES`)
    with anything but keep 1 / fp32 is a ``ValueError``."""
    from .registry import create_plan

    keep, wire = check_summarization(keep, wire, strategy)
    boundaries = price_boundaries(model_profile, model, unit_list, keep=keep, wire=wire)
    prof = summarized_profile(model_profile, model, unit_list, boundaries=boundaries)
    plan = create_plan(prof, devices, strategy=strategy, **kw)
    return apply_summarization(plan, boundaries, wire=wire, keep=keep)
