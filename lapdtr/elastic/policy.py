"""The elastic width as a step of the runtime's per-item chain: the ``Settings`` policy that asks
a rank's :class:`~lapdtr.elastic.controller.WidthController` for its width, and the hook the
``RunUnits`` step calls to run the rank's elastic layers at it."""
from __future__ import annotations

from torch import nn

from .api import elastic_layers, set_width
from .base import ElasticError, ElasticHeads
from .controller import WidthController, WidthPolicy

__all__ = ["EnergyWidths", "allowed_ratios", "allowed_widths"]


def allowed_ratios(model: nn.Module) -> list[float] | None:
    """The width ratios ``k/h`` of the elastic attention with the fewest heads (every other
    layer rounds its own count from the same ratio); ``None`` for a model without attention."""
    heads = [m.num_heads for m in elastic_layers(model) if isinstance(m, ElasticHeads)]
    if not heads:
        return None
    h = min(heads)
    return [k / h for k in range(1, h + 1)]


def allowed_widths(model: nn.Module) -> list[float]:
    """The width ratios ``model`` can run, widest first: [1.0] for a family without elastic
    layers; else ``allowed_ratios`` of its elastic layers (counted on an elastic copy when the
    model itself has not been made elastic)."""
    from .api import FAMILIES, _family

    if not elastic_layers(model):
        if _family(model) not in FAMILIES:
            return [1.0]
        import copy

        from .api import make_elastic

        model = make_elastic(copy.deepcopy(model))
    return sorted(allowed_ratios(model) or [1.0], reverse=True)


class EnergyWidths:
    """``Settings`` policy ``(stage, remaining_j) -> (width, keep_ratio)``: the width from the
    rank's remaining energy over its budget ``e_max_j`` (a rank without a budget runs full
    width), or, for the ``plan`` policy, the width the plan gives the stage (``StagePlan.width``,
    kept by a re-plan); ``clock()`` gives the time in seconds."""

    def __init__(self, policy: WidthPolicy, model: nn.Module, e_max_j: float | None, clock):
        if not elastic_layers(model):
            raise ElasticError("elastic: the rank's model has no elastic layers "
                               "(lapdtr.elastic.make_elastic)")
        self.model = model
        self.controller = WidthController(policy, e_max_j or 1.0, allowed=allowed_ratios(model))
        self.has_budget = bool(e_max_j)
        self.clock = clock
        self.width = 1.0

    def __call__(self, stage, remaining_j):
        if self.controller.policy.kind == "plan":
            return stage.width, 1.0
        r = self.controller.update(remaining_j if self.has_budget else None, self.clock())
        return r, 1.0

    def apply(self, width: float) -> bool:
        """Run the model's elastic layers at ``width``; ``True`` if it changed."""
        if width == self.width:
            return False
        set_width(self.model, width)
        self.width = width
        return True
