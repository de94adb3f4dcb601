"""Elastic layers: attention and MLPs that run with k of h heads and m of d hidden units.

Per family, timm's own layers are swapped for subclasses (``state_dict`` keys unchanged) that
slice their weights per call, as views. Full width equals the original model exactly. Here:
DeiT/ViT (``lapdtr.elastic.vit``) and TinyViT (``lapdtr.elastic.tiny_vit``), and the width
controller that maps a rank's remaining energy to a width ratio (``lapdtr.elastic.controller``).
EfficientViT-M/B and EdgeViT, the controller's place in the runtime's per-item chain, and
planning with widths are not yet (issue 11).
"""
from .api import FAMILIES, elastic_layers, make_elastic, order_by_magnitude_, set_width, widths
from .base import ElasticError, ElasticHeads, ElasticHidden, check_ratio, count_for
from .controller import POLICIES, WidthController, WidthPolicy
from .tiny_vit import ElasticNormMlp, ElasticTinyAttention
from .vit import ElasticAttention, ElasticMlp

__all__ = ["FAMILIES", "ElasticError", "ElasticHeads", "ElasticHidden", "check_ratio",
           "count_for", "make_elastic", "set_width", "widths", "order_by_magnitude_",
           "elastic_layers", "ElasticAttention", "ElasticMlp", "ElasticTinyAttention",
           "ElasticNormMlp", "WidthController", "WidthPolicy", "POLICIES"]
