"""``DataConfig``: which inputs a run classifies, strictly validated (the ``data:`` block of a run).

An unknown key or a bad value is a ``ValueError`` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .._json import to_jsonable
from .._validate import check_fields, check_int

__all__ = ["DataConfig", "parse_data_config", "DATA_KINDS", "SPLITS"]

DATA_KINDS = ("synthetic", "image_folder", "digits")
SPLITS = ("test", "train", "all")


@dataclass
class DataConfig:
    """Where a run's inputs come from.

    ``kind``: ``synthetic`` (seeded random images, no labels: what runs fed before there was
    data), ``image_folder`` (``root/<class>/<image>``, torchvision's ``ImageFolder``) or
    ``digits`` (scikit-learn's 8x8 handwritten digits, offline, labels 0-9).
    ``root``: the folder of an ``image_folder``; the other kinds take none.
    ``split``: which digits to run (``test`` is the split :func:`lapdtr.data.train_digits_checkpoint`
    held out); the other kinds have no splits.
    ``limit``: run only the first ``limit`` inputs (after shuffling). ``shuffle``: a random order,
    drawn from ``seed``, which also draws the digits split (keep 0 to evaluate checkpoints that
    ``train_digits_checkpoint`` trained). ``num_workers``: DataLoader worker processes.
    ``topk``: classes kept per input in ``predictions.jsonl``. ``reference``: where the inputs
    have labels, also run the checkpoint whole in one process on the same inputs after the run,
    and report its accuracy beside the run's (``reference_accuracy``).
    """

    kind: str = "synthetic"
    root: str | None = None
    split: str = "test"
    limit: int | None = None
    shuffle: bool = False
    seed: int = 0
    num_workers: int = 0
    topk: int = 5
    reference: bool = True

    def validate(self, where: str = "data") -> "DataConfig":
        if self.kind not in DATA_KINDS:
            raise ValueError(f"{where}.kind: {self.kind!r} is not allowed; allowed: {list(DATA_KINDS)}")
        if self.root is not None and not isinstance(self.root, (str, os.PathLike)):
            raise ValueError(f"{where}.root: expected a folder path, got {self.root!r}")
        if self.kind == "image_folder":
            if self.root is None:
                raise ValueError(f"{where}.root: kind 'image_folder' needs a root "
                                 "(a folder of class folders of images)")
            self.root = str(self.root)
            if not Path(self.root).is_dir():
                what = "is not a folder" if Path(self.root).exists() else "does not exist"
                raise ValueError(f"{where}.root: {self.root!r} {what}")
        elif self.root is not None:
            raise ValueError(f"{where}.root: kind {self.kind!r} reads no root (got {self.root!r}); "
                             "allowed: a root with kind 'image_folder' only")
        if self.split not in SPLITS:
            raise ValueError(f"{where}.split: {self.split!r} is not allowed; allowed: {list(SPLITS)}")
        if self.kind != "digits" and self.split != "test":
            raise ValueError(f"{where}.split: kind {self.kind!r} has no splits (got "
                             f"{self.split!r}); allowed: a split with kind 'digits' only")
        if self.limit is not None:
            check_int(f"{where}.limit", self.limit, 1)
        for key in ("shuffle", "reference"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{where}.{key}: expected true or false, got "
                                 f"{getattr(self, key)!r}")
        check_int(f"{where}.seed", self.seed, 0)
        check_int(f"{where}.num_workers", self.num_workers, 0)
        check_int(f"{where}.topk", self.topk, 1)
        return self

    @property
    def has_labels(self) -> bool:
        """Whether the inputs come with targets (synthetic ones do not)."""
        return self.kind != "synthetic"

    def to_dict(self) -> dict:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "data") -> "DataConfig":
        check_fields(cls, d, where)
        for k in ("kind", "split"):
            if k in d and not isinstance(d[k], str):
                raise ValueError(f"{where}.{k}: expected a string, got {d[k]!r}")
        return cls(**d).validate(where)


def parse_data_config(value, where: str = "data") -> DataConfig:
    """A ``DataConfig`` from what a run config holds under ``data``: nothing (synthetic inputs), a
    kind (``"digits"``), a mapping of ``DataConfig`` keys, or a ``DataConfig``."""
    if value is None:
        return DataConfig().validate(where)
    if isinstance(value, DataConfig):
        return dataclasses.replace(value).validate(where)
    if isinstance(value, str):
        if value not in DATA_KINDS:
            raise ValueError(f"{where}: {value!r} is not a data kind; allowed: {list(DATA_KINDS)} "
                             "(or a mapping with 'kind' and its keys)")
        return DataConfig(kind=value).validate(where)
    if isinstance(value, dict):
        return DataConfig.from_dict(value, where=where)
    raise ValueError(f"{where}: expected a data kind ({', '.join(DATA_KINDS)}) or a mapping of "
                     f"keys to values, got {type(value).__name__}")

