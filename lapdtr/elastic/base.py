"""What every family's elastic layers share: width ratios to head / hidden counts, and the
checks that name what is allowed.

A *width ratio* r in (0, 1] keeps ``k = max(1, round(r * h))`` of a layer's ``h`` heads (or
hidden units). Full width (k = h) runs timm's own forward, so it equals the original model
exactly.
"""
from __future__ import annotations

from torch import nn

__all__ = ["check_ratio", "count_for", "check_count", "ElasticError"]


class ElasticError(ValueError):
    """A width a layer cannot run, naming what it allows."""


def check_ratio(ratio, what: str = "width") -> float:
    """``ratio`` as a float in (0, 1]; anything else is an ``ElasticError`` saying so."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ElasticError(f"{what}: {ratio!r} is not a width ratio; allowed: a number in (0, 1]")
    return float(ratio)


def count_for(ratio: float, total: int, what: str = "width") -> int:
    """Heads (or hidden units) kept at ``ratio`` of ``total``: ``max(1, round(ratio * total))``."""
    return max(1, round(check_ratio(ratio, what) * total))


def check_count(k, total: int, what: str, where: nn.Module | str = "") -> int:
    """``k`` kept of ``total`` must be an integer in 1..total."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        name = where if isinstance(where, str) else type(where).__name__
        raise ElasticError(f"{name}{': ' if name else ''}{what}={k!r}; allowed: 1..{total}")
    return k
