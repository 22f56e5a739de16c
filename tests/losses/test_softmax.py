"""contrastive_loss: dense == naive reference, tiled == dense (value and every gradient), the tiled
path never builds a B×B tensor, and bad inputs are refused with a message naming the problem."""

import pytest
import torch

from scalelab.losses import contrastive_loss

from .helpers import PeakNumel, embeddings, naive_contrastive_loss, rel_err, uniform

BATCHES = [1, 7, 33, 64]
BLOCKS = [1, 5, 16, 64]


def _scale(seed: int) -> torch.Tensor:
    return torch.tensor(uniform(1.0, 100.0, seed), dtype=torch.float64, requires_grad=True)


def _loss_and_grads(img, txt, scale, block_size, grad_output=1.0):
    loss = contrastive_loss(img, txt, scale, block_size=block_size) * grad_output
    leaves = [t for t in (img, txt, scale) if isinstance(t, torch.Tensor) and t.requires_grad]
    return loss, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("batch", BATCHES)
def test_dense_matches_naive_reference(batch):
    dim = 3 + batch % 13
    img, txt = embeddings(batch, dim, seed=batch)
    scale = _scale(seed=batch)
    loss = contrastive_loss(img, txt, scale)
    expected = naive_contrastive_loss(img.detach(), txt.detach(), scale.item())
    assert loss.dim() == 0
    assert rel_err(loss.detach(), torch.tensor(expected, dtype=torch.float64)) <= 1e-12


def test_dense_on_unnormalised_embeddings_matches_naive_reference():
    gen = torch.Generator().manual_seed(5)
    img, txt = torch.randn(9, 6, generator=gen, dtype=torch.float64), torch.randn(9, 6, generator=gen,
                                                                                dtype=torch.float64)
    expected = naive_contrastive_loss(img, txt, 17.0)
    assert rel_err(contrastive_loss(img, txt, 17.0), torch.tensor(expected, dtype=torch.float64)) <= 1e-12


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("batch", BATCHES)
def test_tiled_matches_dense(batch, block):
    img, txt = embeddings(batch, 2 + (batch * block) % 11, seed=100 + batch + block)
    scale = _scale(seed=batch * block)
    dense, dense_grads = _loss_and_grads(img, txt, scale, None)
    tiled, tiled_grads = _loss_and_grads(img, txt, scale, block)
    # B=1: the loss and its gradients are exactly 0 in the dense path; tiled gets rounding-level values.
    atol = 1e-14 if batch == 1 else 0.0
    assert rel_err(tiled, dense) <= 1e-10 + atol
    for name, got, want in zip(("image_emb", "text_emb", "scale"), tiled_grads, dense_grads, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) <= 1e-10 + atol, name


@pytest.mark.parametrize(("batch", "block"), [(7, 5), (33, 16), (64, 64)])
def test_tiled_matches_dense_with_python_float_scale(batch, block):
    img, txt = embeddings(batch, 8, seed=batch)
    scale = uniform(1.0, 100.0, seed=batch)
    dense, dense_grads = _loss_and_grads(img, txt, scale, None)
    tiled, tiled_grads = _loss_and_grads(img, txt, scale, block)
    assert len(tiled_grads) == 2
    assert rel_err(tiled, dense) <= 1e-10
    for got, want in zip(tiled_grads, dense_grads, strict=True):
        assert rel_err(got, want) <= 1e-10


def test_tiled_backward_multiplies_by_grad_output():
    img, txt = embeddings(33, 8, seed=3)
    scale = _scale(seed=3)
    _, dense_grads = _loss_and_grads(img, txt, scale, None, grad_output=3.7)
    _, tiled_grads = _loss_and_grads(img, txt, scale, 5, grad_output=3.7)
    _, unit_grads = _loss_and_grads(img, txt, scale, 5)
    for got, want, unit in zip(tiled_grads, dense_grads, unit_grads, strict=True):
        assert rel_err(got, want) <= 1e-10
        assert rel_err(got, 3.7 * unit) <= 1e-12


def test_tiled_gradcheck():
    img, txt = embeddings(5, 3, seed=11)
    scale = _scale(seed=11)
    assert torch.autograd.gradcheck(
        lambda a, b, s: contrastive_loss(a, b, s, block_size=2), (img, txt, scale)
    )


