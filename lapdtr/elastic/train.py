"""Sandwich-rule training for elasticity (Yu & Huang 2019, "Universally Slimmable Networks";
DynaBERT, Hou et al. 2020): one model, good at every width it may be asked to run.

Each step of :func:`sandwich_step` runs, on the same batch,

* the **largest** width, trained against the labels (cross entropy);
* the **smallest** width and ``n_random`` widths drawn at random from the allowed widths
  strictly between the two, each trained against the largest width's *detached* soft
  predictions (in-place distillation: ``KL(softmax(teacher / T) || softmax(student / T))``, the
  soft cross entropy up to the teacher's entropy, which has no gradient);

each loss is backpropagated as soon as it is computed (the gradients add up; one graph alive
at a time), then the optimizer takes one step. Heads and hidden units run at the same ratio
(``set_width(model, r)``). Which heads and hidden units a reduced width keeps (the first ones)
can be set once before training by :func:`~lapdtr.elastic.order_by_importance_` on a
calibration batch (``order="importance"``), as DynaBERT does before its width-adaptive training.

:func:`train_elastic_digits` is :func:`lapdtr.data.train_digits_checkpoint` with that step: the
same digits train split, AdamW, cosine schedule and single torch thread, and a safetensors
checkpoint whose keys are timm's own (the elastic layers are subclasses of timm's), so it loads
with ``strict=True`` into the unmodified model and runs there at full width; made elastic again
(``make_elastic``) it runs at every trained width.

Where to start from: on the digits (``benchmarks/elastic.py``: a 4-block DeiT, 4 heads, 32 px),
the sandwich rule from the seeded initial weights is far slower to converge than plain training
(15 epochs: 59% top-1 at full width against 96% plain; every step's gradient is mostly the
students'), while DynaBERT's order, plain training first, then importance ordering and the
sandwich from that checkpoint (``init_checkpoint``), keeps the full-width accuracy and loses
1.4 points at 50% width after 8 epochs.

Partitioned (pipelined) training is not in the tree yet (issue 13): sandwich training runs the
whole model in one process here; :func:`sandwich_step` only needs a model whose forward runs
every width, so a partitioned trainer can call it with its own model and optimizer.

BatchNorm: a family whose BatchNorm layers see a width-dependent input (EfficientViT-M's
``Conv2d_BN`` after its attention) accumulates running statistics mixed over widths; Universally
Slimmable Networks recalibrate them per width after training. That is not done here (the DeiT
and TinyViT families use LayerNorm only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .api import elastic_layers, make_elastic, order_by_magnitude_, set_width
from .base import ElasticError, ElasticHeads, check_ratio
from .importance import order_by_importance_

__all__ = ["sandwich_step", "sandwich_widths", "distill_loss", "train_elastic_digits",
           "ORDERS", "evaluate_widths"]

#: how heads and hidden units are ordered once before elastic training
ORDERS = ("importance", "magnitude", None)


def _check_widths(widths: Sequence[float]) -> list[float]:
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise ElasticError(f"widths: {widths!r}; allowed: a non-empty list of ratios in (0, 1]")
    out = sorted({check_ratio(w, "sandwich width") for w in widths}, reverse=True)
    if not out:
        raise ElasticError("widths: empty; allowed: a non-empty list of ratios in (0, 1]")
    return out


def sandwich_widths(widths: Sequence[float], n_random: int = 2,
                    generator: torch.Generator | None = None) -> list[float]:
    """The widths one sandwich step runs, in order: the largest of ``widths``, the smallest,
    then ``n_random`` drawn uniformly (with replacement, from ``generator``) from those strictly
    between them (none where there are none in between; the largest alone if ``widths`` has
    one width)."""
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ElasticError(f"n_random: {n_random!r}; allowed: an integer >= 0")
    ws = _check_widths(widths)
    big, small = ws[0], ws[-1]
    out = [big] if big == small else [big, small]
    middle = ws[1:-1]
    if middle and n_random:
        idx = torch.randint(len(middle), (n_random,), generator=generator).tolist()
        out += [middle[i] for i in idx]
    return out


def distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T)) · T²`` averaged over the batch; the
    teacher's logits are detached here whatever the caller passed."""
    t = float(temperature)
    logp = F.log_softmax(student / t, dim=-1)
    logq = F.log_softmax(teacher.detach() / t, dim=-1)
    return F.kl_div(logp, logq, reduction="batchmean", log_target=True) * (t * t)


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _saved_widths(model: nn.Module):
    return [(m, "active_heads" if isinstance(m, ElasticHeads) else "active_hidden",
             m.heads_now if isinstance(m, ElasticHeads) else m.hidden_now)
            for m in elastic_layers(model)]


