"""Random planning instances and exhaustive reference solvers for the planner tests."""
from __future__ import annotations

import itertools
import math
import random

from lapdtr.energy.analytical import placement_energy
from lapdtr.plan.cost import memory_limit, usable_energy_j
from lapdtr.profile.types import DeviceProfile, LinkProfile, ModelProfile, UnitProfile


def make_model(n: int, seed: int = 0, *, name: str = "toy") -> ModelProfile:
    r = random.Random(seed)
    units = []
    prev_out = r.randint(10_000, 200_000)
    for i in range(n):
        out = r.randint(1_000, 400_000)
        units.append(UnitProfile(
            index=i, name=f"u{i}", kind="block", modules=[f"blocks.{i}"], in_format="map",
            out_format="map", in_shape=[1, 8, 4, 4], out_shape=[1, 8, 4, 4],
            flops=r.randint(10**6, 10**9), num_params=0, param_bytes=r.randint(0, 2_000_000),
            in_bytes=prev_out, out_bytes=out, peak_bytes=prev_out + out + r.randint(0, 100_000),
            latency_s=0.0))
        prev_out = out
    return ModelProfile(model=name, family="toy", img_size=224, batch_size=1, dtype="float32",
                        device="cpu", units=units, total_flops=sum(u.flops for u in units),
                        model_flops=sum(u.flops for u in units), total_latency_s=0.0)


def make_devices(m: int, seed: int = 0, *, budget: bool = False, mem_scale: float = 1.0,
                 uniform_links: bool = True, spread: float = 0.0) -> list[DeviceProfile]:
    """``m`` random devices of a few speeds and powers (so some are identical); ``spread`` > 0
    makes each distinct: ``gflops * (1 + spread * i)``."""
    r = random.Random(seed)
    devs = []
    for i in range(m):
        gf = r.choice([20.0, 50.0, 200.0, 460.0]) * (1 + spread * i)
        d = DeviceProfile(
            name=f"dev{i}", kind="simulated", gflops=gf,
            memory_bytes=int(r.randint(3_000_000, 20_000_000) * mem_scale),
            power_active_w=r.choice([2.0, 4.5, 10.0, 15.0]), power_idle_w=1.0,
            energy_per_byte_j=r.choice([1e-9, 1e-8, 5e-8]))
        if budget:
            d.energy_budget_j = 10.0
            d.energy_remaining_j = r.choice([0.05, 0.2, 1.0, 10.0])
            d.energy_min_j = 0.01
        devs.append(d)
    for i, d in enumerate(devs):
        if uniform_links:
            d.links = [LinkProfile("*", 12.5e6, 1e-3)]
        else:
            d.links = [LinkProfile(o.name, r.choice([5e6, 12.5e6, 1.25e8]), r.choice([1e-4, 2e-3]))
                       for o in devs if o is not d]
    return devs


def evaluate(model_profile, devices, assignment):
    energies, latency = placement_energy(model_profile, devices, [[(d, 1.0)] for d in assignment])
    return energies, latency


def feasible(model_profile, devices, assignment, *, horizon=1, latency_target=None):
    energies, latency = evaluate(model_profile, devices, assignment)
    for d, e in zip(devices, energies):
        if e.memory_bytes > memory_limit(d) + 1e-6:
            return None
        if e.units and e.energy_j * 1.0 > usable_energy_j(d, horizon) + 1e-12:
            return None
    if latency_target is not None and latency > latency_target * (1 + 1e-9):
        return None
    return energies, latency


def objective_value(energies, latency, objective):
    if objective == "energy":
        return sum(e.energy_j for e in energies)
    if objective == "max-device-energy":
        return max(e.energy_j for e in energies)
    return latency


def exhaustive_contiguous(model_profile, devices, objective="energy", **kw):
    """Best over all contiguous stage cuts and all injective stage -> device maps."""
    n, m = len(model_profile.units), len(devices)
    best = math.inf
    for k in range(1, min(n, m) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = [0, *cuts, n]
            for perm in itertools.permutations(range(m), k):
                a = [0] * n
                for s in range(k):
                    for u in range(bounds[s], bounds[s + 1]):
                        a[u] = perm[s]
                r = feasible(model_profile, devices, a, **kw)
                if r is not None:
                    best = min(best, objective_value(*r, objective))
    return best


def exhaustive_vertical(model_profile, devices, **kw):
    """Least max per-device energy over every unit -> device map (m ** n of them)."""
    n, m = len(model_profile.units), len(devices)
    best = math.inf
    for a in itertools.product(range(m), repeat=n):
        r = feasible(model_profile, devices, list(a), **kw)
        if r is not None:
            best = min(best, max(e.energy_j for e in r[0]))
    return best


def exhaustive_sequential(model_profile, devices, **kw):
    """Best largest per-device energy over Tang & Stefanov's sequential partitions: min(n, m)
    consecutive stages on devices 0, 1, ... in rank order, each device one non-empty stage."""
    n, m = len(model_profile.units), len(devices)
    k = min(n, m)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        a = [s for s in range(k) for _ in range(bounds[s], bounds[s + 1])]
        r = feasible(model_profile, devices, a, **kw)
        if r is not None:
            best = min(best, max(e.energy_j for e in r[0]))
    return best


def plant_feasible(model_profile, devices, seed: int = 0, *, horizon: int = 1,
                   sequential: bool = False) -> list[int]:
    """Make the instance feasible by construction: draw a contiguous partition on distinct
    devices (``sequential``: min(n, m) stages on devices 0, 1, ... in rank order) and raise each
    device's memory and remaining energy, where short, to what its stage needs over ``horizon``
    requests. Changes ``devices`` in place; returns the planted assignment."""
    r = random.Random(seed)
    n, m = len(model_profile.units), len(devices)
    if sequential:
        k = min(n, m)
        order = list(range(k))
    else:
        k = r.randint(1, min(n, m))
        order = r.sample(range(m), k)
    cuts = sorted(r.sample(range(1, n), k - 1))
    bounds = [0, *cuts, n]
    assignment = [order[s] for s in range(k) for _ in range(bounds[s], bounds[s + 1])]
    energies, _ = evaluate(model_profile, devices, assignment)
    for d, e in zip(devices, energies):
        if not e.units:
            continue
        if memory_limit(d) < e.memory_bytes:
            d.memory_bytes = int(math.ceil(e.memory_bytes)) + 1
        if d.energy_remaining_j is not None and usable_energy_j(d, horizon) < e.energy_j:
            d.energy_remaining_j = (d.energy_min_j or 0.0) + e.energy_j * horizon * (1 + 1e-6)
    assert feasible(model_profile, devices, assignment, horizon=horizon) is not None
    return assignment
