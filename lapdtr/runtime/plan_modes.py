"""Which run mode executes a plan as it was made, and what of a plan no mode runs yet.

A plan is made of *parts*, each run by one mode or by none:

* stages (``plan.stages`` listing every unit once, in order, no shards): ``pipeline``;
* channel shards (``Shard.axis == "channels"``, strategies ``horizontal`` / ``hybrid``):
  ``tensor``, with the plan's per-rank shares as the split proportions
  (:func:`lapdtr.runtime.tensor.proportions_from_plan`);
* fused blocks (``plan.meta["blocks"]`` with channel shards, strategy ``ensembled``): each rank
  would run its channel group through every unit of a block and exchange only at block
  boundaries; ``tensor`` mode exchanges after every unit instead, so the fused blocks' saving is
  not realized (it runs them only when ``mode: tensor`` is asked for, with a warning);
* row shards (``axis == "rows"``, strategy ``data``: spatial tiles with halos): no mode runs
  them yet;
* stages with shards beside them (``hyps`` with a mandatory split layer): no mode runs them yet.

``mode: auto`` (the default) picks the mode of a plan's parts (:func:`mode_for_plan`), or
refuses with an error naming the part no mode runs; an explicit mode that cannot run the plan as
made is an error naming the mode that can (:func:`check_plan_mode`), never a silent other split.
"""
from __future__ import annotations

import warnings

__all__ = ["plan_parts", "mode_for_plan", "check_plan_mode", "check_shards",
           "FusedBlocksNotRealized"]


class FusedBlocksNotRealized(UserWarning):
    """A fused-block (ensembled) plan runs in tensor mode as a per-unit channel split."""


def check_shards(plan, unit_names=None, where: str = "plan") -> None:
    """``plan.shards`` are well formed: each on a known axis, of a unit the plan's stages list
    and the model has (when ``unit_names`` is given), the shards of a unit on one axis, non-empty, on distinct ranks,
    tiling ``[0, stop)`` without a gap or an overlap; a row shard's halo at least 0 and at most
    its tile's rows. ``ValueError`` naming the first shard that is not."""
    by_unit: dict[str, list] = {}
    listed = {u for st in plan.stages for u in st.units}
    for s in plan.shards:
        if s.axis not in ("channels", "rows"):
            raise ValueError(f"{where}: a shard of unit {s.unit!r} is on axis {s.axis!r}; "
                             "allowed axes: channels, rows")
        if unit_names is not None and s.unit not in unit_names:
            raise ValueError(f"{where}: has shards of unit {s.unit!r}, which {plan.model!r} does "
                             f"not have; its units: {', '.join(unit_names)}")
        if s.unit not in listed:
            raise ValueError(f"{where}: has shards of unit {s.unit!r}, which none of its stages "
                             f"lists; its units: {', '.join(sorted(listed))}")
        if s.stop <= s.start or s.start < 0:
            raise ValueError(f"{where}: the {s.axis} shard of unit {s.unit!r} on rank {s.rank} is "
                             f"empty or negative: [{s.start}, {s.stop})")
        if s.axis == "rows" and not 0 <= s.halo <= s.stop - s.start:
            raise ValueError(f"{where}: the row shard of unit {s.unit!r} on rank {s.rank} has a "
                             f"halo of {s.halo} rows around a tile of {s.stop - s.start}; allowed: "
                             f"0 .. {s.stop - s.start}")
        by_unit.setdefault(s.unit, []).append(s)
    for unit, shards in by_unit.items():
        axes = sorted({s.axis for s in shards})
        if len(axes) > 1:
            raise ValueError(f"{where}: unit {unit!r} is split on both axes {axes}; a unit is "
                             "split on one axis")
        ranks = [s.rank for s in shards]
        dup = sorted({r for r in ranks if ranks.count(r) > 1})
        if dup:
            raise ValueError(f"{where}: rank(s) {dup} hold more than one {axes[0]} shard of unit "
                             f"{unit!r}; one per rank")
        end = 0
        for s in sorted(shards, key=lambda s: s.start):
            if s.start != end:
                what = "a gap" if s.start > end else "an overlap"
                raise ValueError(f"{where}: the {axes[0]} shards of unit {unit!r} leave {what} at "
                                 f"{min(end, s.start)}..{max(end, s.start)} (rank {s.rank}'s "
                                 f"shard starts at {s.start}); shards tile 0..stop exactly")
            end = s.stop


