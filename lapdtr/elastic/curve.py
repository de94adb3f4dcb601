"""The elastic curve of a model: FLOPs, latency and accuracy at every width it allows.

For each width of :func:`lapdtr.elastic.policy.allowed_widths` (``k/h`` of the attention with
the fewest heads; every other elastic layer rounds its own count from the ratio, heads and
hidden units alike):

* FLOPs of the whole model at batch 1, counted by ``profile_model(..., widths="all")``
  (``ModelProfile.at_width(r).model_flops``);
* latency at batch 1, the median of ``repeats`` timed forwards after ``warmup`` ones, the widths
  timed in turn within each repeat (so that a machine whose speed drifts shifts every width
  alike);
* with data (``"digits"``: the digits test split), top-1 accuracy.

``lapdtr elastic-curve`` (:mod:`lapdtr.elastic.cli`) writes it as ``elastic_curve.json`` and
``elastic_curve.png``. The JSON's ``accuracy`` (``{width_key(r): top1}``, keys that read as
floats) is the ``accuracy`` argument of :func:`lapdtr.plan.plan_widths`; :func:`curve_accuracy`
reads it back with float keys.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .api import FAMILIES, _family, elastic_layers, make_elastic, set_width, widths
from .base import ElasticError

__all__ = ["elastic_curve", "curve_accuracy", "plot_curve", "realised", "DATA", "CURVE_JSON",
           "CURVE_PNG"]

#: data the curve can measure accuracy on
DATA = ("digits",)
CURVE_JSON = "elastic_curve.json"
CURVE_PNG = "elastic_curve.png"


def realised(model: nn.Module) -> dict:
    """The widths the model's elastic layers run now, as distinct ``[active, total]`` pairs:
    ``{"heads": [[k, h], ...], "hidden": [[m, d], ...]}``."""
    w = widths(model)
    return {kind: sorted({tuple(p) for p in pairs}, key=lambda p: (p[1], p[0]))
            for kind, pairs in w.items()}


def _output_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = model(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return int(out.shape[-1])


def _time_widths(model, x, ws, warmup: int, repeats: int) -> dict:
    with torch.no_grad():
        for w in ws:
            set_width(model, w)
            for _ in range(warmup):
                model(x)
        ts = {w: [] for w in ws}
        for _ in range(repeats):
            for w in ws:
                set_width(model, w)
                t0 = time.perf_counter()
                model(x)
                ts[w].append(time.perf_counter() - t0)
    return {w: statistics.median(v) for w, v in ts.items()}


def elastic_curve(model: nn.Module, *, img_size: int | None = None, data: str | None = None,
                  repeats: int = 20, warmup: int = 3, cache_dir=None, use_cache: bool = True,
                  meta: dict | None = None) -> dict:
    """FLOPs, latency (batch 1) and, with ``data``, top-1 of ``model`` at every width it allows
    (see the module docstring). ``model`` is made elastic in place if it is not yet; its width
    is full width afterwards. ``meta`` is copied into the result (model name, checkpoint, ...).

    Returns ``{"model", "family", "img_size", "data", "latency_batch": 1, "latency_repeats",
    "threads", "widths": [...], "rows": [{"width", "heads", "hidden", "flops", "flops_ratio",
    "latency_s", "latency_ratio", "top1"}], "accuracy": {width_key: top1} or None, ...meta}``.
    """
    from ..models import default_img_size
    from ..profile import profile_model
    from ..profile.types import width_key
    from .policy import allowed_widths

    family = _family(model)
    if family not in FAMILIES:
        raise ElasticError(f"elastic-curve: the {family!r} family has no elastic layers; "
                           f"allowed: a model of {sorted(FAMILIES)}")
    if data is not None and data not in DATA:
        raise ElasticError(f"elastic-curve: data {data!r} is not known; allowed: {list(DATA)}")
    for key, v, lo in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")
    model.eval()
    img_size = default_img_size(model) if img_size is None else int(img_size)
    if not elastic_layers(model):
        make_elastic(model)
    set_width(model, 1.0)
    ws = allowed_widths(model)

    prof = profile_model(model, img_size=img_size, batch_size=1, widths="all", repeats=1,
                         warmup=0, cache_dir=cache_dir, use_cache=use_cache)
    missing = [w for w in ws if not prof.has_width(w)]
    if missing:  # allowed_widths and profile_model(widths="all") read the same layers
        raise ElasticError(f"elastic-curve: widths {missing} were not profiled "
                           f"(profiled: {prof.widths})")
    flops = {w: prof.at_width(w).model_flops for w in ws}

    from ..models.base import _input_size

    p = next(model.parameters())
    x = torch.randn(1, _input_size(model)[0], img_size, img_size,
                    generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    loader = None
    if data == "digits":
        n = _output_classes(model, x)
        if n != 10:
            raise ElasticError(f"elastic-curve: data 'digits' has 10 classes but the model "
                               f"has {n} outputs; allowed: a 10-class model (num_classes=10 in "
                               "its model_kwargs, e.g. one trained by train_elastic_digits)")
        from ..data.config import DataConfig
        from ..data.sources import build_loader

        loader = build_loader(DataConfig(kind="digits", split="test"), model,
                              img_size=img_size, batch_size=256)
    lat = _time_widths(model, x, ws, warmup, repeats)

    rows, accuracy = [], ({} if loader is not None else None)
    if loader is not None:
        from .train import evaluate_widths

        accuracy = evaluate_widths(model, loader, ws)
    for w in ws:
        set_width(model, w)
        rows.append({"width": w, **realised(model), "flops": flops[w],
                     "flops_ratio": flops[w] / flops[1.0], "latency_s": lat[w],
                     "latency_ratio": lat[w] / lat[1.0],
                     "top1": None if accuracy is None else accuracy[width_key(w)]})
    set_width(model, 1.0)
    out = {"model": prof.model, "family": family, "img_size": img_size, "data": data,
           "latency_batch": 1, "latency_repeats": repeats, "latency_warmup": warmup,
           "threads": torch.get_num_threads(), "widths": ws, "rows": rows,
           "accuracy": accuracy}
    out.update(meta or {})
    return out


def curve_accuracy(curve) -> dict[float, float]:
    """``{width: top1}`` with float keys from a curve (the dict, or the path of an
    ``elastic_curve.json`` / the directory holding one): the ``accuracy`` argument of
    :func:`lapdtr.plan.plan_widths`."""
    if not isinstance(curve, dict):
        path = Path(curve)
        if path.is_dir():
            path = path / CURVE_JSON
        if not path.is_file():
            raise ValueError(f"elastic curve {str(path)!r} does not exist")
        curve = json.loads(path.read_text())
    acc = curve.get("accuracy")
    if not acc:
        raise ValueError("elastic curve has no accuracy (measured without data; "
                         "lapdtr elastic-curve --data digits measures it)")
    return {float(k): float(v) for k, v in acc.items()}


def plot_curve(curve: dict, path) -> Path:
    """``path`` (PNG): relative FLOPs and latency against width, and, where the curve has
    accuracy, top-1 against relative FLOPs."""
    from ..plan.plot import _plt

    plt = _plt()
    rows = curve["rows"]
    w = [r["width"] for r in rows]
    has_acc = curve.get("accuracy") is not None
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4.2))
    ax = axes[0] if has_acc else axes
    ax.plot(w, [r["flops_ratio"] for r in rows], "o-", label="FLOPs / full")
    ax.plot(w, [r["latency_ratio"] for r in rows], "s--", label="latency / full (batch 1)")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    ax.set_xlabel("width ratio")
    ax.set_ylabel("relative to full width")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.1 * max(1.0, *(r["latency_ratio"] for r in rows)))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{curve['model']} ({curve['img_size']} px)")
    if has_acc:
        ax2 = axes[1]
        fr = [r["flops_ratio"] for r in rows]
        ax2.plot(fr, [100 * r["top1"] for r in rows], "o-")
        for r in rows:
            ax2.annotate(f"{r['width']:.2g}", (r["flops_ratio"], 100 * r["top1"]),
                         textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax2.set_xlabel("FLOPs / full")
        ax2.set_ylabel(f"top-1 % ({curve['data']} test)")
        ax2.grid(alpha=0.3)
        ax2.set_title("accuracy against cost")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
