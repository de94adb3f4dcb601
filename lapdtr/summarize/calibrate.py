"""The keep ratio and wire format of each boundary, chosen on calibration data.

:func:`summarized_forward` runs a model split at ``cuts`` with every boundary encoded and decoded
by a :class:`BoundaryCodec` (``settings[i] = (keep, wire)``; restore rule
:func:`lapdtr.summarize.codec.restore_rule`: ``"tokens"`` for plain ViT token boundaries,
``"dense"`` for maps and RoPE Evas; importance from the attention of the last unit before the
boundary, probed while its stage runs); at ``(1.0, "fp32")`` everywhere it returns ``model(x)``
bit for bit.

:func:`calibrate_keep` measures candidate settings against the unsummarized model on
calibration images (top-1 agreement, accuracy with labels, relative output error) and picks,
among those that hold the fidelity target, the one with the fewest bytes on the wire (payload
bytes of one item, summed over the boundaries). Its :class:`Calibration` keeps every row it
measured (:class:`CalibrationRow`).


:func:`calibrate_cut` also chooses where to cut: :func:`calibrate_keep` at each candidate single
cut (by default :func:`cut_candidates`, every boundary after a unit with an attention source),
then the cut whose choice has the fewest bytes; its :class:`CutCalibration` keeps each cut's
result (:class:`CutRow`).

After a boundary that drops tokens, the next stages run on the shorter sequence
``[prefix, kept..., fused]`` (no proportional attention), and later boundaries are smaller;
under the dense rule they run on the full sequence.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .codec import BoundaryCodec, codec_for_unit
from .importance import attention_source, importance_kind, probe_for
from .summarizer import check_keep
from .wire import WIRE_FORMATS, check_wire

__all__ = ["CALIBRATION_KEEPS", "Calibration", "CalibrationMiss", "CalibrationRow", "CutCalibration",
           "CutRow", "boundary_codecs", "calibrate_cut", "calibrate_keep", "cut_candidates",
           "summarized_forward"]

CALIBRATION_KEEPS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1)
EXACT = (1.0, "fp32")


def _check_setting(s) -> tuple[float, str]:
    if not isinstance(s, (tuple, list)) or len(s) != 2:
        raise ValueError(f"a boundary setting is a pair (keep, wire), e.g. (0.5, 'int8'); "
                         f"got {s!r}")
    return check_keep(s[0]), check_wire(s[1])


def _setting_text(names: Sequence[str], settings) -> str:
    return "; ".join(f"{n}: keep {k:g} {w}" for n, (k, w) in zip(names, settings))


class _Split:
    """A model split at ``cuts``: its stages, the unit before each cut, and (``sources=True``,
    or lazily where a boundary drops tokens) the attention that ranks each boundary's tokens."""

    def __init__(self, model: nn.Module, cuts, unit_list, *, sources: bool = False):
        from lapdtr.models import partition, resolve_cuts

        self.model = model
        self.stages = partition(model, cuts, unit_list=unit_list)
        self.last = [unit_list[c - 1] for c in resolve_cuts(unit_list, cuts)]
        self.names = [u.name for u in self.last]
        self.kind = importance_kind(model)
        self._sources: dict[int, nn.Module] = {}
        if sources:
            for i in range(len(self.last)):
                self.source(i)

    def source(self, i: int) -> nn.Module:
        if i not in self._sources:
            self._sources[i] = attention_source(self.model, self.last[i])
        return self._sources[i]

    def codecs(self, settings) -> list[BoundaryCodec]:
        settings = [_check_setting(s) for s in settings]
        if len(settings) != len(self.last):
            raise ValueError(f"{len(settings)} setting(s) for {len(self.last)} boundary(ies) "
                             f"(after {', '.join(self.names) or 'none'}): give one (keep, wire) "
                             "per boundary")
        out, n_tokens = [], None
        for u, (keep, wire) in zip(self.last, settings):
            c = codec_for_unit(self.model, u, keep=keep, wire=wire)
            if n_tokens is not None and c.layout == "tokens" and n_tokens != c.shape[0]:
                c = dataclasses.replace(c, shape=(n_tokens, c.shape[1]))  # a shorter sequence
            n_tokens = c.out_shape()[0] if c.layout == "tokens" else None
            out.append(c)
        return out

    def stage_out(self, i: int, y: torch.Tensor, rank: bool):
        """Stage ``i``'s output, and the importance of its tokens when ``rank``."""
        if not rank and i not in self._sources:
            return self.stages[i](y), None
        with probe_for(self.source(i), self.kind) as probe:
            b = self.stages[i](y)
            return b, probe.importance()

    def run(self, x: torch.Tensor, codecs: Sequence[BoundaryCodec], first=None) -> torch.Tensor:
        """Logits of ``x`` through the stages and ``codecs``; ``first``: stage 0's
        ``(output, importance)`` for ``x``, already computed."""
        y = x
        for i, codec in enumerate(codecs):
            b, imp = first if i == 0 and first is not None else \
                self.stage_out(i, y, codec.summarizes)
            y = codec.decode(codec.encode(b, imp))
        return self.stages[-1](y)


