"""Model axis of scalelab: image and text towers, the dual encoder, the image classifier (the supervised
stage), named presets, size/MAC accounting.

Single-device nn.Modules only; distribution (ZeRO, DDP) is applied by `scalelab.train`.
Imports torch, timm and scalelab.config — never ray, deepspeed or mlflow.
"""

from scalelab.models.classifier import ImageClassifier
from scalelab.models.dual import DualEncoder, Temperature
from scalelab.models.image import ImageTower, create_backbone, has_batchnorm, swap_batchnorm_for_groupnorm
from scalelab.models.presets import (
    build_model,
    create_classifier,
    create_model,
    get_spec,
    list_presets,
    model_for,
    register_preset,
)
from scalelab.models.stats import (
    ModelStats,
    activation_bytes_per_sample,
    count_params,
    preset_stats,
    preset_table,
)
from scalelab.models.text import PAD_ID, TextTower

__all__ = [
    "PAD_ID",
    "DualEncoder",
    "ImageClassifier",
    "ImageTower",
    "ModelStats",
    "Temperature",
    "TextTower",
    "activation_bytes_per_sample",
    "build_model",
    "count_params",
    "create_backbone",
    "create_classifier",
    "create_model",
    "get_spec",
    "has_batchnorm",
    "list_presets",
    "model_for",
    "preset_stats",
    "preset_table",
    "register_preset",
    "swap_batchnorm_for_groupnorm",
]
