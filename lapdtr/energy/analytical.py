"""Analytical per-device energy models (Tang & Stefanov, "The Effects of Partitioning Strategies on
Energy Consumption in Distributed CNN Inference at The Edge", equations 1-22).

Every device's energy per request splits into three parts (eqs. 6, 10, 14, 18)::

    E_j = E_j^comp + E_j^in,comm + E_j^ex,comm

Calibration from profiles (section VI-A of the paper profiles t_i and P_i(t) per layer on the
device; lapdtr derives them from the unit profile and the device's power model):

- ``t_i = flops_i / (gflops * 1e9)`` and ``P_i(t) = power_active_w``, so the integral
  ``int_0^t_i P_i(t) dt`` is ``flops_i * power_active_w / (gflops * 1e9)``: the energy cost of a
  FLOP is power / throughput (``DeviceProfile.joules_per_flop``).
- ``E_in,comm^i`` (a layer handing its output to the next layer on the same device) is
  ``out_bytes_i * internal_energy_per_byte_j``; it defaults to 0 because a unit's profiled compute
  already includes its own memory traffic.
- ``E_ex,comm^i`` is one profiled figure in the paper; lapdtr splits it into
  ``energy_per_byte_j`` paid by the device that sends and by the device that receives each byte,
  so heterogeneous devices pay their own radio/NIC cost.

The granularity is the *unit* (``lapdtr.models.units``: a stem, a residual block, a conv+ReLU, a
pooling layer, a head) rather than the paper's ONNX layer.

One general form covers the sequential (eqs. 14-17), vertical (18-22), horizontal (10-13) and the
poster's ensembled / hybrid strategies: a *placement* lists, per unit, which devices compute which
fraction ``k_i(j)`` of its output channels (a pipeline unit is ``[(device, 1.0)]``). Between two
units each device that computes part of the next unit needs the whole input, so it receives the
fraction it did not compute itself, and every producer sends its slice to every consumer that is
not itself; for a pipeline this is exactly eq. 17 / 22 (the last unit of a (sub-)partition sends,
the first receives), for the horizontal split exactly eq. 13 (``1 - k_i(j)`` of each output
received) plus the matching sends. The data strategy (eqs. 1-9) has its own function because its
exchange is the halo rows of eqs. 1-5.

The model input is taken to be available where the first unit runs (the paper's first partition
only sends; every data / horizontal partition starts from its input), and the output of the last
unit stays where it is computed (``l_q`` sends nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

__all__ = [
    "DeviceEnergy", "Window", "Placement", "placement_energy", "sequential_energy",
    "vertical_energy", "horizontal_energy", "ensembled_energy", "data_energy", "split_evenly",
    "split_proportional", "halo_rows", "default_window", "estimate_unit_windows", "row_axis",
    "channel_axis", "find_link", "transfer_time_s", "fused_blocks", "estimate_inner_exchange_bytes",
]

# per unit: (device index, fraction of the unit's output computed there)
Placement = Sequence[Sequence[tuple[int, float]]]


@dataclass
class DeviceEnergy:
    """Per-device figures of one request: the three energy terms of eq. 6 and what produced them."""

    device: str
    compute_j: float = 0.0
    internal_comm_j: float = 0.0
    external_comm_j: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    flops: float = 0.0
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    memory_bytes: float = 0.0
    units: list[str] = field(default_factory=list)

    @property
    def energy_j(self) -> float:
        return self.compute_j + self.internal_comm_j + self.external_comm_j

    @property
    def busy_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True)
class Window:
    """A unit's effective sliding window along the rows: output row r reads input rows
    ``[r * stride - pad, r * stride - pad + kernel)`` (clipped to the input)."""

    kernel: int
    stride: int
    pad: int


# --------------------------------------------------------------------------------------- helpers

def _joules_per_flop(d) -> float:
    return d.power_active_w / (d.gflops * 1e9)


def _seconds_per_flop(d) -> float:
    return 1.0 / (d.gflops * 1e9)


def find_link(devices, a: int, b: int):
    """The link between devices ``a`` and ``b`` (indices): a ``LinkProfile`` of ``a`` naming ``b``
    (or ``"*"``: any peer), else one of ``b`` naming ``a``; ``None`` when neither lists one."""
    da, db = devices[a], devices[b]
    for src, peer in ((da, db.name), (db, da.name)):
        for link in src.links:
            if link.peer == peer:
                return link
    for src in (da, db):
        for link in src.links:
            if link.peer == "*":
                return link
    return None


def transfer_time_s(devices, a: int, b: int, nbytes: float) -> float:
    """Seconds to move ``nbytes`` from device ``a`` to ``b``: link latency + bytes / bandwidth.
    A transfer within one device takes no time; a missing link is a ``ValueError`` naming the
    pair."""
    if a == b or nbytes <= 0:
        return 0.0
    link = find_link(devices, a, b)
    if link is None:
        raise ValueError(f"no link between devices {devices[a].name!r} and {devices[b].name!r}: "
                         f"add a LinkProfile (peer name, or '*' for any peer) to one of them")
    return link.latency_s + nbytes / link.bytes_per_s


def _account_transfer(out, devices, p: int, c: int, nbytes: float) -> float:
    """Book ``nbytes`` sent from device ``p`` to ``c`` (bytes, external communication energy on
    both ends, link time on both); returns the transfer time."""
    out[p].bytes_sent += nbytes
    out[p].external_comm_j += nbytes * devices[p].energy_per_byte_j
    out[c].bytes_received += nbytes
    out[c].external_comm_j += nbytes * devices[c].energy_per_byte_j
    dt = transfer_time_s(devices, p, c, nbytes)
    out[p].comm_s += dt
    out[c].comm_s += dt
    return dt


def channel_axis(unit) -> int:
    """Length of the axis a horizontal (channel / neuron) split cuts in this unit's output."""
    shape = list(unit.out_shape)
    if unit.out_format == "map":
        return int(shape[1])
    return int(shape[-1])


