"""Model axis of scalelab: image and text towers, the dual encoder, the image classifier (the supervised
stage), named presets, size/MAC accounting, and pretrained image-tower weights (timm-compatible files).

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
from scalelab.models.pretrained import load_image_weights, match_image_weights, read_weights_file
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
    "load_image_weights",
    "match_image_weights",
    "model_for",
    "preset_stats",
    "preset_table",
    "read_weights_file",
    "register_preset",
    "swap_batchnorm_for_groupnorm",
]
