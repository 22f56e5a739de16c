"""Zero-shot classification with prompt ensembles (CLIP / BASIC) and the robustness-suite summary.

A class is represented by the prompt ensemble of its name: every template filled with the name is
encoded, each embedding L2-normalised, the embeddings averaged and the mean re-normalised (CLIP's
recipe; averaging in embedding space costs one text embedding per class at test time). An image is
classified by cosine similarity to the class embeddings.

Ranks count ties against the true class: it is in the top k when fewer than k other classes score at
least as high. A collapsed model (every score equal) therefore gets 0, not an accidental 1.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from scalelab.eval.datasets import load_image_folder

__all__ = [
    "class_embeddings",
    "encode_images",
    "encode_texts",
    "eval_mode",
    "evaluate_sets",
    "fill_templates",
    "zeroshot_classify",
]


class Tokenizer(Protocol):
    def encode_batch(self, texts: Sequence[str], context_length: int) -> Any: ...


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() + torch.no_grad() inside; every submodule's previous train/eval flag restored after.

    Per-module restore rather than `model.train(previous)`: a model with deliberately frozen-in-eval
    parts (e.g. a BatchNorm kept in eval while fine-tuning) must come back exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def encode_images(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] (on the model's device), encoded `batch_size` at a time."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = _device(model)
    with eval_mode(model):
        out = [F.normalize(model.encode_image(images[a:a + batch_size].to(device)), dim=-1)
               for a in range(0, len(images), batch_size)]
    return torch.cat(out)


def encode_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], *,
                 batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings [N, D], tokenized to the model's context length."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device, ctx = _device(model), model.config.context_length
    out = []
    with eval_mode(model):
        for a in range(0, len(texts), batch_size):
            tokens = torch.as_tensor(tokenizer.encode_batch(list(texts[a:a + batch_size]), ctx),
                                     dtype=torch.int64, device=device)
            out.append(F.normalize(model.encode_text(tokens), dim=-1))
    return torch.cat(out)


def fill_templates(classnames: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts in class-major order (all templates of class 0, then class 1, ...).

    `str.replace`, not `str.format`: templates may hold other braces, which format would reject.
    """
    bad = [t for t in templates if "{c}" not in t]
    if bad or not templates:
        raise ValueError(f"prompt templates must be non-empty and contain {{c}}; bad: {bad[:5]}")
    return [t.replace("{c}", name) for name in classnames for t in templates]


def class_embeddings(model: nn.Module, tokenizer: Tokenizer, classnames: Sequence[str],
                     templates: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
    """Prompt-ensemble class embeddings [C, D]: mean of the normalised prompt embeddings, re-normalised."""
    if not classnames:
        raise ValueError("no class names")
    emb = encode_texts(model, tokenizer, fill_templates(classnames, templates), batch_size=batch_size)
    return F.normalize(emb.reshape(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def zeroshot_classify(model: nn.Module, tokenizer: Tokenizer, images: torch.Tensor, labels: torch.Tensor,
                      classnames: Sequence[str], templates: Sequence[str], *,
                      batch_size: int = 256) -> dict[str, float]:
    """`top1`, `top5` (k clipped to the number of classes) and `mean_per_class_recall`, all in [0, 1].

    Mean per-class recall averages over the classes that have at least one image.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    n, c = len(images), len(classnames)
    if n == 0 or len(labels) != n:
        raise ValueError(f"need as many labels as images (>0), got {len(labels)} labels for {n} images")
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c}) for {c} class names")
    classes = class_embeddings(model, tokenizer, classnames, templates, batch_size=batch_size)
    ranks = torch.empty(n, dtype=torch.int64)
    for a in range(0, n, batch_size):  # [batch, C] scores at a time: no N × C matrix for big sets
        img = encode_images(model, images[a:a + batch_size], batch_size=batch_size)
        scores = img @ classes.to(img.dtype).T
        y = labels[a:a + batch_size].to(scores.device)
        true = scores.gather(1, y[:, None])
        ranks[a:a + len(y)] = ((scores >= true).sum(dim=1) - 1).cpu()  # others scoring ≥ the true class
    hit1 = (ranks < 1).double()
    per_class = torch.zeros(c, dtype=torch.float64).index_add_(0, labels, hit1)
    counts = torch.bincount(labels, minlength=c).double()
    present = counts > 0
    return {
        "top1": float(hit1.mean()),
        "top5": float((ranks < min(5, c)).double().mean()),
        "mean_per_class_recall": float((per_class[present] / counts[present]).mean()),
    }


def evaluate_sets(model: nn.Module, tokenizer: Tokenizer, sets: Mapping[str, str | Path],
                  image_size: int | None = None, *, shifted: Sequence[str] = (),
                  batch_size: int = 256, templates: str | Path | None = None) -> dict[str, float]:
    """Zero-shot metrics of each ImageFolder set, under stable keys `eval/zeroshot/<set>/<metric>`.

    `templates`: a shared templates file for the sets without a templates.txt of their own.

    `shifted` names the sets that count as distribution shifts; their mean top1 is reported as
    `eval/zeroshot/robustness_avg/top1` (omitted when `shifted` is empty). `image_size` defaults to
    the model's.
    """
    unknown = [s for s in shifted if s not in sets]
    if unknown:
        raise ValueError(f"shifted sets {unknown} are not among the evaluated sets {list(sets)}")
    bad = [s for s in sets if not s or "/" in s or s == "robustness_avg"]
    if bad:
        raise ValueError(f"set names become metric keys: they must be non-empty, without '/', "
                         f"and not 'robustness_avg'; got {bad}")
    size = model.config.image_size if image_size is None else image_size
    out: dict[str, float] = {}
    for name, directory in sets.items():
        data = load_image_folder(directory, size, templates)
        metrics = zeroshot_classify(model, tokenizer, data.images, data.labels, data.classnames,
                                    data.templates, batch_size=batch_size)
        out.update({f"eval/zeroshot/{name}/{k}": v for k, v in metrics.items()})
    if shifted:
        top1 = [out[f"eval/zeroshot/{s}/top1"] for s in shifted]
        out["eval/zeroshot/robustness_avg/top1"] = sum(top1) / len(top1)
    return out