def row_axis(unit) -> int | None:
    """Number of spatial output rows of a unit (``None`` when its output is not a spatial map)."""
    shape = list(unit.out_shape)
    if unit.out_format == "map" and len(shape) == 4:
        return int(shape[2])
    if unit.out_format == "map_nhwc" and len(shape) == 4:
        return int(shape[1])
    return None


def _in_rows(unit) -> int | None:
    shape = list(unit.in_shape)
    if unit.in_format in ("map", "image") and len(shape) == 4:
        return int(shape[2])
    if unit.in_format == "map_nhwc" and len(shape) == 4:
        return int(shape[1])
    return None


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` items in ``parts`` groups whose sizes differ by at most one (the paper's
    "difference among the heights / numbers of neurons is minimized")."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    q, r = divmod(int(total), parts)
    return [q + (1 if j < r else 0) for j in range(parts)]


def split_proportional(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` items split in proportion to ``weights`` (largest remainders), e.g. device
    GFLOP/s for the hybrid strategy; sizes sum to ``total`` exactly."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    s = float(sum(weights))
    raw = [total * w / s for w in weights]
    out = [int(math.floor(x)) for x in raw]
    rest = total - sum(out)
    order = sorted(range(len(raw)), key=lambda j: (-(raw[j] - out[j]), j))
    for j in order[:rest]:
        out[j] += 1
    return out


def default_window(unit) -> Window:
    """A window guessed from shapes alone: stride = input rows / output rows, one 3x3-like
    neighbourhood (kernel = stride + 2, pad 1). ``estimate_unit_windows`` reads the real layers."""
    hi, ho = _in_rows(unit), row_axis(unit)
    if not hi or not ho:
        return Window(1, 1, 0)
    s = max(1, round(hi / ho))
    return Window(s + 2, s, 1)


