"""lapdtr: energy-aware, elastic, distributed vision models on torch.distributed."""
__version__ = "0.1.0"

from .models import (Stage, Unit, create_model, get_adapter, list_adapters, list_supported_models,
                     partition, units)

__all__ = ["Stage", "Unit", "create_model", "get_adapter", "list_adapters",
           "list_supported_models", "partition", "units", "__version__"]