def _unit_list(model: nn.Module, x: torch.Tensor, unit_list):
    from lapdtr.models import units

    return list(unit_list) if unit_list is not None else units(model, x.shape[-1])


def boundary_codecs(model: nn.Module, cuts, settings, *, img_size: int | None = None,
                    unit_list=None) -> list[BoundaryCodec]:
    """The codec of each boundary of ``model`` split at ``cuts`` under ``settings`` (one
    ``(keep, wire)`` per cut), as :func:`summarized_forward` uses them: a boundary after one that
    drops tokens carries the shorter sequence."""
    from lapdtr.models import units

    ul = list(unit_list) if unit_list is not None else units(model, img_size)
    return _Split(model, cuts, ul).codecs(settings)


def summarized_forward(model: nn.Module, cuts, x: torch.Tensor, settings, *,
                       unit_list=None) -> torch.Tensor:
    """Logits of ``x`` with ``model`` split at ``cuts`` (unit indices or names, as
    :func:`lapdtr.partition` takes) and boundary ``i`` encoded and decoded with ``settings[i] =
    (keep, wire)``; tokens ranked by the attention of the unit before the boundary (probed while
    its stage runs; only where tokens are dropped). No gradients. At ``(1.0, "fp32")`` everywhere
    this is ``model(x)`` exactly (for a model in eval mode)."""
    split = _Split(model, cuts, _unit_list(model, x, unit_list))
    codecs = split.codecs(settings)
    with torch.no_grad():
        return split.run(x, codecs)


