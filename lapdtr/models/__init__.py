"""Model families as ordered units; importing this registers every adapter (and, with timm,
the models lapdtr implements itself: EdgeViT and SqueezeNet)."""
from .base import (Adapter, Stage, Unit, UnitSpec, create_model, default_img_size, get_adapter,
                   get_adapter_for_name, list_adapters, list_supported_models, partition,
                   register_adapter, resolve_cuts, unit_owned_names, units)
from . import vit, tiny_vit, efficientvit, resnet, mobilenet, vgg, edgevit, squeezenet, vit_relpos, resnetv2, byobnet, eva  # noqa: F401

__all__ = ["Adapter", "Stage", "Unit", "UnitSpec", "create_model", "default_img_size",
           "get_adapter", "get_adapter_for_name", "list_adapters", "list_supported_models",
           "partition", "register_adapter", "resolve_cuts", "unit_owned_names", "units"]
