"""Elastic layers: attention and MLPs that run with k of h heads and m of d hidden units.

Per family, timm's own layers are swapped for subclasses (``state_dict`` keys unchanged) that
slice their weights per call, as views. Full width equals the original model exactly. The
DeiT/ViT family is here (``lapdtr.elastic.vit``), and the width controller that maps a rank's
remaining energy to a width ratio (``lapdtr.elastic.controller``). TinyViT, EfficientViT-M/B and
EdgeViT, the controller's place in the runtime's per-item chain, and planning with widths are
not yet (issue 11).
"""
from .base import ElasticError, check_ratio, count_for
from .controller import POLICIES, WidthController, WidthPolicy
from .vit import (ElasticAttention, ElasticMlp, make_elastic, order_by_magnitude_, order_heads_,
                  order_hidden_, set_width, widths)

__all__ = ["ElasticError", "check_ratio", "count_for", "ElasticAttention", "ElasticMlp",
           "make_elastic", "set_width", "widths", "order_by_magnitude_", "order_heads_",
           "order_hidden_", "WidthController", "WidthPolicy", "POLICIES"]
