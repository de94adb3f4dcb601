"""The one cost model every planner predicts with, and the validation they share.

Per request (one input of the profile's batch) on device ``d``:

- compute time ``flops / (gflops * 1e9)``; compute energy ``power_active_w * compute time``, so a
  FLOP costs ``power_active_w / (gflops * 1e9)`` joules (``DeviceProfile.joules_per_flop``);
- communication: the bytes crossing a stage boundary go over the link between the two devices
  (``LinkProfile``: latency + bytes / bandwidth) and cost ``energy_per_byte_j`` on the sender and
  on the receiver;
- memory: the parameter bytes of the units held plus the largest peak activation of those units;
- period (``meta['period_s']``): the largest of every stage's compute time and every boundary's
  transfer time — the pipeline's steady-state time per request (objective ``throughput``).

A plan that sends between two devices without a link between them is a ``MissingLinkError``
naming both and the fix, not an infeasible plan.

The per-device arithmetic lives in :mod:`lapdtr.energy.analytical` (Tang & Stefanov's equations);
this module turns it into ``DevicePrediction`` rows and checks inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..energy.analytical import DeviceEnergy, find_link, placement_energy
from .types import DevicePrediction, Plan, StagePlan

__all__ = ["Constraints", "OBJECTIVES", "MissingLinkError", "missing_links", "check_links",
           "pipeline_period_s", "memory_limit", "usable_energy_j", "validate_inputs",
           "to_predictions", "predict_assignment", "build_pipeline_plan", "stages_from_assignment",
           "plan_totals", "check_units_fit"]

# energy: total J per request; max-device-energy: the largest device's J; latency: end-to-end s
# of one request; throughput: the pipeline's period (its slowest stage or transfer), so requests/s
OBJECTIVES = ("energy", "max-device-energy", "latency", "throughput")


class MissingLinkError(ValueError):
    """A plan needs a transfer between two devices that have no link (``pairs``: their names)."""

    def __init__(self, pairs):
        self.pairs = [tuple(p) for p in pairs]
        a, b = self.pairs[0]
        names = "; ".join(f"{x!r} and {y!r}" for x, y in self.pairs)
        super().__init__(
            f"no link between devices {names}: a plan sends activations between them and the "
            "planner needs each link's bandwidth and latency. Add a 'links' entry to the device "
            f"file, e.g. '- {{a: {a}, b: {b}, bandwidth: 1Gbps, latency_ms: 0.2}}', or a "
            "'default_link' for every pair not listed (in Python: a LinkProfile(peer="
            f"{b!r}, bytes_per_s=..., latency_s=...) in the links of {a!r})")


def missing_links(devices, among=None) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, of ``devices`` (restricted to ``among``) with no link."""
    idx = sorted(range(len(devices)) if among is None else among)
    return [(i, j) for k, i in enumerate(idx) for j in idx[k + 1:]
            if find_link(devices, i, j) is None]


def check_links(devices, assignment: Sequence[int]) -> None:
    """``MissingLinkError`` when consecutive stages of ``assignment`` sit on unlinked devices."""
    pairs = []
    for p, d in zip(assignment, assignment[1:]):
        if p != d and find_link(devices, p, d) is None:
            pair = (devices[min(p, d)].name, devices[max(p, d)].name)
            if pair not in pairs:
                pairs.append(pair)
    if pairs:
        raise MissingLinkError(pairs)


def _transfer_s(devices, a: int, b: int, nbytes: float) -> float:
    link = find_link(devices, a, b)
    if link is None:
        raise MissingLinkError([(devices[a].name, devices[b].name)])
    return link.latency_s + nbytes / link.bytes_per_s


def pipeline_period_s(model_profile, devices, assignment: Sequence[int]) -> float:
    """The period of a pipeline assignment: the largest stage compute time (``flops / (gflops *
    1e9)``) or boundary transfer time (link latency + the next stage's input bytes / bytes/s)."""
    units = model_profile.units
    best, flops = 0.0, 0.0
    for i, d in enumerate(assignment):
        if i > 0 and assignment[i - 1] != d:
            best = max(best, flops / (devices[assignment[i - 1]].gflops * 1e9),
                       _transfer_s(devices, assignment[i - 1], d, units[i].in_bytes))
            flops = 0.0
        flops += units[i].flops
    if assignment:
        best = max(best, flops / (devices[assignment[-1]].gflops * 1e9))
    return best


