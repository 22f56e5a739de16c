"""Naive references and probes shared by the loss tests.

The references are deliberately plain: python loops over rows and columns, math.fsum for every sum,
log-sum-exp by hand. They are slow and obviously right, which is the point.
"""

import math

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _dot(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def _neg_log_sigmoid(x: float) -> float:
    # −log σ(x) = log(1 + e^{−x}), written so the exponent is never positive.
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _logits(image_emb: Tensor, text_emb: Tensor, scale: float, bias: float = 0.0) -> list[list[float]]:
    img, txt = image_emb.tolist(), text_emb.tolist()
    return [[scale * _dot(img[i], txt[j]) + bias for j in range(len(txt))] for i in range(len(img))]


def naive_contrastive_loss(image_emb: Tensor, text_emb: Tensor, scale: float) -> float:
    """½ (mean over rows of CE(row i, target i) + mean over columns of CE(column j, target j))."""
    z = _logits(image_emb, text_emb, scale)
    n = len(z)
    image_to_text = math.fsum(_logsumexp(z[i]) - z[i][i] for i in range(n)) / n
    text_to_image = math.fsum(_logsumexp([z[i][j] for i in range(n)]) - z[j][j] for j in range(n)) / n
    return 0.5 * (image_to_text + text_to_image)


def naive_sigmoid_loss(image_emb: Tensor, text_emb: Tensor, scale: float, bias: float) -> float:
    """−(1/B) Σ_ij log σ(y_ij z_ij), y = +1 on the diagonal and −1 elsewhere."""
    z = _logits(image_emb, text_emb, scale, bias)
    n = len(z)
    terms = [_neg_log_sigmoid(z[i][j] if i == j else -z[i][j]) for i in range(n) for j in range(n)]
    return math.fsum(terms) / n


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, or the plain difference where expected is exactly zero."""
    diff = torch.linalg.vector_norm((actual - expected).double()).item()
    norm = torch.linalg.vector_norm(expected.double()).item()
    return diff / norm if norm > 0 else diff


def embeddings(batch: int, dim: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Random L2-normalised image / text embeddings (leaf tensors requiring grad)."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=-1)
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()


def uniform(low: float, high: float, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand((), generator=gen, dtype=torch.float64).item()


class PeakNumel(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op produces while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, Tensor):
                self.peak = max(self.peak, leaf.numel())
        return out
