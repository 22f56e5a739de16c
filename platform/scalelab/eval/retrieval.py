"""Image↔text retrieval recall@k over held-out matched pairs (pair i's caption is image i's positive).

Recall@k is the fraction of queries whose positive ranks in the top k of all N candidates. Scores are
computed `chunk` query rows at a time, so memory is O(chunk · N), never N × N (50k pairs would be
10 GB in fp32). Ties count against the positive (as in zero-shot), so a collapsed model scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from scalelab.eval.datasets import load_pairs
from scalelab.eval.zeroshot import Tokenizer, encode_images, encode_texts

__all__ = ["evaluate_retrieval", "positive_ranks", "retrieval_metrics"]


def positive_ranks(queries: torch.Tensor, candidates: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """int64 [N]: for query i, how many candidates j ≠ i score at least as high as candidate i."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    ranks = torch.empty(len(queries), dtype=torch.int64)
    for a in range(0, len(queries), chunk):
        scores = queries[a:a + chunk] @ candidates.T  # [chunk, N]
        rows = torch.arange(len(scores), device=scores.device)
        # The positive's score comes from the same product as the others, so it compares exactly.
        positive = scores[rows, rows + a]
        ranks[a:a + len(scores)] = ((scores >= positive[:, None]).sum(dim=1) - 1).cpu()
    return ranks


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10), *,
                      chunk: int = 1024) -> dict[str, float]:
    """`i2t_r{k}` (image query → captions) and `t2i_r{k}` (caption query → images) for each k, in [0, 1]."""
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape or len(image_emb) == 0:
        raise ValueError(f"need matching non-empty [N, D] embeddings, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if not ks or any(k <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    out: dict[str, float] = {}
    for prefix, q, c in (("i2t", image_emb, text_emb), ("t2i", text_emb, image_emb)):
        ranks = positive_ranks(q, c, chunk=chunk)
        out.update({f"{prefix}_r{k}": float((ranks < k).double().mean()) for k in ks})
    return out


def evaluate_retrieval(model: nn.Module, tokenizer: Tokenizer, dataset_dir: str | Path,
                       image_size: int | None = None, name: str | None = None, *,
                       ks: Sequence[int] = (1, 5, 10), batch_size: int = 256) -> dict[str, float]:
    """Retrieval recall@k on a shard dataset of matched pairs, keys `eval/retrieval/i2t_r1` etc., or
    `eval/retrieval/<name>/i2t_r1` for a named set (several retrieval sets side by side).

    `image_size` defaults to the model's.
    """
    if name is not None and (not name or "/" in name):
        raise ValueError(f"name becomes part of metric keys: non-empty, without '/'; got {name!r}")
    size = model.config.image_size if image_size is None else image_size
    images, captions = load_pairs(dataset_dir, size)
    image_emb = encode_images(model, images, batch_size=batch_size)
    text_emb = encode_texts(model, tokenizer, captions, batch_size=batch_size)
    metrics = retrieval_metrics(image_emb, text_emb.to(image_emb.dtype), ks)
    prefix = "eval/retrieval/" if name is None else f"eval/retrieval/{name}/"
    return {prefix + k: v for k, v in metrics.items()}