def plan_parts(plan) -> dict[str, str]:
    """The parts of ``plan``: ``{part: what it holds}``, parts ``stages``, ``channels``,
    ``fused_blocks``, ``rows`` (its shards checked by :func:`check_shards` first)."""
    check_shards(plan)
    parts: dict[str, str] = {}
    rows = [s for s in plan.shards if s.axis == "rows"]
    chans = [s for s in plan.shards if s.axis == "channels"]
    if rows:
        units = sorted({s.unit for s in rows})
        parts["rows"] = (f"{len(rows)} row shards with halos of {len(units)} unit(s) "
                         f"({', '.join(units[:3])}{' ...' if len(units) > 3 else ''})")
    if chans:
        units = sorted({s.unit for s in chans})
        parts["channels"] = f"{len(chans)} channel shards of {len(units)} unit(s)"
    blocks = plan.meta.get("blocks")
    if blocks and chans:
        parts["fused_blocks"] = f"{len(blocks)} fused blocks (exchange at block ends only)"
    sharded = {s.unit for s in plan.shards}
    if not plan.shards:
        parts["stages"] = f"{len(plan.stages)} stage(s)"
    elif any(set(s.units) - sharded for s in plan.stages):
        parts["stages"] = "stages with units not in any shard"
    return parts


def _not_run(parts: dict[str, str]) -> str | None:
    if "rows" in parts:
        return (f"its {parts['rows']} (strategy 'data': spatial tiles exchanging halo rows) "
                "are not run by any mode yet")
    if "stages" in parts and len(parts) > 1:
        shards = ", ".join(parts[p] for p in parts if p != "stages")
        return (f"its stages with a layer split beside them ({shards}; strategy 'hyps' with a "
                "mandatory split) are not run by any mode yet")
    return None


def mode_for_plan(plan, where: str = "plan") -> str:
    """The mode that runs ``plan`` as made (``mode: auto``); ``ValueError`` naming the part of
    the plan that no mode runs."""
    parts = plan_parts(plan)
    why = _not_run(parts)
    if why is not None:
        raise ValueError(f"{where}: {why}; runnable plans: stages (mode pipeline: strategies "
                         "lapdtr, lapdtr-greedy, sequential, vertical, hyps without a mandatory "
                         "split) and channel shards (mode tensor: horizontal, hybrid)")
    if "fused_blocks" in parts:
        raise ValueError(f"{where}: its {parts['fused_blocks']} (strategy 'ensembled') are not "
                         "run as fused blocks yet; mode 'tensor' runs the plan's channel shards "
                         "exchanging after every unit (the fused blocks' saving not realized): "
                         "set mode: tensor to run it so")
    return "tensor" if "channels" in parts else "pipeline"


def check_plan_mode(plan, mode: str, where: str = "plan") -> None:
    """``ValueError`` when ``mode`` would not run ``plan`` as made (naming the mode that would);
    a :class:`FusedBlocksNotRealized` warning for a fused-block plan in tensor mode."""
    parts = plan_parts(plan)
    why = _not_run(parts)
    if why is not None:
        raise ValueError(f"{where}: mode {mode!r} cannot run it: {why}")
    if mode == "pipeline" and "stages" not in parts:
        raise ValueError(f"{where}: mode 'pipeline' runs stages, but the plan (strategy "
                         f"{plan.strategy!r}) is {'; '.join(parts.values())}: mode 'tensor' (or "
                         "'auto') runs it")
    if mode == "tensor" and "channels" not in parts:
        raise ValueError(f"{where}: mode 'tensor' runs channel shards, but the plan (strategy "
                         f"{plan.strategy!r}) has none ({'; '.join(parts.values())}): mode "
                         "'pipeline' (or 'auto') runs it")
    if mode == "ensemble":
        raise ValueError(f"{where}: mode 'ensemble' runs whole models on every rank and takes no "
                         "plan; allowed: mode pipeline, tensor or auto with a plan")
    if mode == "tensor" and "fused_blocks" in parts:
        warnings.warn(FusedBlocksNotRealized(
            f"{where}: its {parts['fused_blocks']} run in tensor mode as a per-unit channel split "
            "(an exchange after every unit): the fused blocks' saving is not realized"),
            stacklevel=2)
