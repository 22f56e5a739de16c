"""Evaluation: zero-shot classification with prompt ensembles, the robustness suite, image↔text retrieval,
top-1 of a supervised classifier on held-out splits (`evaluate_classifier`),
and loading a model written by `scalelab export` (`load_exported`).

Depends on `scalelab.models` and `scalelab.data` (never ray, deepspeed or mlflow): the training loop
calls these functions and reports the returned stable metric keys (`eval/zeroshot/<set>/top1`, ...).
"""

from scalelab.eval.classify import evaluate_classifier, topk_accuracy
from scalelab.eval.datasets import (
    CLIP_MEAN,
    CLIP_STD,
    LabelledImages,
    load_image_folder,
    load_pairs,
    preprocess_eval,
)
from scalelab.eval.load import load_exported
from scalelab.eval.retrieval import evaluate_retrieval, retrieval_metrics
from scalelab.eval.zeroshot import (
    class_embeddings,
    encode_images,
    encode_texts,
    eval_mode,
    evaluate_sets,
    fill_templates,
    zeroshot_classify,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "LabelledImages",
    "class_embeddings",
    "encode_images",
    "encode_texts",
    "eval_mode",
    "evaluate_classifier",
    "evaluate_retrieval",
    "evaluate_sets",
    "fill_templates",
    "load_exported",
    "load_image_folder",
    "load_pairs",
    "preprocess_eval",
    "retrieval_metrics",
    "topk_accuracy",
    "zeroshot_classify",
]