def sandwich_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  optimizer: torch.optim.Optimizer | None, widths: Sequence[float], *,
                  n_random: int = 2, generator: torch.Generator | None = None,
                  temperature: float = 1.0, inplace_distill: bool = True,
                  loss_fn: Callable | None = None, zero_grad: bool = True,
                  step: bool = True) -> dict:
    """One sandwich-rule step of an elastic ``model`` (:func:`make_elastic`) on the batch
    ``(x, y)``: the widths of :func:`sandwich_widths` (largest, smallest, ``n_random`` random
    ones in between), each run forward and backward in turn, gradients accumulated, then one
    ``optimizer.step()``.

    The largest width's loss is ``loss_fn(logits, y)`` (default cross entropy); every other
    width's is :func:`distill_loss` against the largest width's detached logits
    (``inplace_distill``; ``False``: every width against the labels). Losses are summed, as
    Universally Slimmable Networks do. ``zero_grad`` / ``step``: clear the gradients first and
    step the optimizer last (turn off to accumulate over several calls; ``optimizer`` may then
    be ``None``). The model's widths are restored afterwards.

    Returns ``{"widths": [the widths run, in order], "losses": [each width's loss], "loss":
    their sum}`` (floats).
    """
    if not elastic_layers(model):
        raise ElasticError("sandwich_step: the model has no elastic layers; call "
                           "lapdtr.elastic.make_elastic(model) first")
    if y is None:
        raise ElasticError("sandwich_step: the largest width trains against labels; y is None")
    if (zero_grad or step) and optimizer is None:
        raise ElasticError("sandwich_step: optimizer is None; allowed with zero_grad=False and "
                           "step=False only")
    run = sandwich_widths(widths, n_random, generator)
    loss_fn = loss_fn or F.cross_entropy
    saved = _saved_widths(model)
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    losses = []
    teacher = None
    try:
        for i, w in enumerate(run):
            set_width(model, w)
            out = _logits(model(x))
            if i == 0 or not inplace_distill:
                loss = loss_fn(out, y)
                if i == 0:
                    teacher = out.detach()
            else:
                loss = distill_loss(out, teacher, temperature)
            loss.backward()
            losses.append(float(loss.detach()))
    finally:
        for m, attr, n in saved:
            setattr(m, attr, n)
    if step:
        optimizer.step()
    return {"widths": run, "losses": losses, "loss": sum(losses)}


@torch.no_grad()
def evaluate_widths(model: nn.Module, loader, widths: Sequence[float]) -> dict:
    """Top-1 of an elastic ``model`` over ``loader``'s ``(inputs, targets)`` at each width
    (heads and hidden units at the ratio): ``{width_key(w): top1}``; widths restored after."""
    from ..data.predictions import reference_accuracy
    from ..profile.types import width_key

    saved = _saved_widths(model)
    out = {}
    try:
        for w in _check_widths(widths):
            set_width(model, w)
            out[width_key(w)] = reference_accuracy(model, loader)["top1"]
    finally:
        for m, attr, n in saved:
            setattr(m, attr, n)
    return out


def _order(model, order, calib):
    if order == "importance":
        return order_by_importance_(model, calib)
    if order == "magnitude":
        return order_by_magnitude_(model)
    return {}


