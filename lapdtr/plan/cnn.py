"""The CNN partitioning strategies of the seeds, as planners with fixed splitting rules:

- ``data`` (Tang & Stefanov, eqs. 1-9): every spatial unit's output rows split over all devices
  (equal heights); each device exchanges the halo rows its next unit needs; units without rows (the
  classifier head) run on rank 0, which gathers the last map.
- ``horizontal`` (eqs. 10-13; the poster's "Meta"): every unit's output channels / neurons split
  over all devices (equal groups), all-gathered after every unit.
- ``ensembled`` (the poster): the channel split, but units of equal dimensions are fused into blocks
  and exchange only at block boundaries.
- ``hybrid`` (the poster): the channel split with group sizes proportional to each device's
  GFLOP/s, so a slow device gets fewer channels.

They do not search: the split is the strategy. Every device takes part, so the objective is
recorded in the plan but not optimized. ``Plan.shards`` says which channels / rows of which unit
each rank computes; a unit without shards runs whole on the ranks whose stage lists it.
"""
from __future__ import annotations

from ..energy.analytical import (Window, data_energy, ensembled_energy, horizontal_energy,
                                 row_axis)
from .cost import Constraints, memory_limit, plan_totals, to_predictions, usable_energy_j
from .registry import register_planner
from .types import Plan, Shard, StagePlan

__all__ = ["plan_data", "plan_horizontal", "plan_ensembled", "plan_hybrid"]


def _check_fit(strategy, devices, energies, cons: Constraints) -> None:
    over_mem = [f"{d.name} ({int(e.memory_bytes)} > {int(memory_limit(d))} bytes)"
                for d, e in zip(devices, energies) if e.memory_bytes > memory_limit(d)]
    if over_mem:
        raise ValueError(f"strategy {strategy!r}: the split does not fit in memory on "
                         f"{', '.join(over_mem)}")
    over_e = [d.name for d, e in zip(devices, energies)
              if e.units and e.energy_j > usable_energy_j(d, cons.horizon_requests)]
    if over_e:
        raise ValueError(f"strategy {strategy!r}: devices {', '.join(over_e)} lack the energy for "
                         f"{cons.horizon_requests} request(s) (E_i - E_min)")
    if cons.latency_target_s is not None or cons.throughput_target is not None:
        raise ValueError(f"strategy {strategy!r} has a fixed split and takes no latency or "
                         f"throughput target; use strategy 'lapdtr'")


def _plan(model_profile, devices, cons, strategy, energies, latency, shards, meta) -> Plan:
    _check_fit(strategy, devices, energies, cons)
    stages = [StagePlan(index=r, rank=r, device=d.name, units=list(e.units))
              for r, (d, e) in enumerate(zip(devices, energies)) if e.units]
    for i, s in enumerate(stages):
        s.index = i
    preds = to_predictions(energies)
    m = plan_totals(preds, latency)
    m.update(meta)
    m.update({"exact": True, "horizon_requests": cons.horizon_requests})
    return Plan(model=model_profile.model, strategy=strategy, devices=[d.name for d in devices],
                stages=stages, img_size=model_profile.img_size,
                batch_size=model_profile.batch_size, objective=cons.objective, shards=shards,
                predictions=preds, meta=m)


def _channel_shards(units, sizes) -> list[Shard]:
    shards = []
    for u, s in zip(units, sizes):
        start = 0
        for rank, k in enumerate(s):
            if k > 0:
                shards.append(Shard(unit=u.name, rank=rank, axis="channels", start=start,
                                    stop=start + k))
            start += k
    return shards


def _channel_split(model_profile, devices, cons, strategy, weights, inner_bytes):
    energies, latency, sizes = horizontal_energy(model_profile, devices, weights=weights,
                                                 inner_bytes=inner_bytes)
    meta = {"split": "proportional to gflops" if weights else "equal",
            "inner_exchange_bytes": dict(inner_bytes or {})}
    return _plan(model_profile, devices, cons, strategy, energies, latency,
                 _channel_shards(model_profile.units, sizes), meta)


@register_planner("horizontal")
def plan_horizontal(model_profile, devices, cons: Constraints, *, inner_bytes=None):
    """Horizontal / Meta: every unit's channels split evenly, all-gathered after each layer.

    ``inner_bytes``: unit name -> bytes of its inner layer outputs (see
    ``lapdtr.energy.analytical.estimate_inner_exchange_bytes``); without it only unit outputs are
    exchanged."""
    return _channel_split(model_profile, devices, cons, "horizontal", None, inner_bytes)


@register_planner("hybrid")
def plan_hybrid(model_profile, devices, cons: Constraints, *, inner_bytes=None):
    """Hybrid: channel groups sized in proportion to each device's GFLOP/s."""
    return _channel_split(model_profile, devices, cons, "hybrid", [d.gflops for d in devices],
                          inner_bytes)


@register_planner("ensembled")
def plan_ensembled(model_profile, devices, cons: Constraints, *, blocks=None):
    """Ensembled: channel groups through fused blocks of equal dimensions, exchange at block
    boundaries only."""
    energies, latency, sizes, blocks = ensembled_energy(model_profile, devices, blocks=blocks)
    names = [[model_profile.units[i].name for i in b] for b in blocks]
    return _plan(model_profile, devices, cons, "ensembled", energies, latency,
                 _channel_shards(model_profile.units, sizes), {"blocks": names})


def _windows(windows) -> dict:
    out = {}
    for k, w in (windows or {}).items():
        out[k] = w if isinstance(w, Window) else Window(*[int(x) for x in w])
    return out


@register_planner("data")
def plan_data(model_profile, devices, cons: Constraints, *, windows=None, gather_rank: int = 0):
    """Data: spatial row tiles with halo exchange (eqs. 1-9); the head runs on ``gather_rank``.

    ``windows``: unit name -> ``Window`` or ``(kernel, stride, pad)`` of its rows (see
    ``lapdtr.energy.analytical.estimate_unit_windows``); a guess from the shapes otherwise."""
    if not 0 <= gather_rank < len(devices):
        raise ValueError(f"gather_rank {gather_rank} is not a rank; ranks are 0..{len(devices) - 1}")
    win = _windows(windows)
    energies, latency, rows = data_energy(model_profile, devices, windows=win,
                                          gather_rank=gather_rank)
    shards = []
    for u, r in zip(model_profile.units, rows):
        if r is None:
            continue
        for rank, (start, stop, above, below) in enumerate(r):
            if stop > start:
                shards.append(Shard(unit=u.name, rank=rank, axis="rows", start=start, stop=stop,
                                    halo=max(above, below)))
    spatial = sum(1 for u in model_profile.units if row_axis(u) is not None)
    return _plan(model_profile, devices, cons, "data", energies, latency, shards,
                 {"gather_rank": gather_rank, "spatial_units": spatial,
                  "windows": {k: [w.kernel, w.stride, w.pad] for k, w in win.items()}})