def test_tiled_only_some_inputs_need_grad():
    img, txt = embeddings(10, 4, seed=2)
    frozen_txt = txt.detach()
    scale = torch.tensor(20.0, dtype=torch.float64)  # a tensor that does not require grad
    (tiled,) = torch.autograd.grad(contrastive_loss(img, frozen_txt, scale, block_size=3), [img])
    (dense,) = torch.autograd.grad(contrastive_loss(img, frozen_txt, scale), [img])
    assert rel_err(tiled, dense) <= 1e-10
    with torch.no_grad():
        assert not contrastive_loss(img, txt, scale, block_size=3).requires_grad


def test_tiled_never_materialises_the_batch_matrix():
    batch, block = 512, 32
    img, txt = embeddings(batch, 16, seed=0)
    scale = _scale(seed=0)
    with PeakNumel() as tiled_probe:
        contrastive_loss(img, txt, scale, block_size=block).backward()
    with PeakNumel() as dense_probe:
        contrastive_loss(img, txt, scale).backward()
    assert dense_probe.peak >= batch * batch  # the probe does see a B×B tensor when there is one
    assert tiled_probe.peak < batch * batch / 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    img, txt = embeddings(40, 16, seed=4, dtype=dtype)
    reference = contrastive_loss(img.detach().double(), txt.detach().double(), 30.0)
    for block_size in (None, 8):
        loss = contrastive_loss(img, txt, 30.0, block_size=block_size)
        assert loss.dtype == torch.float32
        assert rel_err(loss.double(), reference) <= 1e-2
        grad_img, _ = torch.autograd.grad(loss, [img, txt])
        assert grad_img.dtype == dtype


def _bad(batch_img=4, batch_txt=4, dim=3):
    return torch.randn(batch_img, dim, dtype=torch.float64), torch.randn(batch_txt, dim, dtype=torch.float64)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: (*_bad(8, 7), {}), "image_emb has 8 rows but text_emb has 7"),
        (lambda: (*_bad(dim=3)[:1], torch.randn(4, 5, dtype=torch.float64), {}), "embedding dim 3"),
        (lambda: (torch.randn(4, dtype=torch.float64), _bad()[1], {}), "image_emb must be 2-d"),
        (lambda: (_bad()[0], torch.randn(2, 2, 3), {}), "text_emb must be 2-d"),
        (lambda: (*_bad(0, 0), {}), "B=0"),
        (lambda: (*_bad(), {"block_size": 0}), "block_size must be a positive int, got 0"),
        (lambda: (*_bad(), {"block_size": -3}), "block_size must be a positive int, got -3"),
        (lambda: (*_bad(), {"block_size": 2.0}), "block_size must be a positive int"),
        (
            lambda: (_bad()[0], _bad()[1].float(), {}),
            "image_emb is torch.float64 but text_emb is torch.float32",
        ),
        (lambda: (_bad()[0].long(), _bad()[1].long(), {}), "must be a floating-point tensor"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(make, message):
    img, txt, kwargs = make()
    for block_size in (None, 4):
        with pytest.raises(ValueError, match=message):
            contrastive_loss(img, txt, 10.0, **{"block_size": block_size, **kwargs})


def test_bad_scale_is_refused():
    img, txt = _bad()
    with pytest.raises(ValueError, match="scale must be a python number or a one-element tensor"):
        contrastive_loss(img, txt, torch.ones(3))


def test_scale_gradient_keeps_the_scale_shape_and_dtype():
    # A one-element float32 parameter next to float64 embeddings: its gradient comes back as such.
    img, txt = embeddings(9, 4, seed=8)
    scale = torch.full((1,), 12.0, dtype=torch.float32, requires_grad=True)
    (dense,) = torch.autograd.grad(contrastive_loss(img, txt, scale), [scale])
    (tiled,) = torch.autograd.grad(contrastive_loss(img, txt, scale, block_size=4), [scale])
    assert tiled.shape == dense.shape == (1,) and tiled.dtype == dense.dtype == torch.float32
    assert rel_err(tiled, dense) <= 1e-6
