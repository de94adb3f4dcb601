"""Inputs in and outputs out of a ``lapdtr run`` (the coordinator's side of its ``data:`` block).

:class:`RunFeed` turns the run's :class:`~lapdtr.data.DataConfig` into the batches the
coordinator pulls (request ``r`` is batch ``r`` of the loader, the last one may be short), and
takes every answered request's output back: top-k predictions into ``predictions.jsonl``, top-1/
top-5 accuracy where the inputs have labels, the tensors themselves when ``save_outputs`` asks.
After the run it measures the *reference*: the same checkpoint run whole in this process on the
same inputs, whose accuracy a distributed run must equal.

With ``resume``, answered requests are also kept in a :class:`~lapdtr.runtime.journal.Journal`
(``out/journal``): a run restarted by ``torchrun --max-restarts`` computes only the requests the
journal lacks, answers none twice, and rebuilds ``predictions.jsonl`` from the journal, so a crash
between the two files can neither lose nor double a line.
"""
from __future__ import annotations

import hashlib
from collections import deque
from pathlib import Path

import torch

from ..data import Accuracy, DataConfig, PredictionWriter, build_dataset, build_loader
from .config import RunConfig

__all__ = ["RunFeed", "PREDICTIONS", "JOURNAL"]

PREDICTIONS = "predictions.jsonl"
JOURNAL = "journal"


def _file_digest(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size} if p.exists() else {
        "path": str(p.resolve())}


