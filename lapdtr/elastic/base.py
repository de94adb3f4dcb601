"""What every family's elastic layers share: width ratios to head / hidden counts, and the
checks that name what is allowed.

A *width ratio* r in (0, 1] keeps ``k = max(1, round(r * h))`` of a layer's ``h`` heads (or
hidden units). Full width (k = h) runs timm's own forward, so it equals the original model
exactly.
"""
from __future__ import annotations

from torch import nn

__all__ = ["batch_norm_first", "check_ratio", "count_for", "check_count", "ElasticError", "ElasticHeads",
           "ElasticHidden", "check_permutation"]


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


def _check_part(layer, n, total: int, what: str, reason: str) -> int:
    """``n`` of ``total`` (heads or hidden units) if ``layer`` can run them, else an error."""
    check_count(n, total, what, type(layer).__name__)
    if n < total and not layer.exact_below_full() and not layer.approximate:
        raise ElasticError(f"{type(layer).__name__}: {reason}; allowed: {what}={total} only")
    return n


class ElasticHeads:
    """Mixin of an elastic attention: ``num_heads`` of it, ``active_heads`` run (the first
    ones). A subclass says whether it can run fewer heads exactly (``exact_below_full``) and
    implements ``reorder_(order)``, ``magnitude()`` (data-free importance per head) and
    ``head_site()`` (where the heads' outputs meet, for the calibration-data importance of
    ``lapdtr.elastic.importance``). ``reorderable = False`` where head order is part of the
    function (EfficientViT-M's cascade: head i reads head i-1's output)."""

    active_heads: int
    reason_inexact = "this attention cannot run part of its heads exactly"
    reorderable = True
    #: runs fewer heads even where that is not exact (``exact_below_full`` False): the model
    #: then relies on elastic (sandwich) training, as EdgeViT's sr > 1 attention does
    approximate = False

    def head_site(self):
        """``(module, dim, per_head)`` or ``(module, dim, per_head, repeats)``: the module whose
        input is the heads' outputs side by side along ``dim``, ``per_head`` channels each, in
        head order (``repeats`` times over, one range per branch)."""
        raise NotImplementedError(type(self).__name__)

    def exact_below_full(self) -> bool:
        return True

    def check_heads(self, k: int) -> int:
        """``k`` if this layer can run ``k`` heads, else an ``ElasticError`` naming the allowed."""
        return _check_part(self, k, self.num_heads, "heads", self.reason_inexact)

    def set_heads(self, k: int) -> None:
        self.active_heads = self.check_heads(k)

    @property
    def heads_now(self) -> int:
        return getattr(self, "active_heads", self.num_heads)


class ElasticHidden:
    """Mixin of an elastic MLP over ``fc1`` / ``fc2`` linears: ``active_hidden`` of its hidden
    units run (the first ones: ``fc1``'s rows, ``fc2``'s columns)."""

    active_hidden: int
    reorderable = True
    approximate = False
    reason_inexact = "a norm over all hidden units cannot run part of them exactly"

    def hidden_params(self):
        """``[(parameter, dim)]``: the parameters whose slices along ``dim`` are the hidden units
        (``fc1`` rows and bias, ``fc2`` columns), for the weight × gradient importance."""
        out = [(self.fc1.weight, 0), (self.fc2.weight, 1)]
        if self.fc1.bias is not None:
            out.append((self.fc1.bias, 0))
        return out

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_features

    @property
    def hidden_now(self) -> int:
        return getattr(self, "active_hidden", self.hidden_features)

    def exact_below_full(self) -> bool:
        return True

    def check_hidden(self, m: int) -> int:
        """``m`` if this layer can run ``m`` hidden units, else an ``ElasticError``."""
        return _check_part(self, m, self.hidden_features, "hidden", self.reason_inexact)

    def set_hidden(self, m: int) -> None:
        self.active_hidden = self.check_hidden(m)

    def hidden_forward(self, x, m: int):
        """fc1's first ``m`` rows, act, drop1, fc2's first ``m`` columns, drop2 (views)."""
        import torch.nn.functional as F

        b = self.fc1.bias
        x = F.linear(x, self.fc1.weight[:m], None if b is None else b[:m])
        x = self.drop1(self.act(x))
        return self.drop2(F.linear(x, self.fc2.weight[:, :m], self.fc2.bias))

    def magnitude(self):
        """Data-free importance of each hidden unit: ``|fc1 row| · |fc2 column|``."""
        return self.fc1.weight.norm(dim=1) * self.fc2.weight.norm(dim=0)

    def reorder_(self, order) -> None:
        """Reorder the hidden units in place (``fc1`` rows, ``fc2`` columns)."""
        import torch

        m = self.hidden_features
        order = torch.as_tensor(order, dtype=torch.long)
        if sorted(order.tolist()) != list(range(m)):
            raise ElasticError(f"reorder_: not a permutation of 0..{m - 1}")
        with torch.no_grad():
            self.fc1.weight.copy_(self.fc1.weight[order])
            if self.fc1.bias is not None:
                self.fc1.bias.copy_(self.fc1.bias[order])
            self.fc2.weight.copy_(self.fc2.weight[:, order])


def check_permutation(order, n: int, what: str):
    import torch

    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(n)):
        raise ElasticError(f"{what}: {order.tolist()} is not a permutation of 0..{n - 1}")
    return order


def batch_norm_first(bn, x, m: int):
    """``bn`` on ``x`` holding its first ``m`` channels: torch's ``_BatchNorm.forward`` with
    every per-channel tensor sliced to ``[:m]`` (views; in training mode the running statistics
    of those channels are updated in place, and ``num_batches_tracked`` counts the step)."""
    import torch.nn.functional as F

    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    mean = bn.running_mean[:m] if track and bn.running_mean is not None else None
    var = bn.running_var[:m] if track and bn.running_var is not None else None
    w = None if bn.weight is None else bn.weight[:m]
    b = None if bn.bias is None else bn.bias[:m]
    return F.batch_norm(x, mean, var, w, b, use_batch, factor, bn.eps)
