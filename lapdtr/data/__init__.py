"""Data in, predictions out.

The data flow of a run that classifies real inputs::

    DataConfig (the run's ``data:`` block; parse_data_config)
      -> build_dataset / build_loader: (image, target) in one fixed order, preprocessed for the
         model with timm's eval data config (synthetic | image_folder | digits; target -1 = none)
      -> the ranks run each batch (request r = batch r of the loader)
      -> rank 0: PredictionWriter -> predictions.jsonl (one fsynced line per input: top-k
         [class, prob] and target), Accuracy -> report (top-1/top-5)
      -> reference_accuracy: the same inputs through the whole model in one process; a run's
         accuracy must equal it.

``synthetic_request`` is the runtime's seeded random input (no labels), kept bit-for-bit.
``train_digits_checkpoint`` trains a small supported model on the digits offline, so a run can
report an accuracy that means something without downloading weights or data.
"""
from .config import DATA_KINDS, SPLITS, DataConfig, parse_data_config
from .predictions import (Accuracy, PredictionWriter, read_predictions, reference_accuracy,
                          topk_predictions)
from .sources import (DIGITS_CLASSES, DataSource, build_dataset, build_loader, digits_images,
                      digits_split, model_data_config, synthetic_request)
from .train import digits_model_kwargs, train_digits_checkpoint

__all__ = [
    "DATA_KINDS", "SPLITS", "DataConfig", "parse_data_config",
    "Accuracy", "PredictionWriter", "read_predictions", "reference_accuracy", "topk_predictions",
    "DIGITS_CLASSES", "DataSource", "build_dataset", "build_loader", "digits_images",
    "digits_split", "model_data_config", "synthetic_request",
    "digits_model_kwargs", "train_digits_checkpoint",
]
