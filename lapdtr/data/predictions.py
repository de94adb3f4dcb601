"""Predictions out: top-k classes per input as JSON lines, and accuracy against the labels.

``predictions.jsonl`` holds one line per input, ``{"index", "request", "topk": [[class, prob],
...], "target"}``; each line is flushed and fsynced as it is written, so a run that crashes leaves
only complete lines (and at most one torn last line, which :func:`read_predictions` drops).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["topk_predictions", "PredictionWriter", "read_predictions", "Accuracy",
           "reference_accuracy", "PROB_DIGITS"]

PROB_DIGITS = 6  # probabilities are rounded to this many decimals


def topk_predictions(logits: torch.Tensor, k: int) -> list[list[list]]:
    """Per row of ``logits`` (B, K): the ``min(k, K)`` most probable ``[class, prob]``, most
    probable first (softmax in float32, probabilities rounded to ``PROB_DIGITS`` decimals)."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (batch, classes), got shape {list(logits.shape)}")
    probs = torch.softmax(logits.detach().float().cpu(), dim=-1)
    p, c = probs.topk(min(int(k), probs.shape[-1]), dim=-1)
    return [[[int(ci), round(float(pi), PROB_DIGITS)] for ci, pi in zip(cr, pr)]
            for cr, pr in zip(c.tolist(), p.tolist())]


class PredictionWriter:
    """Appends one JSON line per input to ``path``, flushed and fsynced line by line.

    A torn last line left by an earlier crash is cut off when the file is opened again, so
    appended lines start on a line of their own. Use as a context manager, or call ``close``.
    """

    def __init__(self, path: str | Path, topk: int = 5):
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected an integer >= 1, got {topk!r}")
        self.path = Path(path)
        self.topk = topk
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self.num_written = 0

    def write(self, index: int, request: int, topk: Sequence, target: int | None = None) -> None:
        """One line: input ``index`` of ``request``, its ``[[class, prob], ...]``, its target
        (``None``, or a negative one, writes null)."""
        t = None if target is None or int(target) < 0 else int(target)
        line = json.dumps({"index": int(index), "request": int(request),
                           "topk": [[int(c), float(p)] for c, p in topk], "target": t})
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.num_written += 1

    def write_batch(self, logits: torch.Tensor, *, request: int, indices: Iterable[int],
                    targets: torch.Tensor | Sequence[int] | None = None) -> int:
        """One line per row of ``logits``; returns the number of lines written."""
        rows = topk_predictions(logits, self.topk)
        indices = list(indices)
        if len(indices) != len(rows):
            raise ValueError(f"indices: {len(indices)} given for {len(rows)} rows of logits")
        tl = [None] * len(rows) if targets is None else [int(t) for t in targets]
        if len(tl) != len(rows):
            raise ValueError(f"targets: {len(tl)} given for {len(rows)} rows of logits")
        for i, row, t in zip(indices, rows, tl):
            self.write(i, request, row, t)
        return len(rows)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_predictions(path: str | Path) -> list[dict]:
    """The complete lines of a ``predictions.jsonl``; a torn last line (a crash mid-write) is
    dropped. A line that does not parse anywhere else is a ``ValueError`` naming file and line."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"predictions file {str(path)!r} does not exist")
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: torn by a crash
                break
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from e
    return out


class Accuracy:
    """Top-1 and top-5 accuracy over the inputs with a label; targets < 0 are ignored (counted in
    ``num_ignored``). Top-5 is top-``min(5, classes)``. With no labelled input both are None."""

    def __init__(self):
        self.count = 0
        self.num_ignored = 0
        self.correct1 = 0
        self.correct5 = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> None:
        targets = torch.as_tensor(targets, dtype=torch.long).flatten().cpu()
        logits = logits.detach().cpu()
        if logits.dim() != 2 or logits.shape[0] != targets.numel():
            raise ValueError(f"logits {list(logits.shape)} and targets ({targets.numel()}) do not "
                             "match: expected (batch, classes) logits and one target per row")
        keep = targets >= 0
        self.num_ignored += int((~keep).sum())
        if not keep.any():
            return
        logits, targets = logits[keep], targets[keep]
        if int(targets.max()) >= logits.shape[1]:
            raise ValueError(f"targets: class {int(targets.max())} is out of range for "
                             f"{logits.shape[1]} logits per row")
        top = logits.topk(min(5, logits.shape[1]), dim=-1).indices
        hit = top == targets[:, None]
        self.count += int(targets.numel())
        self.correct1 += int(hit[:, 0].sum())
        self.correct5 += int(hit.any(dim=1).sum())

    @property
    def top1(self) -> float | None:
        return self.correct1 / self.count if self.count else None

    @property
    def top5(self) -> float | None:
        return self.correct5 / self.count if self.count else None

    def to_dict(self) -> dict:
        return {"count": self.count, "top1": self.top1, "top5": self.top5,
                "num_ignored": self.num_ignored}


@torch.no_grad()
def reference_accuracy(model: nn.Module, loader: Iterable) -> dict:
    """Accuracy of ``model`` run whole in this process (eval mode, no grad) over the ``(inputs,
    targets)`` batches of ``loader``: what a distributed run of the same inputs should report."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        acc = Accuracy()
        for x, t in loader:
            acc.update(model(x.to(device)), t)
        return acc.to_dict()
    finally:
        model.train(was_training)
