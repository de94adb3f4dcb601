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
    from safetensors.torch import save_file

    from ..models.base import create_model

    for key, v, lo in (("img_size", img_size, 1), ("epochs", epochs, 0), ("seed", seed, 0),
                       ("batch_size", batch_size, 1), ("num_threads", num_threads, 1)):
        if v is None and key == "num_threads":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{key}: expected an integer >= {lo}, got {v!r}")
    kw = digits_model_kwargs(model_name, img_size, model_kwargs)
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):  # seeded from ``seed``; the caller's RNG untouched
        torch.manual_seed(seed)
        model = create_model(model_name, **kw)
        cfg = model_data_config(model, img_size)
        train_idx, _ = digits_split()
        x = digits_images(train_idx, img_size, in_chans=cfg["input_size"][0], mean=cfg["mean"],
                          std=cfg["std"])
        y = _load_digits()[1][torch.as_tensor(train_idx)]
        steps = epochs * math.ceil(len(train_idx) / batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            model.train()
            t0 = time.perf_counter()
            for _ in range(epochs):
                order = torch.randperm(len(train_idx))
                for i in range(0, len(order), batch_size):
                    b = order[i:i + batch_size]
                    loss = F.cross_entropy(model(x[b]), y[b])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            train_s = time.perf_counter() - t0
            test = build_loader(DataConfig(kind="digits", split="test"), model,
                                img_size=img_size, batch_size=256)
            acc = reference_accuracy(model, test)  # in eval mode
        finally:
            torch.set_num_threads(threads)
    model.eval()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"model": model_name, "weights": "trained on digits",
                                      "model_kwargs": json.dumps(kw, sort_keys=True),
                                      "img_size": str(img_size), "test_top1": f"{acc['top1']:.4f}"})
    tmp.replace(path)
    return {"path": str(path), "train_s": train_s, "test_top1": acc["top1"],
            "test_top5": acc["top5"], "model": model_name, "model_kwargs": kw,
            "img_size": img_size, "epochs": epochs}
