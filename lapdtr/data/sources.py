"""Datasets of ``(image, target)`` for each ``DataConfig.kind``, in a fixed order.

Images come preprocessed for the model (its input size, channels, mean and std, read through
``timm.data.resolve_data_config``); ``target`` is the class index, or -1 where there is no label
(synthetic inputs). Shuffling and ``limit`` are applied when the dataset is built, so the loader
and every rank see one order: position ``i`` is input ``i`` of the run.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import DataConfig

__all__ = ["DataSource", "build_dataset", "build_loader", "synthetic_request", "digits_split",
           "digits_images", "model_data_config", "DIGITS_CLASSES"]

DIGITS_CLASSES = [str(c) for c in range(10)]


def synthetic_request(seed: int, request: int, batch_size: int, img_size: int,
                      in_chans: int = 3) -> torch.Tensor:
    """The deterministic synthetic input of ``request``: ``(batch_size, in_chans, img_size,
    img_size)`` standard normal values drawn from seed ``seed * 1_000_003 + request``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + request)
    return torch.randn(batch_size, in_chans, img_size, img_size, generator=g)


def model_data_config(model: nn.Module | None, img_size: int | None = None) -> dict:
    """timm's eval-time data config of ``model`` (input size, interpolation, mean, std, crop),
    with ``input_size`` set to ``img_size`` when given. ``model=None``: timm's defaults."""
    from timm.data import resolve_data_config

    if model is None:  # timm's defaults (ImageNet's mean and std, 224 px)
        cfg = dict(resolve_data_config({"input_size": (3, 224, 224)}))
    else:
        cfg = dict(resolve_data_config({}, model=model))
    chans = _in_chans(model) if model is not None else int(cfg["input_size"][0])
    size = int(img_size) if img_size is not None else int(cfg["input_size"][-1])
    cfg["input_size"] = (chans, size, size)
    return cfg


def _in_chans(model: nn.Module) -> int:
    from ..models.base import _input_size

    return _input_size(model)[0]