def train_elastic_digits(model_name: str, path: str | Path, *, img_size: int = 32,
                         epochs: int = 3, widths: Sequence[float] | None = None,
                         sandwich: bool = True, n_random: int = 2,
                         order: str | None = "importance", calib_size: int = 256,
                         temperature: float = 1.0, seed: int = 0,
                         model_kwargs: dict | None = None, batch_size: int = 64,
                         lr: float = 2e-3, weight_decay: float = 0.05,
                         num_threads: int | None = 1, eval_widths: Sequence[float] | None = None,
                         init_checkpoint: str | Path | None = None) -> dict:
    """Train ``model_name`` on the digits train split with the sandwich rule
    (:func:`sandwich_step` over ``widths``, default every width the model allows,
    :func:`lapdtr.elastic.policy.allowed_widths`), save it to ``path`` (safetensors, timm's
    keys) and measure its test top-1 at every width of ``eval_widths`` (default ``widths``).

    Data, optimizer (AdamW, ``lr``, ``weight_decay``), cosine schedule over all steps, seeding
    (``seed``: the initial weights and the batch order; the random widths come from their own
    generator, seeded from ``seed``, so the batch order is that of
    :func:`~lapdtr.data.train_digits_checkpoint`) and threads are those of
    :func:`~lapdtr.data.train_digits_checkpoint`.

    ``sandwich=False`` trains the largest width only, against the labels: the same training as
    ``train_digits_checkpoint`` (the baseline an elastic model is compared with; ``order`` is
    then ignored). ``order`` (``"importance"``, ``"magnitude"``, ``None``): how heads and hidden
    units are ordered once before sandwich training (importance: DynaBERT's, on the first
    ``calib_size`` training images). ``init_checkpoint``: start from these weights (e.g. a
    plainly trained checkpoint, DynaBERT's setting) instead of the seeded initial ones.

    Returns ``{"path", "train_s", "test_top1" (full width), "test_top5", "accuracy":
    {width_key: top1}, "model", "model_kwargs", "img_size", "epochs", "widths", "sandwich",
    "n_random", "order", "steps"}``.
    """
    from ..data.predictions import reference_accuracy
    from ..data.train import (_digits_metadata, _save_digits_checkpoint, _train_on_digits,
                              digits_model_kwargs)
    from .policy import allowed_widths

    chosen = {}  # set by prepare, once the arguments are checked: widths, generator

    def prepare(model, x, y):  # the seeded model, the train split; returns the layers ordered
        if init_checkpoint is not None:
            from ..runtime.stages import load_model

            kw = digits_model_kwargs(model_name, img_size, model_kwargs)
            model.load_state_dict(load_model(model_name, init_checkpoint, kw).state_dict(),
                                  strict=True)
        make_elastic(model)
        chosen["widths"] = _check_widths(allowed_widths(model) if widths is None else widths)
        chosen["eval"] = chosen["widths"] if eval_widths is None else _check_widths(eval_widths)
        chosen["gen"] = torch.Generator().manual_seed(seed + 1)  # the random widths' own
        if sandwich and order is not None:
            return _order(model, order, [(x[:calib_size], y[:calib_size])])
        return {}

    def step(model, xb, yb, opt):
        sandwich_step(model, xb, yb, opt, chosen["widths"], n_random=n_random,
                      generator=chosen["gen"], temperature=temperature)

    def evaluate(model, test):
        set_width(model, 1.0)
        acc = reference_accuracy(model, test)  # in eval mode
        return acc, evaluate_widths(model, test, chosen["eval"])

    run = _train_on_digits(model_name, img_size=img_size, epochs=epochs, seed=seed,
                           model_kwargs=model_kwargs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, num_threads=num_threads,
                           checks=(("calib_size", calib_size, 1), ("n_random", n_random, 0)),
                           choices=(("order", order, ORDERS),), prepare=prepare,
                           step=step if sandwich else None, evaluate=evaluate)
    trained, curve = chosen["widths"], run.evaluated
    weights = "trained on digits" + (" with the sandwich rule" if sandwich else "")
    path = _save_digits_checkpoint(run.model, path, {
        **_digits_metadata(model_name, run, img_size, weights), "widths": json.dumps(trained),
        "accuracy": json.dumps(curve, sort_keys=True)})
    return {"path": path, "train_s": run.train_s, "test_top1": run.acc["top1"],
            "test_top5": run.acc["top5"], "accuracy": curve, "model": model_name,
            "model_kwargs": run.model_kwargs, "img_size": img_size, "epochs": epochs,
            "widths": trained, "sandwich": bool(sandwich),
            "n_random": n_random if sandwich else 0, "order": order if sandwich else None,
            "ordered_layers": len(run.prepared),
            "steps": run.steps}