@dataclass
class Constraints:
    """What a planner must respect and what it optimizes.

    ``horizon_requests``: the plan must be able to serve this many requests on each device's
    usable energy ``energy_remaining_j - energy_min_j`` (E_i - E_min). ``latency_target_s``: the
    end-to-end latency of one request. ``throughput_target``: requests per second, i.e. every
    stage's compute and every boundary transfer must take at most ``1 / throughput_target``.
    """

    objective: str = "energy"
    latency_target_s: float | None = None
    throughput_target: float | None = None
    horizon_requests: int = 1

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; allowed: "
                             f"{', '.join(OBJECTIVES)}")
        if isinstance(self.horizon_requests, bool) or not isinstance(self.horizon_requests, int) \
                or self.horizon_requests < 1:
            raise ValueError(f"horizon_requests must be an integer >= 1, got "
                             f"{self.horizon_requests!r}")
        for name in ("latency_target_s", "throughput_target"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number or None, got {v!r}")


def memory_limit(d) -> float:
    """A device's memory for the model; ``memory_bytes`` 0 means "not given": no limit."""
    return float(d.memory_bytes) if d.memory_bytes and d.memory_bytes > 0 else math.inf


def usable_energy_j(d, horizon_requests: int = 1) -> float:
    """Energy one request may use on ``d``: ``(E_i - E_min) / horizon`` (inf when unlimited)."""
    if d.energy_remaining_j is None:
        return math.inf
    return (d.energy_remaining_j - (d.energy_min_j or 0.0)) / horizon_requests


def validate_inputs(model_profile, devices) -> None:
    """Errors that name the bad input: no units, no devices, duplicate names, bad device figures."""
    if not model_profile.units:
        raise ValueError(f"model profile {model_profile.model!r} has no units")
    if not devices:
        raise ValueError("no devices given: a plan needs at least one DeviceProfile")
    names = [d.name for d in devices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"device names must be unique; repeated: {dup}")
    for d in devices:
        if not (d.gflops > 0 and math.isfinite(d.gflops)):
            raise ValueError(f"device {d.name!r}: gflops must be > 0, got {d.gflops!r}")
        if d.memory_bytes is None or d.memory_bytes < 0:
            raise ValueError(f"device {d.name!r}: memory_bytes must be >= 0, got "
                             f"{d.memory_bytes!r}")
        for f in ("power_active_w", "power_idle_w", "energy_per_byte_j"):
            v = getattr(d, f)
            if v is None or v < 0:
                raise ValueError(f"device {d.name!r}: {f} must be >= 0, got {v!r}")


def check_units_fit(model_profile, devices) -> None:
    """A unit that fits on no device whole is an error naming it and the devices' memory."""
    best = max(memory_limit(d) for d in devices)
    for u in model_profile.units:
        need = u.param_bytes + u.peak_bytes
        if need > best:
            mems = ", ".join(f"{d.name}={int(memory_limit(d)) if math.isfinite(memory_limit(d)) else 'inf'}"
                             for d in devices)
            raise ValueError(f"unit {u.name!r} needs {need} bytes (parameters + peak activation) "
                             f"and fits on no device (memory_bytes: {mems}); add memory or use "
                             f"strategy 'hyps' / 'horizontal' to split it")


def to_predictions(energies: Sequence[DeviceEnergy]) -> list[DevicePrediction]:
    return [DevicePrediction(
        device=e.device, rank=r, energy_j=e.energy_j, compute_energy_j=e.compute_j,
        comm_energy_j=e.internal_comm_j + e.external_comm_j, latency_s=e.busy_s,
        memory_bytes=int(math.ceil(e.memory_bytes)), bytes_sent=int(round(e.bytes_sent)),
        bytes_received=int(round(e.bytes_received)), flops=int(round(e.flops)))
        for r, e in enumerate(energies)]


def predict_assignment(model_profile, devices, assignment: Sequence[int]):
    """Predictions and end-to-end latency for a unit -> device assignment (any, consecutive or
    not: eqs. 14-22)."""
    energies, latency = placement_energy(model_profile, devices,
                                         [[(d, 1.0)] for d in assignment])
    return to_predictions(energies), latency


def stages_from_assignment(model_profile, devices, assignment: Sequence[int]) -> list[StagePlan]:
    """Maximal runs of consecutive units on one device, as stages in model order."""
    stages: list[StagePlan] = []
    for u, d in zip(model_profile.units, assignment):
        if stages and stages[-1].rank == d:
            stages[-1].units.append(u.name)
        else:
            stages.append(StagePlan(index=len(stages), rank=d, device=devices[d].name,
                                    units=[u.name]))
    return stages


def plan_totals(predictions: Sequence[DevicePrediction], latency_s: float) -> dict:
    return {"total_energy_j": sum(p.energy_j for p in predictions),
            "max_device_energy_j": max(p.energy_j for p in predictions),
            "latency_s": latency_s}


def build_pipeline_plan(model_profile, devices, assignment: Sequence[int], *, strategy: str,
                        constraints: Constraints, meta: dict | None = None) -> Plan:
    check_links(devices, assignment)
    preds, latency = predict_assignment(model_profile, devices, assignment)
    m = dict(plan_totals(preds, latency))
    m["period_s"] = pipeline_period_s(model_profile, devices, assignment)
    m.update(meta or {})
    m.setdefault("horizon_requests", constraints.horizon_requests)
    return Plan(model=model_profile.model, strategy=strategy, devices=[d.name for d in devices],
                stages=stages_from_assignment(model_profile, devices, assignment),
                img_size=model_profile.img_size, batch_size=model_profile.batch_size,
                objective=constraints.objective, predictions=preds, meta=m)
