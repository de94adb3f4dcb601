"""PNG plots of plans (matplotlib, Agg backend): which units sit on which device, per-device energy
bars, and the Tang & Stefanov strategy comparison chart."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["unit_rank_matrix", "plot_plan", "plot_compare"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def unit_rank_matrix(plan, unit_names) -> np.ndarray:
    """Fraction of each unit (rows) computed on each rank (columns)."""
    idx = {u: i for i, u in enumerate(unit_names)}
    mat = np.zeros((len(unit_names), len(plan.devices)))
    sharded = set()
    for s in plan.shards:
        if s.unit in idx:
            sharded.add(s.unit)
    totals = {}
    for s in plan.shards:
        totals[s.unit] = totals.get(s.unit, 0) + (s.stop - s.start)
    for s in plan.shards:
        if s.unit in idx and totals[s.unit] > 0:
            mat[idx[s.unit], s.rank] += (s.stop - s.start) / totals[s.unit]
    for st in plan.stages:
        for u in st.units:
            if u in idx and u not in sharded:
                mat[idx[u], st.rank] = 1.0
    return mat


def plot_plan(plan, unit_names, path) -> Path:
    """Left: units x devices (shade = share of the unit computed there). Right: predicted energy
    per device, compute and communication stacked."""
    plt = _plt()
    mat = unit_rank_matrix(plan, unit_names)
    n, m = mat.shape
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.18 * n + 1.5)),
                                   gridspec_kw={"width_ratios": [1.2, 1]})
    ax1.imshow(mat, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_xticks(range(m))
    ax1.set_xticklabels([f"{r}: {d}" for r, d in enumerate(plan.devices)], rotation=45,
                        ha="right", fontsize=8)
    step = max(1, n // 40)
    ax1.set_yticks(range(0, n, step))
    ax1.set_yticklabels(unit_names[::step], fontsize=7)
    ax1.set_title(f"{plan.model}: units on devices ({plan.strategy})")
    preds = sorted(plan.predictions, key=lambda p: p.rank)
    x = np.arange(len(preds))
    comp = [p.compute_energy_j for p in preds]
    comm = [p.comm_energy_j for p in preds]
    ax2.bar(x, comp, label="compute")
    ax2.bar(x, comm, bottom=comp, label="communication")
    ax2.set_xticks(x)
    ax2.set_xticklabels([p.device for p in preds], rotation=45, ha="right", fontsize=8)
    ax2.set_ylabel("predicted energy per request (J)")
    ax2.set_title(f"per-device energy (objective: {plan.objective})")
    ax2.legend()
    return _save(plt, fig, path)


def plot_compare(result: dict, path) -> Path:
    """Grouped bars: maximum per-device energy normalized to one device, per strategy, for each
    number of devices (Tang & Stefanov, Figs. 5-13)."""
    plt = _plt()
    ks = result["num_devices"]
    strategies = list(result["normalized"])
    width = 0.8 / max(1, len(strategies))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ks) + 2), 4.5))
    for j, s in enumerate(strategies):
        vals = [v if v is not None else np.nan for v in result["normalized"][s]]
        ax.bar(np.arange(len(ks)) + (j - (len(strategies) - 1) / 2) * width, vals, width,
               label=s)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(ks)))
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("number of devices")
    ax.set_ylabel("max per-device energy / one device")
    ax.set_title(f"{result['model']}: one device {result['single_device_energy_j']:.4g} J/request")
    ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
