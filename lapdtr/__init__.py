"""lapdtr: energy-aware, elastic, distributed vision models on torch.distributed."""
__version__ = "0.1.0"

from .models import (Stage, Unit, create_model, get_adapter, list_adapters, list_supported_models,
                     partition, units)

from .distribute import DistributedModel, distribute

__all__ = ["DistributedModel", "distribute", "Stage", "Unit", "create_model", "get_adapter", "list_adapters",
           "list_supported_models", "partition", "units", "__version__"]