class RunFeed:
    """The batches of a run, and where its outputs go. Coordinator only.

    ``model`` is the host module (parameters may be on the meta device: only its data config is
    read); ``img_size`` is the side the run's model runs at.
    """

    def __init__(self, cfg: RunConfig, model, img_size: int, *, checkpoint: str | None):
        self.cfg = cfg
        self.data: DataConfig = cfg.data
        self.out = Path(cfg.out)
        self.checkpoint = checkpoint
        requests = cfg.num_requests if self.data.kind == "synthetic" else cfg.requests
        self.dataset = build_dataset(self.data, model, img_size=img_size, requests=requests,
                                     batch_size=cfg.batch_size, seed=cfg.seed)
        if len(self.dataset) == 0:
            raise ValueError(f"data: {self.data.kind!r} gives no inputs (limit/split/requests "
                             "leave none); allowed: a data block with at least one input")
        self.total = -(-len(self.dataset) // cfg.batch_size)  # requests of this run
        self.order: deque[int] = deque()  # run request of each coordinator request, in order
        self.targets: dict[int, torch.Tensor] = {}  # run request -> its targets, until answered
        self.outputs: dict[int, torch.Tensor] = {}  # kept for save_outputs
        self.accuracy = Accuracy()
        self.answered = 0
        self.taken = 0  # coordinator requests drained
        self.resumed: list[int] = []
        self.journal = None
        if cfg.resume:
            from .journal import Journal

            self.journal = Journal(self.out / JOURNAL, self._identity())
        self.writer = None
        if cfg.predictions:  # a fresh file: a resumed run rewrites what its journal holds
            (self.out / PREDICTIONS).unlink(missing_ok=True)
            self.writer = PredictionWriter(self.out / PREDICTIONS, self.data.topk)
        if self.journal is not None:
            self._replay()

    # -- identity and resume ----------------------------------------------------------------
    def _identity(self) -> dict:
        cfg = self.cfg
        return {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "img_size": cfg.img_size,
                "checkpoint": _file_digest(self.checkpoint), "seed": cfg.seed,
                "plan": (hashlib.sha256(Path(cfg.plan).read_bytes()).hexdigest()[:16]
                         if cfg.plan else None),
                "cuts": cfg.cuts, "strategy": cfg.strategy, "objective": cfg.objective,
                "batch_size": cfg.batch_size, "requests": self.total,
                "data": self.data.to_dict()}

    def _rows(self, request: int) -> range:
        b = self.cfg.batch_size
        return range(request * b, min((request + 1) * b, len(self.dataset)))

    def _targets_of(self, request: int) -> torch.Tensor:
        return torch.tensor([self.dataset[i][1] for i in self._rows(request)], dtype=torch.long)

    def _replay(self) -> None:
        """predictions.jsonl and accuracy rebuilt from what the journal holds."""
        done = sorted(r for r in self.journal.completed() if r < self.total)
        for r in done:
            self._take(r, self.journal.output(r), self._targets_of(r), record=False)
        self.resumed = done

    # -- the coordinator's side -------------------------------------------------------------
    def batches(self):
        """Input batches of the requests still to answer, in order (pulled by the coordinator
        as its window frees). Synthetic requests are drawn whole (``synthetic_request``, what
        the dataset's rows are), not stacked from rows."""
        skip = set(self.resumed)
        if self.data.kind == "synthetic" and not self.data.shuffle and self.data.limit is None:
            from ..data import synthetic_request

            base = self.dataset.base
            for r in range(self.total):
                if r not in skip:
                    self.order.append(r)
                    self.targets[r] = torch.full((len(self._rows(r)),), -1, dtype=torch.long)
                    yield synthetic_request(self.cfg.seed, r, self.cfg.batch_size,
                                            base.img_size, base.in_chans)
            return
        if not skip:
            for r, (x, t) in enumerate(build_loader(self.data, None, img_size=None,
                                                    batch_size=self.cfg.batch_size,
                                                    dataset=self.dataset)):
                self.order.append(r)
                self.targets[r] = t
                yield x
            return
        for r in range(self.total):  # only the missing ones are read
            if r in skip:
                continue
            items = [self.dataset[i] for i in self._rows(r)]
            self.order.append(r)
            self.targets[r] = torch.tensor([t for _, t in items], dtype=torch.long)
            yield torch.stack([x for x, _ in items])

    def drain(self, co) -> None:
        """Take the outputs of the requests the coordinator has answered, in order."""
        # coordinator requests are numbered in submission order, which is self.order's
        while self.order and co.request_done(self.taken):
            r = self.order.popleft()
            self._take(r, co.output(self.taken, pop=True), self.targets.pop(r), record=True)
            self.taken += 1

    def _take(self, r: int, y: torch.Tensor, targets: torch.Tensor, *, record: bool) -> None:
        if record and self.journal is not None:
            self.journal.record(r, y)
        classify = y.dim() == 2
        if self.writer is not None and classify:
            self.writer.write_batch(y, request=r, indices=self._rows(r),
                                    targets=targets if self.data.has_labels else None)
        if self.data.has_labels and classify:
            self.accuracy.update(y, targets)
        if self.cfg.save_outputs:
            self.outputs[r] = y
        self.answered += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.journal is not None:
            self.journal.close()

    # -- after the run ----------------------------------------------------------------------
    def reference(self) -> dict | None:
        """The accuracy of the whole model in this process on the same inputs (where they have
        labels and ``data.reference`` asks for it)."""
        if not (self.data.has_labels and self.data.reference and self.checkpoint):
            return None
        from .stages import load_model

        model = load_model(self.cfg.model, self.checkpoint, self.cfg.model_kwargs)
        loader = build_loader(self.data, None, img_size=None, batch_size=self.cfg.batch_size,
                              dataset=self.dataset)
        from ..data import reference_accuracy

        return reference_accuracy(model, loader)

    def meta(self, reference: dict | None) -> dict:
        m = {"data": {**self.data.to_dict(), "inputs": len(self.dataset), "requests": self.total},
             "answered_requests": self.answered}
        if self.writer is not None:
            m["predictions"] = str(self.out / PREDICTIONS)
        if self.journal is not None:
            m["journal"] = str(self.out / JOURNAL)
            m["resumed_requests"] = len(self.resumed)
        if self.data.has_labels:
            m["accuracy"] = self.accuracy.to_dict()
            m["reference_accuracy"] = reference
            m["accuracy_label"] = ("measured: top-1/top-5 of this run's outputs; "
                                   "reference_accuracy: the same checkpoint whole in one process "
                                   "on the same inputs")
        return m

    def save_outputs(self, path: Path) -> None:
        from safetensors.torch import save_file

        outs = {f"request{r}": y.contiguous() for r, y in sorted(self.outputs.items())}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(outs, str(path))
