"""Profile selection: Algorithm 1 of the LAP-DTR paper with the corrected score.

Algorithm 1 keeps the candidate profiles that meet the required accuracy, energy and latency,
falls back to the most accurate profile when none does, and otherwise picks the highest score. The
seed writes ``Score = w_Acc * Acc + w_E * E / E_max + w_L * L / L_max``: with a plus sign a
profile that costs more energy or time scores *higher*, so it picks the dearest. lapdtr subtracts
the normalized energy and latency: ``Score = w_acc * Acc - w_energy * E / E_max - w_latency *
L / L_max`` (``E_max``, ``L_max``: the largest among the candidates that passed the filter).
``paper_sign=True`` reproduces the seed's formula, for comparison only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Candidate", "SelectionConstraints", "Selection", "select_profile"]


@dataclass
class Candidate:
    """One model partition profile: its accuracy (fraction or %), energy per request (J) and
    latency (s); ``plan`` optionally carries the Plan it describes."""

    name: str
    accuracy: float
    energy_j: float
    latency_s: float
    plan: Any = None

    @classmethod
    def from_plan(cls, plan, *, accuracy: float, name: str | None = None) -> "Candidate":
        """A candidate from a ``Plan``: its predicted total energy and end-to-end latency."""
        return cls(name or plan.strategy, accuracy, plan.meta["total_energy_j"],
                   plan.meta["latency_s"], plan)


@dataclass
class SelectionConstraints:
    """Required accuracy (at least), energy and latency (at most); None: no requirement."""

    min_accuracy: float | None = None
    max_energy_j: float | None = None
    max_latency_s: float | None = None


@dataclass
class Selection:
    candidate: Candidate
    index: int
    score: float | None
    fallback: bool  # no candidate met the constraints: the most accurate one was returned
    passed: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)


_CAND_KEYS = {"name", "accuracy", "energy_j", "latency_s", "plan"}
_CONS_KEYS = {"min_accuracy", "max_energy_j", "max_latency_s"}


def _candidate(c, i) -> Candidate:
    if isinstance(c, Candidate):
        out = c
    elif isinstance(c, dict):
        bad = sorted(set(c) - _CAND_KEYS)
        if bad:
            raise ValueError(f"candidate {i}: unknown key(s) {bad}; allowed: {sorted(_CAND_KEYS)}")
        missing = sorted({"accuracy", "energy_j", "latency_s"} - set(c))
        if missing:
            raise ValueError(f"candidate {i}: missing key(s) {missing}")
        out = Candidate(name=str(c.get("name", f"candidate{i}")), accuracy=c["accuracy"],
                        energy_j=c["energy_j"], latency_s=c["latency_s"], plan=c.get("plan"))
    else:
        raise ValueError(f"candidate {i}: expected a Candidate or a dict, got {type(c).__name__}")
    for k in ("accuracy", "energy_j", "latency_s"):
        v = getattr(out, k)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or (k != "accuracy" and v < 0):
            raise ValueError(f"candidate {out.name!r}: {k} must be a finite number"
                             f"{'' if k == 'accuracy' else ' >= 0'}, got {v!r}")
    return out


def _constraints(c) -> SelectionConstraints:
    if c is None:
        return SelectionConstraints()
    if isinstance(c, SelectionConstraints):
        return c
    if isinstance(c, dict):
        bad = sorted(set(c) - _CONS_KEYS)
        if bad:
            raise ValueError(f"constraints: unknown key(s) {bad}; allowed: {sorted(_CONS_KEYS)}")
        return SelectionConstraints(**c)
    raise ValueError(f"constraints must be a SelectionConstraints, a dict or None, got "
                     f"{type(c).__name__}")


def select_profile(candidates: Sequence, *, w_acc: float = 1.0, w_energy: float = 1.0,
                   w_latency: float = 1.0, constraints=None,
                   paper_sign: bool = False) -> Selection:
    """Algorithm 1 (corrected score, see the module docstring)."""
    cands = [_candidate(c, i) for i, c in enumerate(candidates)]
    if not cands:
        raise ValueError("select_profile: no candidate profiles given")
    for k, v in (("w_acc", w_acc), ("w_energy", w_energy), ("w_latency", w_latency)):
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
    cons = _constraints(constraints)
    passed = [i for i, c in enumerate(cands)
              if (cons.min_accuracy is None or c.accuracy >= cons.min_accuracy)
              and (cons.max_energy_j is None or c.energy_j <= cons.max_energy_j)
              and (cons.max_latency_s is None or c.latency_s <= cons.max_latency_s)]
    if not passed:  # lines 10-11: the most accurate profile (the cheaper one on a tie)
        i = min(range(len(cands)), key=lambda j: (-cands[j].accuracy, cands[j].energy_j,
                                                   cands[j].latency_s, j))
        return Selection(cands[i], i, None, True, [], {})
    e_max = max(cands[i].energy_j for i in passed) or 1.0
    l_max = max(cands[i].latency_s for i in passed) or 1.0
    sign = 1.0 if paper_sign else -1.0
    scores = {}
    best, best_score = -1, -math.inf
    for i in passed:
        c = cands[i]
        s = (w_acc * c.accuracy + sign * w_energy * c.energy_j / e_max
             + sign * w_latency * c.latency_s / l_max)
        scores[c.name] = s
        if s > best_score:
            best, best_score = i, s
    return Selection(cands[best], best, best_score, False, [cands[i].name for i in passed], scores)
