"""Run reports: per-rank and total figures (``report.json``), a printed table, a PNG timeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .._json import from_jsonable, load_json, save_json, to_jsonable

__all__ = ["RankReport", "ReplanEvent", "RunReport", "format_report", "plot_timeline",
           "percentile"]


@dataclass
class RankReport:
    """What one rank did. ``status``: ``ok``, ``failed`` (died; figures from its last telemetry)
    or ``left`` (taken out of the plan, e.g. below E_min). ``energy_label``: ``measured`` or
    ``modelled`` (simulated battery) or ``none``. ``timeline``: ``[item, first_unit, end_unit,
    t_start_s, t_end_s]`` relative to the run start. ``stage_p50_s``/``stage_p95_s``: latency of
    one stage run (one item) on this rank; ``items_per_s``: items over the run's wall time;
    ``cpu_s``: CPU time of the rank's process (all threads) from the start of the stream to its
    end (``compute_s`` is wall time in stages, which exceeds CPU time when ranks share cores);
    ``cpus``: the CPUs the rank was pinned to (empty: not pinned)."""

    rank: int
    device: str = ""
    status: str = "ok"
    units: list[str] = field(default_factory=list)
    items: int = 0
    stage_p50_s: float = 0.0
    stage_p95_s: float = 0.0
    items_per_s: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    idle_s: float = 0.0
    cpu_s: float = 0.0
    cpus: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    energy_j: float = 0.0  # used, by the meter (an injected drain is not in it: drained_j)
    remaining_j: float | None = None
    energy_label: str = "none"
    drained_j: float = 0.0  # charge removed by injected drain faults
    energy_budget_j: float | None = None  # E_max
    energy_min_j: float = 0.0  # E_min
    energy_trace: list = field(default_factory=list)  # [t_s, remaining J] at each telemetry beat
    widths: list = field(default_factory=list)  # [t_s, width ratio] at the start and each change
    param_bytes: int = 0
    weights_loaded_bytes: int = 0
    cache_peak_bytes: int = 0
    cache_spilled: int = 0
    cache_dropped: int = 0
    timeline: list[list] = field(default_factory=list)
    # boundaries this rank sent on, by the unit before each: {"items", "bytes" (as sent, message
    # headers included), "payload_bytes" (the packet's tensors), "dense_fp32_bytes" (the same
    # items' boundary in fp32 with no boundary before it summarized either), "keep", "wire",
    # "tokens" (per item, as sent)}
    boundaries: dict = field(default_factory=dict)

    def count_boundary(self, unit: str, sent: int, packet, dense_bytes: int, keep: float) -> None:
        from ..summarize.wire import wire_of_dtype

        b = self.boundaries.setdefault(unit, {"items": 0, "bytes": 0, "payload_bytes": 0,
                                              "dense_fp32_bytes": 0})
        b["items"] += 1
        b["bytes"] += int(sent)
        b["payload_bytes"] += int(packet.nbytes)
        b["dense_fp32_bytes"] += int(dense_bytes)
        b["keep"], b["wire"] = float(keep), wire_of_dtype(packet.tensors[0].dtype)
        b["tokens"] = int(packet.tensors[0].shape[1]) if packet.tensors[0].dim() > 2 else None


@dataclass
class ReplanEvent:
    """One re-plan: why, which ranks, how long detection and recovery took, what moved."""

    generation: int
    kind: str
    devices: list[str]
    ranks: list[int]
    time_s: float
    detect_s: float = 0.0
    recovery_s: float = 0.0
    moves: list[dict] = field(default_factory=list)
    resumed: dict = field(default_factory=dict)  # first unit -> number of items resumed there
    # item -> [unit it resumed from, furthest boundary any survivor had cached for it]
    resume_points: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)


@dataclass
class RunReport:
    model: str
    mode: str
    world_size: int
    requests: int
    batch_size: int
    micro_batches: int
    wall_s: float
    throughput_rps: float
    latency_p50_s: float
    latency_p95_s: float
    latency_mean_s: float
    bytes_sent: int
    bytes_received: int
    energy_j: float
    energy_label: str
    compute_s: float
    comm_s: float
    completed: int
    duplicates: int
    lost: int
    ranks: list[RankReport] = field(default_factory=list)
    replans: list[ReplanEvent] = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunReport":
        return from_jsonable(cls, d)

    def save(self, path):
        return save_json(self, path)

    @classmethod
    def load(cls, path) -> "RunReport":
        return load_json(cls, path)


def percentile(values, q: float) -> float:
    if not values:
        return 0.0
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def _mb(n) -> str:
    return f"{n / 2**20:.2f}"


def format_report(r: RunReport) -> str:
    """A plain-text table of the run: totals, then one row per rank, then the re-plans."""
    lines = [
        f"{r.model} | mode {r.mode} | {r.world_size} ranks | {r.completed}/{r.requests} requests "
        f"(batch {r.batch_size}, {r.micro_batches} micro-batches) | duplicates {r.duplicates} | "
        f"lost {r.lost}",
        f"wall {r.wall_s:.2f} s | throughput {r.throughput_rps:.1f} req/s | latency p50 "
        f"{r.latency_p50_s * 1e3:.1f} ms p95 {r.latency_p95_s * 1e3:.1f} ms | energy "
        f"{r.energy_j:.2f} J ({r.energy_label}) | sent {_mb(r.bytes_sent)} MiB",
        "",
        f"{'rank':>4} {'device':<14} {'status':<7} {'units':<22} {'items':>5} {'p50 ms':>7} "
        f"{'p95 ms':>7} {'compute s':>9} "
        f"{'comm s':>7} {'idle s':>7} {'sent MiB':>8} {'recv MiB':>8} {'energy J':>9} "
        f"{'left J':>8} {'label':<8}",
    ]
    for k in r.ranks:
        units = f"{k.units[0]}..{k.units[-1]}" if len(k.units) > 1 else (k.units[0] if k.units else "-")
        left = "-" if k.remaining_j is None else f"{k.remaining_j:.2f}"
        lines.append(
            f"{k.rank:>4} {k.device[:14]:<14} {k.status:<7} {units[:22]:<22} {k.items:>5} "
            f"{k.stage_p50_s * 1e3:>7.1f} {k.stage_p95_s * 1e3:>7.1f} {k.compute_s:>9.3f} "
            f"{k.comm_s:>7.3f} {k.idle_s:>7.3f} {_mb(k.bytes_sent):>8} "
            f"{_mb(k.bytes_received):>8} {k.energy_j:>9.2f} {left:>8} {k.energy_label:<8}")
    steps = [(k, k.widths) for k in r.ranks if k.widths and
             (len(k.widths) > 1 or k.widths[0][1] != 1.0)]
    if steps:
        lines.append("")
        for k, ws in steps:
            lines.append(f"widths on r{k.rank} {k.device}: " + ", ".join(
                f"{_width_label(w)} at {t:.2f} s" + (
                    "" if not k.energy_budget_j or not k.energy_trace else
                    f" ({_remaining_at(k, t):.1f} J left)") for t, w in ws))
    bounds = [(k, u, b) for k in r.ranks for u, b in k.boundaries.items()]
    if bounds:
        lines.append("")
        for k, u, b in bounds:
            lines.append(
                f"boundary after {u} (r{k.rank}): keep {b['keep']:g} {b['wire']}, "
                f"{b['items']} items, {b['bytes']} bytes sent ({b['payload_bytes']} payload, "
                f"{b['payload_bytes'] / max(1, b['dense_fp32_bytes']):.1%} of fp32 unsummarized)")
    drained = [k for k in r.ranks if k.drained_j]
    if drained:
        lines.append("")
        lines += [f"injected drain on r{k.rank} {k.device}: {k.drained_j:.2f} J removed (a "
                  f"fault, not counted as energy used)" for k in drained]
    if r.replans:
        lines.append("")
        for e in r.replans:
            lines.append(
                f"re-plan gen {e.generation} at {e.time_s:.2f} s: {e.kind} on {', '.join(e.devices)} "
                f"(rank {', '.join(map(str, e.ranks))}); detected in {e.detect_s * 1e3:.0f} ms, "
                f"recovered in {e.recovery_s * 1e3:.0f} ms; {len(e.moves)} unit(s) moved; items "
                f"resumed at unit index: {e.resumed}")
    else:
        lines += ["", "no re-plans"]
    acc, ref = r.meta.get("accuracy"), r.meta.get("reference_accuracy")
    if acc and acc.get("count"):
        line = (f"accuracy on {acc['count']} {r.meta.get('data', {}).get('kind', '')} inputs: "
                f"top-1 {acc['top1']:.4f}, top-5 {acc['top5']:.4f} (measured)")
        if ref and ref.get("count"):
            line += (f"; the model whole in one process: top-1 {ref['top1']:.4f}, top-5 "
                     f"{ref['top5']:.4f}")
        lines += ["", line]
    if r.meta.get("idle_ranks"):
        lines += ["", f"idle: launched rank(s) {r.meta['idle_ranks']} got no units"]
    if r.meta.get("resumed_requests"):
        lines += ["", f"resumed: {r.meta['resumed_requests']} request(s) from the journal "
                      f"{r.meta.get('journal')}, not computed again"]
    return "\n".join(lines)


def plot_timeline(r: RunReport, path: str | Path) -> Path:
    """A PNG Gantt chart: one row per rank, one bar per stage run, re-plans as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.7 * max(1, len(r.ranks))))
    cmap = plt.get_cmap("tab20")
    for row, k in enumerate(r.ranks):
        bars = [(t0, max(t1 - t0, 1e-4)) for _, _, _, t0, t1 in k.timeline]
        colors = [cmap((item // max(1, r.micro_batches)) % 20) for item, *_ in k.timeline]
        if bars:
            ax.broken_barh(bars, (row - 0.35, 0.7), facecolors=colors, linewidth=0)
    for e in r.replans:
        ax.axvline(e.time_s, color="red", linestyle="--", linewidth=1)
        ax.text(e.time_s, len(r.ranks) - 0.5, f" {e.kind}: {', '.join(e.devices)}", color="red",
                fontsize=8, va="bottom")
    ax.set_yticks(range(len(r.ranks)))
    ax.set_yticklabels([f"rank {k.rank} ({k.device}, {k.status})" for k in r.ranks])
    ax.set_xlabel("time since start (s); colour = request")
    ax.set_title(f"{r.model}: {r.completed} requests on {r.world_size} ranks "
                 f"({r.throughput_rps:.1f} req/s)")
    ax.set_ylim(-0.6, len(r.ranks) - 0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _width_label(r: float) -> str:
    from fractions import Fraction

    f = Fraction(r).limit_denominator(16)
    return "full" if f == 1 else f"{f.numerator}/{f.denominator}"


def _remaining_at(k: RankReport, t_s: float) -> float:
    before = [p[1] for p in k.energy_trace if p[0] <= t_s]
    return before[-1] if before else k.energy_trace[0][1]


def plot_energy(r: RunReport, path: str | Path) -> Path:
    """A PNG of each rank's remaining energy over the run (its telemetry), as a share of its
    E_max so that a 16 J phone and a 5 kJ board share one axis, with its E_min as a dotted line
    of the same colour, its width steps marked on its curve, and each re-plan as a red
    vertical line; ranks without a battery are left out (said in the title). The y label says
    whether the figures are measured or modelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4))
    shown = [k for k in r.ranks if k.energy_trace]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, k in enumerate(shown):
        c = colors[i % len(colors)]
        e_max = k.energy_budget_j or max(p[1] for p in k.energy_trace) or 1.0
        t = [p[0] for p in k.energy_trace]
        e = [100.0 * p[1] / e_max for p in k.energy_trace]
        ax.plot(t, e, color=c, label=f"r{k.rank} {k.device} (E_max {e_max:g} J)")
        if k.energy_min_j:
            ax.axhline(100.0 * k.energy_min_j / e_max, color=c, linestyle=":", linewidth=1)
            ax.text(t[0], 100.0 * k.energy_min_j / e_max, f"E_min {k.device}", color=c,
                    fontsize=7, va="bottom")
        for ts, w in k.widths:
            at = 100.0 * _remaining_at(k, ts) / e_max  # the last trace point before the step
            ax.plot([ts], [at], marker="v", color=c, markersize=7)
            ax.annotate(f"width {_width_label(w)}", (ts, at), textcoords="offset points",
                        xytext=(4, 6), fontsize=7, color=c)
    ax.set_ylim(0, 105)
    for e in r.replans:
        ax.axvline(e.time_s, color="red", linestyle="--", linewidth=1)
        ax.text(e.time_s, 103, f" re-plan: {e.kind} {', '.join(e.devices)}", color="red",
                fontsize=7, va="top")
    left = [k.device for k in r.ranks if not k.energy_trace]
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(f"remaining energy, % of E_max ({r.energy_label})")
    title = f"{r.model}: remaining energy per device"
    if left:
        title += f" (no battery: {', '.join(left)})"
    ax.set_title(title, fontsize=9)
    if shown:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
