"""Train a small supported timm model on the digits, so runs can report a real accuracy offline.

The checkpoint is a safetensors state dict of ``lapdtr.create_model(model_name, **model_kwargs)``
with the returned ``model_kwargs`` (``num_classes=10``, and ``img_size`` for families built for
one input size): give the same ``model_kwargs`` to a run and its ranks load it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .config import DataConfig
from .predictions import reference_accuracy
from .sources import (_load_digits, build_loader, digits_images, digits_split,
                      model_data_config)

__all__ = ["train_digits_checkpoint", "digits_model_kwargs"]


def digits_model_kwargs(model_name: str, img_size: int, model_kwargs: dict | None = None) -> dict:
    """``model_kwargs`` of a digits classifier: ``num_classes=10``, ``img_size`` where the family
    takes it at creation (ViT, TinyViT, EfficientViT-M), then ``model_kwargs``."""
    from ..models.base import get_adapter_for_name

    kw = {"num_classes": 10}
    if get_adapter_for_name(model_name).img_size_kwarg:
        kw["img_size"] = int(img_size)
    kw.update(model_kwargs or {})
    return kw


def _check_ints(checks) -> None:
    """Each ``(key, value, lo)``: ``value`` an integer ``>= lo`` (``num_threads`` may be None)."""
    for key, v, lo in checks:
        if v is None and key == "num_threads":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")


def _cross_entropy_step(model, xb, yb, opt) -> None:
    loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _test_accuracy(model, test):
    return reference_accuracy(model, test), None  # in eval mode


class _DigitsRun(NamedTuple):
    model: torch.nn.Module  # trained, in eval mode
    model_kwargs: dict
    train_s: float
    acc: dict  # the test split's reference_accuracy
    steps: int
    prepared: Any  # what ``prepare`` returned
    evaluated: Any  # what ``evaluate`` returned besides the accuracy


def _train_on_digits(model_name: str, *, img_size: int, epochs: int, seed: int,
                     model_kwargs: dict | None, batch_size: int, lr: float, weight_decay: float,
                     num_threads: int | None, checks: Sequence[tuple] = (),
                     choices: Sequence[tuple] = (), prepare: Callable | None = None,
                     step: Callable | None = None,
                     evaluate: Callable | None = None) -> _DigitsRun:
    """The skeleton of :func:`train_digits_checkpoint` and ``train_elastic_digits``: check the
    arguments (then ``checks``, more ``(key, value, lo)`` integers, then ``choices``, ``(key,
    value, allowed)``), seed the model (``torch.manual_seed(seed)`` then ``create_model``, in a
    forked RNG), load the digits train split, set the torch threads (restored after), call
    ``prepare(model, x, y)`` once (its result is ``prepared``), then AdamW and a cosine
    schedule over every step, ``epochs`` of ``torch.randperm`` batches each run by
    ``step(model, xb, yb, opt)`` (default: one cross-entropy step) and a scheduler step, and
    finally ``evaluate(model, test)`` -> ``(accuracy, evaluated)`` on the test split (default:
    ``reference_accuracy``, ``None``). Nothing is saved."""
    from ..models.base import create_model

    _check_ints((("img_size", img_size, 1), ("epochs", epochs, 0), ("seed", seed, 0),
                 ("batch_size", batch_size, 1), ("num_threads", num_threads, 1), *checks))
    for key, v, allowed in choices:
        if v not in allowed:
            raise ValueError(f"{key}: {v!r}; allowed: {list(allowed)}")
    step = step or _cross_entropy_step
    kw = digits_model_kwargs(model_name, img_size, model_kwargs)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # seeded from ``seed``; the caller's RNG untouched
        torch.manual_seed(seed)
        model = create_model(model_name, **kw)
        # the data draws from generators of its own: the global RNG is where create_model left it
        cfg = model_data_config(model, img_size)
        train_idx, _ = digits_split()
        x = digits_images(train_idx, img_size, in_chans=cfg["input_size"][0], mean=cfg["mean"],
                          std=cfg["std"])
        y = _load_digits()[1][torch.as_tensor(train_idx)]
        steps = epochs * math.ceil(len(train_idx) / batch_size)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            prepared = prepare(model, x, y) if prepare is not None else None
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
            model.train()
            t0 = time.perf_counter()
            for _ in range(epochs):
                order = torch.randperm(len(train_idx))
                for i in range(0, len(order), batch_size):
                    b = order[i:i + batch_size]
                    step(model, x[b], y[b], opt)
                    sched.step()
            train_s = time.perf_counter() - t0
            test = build_loader(DataConfig(kind="digits", split="test"), model,
                                img_size=img_size, batch_size=256)
            acc, evaluated = (evaluate or _test_accuracy)(model, test)
        finally:
            torch.set_num_threads(threads)
    model.eval()
    return _DigitsRun(model, kw, train_s, acc, steps, prepared, evaluated)


def _digits_metadata(model_name: str, run: _DigitsRun, img_size: int,
                     weights: str = "trained on digits") -> dict:
    return {"model": model_name, "weights": weights,
            "model_kwargs": json.dumps(run.model_kwargs, sort_keys=True),
            "img_size": str(img_size), "test_top1": f"{run.acc['top1']:.4f}"}


def _save_digits_checkpoint(model: torch.nn.Module, path: str | Path, metadata: dict) -> str:
    """``model``'s state dict to ``path`` (safetensors, through a ``.tmp`` file); returns it."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    tmp.replace(path)
    return str(path)


def train_digits_checkpoint(model_name: str, path: str | Path, *, img_size: int = 32,
                            epochs: int = 3, seed: int = 0, model_kwargs: dict | None = None,
                            batch_size: int = 64, lr: float = 2e-3,
                            weight_decay: float = 0.05, num_threads: int | None = 1) -> dict:
    """Train ``model_name`` on the digits train split (:func:`digits_split`, seed 0) with AdamW
    and a cosine learning rate, save it to ``path`` (safetensors) and measure it on the test split.

    ``resnet10t`` at 32 px reaches 99% test top-1 in 2 or 3 epochs (6-13 s of training on two
    CPU cores shared with other jobs; 75 s there with torch's two threads). ``epochs=0`` saves
    the seeded initial weights. Returns ``{"path", "train_s", "test_top1", "test_top5", "model",
    "model_kwargs", "img_size", "epochs"}``; ``train_s`` is the wall time of the training steps.
    ``num_threads``: torch threads while training, restored after (``None``: keep the current
    setting); one thread is fastest for a model this small, and by far on a busy machine.
    """
    run = _train_on_digits(model_name, img_size=img_size, epochs=epochs, seed=seed,
                           model_kwargs=model_kwargs, batch_size=batch_size, lr=lr,
                           weight_decay=weight_decay, num_threads=num_threads)
    path = _save_digits_checkpoint(run.model, path, _digits_metadata(model_name, run, img_size))
    return {"path": path, "train_s": run.train_s, "test_top1": run.acc["top1"],
            "test_top5": run.acc["top5"], "model": model_name, "model_kwargs": run.model_kwargs,
            "img_size": img_size, "epochs": epochs}