def estimate_unit_windows(model, unit_list) -> dict[str, Window]:
    """Effective row window of every spatial unit, composed from its Conv/Pool layers along the
    main path (``downsample`` / ``shortcut`` branches are 1x1 or pooling projections inside the
    same receptive field and are skipped). Falls back to :func:`default_window` when the composed
    stride does not match the measured shapes."""
    from torch import nn

    from ..models.base import _get

    out = {}
    for u in unit_list:
        ho = row_axis(u)
        if ho is None:
            continue
        k, s, p = 1, 1, 0
        for name in u.modules:
            try:
                mod = _get(model, name)
            except AttributeError:
                continue
            if not isinstance(mod, nn.Module):
                continue
            for sub_name, sub in mod.named_modules():
                if any(t in sub_name for t in ("downsample", "shortcut", "se", "attn")):
                    continue
                if isinstance(sub, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                    kk = sub.kernel_size if isinstance(sub.kernel_size, int) else sub.kernel_size[0]
                    ss = sub.stride if isinstance(sub.stride, int) else sub.stride[0]
                    pp = sub.padding if isinstance(sub.padding, int) else (
                        sub.padding[0] if isinstance(sub.padding, tuple) else 0)
                    dil = getattr(sub, "dilation", 1)
                    dil = dil if isinstance(dil, int) else dil[0]
                    kk = dil * (kk - 1) + 1
                    k, p, s = k + (kk - 1) * s, p + pp * s, s * ss
        hi = _in_rows(u)
        w = Window(k, s, p)
        if not hi or (hi + 2 * p - k) // s + 1 != ho:
            w = default_window(u)
        out[u.name] = w
    return out


def _main_branch_layers(model, unit, kinds):
    from ..models.base import _get

    layers = []
    for name in unit.modules:
        try:
            mod = _get(model, name)
        except AttributeError:
            continue
        if not hasattr(mod, "named_modules"):
            continue
        for sub_name, sub in mod.named_modules():
            if any(t in sub_name.split(".") for t in ("downsample", "shortcut", "se")):
                continue
            if isinstance(sub, kinds):
                layers.append(sub)
    return layers


def estimate_inner_exchange_bytes(model, unit_list) -> dict[str, int]:
    """Per unit, the bytes of inner layer outputs a per-layer (horizontal) split must all-gather:
    the outputs of every Conv/Linear layer on the unit's main branch except the last one (whose
    output joins the unit's output channel-wise through BN, activation, pooling or the residual
    add, which each device can apply to its own channels). Measured with forward hooks on one
    input of the units' batch size."""
    import torch
    from torch import nn

    sizes: dict[int, int] = {}
    hooks = []
    per_unit = {}
    for u in unit_list:
        layers = _main_branch_layers(model, u, (nn.Conv2d, nn.Linear))
        per_unit[u.name] = layers[:-1]
        for layer in layers[:-1]:
            hooks.append(layer.register_forward_hook(
                lambda mod, inp, out: sizes.__setitem__(id(mod), out.numel() * out.element_size())))
    try:
        p = next(model.parameters())
        x = torch.zeros(*unit_list[0].in_shape, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            for u in unit_list:
                x = u.fn(model, x)
    finally:
        for h in hooks:
            h.remove()
    return {name: int(sum(sizes.get(id(m), 0) for m in layers))
            for name, layers in per_unit.items()}


def halo_rows(out_starts: Sequence[int], out_sizes: Sequence[int], window: Window,
              in_rows: int) -> list[tuple[int, int]]:
    """Input rows each partition needs, ``[a(j), b(j))``, for its output rows (eqs. 4-5 with
    padding): output rows ``[o, o + n)`` read ``[o*s - pad, (o + n - 1)*s - pad + kernel)``."""
    need = []
    for o, n in zip(out_starts, out_sizes):
        if n <= 0:
            need.append((0, 0))
            continue
        a = max(0, o * window.stride - window.pad)
        b = min(in_rows, (o + n - 1) * window.stride - window.pad + window.kernel)
        need.append((a, max(a, b)))
    return need


def _h_comm(x: int, y: int, a: int, b: int) -> int:
    """Eq. 1: rows needed, ``[a, b)``, that the partition did not produce, ``[x, y)``."""
    if b <= a:
        return 0
    if y <= x:  # produced nothing: everything it needs comes from elsewhere
        return b - a
    return max(0, x - a) + max(0, b - y)


def fused_blocks(units) -> list[list[int]]:
    """Units grouped into blocks of equal dimensions (the poster's Ensembled partition: "combine
    layers with similar dimensions"): consecutive units whose input and output shapes are equal
    join the block before them; a unit that changes the shape starts a new block."""
    blocks: list[list[int]] = []
    for i, u in enumerate(units):
        same = list(u.in_shape) == list(u.out_shape) and u.in_format == u.out_format
        if blocks and same and u.out_format in ("map", "map_nhwc", "tokens"):
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


# ----------------------------------------------------------------------- the general placement

def placement_energy(model_profile, devices, placement: Placement, *, fused: Sequence[int] = (),
                     inner_bytes: Sequence[float] | None = None,
                     internal_energy_per_byte_j: float = 0.0) -> tuple[list[DeviceEnergy], float]:
    """Per-device energy of a placement (see the module docstring) and the end-to-end latency.

    ``placement[i]`` lists ``(device index, fraction)`` for unit ``i`` (fractions sum to 1).
    ``fused`` lists boundaries ``i`` (between unit ``i`` and ``i + 1``) where nothing is exchanged
    because each device continues on its own channel group (Ensembled blocks). ``inner_bytes[i]``:
    bytes of unit ``i``'s inner layer outputs that the next layer inside the unit needs whole
    (:func:`estimate_inner_exchange_bytes`); a unit split over several devices all-gathers them
    (eq. 13 applied to the layers inside the unit).
    Latency: per unit, the slowest participant's compute plus the slowest receiver's transfers.
    """
    units = model_profile.units
    if len(placement) != len(units):
        raise ValueError(f"placement has {len(placement)} entries for {len(units)} units")
    out = [DeviceEnergy(d.name) for d in devices]
    jpf = [_joules_per_flop(d) for d in devices]
    spf = [_seconds_per_flop(d) for d in devices]
    params = [0.0] * len(devices)
    peak = [0.0] * len(devices)
    fused = set(fused)
    latency = 0.0
    for i, u in enumerate(units):
        parts = placement[i]
        tot = sum(f for _, f in parts)
        if not parts or abs(tot - 1.0) > 1e-6 or any(f < 0 for _, f in parts):
            raise ValueError(f"unit {u.name!r}: fractions must be >= 0 and sum to 1, got {parts}")
        slowest = 0.0
        for d, f in parts:
            if f <= 0:
                continue
            e = out[d]
            flops = f * u.flops
            e.flops += flops
            e.compute_j += flops * jpf[d]
            e.compute_s += flops * spf[d]
            slowest = max(slowest, flops * spf[d])
            e.internal_comm_j += f * u.out_bytes * internal_energy_per_byte_j  # eqs. 8/12/16/20
            params[d] += f * u.param_bytes
            # a channel shard still holds the whole input; its own work scales with its share
            peak[d] = max(peak[d], u.in_bytes + f * max(0, u.peak_bytes - u.in_bytes))
            if u.name not in e.units:
                e.units.append(u.name)
        latency += slowest
        inner = float(inner_bytes[i]) if inner_bytes is not None else 0.0
        active = [(d, f) for d, f in parts if f > 0]
        if inner > 0 and len(active) > 1:
            t_max = 0.0
            for c, fc in active:
                t = 0.0
                for p, fp in active:
                    if p == c:
                        continue
                    t += _account_transfer(out, devices, p, c, fp * inner)
                t_max = max(t_max, t)
            latency += t_max
        if i + 1 == len(units) or i in fused:
            continue
        # every consumer of unit i+1 needs unit i's whole output
        nxt = placement[i + 1]
        B = float(u.out_bytes)
        recv_t = 0.0
        for c, fc in nxt:
            if fc <= 0:
                continue
            t = 0.0
            for p, fp in parts:
                if fp <= 0 or p == c:
                    continue
                t += _account_transfer(out, devices, p, c, fp * B)
            recv_t = max(recv_t, t)
        latency += recv_t
    for d, e in enumerate(out):
        e.memory_bytes = params[d] + peak[d]
    return out, latency


def _check_assignment(model_profile, devices, assignment) -> None:
    if len(assignment) != len(model_profile.units):
        raise ValueError(f"assignment has {len(assignment)} entries for "
                         f"{len(model_profile.units)} units")
    for i, d in enumerate(assignment):
        if not 0 <= d < len(devices):
            raise ValueError(f"unit {model_profile.units[i].name!r} is assigned to device {d}; "
                             f"there are {len(devices)} devices")


def sequential_energy(model_profile, devices, assignment: Sequence[int], **kw):
    """Eqs. 14-17: each device holds one run of consecutive units (``assignment[i]`` = device of
    unit ``i``); the first unit of a partition receives its input, the last sends its output."""
    _check_assignment(model_profile, devices, assignment)
    seen, prev = set(), None
    for d in assignment:
        if d != prev and d in seen:
            raise ValueError(f"sequential partitions are consecutive: device "
                             f"{devices[d].name!r} holds two separate runs (use vertical_energy)")
        seen.add(d)
        prev = d
    return placement_energy(model_profile, devices, [[(d, 1.0)] for d in assignment], **kw)


def vertical_energy(model_profile, devices, assignment: Sequence[int], **kw):
    """Eqs. 18-22: a device may hold non-consecutive units; each maximal run on it (a
    sub-partition p_js) receives its input and sends its output (unless it holds l_z / l_q)."""
    _check_assignment(model_profile, devices, assignment)
    return placement_energy(model_profile, devices, [[(d, 1.0)] for d in assignment], **kw)


def _fractions(units, sizes_per_unit):
    placement = []
    for u, sizes in zip(units, sizes_per_unit):
        total = sum(sizes)
        placement.append([(j, s / total) for j, s in enumerate(sizes) if s > 0])
    return placement


def horizontal_energy(model_profile, devices, *, weights: Sequence[float] | None = None,
                      inner_bytes: dict | None = None, **kw):
    """Eqs. 10-13: every unit's output channels / neurons split into ``len(devices)`` groups
    (equal sizes, or in proportion to ``weights`` for the hybrid strategy); after every unit but the
    last each device receives the ``1 - k_i(j)`` it did not compute and sends its own slice to the
    others. ``inner_bytes`` (unit name -> bytes, :func:`estimate_inner_exchange_bytes`) adds the
    all-gathers of the layers inside a unit. Returns ``(per-device energies, latency, sizes per
    unit)``."""
    units = model_profile.units
    m = len(devices)
    sizes = [split_evenly(channel_axis(u), m) if weights is None
             else split_proportional(channel_axis(u), weights) for u in units]
    inner = [float((inner_bytes or {}).get(u.name, 0.0)) for u in units]
    energies, latency = placement_energy(model_profile, devices, _fractions(units, sizes),
                                         inner_bytes=inner, **kw)
    return energies, latency, sizes


def ensembled_energy(model_profile, devices, *, weights: Sequence[float] | None = None,
                     blocks: Sequence[Sequence[int]] | None = None, **kw):
    """The poster's Ensembled partition: the channel split of :func:`horizontal_energy`, but units
    fused into blocks (:func:`fused_blocks`) exchange only at block boundaries. Returns
    ``(energies, latency, sizes per unit, blocks)``."""
    units = model_profile.units
    m = len(devices)
    blocks = [list(b) for b in (blocks if blocks is not None else fused_blocks(units))]
    sizes = []
    for b in blocks:
        # one split per block, so a device keeps its own group through the block
        c = channel_axis(units[b[0]])
        s = split_evenly(c, m) if weights is None else split_proportional(c, weights)
        for i in b:
            ci = channel_axis(units[i])
            sizes.append(s if ci == c else (split_evenly(ci, m) if weights is None
                                            else split_proportional(ci, weights)))
    fused = [i for b in blocks for i in b[:-1]]
    energies, latency = placement_energy(model_profile, devices, _fractions(units, sizes),
                                         fused=fused, **kw)
    return energies, latency, sizes, blocks


def data_energy(model_profile, devices, *, windows: dict | None = None,
                weights: Sequence[float] | None = None, gather_rank: int = 0,
                internal_energy_per_byte_j: float = 0.0):
    """Eqs. 1-9: every spatial unit's output rows split into ``len(devices)`` parts (equal, or in
    proportion to ``weights``); a device computes ``k_i(j) = H_i^Y(j) / H_i^Y`` of each unit
    (eq. 7) and receives the halo rows ``H_i^comm(j)`` of eqs. 1-5 from its neighbours (eq. 9),
    who send them. Units whose output has no rows (a classifier head) run whole on
    ``gather_rank``, which receives the other devices' rows of the last map.

    Returns ``(energies, latency, rows)``: ``rows[i]`` lists ``(start, stop, halo_above,
    halo_below)`` per device for spatial units, ``None`` otherwise.
    """
    units = model_profile.units
    m = len(devices)
    windows = windows or {}
    out = [DeviceEnergy(d.name) for d in devices]
    jpf = [_joules_per_flop(d) for d in devices]
    spf = [_seconds_per_flop(d) for d in devices]
    params = [0.0] * m
    peak = [0.0] * m
    latency = 0.0
    rows_out: list = []
    prev_split = None  # (starts, sizes) of the previous spatial unit's output rows
    for i, u in enumerate(units):
        H = row_axis(u)
        if H is None:
            # gather the previous spatial output on gather_rank, then run the unit there whole
            if prev_split is not None:
                starts, sizes = prev_split
                B = float(units[i - 1].out_bytes)
                t = 0.0
                for j in range(m):
                    if j == gather_rank or sizes[j] == 0:
                        continue
                    nbytes = B * sizes[j] / sum(sizes)
                    out[j].bytes_sent += nbytes
                    out[j].external_comm_j += nbytes * devices[j].energy_per_byte_j
                    out[gather_rank].bytes_received += nbytes
                    out[gather_rank].external_comm_j += nbytes * devices[gather_rank].energy_per_byte_j
                    dt = transfer_time_s(devices, j, gather_rank, nbytes)
                    out[j].comm_s += dt
                    out[gather_rank].comm_s += dt
                    t += dt
                latency += t
                prev_split = None
            e = out[gather_rank]
            e.flops += u.flops
            e.compute_j += u.flops * jpf[gather_rank]
            e.compute_s += u.flops * spf[gather_rank]
            e.internal_comm_j += u.out_bytes * internal_energy_per_byte_j
            params[gather_rank] += u.param_bytes
            peak[gather_rank] = max(peak[gather_rank], u.peak_bytes)
            if u.name not in e.units:
                e.units.append(u.name)
            latency += u.flops * spf[gather_rank]
            rows_out.append(None)
            continue
        sizes = split_evenly(H, m) if weights is None else split_proportional(H, weights)
        starts = [sum(sizes[:j]) for j in range(m)]
        w = windows.get(u.name) or default_window(u)
        hin = _in_rows(u) or H
        need = halo_rows(starts, sizes, w, hin)
        halos = []
        # eqs. 1-5 and 9: rows of the previous output each partition needs but did not produce
        if prev_split is not None:
            pstarts, psizes = prev_split
            B = float(units[i - 1].out_bytes)
            Hp = sum(psizes)
            row_bytes = B / Hp
            t_max = 0.0
            for j in range(m):
                a, b = need[j]
                x, y = pstarts[j], pstarts[j] + psizes[j]
                hc = _h_comm(x, y, a, b)
                halos.append((max(0, x - a) if y > x else 0, max(0, b - y) if y > x else 0))
                if hc == 0:
                    continue
                t = 0.0
                for k in range(m):  # who produced the rows j needs
                    if k == j:
                        continue
                    lo, hi = max(a, pstarts[k]), min(b, pstarts[k] + psizes[k])
                    if hi <= lo:
                        continue
                    nbytes = (hi - lo) * row_bytes
                    out[k].bytes_sent += nbytes
                    out[k].external_comm_j += nbytes * devices[k].energy_per_byte_j
                    out[j].bytes_received += nbytes
                    out[j].external_comm_j += nbytes * devices[j].energy_per_byte_j
                    dt = transfer_time_s(devices, k, j, nbytes)
                    out[k].comm_s += dt
                    out[j].comm_s += dt
                    t += dt
                t_max = max(t_max, t)
            latency += t_max
        else:
            halos = [(0, 0)] * m
        slowest = 0.0
        for j in range(m):
            k = sizes[j] / H  # eq. 7: k_i(j) = H_i^Y(j) / H_i^Y
            if k <= 0:
                continue
            e = out[j]
            flops = k * u.flops
            e.flops += flops
            e.compute_j += flops * jpf[j]
            e.compute_s += flops * spf[j]
            slowest = max(slowest, flops * spf[j])
            e.internal_comm_j += k * u.out_bytes * internal_energy_per_byte_j  # eq. 8
            params[j] += u.param_bytes  # weights are not partitioned
            a, b = need[j]
            in_part = u.in_bytes * (b - a) / hin if hin else u.in_bytes
            peak[j] = max(peak[j], in_part + k * max(0, u.peak_bytes - u.in_bytes))
            if u.name not in e.units:
                e.units.append(u.name)
        latency += slowest
        rows_out.append([(starts[j], starts[j] + sizes[j], halos[j][0], halos[j][1])
                         for j in range(m)])
        prev_split = (starts, sizes)
    for d, e in enumerate(out):
        e.memory_bytes = params[d] + peak[d]
    return out, latency, rows_out
