"""sigmoid_loss (SigLIP): dense == naive reference, tiled == dense for the value and the gradients of
image_emb, text_emb, scale and bias, no B×B tensor in the tiled path, clear errors on bad input."""

import math

import pytest
import torch

from scalelab.losses import sigmoid_loss

from .helpers import PeakNumel, embeddings, naive_sigmoid_loss, rel_err, uniform

BATCHES = [1, 7, 33, 64]
BLOCKS = [1, 5, 16, 64]


def _scalars(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor(uniform(1.0, 100.0, seed), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(uniform(-10.0, 0.0, seed + 1), dtype=torch.float64, requires_grad=True)
    return scale, bias


def _loss_and_grads(img, txt, scale, bias, block_size, grad_output=1.0):
    loss = sigmoid_loss(img, txt, scale, bias, block_size=block_size) * grad_output
    leaves = [t for t in (img, txt, scale, bias) if isinstance(t, torch.Tensor) and t.requires_grad]
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("batch", BATCHES)
def test_dense_matches_naive_reference(batch):
    img, txt = embeddings(batch, 3 + batch % 13, seed=batch)
    scale, bias = _scalars(seed=batch)
    loss = sigmoid_loss(img, txt, scale, bias)
    expected = naive_sigmoid_loss(img.detach(), txt.detach(), scale.item(), bias.item())
    assert loss.dim() == 0
    assert rel_err(loss.detach(), torch.tensor(expected, dtype=torch.float64)) <= 1e-12


def test_normalised_by_batch_size_not_pairs():
    # All-zero embeddings with scale·0 + bias = 0: every pair costs log 2, B² pairs, divided by B.
    img = torch.zeros(6, 4, dtype=torch.float64)
    for block_size in (None, 4):
        loss = sigmoid_loss(img, img, 10.0, 0.0, block_size=block_size)
        assert rel_err(loss, torch.tensor(6 * math.log(2.0), dtype=torch.float64)) <= 1e-15


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_tiled_matches_dense(batch, block):
    img, txt = embeddings(batch, 2 + (batch * block) % 11, seed=200 + batch + block)
    scale, bias = _scalars(seed=batch * block)
    dense, dense_grads = _loss_and_grads(img, txt, scale, bias, None)
    tiled, tiled_grads = _loss_and_grads(img, txt, scale, bias, block)
    assert rel_err(tiled, dense) <= 1e-10
    names = ("image_emb", "text_emb", "scale", "bias")
    for name, got, want in zip(names, tiled_grads, dense_grads, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) <= 1e-10, name


def test_tiled_is_exact_for_confident_pairs():
    # Large |z|: a softplus-with-threshold or softplus(z) − z shortcut would lose the e^{−|z|} tails.
    gen = torch.Generator().manual_seed(9)
    img = torch.randn(12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = naive_sigmoid_loss(img.detach(), txt.detach(), 15.0, 3.0)
    _, dense_grads = _loss_and_grads(img, txt, 15.0, 3.0, None)
    tiled, tiled_grads = _loss_and_grads(img, txt, 15.0, 3.0, 5)
    assert rel_err(tiled, torch.tensor(expected, dtype=torch.float64)) <= 1e-12
    for got, want in zip(tiled_grads, dense_grads, strict=True):
        assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize(("scale_is_float", "bias_is_float"), [(True, True), (True, False), (False, True)])
def test_tiled_matches_dense_with_python_float_scalars(scale_is_float, bias_is_float):
    img, txt = embeddings(33, 8, seed=7)
    scale, bias = _scalars(seed=7)
    scale = scale.item() if scale_is_float else scale
    bias = bias.item() if bias_is_float else bias
    dense, dense_grads = _loss_and_grads(img, txt, scale, bias, None)
    tiled, tiled_grads = _loss_and_grads(img, txt, scale, bias, 16)
    assert len(tiled_grads) == 4 - scale_is_float - bias_is_float
    assert rel_err(tiled, dense) <= 1e-10
    for got, want in zip(tiled_grads, dense_grads, strict=True):
        assert rel_err(got, want) <= 1e-10


def test_tiled_backward_multiplies_by_grad_output():
    img, txt = embeddings(33, 8, seed=3)
    scale, bias = _scalars(seed=3)
    _, dense_grads = _loss_and_grads(img, txt, scale, bias, None, grad_output=3.7)
    _, tiled_grads = _loss_and_grads(img, txt, scale, bias, 5, grad_output=3.7)
    _, unit_grads = _loss_and_grads(img, txt, scale, bias, 5)
    for got, want, unit in zip(tiled_grads, dense_grads, unit_grads, strict=True):
        assert rel_err(got, want) <= 1e-10
        assert rel_err(got, 3.7 * unit) <= 1e-12


def test_tiled_gradcheck():
    img, txt = embeddings(5, 3, seed=11)
    scale, bias = _scalars(seed=11)
    assert torch.autograd.gradcheck(
        lambda a, b, s, c: sigmoid_loss(a, b, s, c, block_size=2), (img, txt, scale, bias)
    )


def test_tiled_never_materialises_the_batch_matrix():
    batch, block = 512, 32
    img, txt = embeddings(batch, 16, seed=0)
    scale, bias = _scalars(seed=0)
    with PeakNumel() as tiled_probe:
        sigmoid_loss(img, txt, scale, bias, block_size=block).backward()
    with PeakNumel() as dense_probe:
        sigmoid_loss(img, txt, scale, bias).backward()
    assert dense_probe.peak >= batch * batch  # the probe does see a B×B tensor when there is one
    assert tiled_probe.peak < batch * batch / 4


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((torch.randn(8, 3), torch.randn(7, 3), 1.0, 0.0), {}, "image_emb has 8 rows but text_emb has 7"),
        ((torch.randn(4), torch.randn(4, 3), 1.0, 0.0), {}, "image_emb must be 2-d"),
        ((torch.randn(0, 3), torch.randn(0, 3), 1.0, 0.0), {}, "B=0"),
        ((torch.randn(4, 3), torch.randn(4, 3), 1.0, 0.0), {"block_size": 0},
         "block_size must be a positive int, got 0"),
        ((torch.randn(4, 3), torch.randn(4, 3), 1.0, torch.zeros(2)), {}, "bias must be a python number"),
        ((torch.randn(4, 3), torch.randn(4, 3), "1", 0.0), {}, "scale must be a python number"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sigmoid_loss(*args, **kwargs)