class DataSource(Dataset):
    """``(image, target)`` items of ``base`` at ``indices``, in that order.

    ``kind``, ``has_labels``, ``classes`` (names, or None) and ``num_classes`` (or None) describe
    the items; ``indices[i]`` is the position in ``base`` of item ``i``.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], *, kind: str, has_labels: bool,
                 classes: list[str] | None = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.kind = kind
        self.has_labels = has_labels
        self.classes = classes
        self.num_classes = len(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, t = self.base[self.indices[i]]
        return x, int(t)


class _Synthetic(Dataset):
    """Row ``j`` of :func:`synthetic_request` ``r`` is item ``r * batch_size + j``."""

    def __init__(self, seed: int, requests: int, batch_size: int, img_size: int, in_chans: int):
        self.seed, self.requests, self.batch_size = seed, requests, batch_size
        self.img_size, self.in_chans = img_size, in_chans
        self._last: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.requests * self.batch_size

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        r, j = divmod(i, self.batch_size)
        if self._last is None or self._last[0] != r:
            self._last = (r, synthetic_request(self.seed, r, self.batch_size, self.img_size,
                                               self.in_chans))
        return self._last[1][j], -1


@functools.lru_cache(maxsize=1)
def _load_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def digits_split(train_fraction: float = 0.8, seed: int = 0) -> tuple[list[int], list[int]]:
    """Train and test indices of the 1797 digits: per class, a ``seed``-drawn ``train_fraction``
    of its images (rounded) trains, the rest tests. Both lists are sorted."""
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
            or not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction: expected a number between 0 and 1 (exclusive), got "
                         f"{train_fraction!r}")
    _, labels = _load_digits()
    g = torch.Generator().manual_seed(int(seed))
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(train_fraction * len(idx))
        train += idx[:k].tolist()
        test += idx[k:].tolist()
    return sorted(train), sorted(test)


def digits_images(indices: Sequence[int], img_size: int, *, in_chans: int = 3,
                  mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)) -> torch.Tensor:
    """Digits at ``indices`` as a model sees them: 0..16 scaled to [0, 1], bilinearly upscaled to
    ``img_size``, replicated to ``in_chans`` channels, normalized by ``mean``/``std`` (per channel;
    a single value, or one whose length is not ``in_chans``, is averaged over channels)."""
    images, _ = _load_digits()
    x = images[torch.as_tensor(list(indices), dtype=torch.long)].unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, in_chans, -1, -1)
    m, s = (torch.as_tensor(v, dtype=torch.float32) for v in (mean, std))
    if m.numel() != in_chans:
        m = m.mean().repeat(in_chans)
    if s.numel() != in_chans:
        s = s.mean().repeat(in_chans)
    return ((x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)).contiguous()


class _Digits(Dataset):
    def __init__(self, img_size: int, in_chans: int, mean, std):
        self.img_size, self.in_chans, self.mean, self.std = img_size, in_chans, mean, std
        self.labels = _load_digits()[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = digits_images([i], self.img_size, in_chans=self.in_chans, mean=self.mean, std=self.std)
        return x[0], int(self.labels[i])


def _image_folder(root: str, cfg: dict):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    transform = create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False)
    try:
        return ImageFolder(root, transform=transform)
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise ValueError(f"data.root: {root!r} holds no class folders of images ({e}); expected "
                         "root/<class>/<image>.png|jpg|...") from e


def build_dataset(data_cfg: DataConfig, model: nn.Module | None, *, img_size: int | None,
                  requests: int | None = None, batch_size: int = 1, seed: int = 0) -> DataSource:
    """The ``(image, target)`` inputs ``data_cfg`` describes, preprocessed for ``model``.

    ``img_size``: the side the model runs at (``None``: the model's default). ``synthetic``:
    ``requests`` requests of ``batch_size`` rows, drawn from the run's ``seed`` exactly as
    :func:`synthetic_request` draws them. Other kinds: all inputs, or
    at most ``requests * batch_size`` of them when ``requests`` is given. Then ``data_cfg``
    shuffles (from ``data_cfg.seed``) and keeps the first ``data_cfg.limit``.
    """
    if not isinstance(data_cfg, DataConfig):
        raise ValueError(f"data: expected a DataConfig, got {type(data_cfg).__name__} "
                         "(lapdtr.data.parse_data_config makes one)")
    data_cfg.validate()
    if requests is not None and (isinstance(requests, bool) or not isinstance(requests, int)
                                 or requests < 1):
        raise ValueError(f"requests: expected an integer >= 1 or None, got {requests!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    cfg = model_data_config(model, img_size)
    chans, size = cfg["input_size"][0], cfg["input_size"][-1]
    if data_cfg.kind == "synthetic":
        if requests is None:
            raise ValueError("requests: synthetic inputs need the run's number of requests")
        base = _Synthetic(seed, requests, batch_size, size, chans)
        indices, classes = list(range(len(base))), None
    elif data_cfg.kind == "image_folder":
        base = _image_folder(data_cfg.root, cfg)
        indices, classes = list(range(len(base))), list(base.classes)
    else:
        base = _Digits(size, chans, cfg["mean"], cfg["std"])
        train, test = digits_split(seed=data_cfg.seed)
        indices = {"train": train, "test": test, "all": list(range(len(base)))}[data_cfg.split]
        classes = list(DIGITS_CLASSES)
    if data_cfg.kind != "synthetic" and requests is not None:
        indices = indices[:requests * batch_size]
    if data_cfg.shuffle:
        g = torch.Generator().manual_seed(data_cfg.seed)
        indices = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
    if data_cfg.limit is not None:
        indices = indices[:data_cfg.limit]
    return DataSource(base, indices, kind=data_cfg.kind, has_labels=data_cfg.has_labels,
                      classes=classes)


def build_loader(data_cfg: DataConfig, model: nn.Module | None, *, img_size: int | None,
                 requests: int | None = None, batch_size: int = 1, seed: int = 0,
                 dataset: DataSource | None = None) -> DataLoader:
    """A DataLoader of ``(inputs, targets)`` batches of ``batch_size`` (the last may be short) over
    :func:`build_dataset` (or ``dataset``), in the dataset's order; ``targets`` is -1 where
    unknown. Batch ``r`` is request ``r``."""
    if dataset is None:
        dataset = build_dataset(data_cfg, model, img_size=img_size, requests=requests,
                                batch_size=batch_size, seed=seed)
    # its own generator: iterating a DataLoader draws a seed (for workers) from the global RNG
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      num_workers=data_cfg.num_workers, drop_last=False,
                      generator=torch.Generator().manual_seed(data_cfg.seed))
