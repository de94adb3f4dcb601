"""Elastic layers: attention and MLPs that run with k of h heads and m of d hidden units.

Per family, timm's own layers are swapped for subclasses (``state_dict`` keys unchanged) that
slice their weights per call, as views. Full width equals the original model exactly. Families
(``FAMILIES``, one module each): DeiT/ViT (``vit``), TinyViT (``tiny_vit``), EfficientViT-M
(``efficientvit_m``: the first k heads of its cascade only), EfficientViT-B
(``efficientvit_b``), EdgeViT (``edgevit``: exact in its last stage; where sr > 1 a norm over
all channels follows the attention, so fewer heads there are approximate, listed by
``inexact_layers``, and rely on elastic training). Which heads and
hidden units come first is set once from calibration data (``importance``, DynaBERT) or by
magnitude; the width controller (``controller``, ``policy``) maps a rank's remaining energy to a
width ratio in the runtime's per-item chain.
"""
from .api import (FAMILIES, apply_elastic, elastic_layers, inexact_layers, make_elastic,
                  order_by_magnitude_, set_width, widths)
from .importance import importance, order_by_importance_
from .base import ElasticError, ElasticHeads, ElasticHidden, check_ratio, count_for
from .controller import POLICIES, WidthController, WidthPolicy
from .tiny_vit import ElasticNormMlp, ElasticTinyAttention
from .vit import ElasticAttention, ElasticMlp

__all__ = ["FAMILIES", "ElasticError", "ElasticHeads", "ElasticHidden", "check_ratio",
           "count_for", "apply_elastic", "make_elastic", "set_width", "widths",
           "order_by_magnitude_", "importance", "order_by_importance_", "elastic_layers",
           "inexact_layers", "ElasticAttention", "ElasticMlp", "ElasticTinyAttention",
           "ElasticNormMlp", "WidthController", "WidthPolicy", "POLICIES"]