@dataclass(frozen=True)
class CalibrationRow:
    """One measured candidate: ``settings`` (one ``(keep, wire)`` per boundary), its payload
    ``bytes`` per boundary for one item and the unsummarized fp32 ``dense_bytes``, ``ratio`` (sum
    of bytes over sum of dense bytes), and its fidelity on the calibration data against the
    unsummarized model: top-1 ``agreement``, ``accuracy`` (None without labels), ``rel_error``
    (``||out - ref|| / ||ref||`` over every logit), ``meets`` (the target holds)."""

    settings: tuple[tuple[float, str], ...]
    bytes: tuple[int, ...]
    dense_bytes: tuple[int, ...]
    agreement: float
    accuracy: float | None
    rel_error: float
    meets: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes)

    @property
    def ratio(self) -> float:
        return self.total_bytes / sum(self.dense_bytes)

    def to_dict(self) -> dict:
        return {"settings": [list(s) for s in self.settings], "bytes": list(self.bytes),
                "total_bytes": self.total_bytes, "dense_bytes": list(self.dense_bytes),
                "ratio": self.ratio, "agreement": self.agreement, "accuracy": self.accuracy,
                "rel_error": self.rel_error, "meets": self.meets}


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate_keep` chose (``choice``, the cheapest row that meets the target),
    for the boundaries after ``boundaries`` (unit names), and every row it measured
    (``table``). ``base_accuracy``: the unsummarized model's accuracy on the calibration data
    (None without labels); ``search``: ``"product"`` or ``"greedy"``."""

    boundaries: tuple[str, ...]
    choice: CalibrationRow
    table: tuple[CalibrationRow, ...] = field(repr=False)
    base_accuracy: float | None
    target_agreement: float | None
    max_accuracy_drop: float | None
    search: str
    n_calib: int

    @property
    def settings(self) -> tuple[tuple[float, str], ...]:
        return self.choice.settings

    @property
    def total_bytes(self) -> int:
        return self.choice.total_bytes

    @property
    def ratio(self) -> float:
        return self.choice.ratio

    def to_dict(self) -> dict:
        return {"boundaries": list(self.boundaries), "choice": self.choice.to_dict(),
                "base_accuracy": self.base_accuracy, "target_agreement": self.target_agreement,
                "max_accuracy_drop": self.max_accuracy_drop, "search": self.search,
                "n_calib": self.n_calib, "table": [r.to_dict() for r in self.table]}


def _check_fraction(key: str, v, hi: float | None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= (hi or float("inf")):
        allowed = f"[0, {hi:g}]" if hi is not None else ">= 0"
        raise ValueError(f"{key}: expected a fraction {allowed} (0.01 is one point), got {v!r}")
    return float(v)


class CalibrationMiss(ValueError):
    """No candidate setting meets the fidelity target (the message names the closest one)."""


def calibrate_keep(model: nn.Module, cuts, x_calib: torch.Tensor, *,
                   target_agreement: float | None = None, max_accuracy_drop: float | None = None,
                   labels: torch.Tensor | None = None, keeps: Sequence[float] = CALIBRATION_KEEPS,
                   wires: Sequence[str] = WIRE_FORMATS, unit_list=None, batch_size: int = 256,
                   max_product: int = 256) -> Calibration:
    """For each boundary of ``model`` split at ``cuts``, the ``(keep, wire)`` out of ``keeps`` x
    ``wires`` with the fewest bytes per item (``codec.nbytes(1)`` summed over the boundaries)
    whose fidelity against the unsummarized model on ``x_calib`` holds: top-1 agreement >=
    ``target_agreement``, and/or (with ``labels``) accuracy >= the unsummarized accuracy -
    ``max_accuracy_drop`` (fractions: 0.01 is one point). Ties in bytes go to the higher
    agreement, then accuracy, then the lower output error.

    Search: every combination when there are at most ``max_product`` of them
    (``len(keeps) * len(wires)`` to the number of boundaries; always for one boundary);
    otherwise greedy, boundary by boundary in order: each takes its cheapest setting that meets
    the target with the boundaries before it at their choices and those after it unsummarized
    (``(1.0, "fp32")``), so the last step measures the final choice. Greedy spends the slack on
    the first boundaries. ``x_calib`` runs in chunks of ``batch_size``; the first stage once
    per chunk. A target nothing meets is a :class:`CalibrationMiss` (a ``ValueError``) naming
    the closest row."""
    return _calibrate_keep(model, cuts, x_calib, target_agreement=target_agreement,
                           max_accuracy_drop=max_accuracy_drop, labels=labels, keeps=keeps,
                           wires=wires, unit_list=unit_list, batch_size=batch_size,
                           max_product=max_product)


def _check_targets(target_agreement, max_accuracy_drop, labels, x_calib, batch_size):
    if target_agreement is None and max_accuracy_drop is None:
        raise ValueError("no fidelity target: give target_agreement (top-1 agreement with the "
                         "unsummarized model, in [0, 1]) and/or max_accuracy_drop (with labels)")
    if target_agreement is not None:
        target_agreement = _check_fraction("target_agreement", target_agreement, 1.0)
    if max_accuracy_drop is not None:
        max_accuracy_drop = _check_fraction("max_accuracy_drop", max_accuracy_drop, None)
        if labels is None:
            raise ValueError("max_accuracy_drop needs labels (one class index per calibration "
                             "image)")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != x_calib.shape[0]):
        raise ValueError(f"labels must be one class index per calibration image: shape "
                         f"[{x_calib.shape[0]}], got {list(labels.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    return target_agreement, max_accuracy_drop


def _chunks(x_calib, labels, batch_size):
    return list(zip(x_calib.split(batch_size),
                    labels.split(batch_size) if labels is not None else
                    [None] * -(-x_calib.shape[0] // batch_size)))


def _calibrate_keep(model, cuts, x_calib, *, target_agreement, max_accuracy_drop, labels, keeps,
                    wires, unit_list, batch_size, max_product, refs=None) -> Calibration:
    """:func:`calibrate_keep`; ``refs``: the unsummarized logits of each chunk, if known."""
    target_agreement, max_accuracy_drop = _check_targets(target_agreement, max_accuracy_drop,
                                                         labels, x_calib, batch_size)
    keeps = list(dict.fromkeys(check_keep(k) for k in keeps))
    wires = list(dict.fromkeys(check_wire(w) for w in wires))
    if not keeps or not wires:
        raise ValueError(f"keeps and wires must each name at least one candidate; got keeps="
                         f"{keeps}, wires={wires} (wires supported: {', '.join(WIRE_FORMATS)})")
    split = _Split(model, cuts, _unit_list(model, x_calib, unit_list),
                   sources=any(k < 1.0 for k in keeps))
    B = len(split.last)
    if B == 0:
        raise ValueError("no boundary to calibrate: give at least one cut")

    chunks = _chunks(x_calib, labels, batch_size)
    with torch.no_grad():
        if refs is None:
            refs = [model(x) for x, _ in chunks]
        firsts = [split.stage_out(0, x, any(k < 1.0 for k in keeps)) for x, _ in chunks]
    n = x_calib.shape[0]
    base_acc = None if labels is None else \
        sum(int((r.argmax(1) == t).sum()) for r, (_, t) in zip(refs, chunks)) / n
    measured: dict[tuple, CalibrationRow] = {}

    def meets(agree, acc) -> bool:
        ok = target_agreement is None or agree >= target_agreement - 1e-12
        if max_accuracy_drop is not None:
            ok = ok and acc >= base_acc - max_accuracy_drop - 1e-12
        return ok

    def measure(settings) -> CalibrationRow:
        settings = tuple(settings)
        if settings in measured:
            return measured[settings]
        codecs = split.codecs(settings)
        agree = correct = 0
        err = ref2 = 0.0
        with torch.no_grad():
            for (x, t), ref, first in zip(chunks, refs, firsts):
                out = split.run(x, codecs, first)
                top = out.argmax(1)
                agree += int((top == ref.argmax(1)).sum())
                correct += int((top == t).sum()) if t is not None else 0
                err += float((out.double() - ref.double()).pow(2).sum())
                ref2 += float(ref.double().pow(2).sum())
        a, acc = agree / n, (correct / n if labels is not None else None)
        row = CalibrationRow(settings, tuple(c.nbytes(1) for c in codecs),
                             tuple(codec_for_unit(model, u).dense_nbytes(1) for u in split.last),
                             a, acc, (err / ref2) ** 0.5 if ref2 > 0 else 0.0, meets(a, acc))
        measured[settings] = row
        return row

    def order(r: CalibrationRow):
        return (r.total_bytes, -r.agreement, -(r.accuracy or 0.0), r.rel_error)

    per = [(k, w) for k in keeps for w in wires]
    search = "product" if len(per) ** B <= max_product or B == 1 else "greedy"
    if search == "product":
        for s in itertools.product(per, repeat=B):
            measure(s)
        ok = [r for r in measured.values() if r.meets]
    else:
        chosen: list = []
        for i in range(B):
            rows = [measure([*chosen, c, *[EXACT] * (B - i - 1)]) for c in per]
            ok = [r for r in rows if r.meets]
            if not ok:
                break
            chosen.append(min(ok, key=order).settings[i])
    if not ok:
        raise CalibrationMiss(_miss_text(split.names, list(measured.values()), target_agreement,
                                    max_accuracy_drop, base_acc, n, keeps, wires))
    return Calibration(tuple(split.names), min(ok, key=order), tuple(measured.values()),
                       base_acc, target_agreement, max_accuracy_drop, search, n)


def cut_candidates(model: nn.Module, *, img_size: int | None = None, unit_list=None) -> list[str]:
    """Every single cut of ``model`` whose boundary can be summarized: the names of the units
    that start the second stage, where the unit before has an attention source
    (:func:`attention_source`) and outputs tokens or a map; for a ViT ``blocks.1`` ..
    ``blocks.{depth-1}`` and the unit after the last block (e.g. ``head``)."""
    from lapdtr.models import units

    ul = list(unit_list) if unit_list is not None else units(model, img_size)
    out = []
    for prev, u in zip(ul, ul[1:]):
        if prev.out_format not in ("tokens", "map", "map_nhwc"):
            continue
        try:
            attention_source(model, prev)
        except ValueError:
            continue
        out.append(u.name)
    return out


@dataclass(frozen=True)
class CutRow:
    """One candidate cut: ``cut`` (the unit that starts the second stage), ``boundary`` (the
    unit before it) and :func:`calibrate_keep`'s result there, or ``calibration=None`` and
    ``miss`` (why) where nothing there meets the target."""

    cut: str
    boundary: str
    calibration: Calibration | None
    miss: str | None = None

    @property
    def meets(self) -> bool:
        return self.calibration is not None

    def to_dict(self) -> dict:
        return {"cut": self.cut, "boundary": self.boundary, "meets": self.meets,
                "calibration": self.calibration.to_dict() if self.calibration else None,
                "miss": self.miss}


@dataclass(frozen=True)
class CutCalibration:
    """What :func:`calibrate_cut` chose: the single ``cut`` (a unit name) whose calibrated
    setting (``calibration``, :func:`calibrate_keep` there) has the fewest bytes per item, and
    every candidate's result (``per_cut``, in the order given)."""

    cut: str
    calibration: Calibration
    per_cut: tuple[CutRow, ...] = field(repr=False)

    @property
    def boundary(self) -> str:
        return self.calibration.boundaries[0]

    @property
    def choice(self) -> CalibrationRow:
        return self.calibration.choice

    @property
    def settings(self) -> tuple[tuple[float, str], ...]:
        return self.calibration.settings

    @property
    def total_bytes(self) -> int:
        return self.calibration.total_bytes

    @property
    def ratio(self) -> float:
        return self.calibration.ratio

    def row(self, cut: str) -> CutRow:
        for r in self.per_cut:
            if r.cut == cut:
                return r
        raise KeyError(f"cut {cut!r} was not a candidate; candidates: "
                       f"{', '.join(r.cut for r in self.per_cut)}")

    def to_dict(self) -> dict:
        return {"cut": self.cut, "boundary": self.boundary,
                "calibration": self.calibration.to_dict(),
                "per_cut": [r.to_dict() for r in self.per_cut]}


def calibrate_cut(model: nn.Module, x_calib: torch.Tensor, candidate_cuts=None, *,
                  target_agreement: float | None = None, max_accuracy_drop: float | None = None,
                  labels: torch.Tensor | None = None, keeps: Sequence[float] = CALIBRATION_KEEPS,
                  wires: Sequence[str] = WIRE_FORMATS, unit_list=None,
                  batch_size: int = 256) -> CutCalibration:
    """Where to cut ``model`` once, and how to summarize that boundary: :func:`calibrate_keep`
    (same targets, keeps, wires) at each of ``candidate_cuts`` (single cuts, unit indices or
    names; default :func:`cut_candidates`), then the cut whose choice has the fewest bytes per
    item. Ties go to the higher agreement, then accuracy, then the lower output error, then the
    earlier candidate. The unsummarized logits of ``x_calib`` are computed once. A cut where
    nothing meets the target is kept in ``per_cut`` with its reason; when no cut meets it, a
    :class:`CalibrationMiss` names each cut's closest setting.

    The fp32 bytes of a boundary can differ between cuts (maps, a CNN's stages), so the choice
    is by bytes, not by ratio; a ViT carries the same (N, C) at every block boundary. Bytes are
    all this weighs: the compute on each side of the cut is not, so the cheapest cut may leave
    the second stage with little to do (for a ViT with a class-token head, the cut before the
    head needs only the class token)."""
    from lapdtr.models import resolve_cuts

    ul = _unit_list(model, x_calib, unit_list)
    if candidate_cuts is None:
        candidate_cuts = cut_candidates(model, unit_list=ul)
    if isinstance(candidate_cuts, (str, int)):
        candidate_cuts = [candidate_cuts]
    candidate_cuts = list(candidate_cuts)
    if not candidate_cuts:
        raise ValueError("no candidate cut: give at least one unit index or name (single cuts; "
                         "cut_candidates(model) lists those with an attention source)")
    idx = [resolve_cuts(ul, [c])[0] for c in candidate_cuts]
    dup = sorted({ul[i].name for i in idx if idx.count(i) > 1})
    if dup:
        raise ValueError(f"candidate cuts name the same cut more than once: {', '.join(dup)}")
    _check_targets(target_agreement, max_accuracy_drop, labels, x_calib, batch_size)
    chunks = _chunks(x_calib, labels, batch_size)
    with torch.no_grad():
        refs = [model(x) for x, _ in chunks]
    rows = []
    for i in idx:
        try:
            cal = _calibrate_keep(model, [i], x_calib, target_agreement=target_agreement,
                                  max_accuracy_drop=max_accuracy_drop, labels=labels,
                                  keeps=keeps, wires=wires, unit_list=ul, batch_size=batch_size,
                                  max_product=1, refs=refs)
            rows.append(CutRow(ul[i].name, ul[i - 1].name, cal))
        except CalibrationMiss as e:
            rows.append(CutRow(ul[i].name, ul[i - 1].name, None, str(e)))
    ok = [(j, r) for j, r in enumerate(rows) if r.meets]
    if not ok:
        raise CalibrationMiss("no candidate cut meets the target: " +
                              "; ".join(f"cut at {r.cut}: {r.miss}" for r in rows))

    def order(item):
        j, r = item
        c = r.calibration.choice
        return (c.total_bytes, -c.agreement, -(c.accuracy or 0.0), c.rel_error, j)

    best = min(ok, key=order)[1]
    return CutCalibration(best.cut, best.calibration, tuple(rows))


def _miss_text(names, rows, target_agreement, max_drop, base_acc, n, keeps, wires) -> str:
    want = []
    if target_agreement is not None:
        want.append(f"top-1 agreement >= {target_agreement:.4f}")
    if max_drop is not None:
        want.append(f"accuracy >= {base_acc:.4f} - {max_drop:.4f} (unsummarized - allowed drop)")

    def shortfall(r):
        s = []
        if target_agreement is not None:
            s.append(target_agreement - r.agreement)
        if max_drop is not None:
            s.append(base_acc - max_drop - r.accuracy)
        return max(s)

    best = min(rows, key=shortfall)
    got = f"top-1 agreement {best.agreement:.4f}" + \
        (f", accuracy {best.accuracy:.4f}" if best.accuracy is not None else "")
    return (f"no setting of keeps {keeps} x wires {wires} meets {' and '.join(want)} on {n} "
            f"calibration images; the closest reached {got} with "
            f"{_setting_text(names, best.settings)} ({best.total_bytes} B); allow a lower "
            f"target, or add larger keeps / wider wires (keep 1.0 with fp32 is exact)")
