"""all_gather / all_gather_with_grad on two real ranks (gloo, spawned processes) and the fallback.

The gradient claim under test: every rank gathers the global batch with all_gather_with_grad and
computes the same global loss; after backward, data-parallel averaging (divide by world size)
leaves each rank with exactly the single-process full-batch gradient of its own rows.
"""

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalelab.losses import all_gather, all_gather_with_grad, contrastive_loss

from .helpers import rel_err

WORLD = 2
BATCH = 12  # global: BATCH // WORLD rows per rank
DIM = 5
SCALE = 23.0
BLOCK_SIZES = (None, 5)
TIMEOUT_S = 120


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=-1)
    return img, txt


def _rank_gradients(rank: int, block_size: int | None) -> dict[str, torch.Tensor]:
    img_full, txt_full = _global_batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    img = img_full[rows].clone().requires_grad_()
    txt = txt_full[rows].clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    all_img, all_txt = all_gather_with_grad(img), all_gather_with_grad(txt)
    loss = contrastive_loss(all_img, all_txt, scale, block_size=block_size)
    loss.backward()
    return {"loss": loss.detach(), "image": img.grad, "text": txt.grad, "scale": scale.grad}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        img_full, _ = _global_batch()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        result = {"gathered": all_gather(img_full[rows])}
        for block_size in BLOCK_SIZES:
            result[f"grads/{block_size}"] = _rank_gradients(rank, block_size)
        try:  # unequal shapes: every rank must get the same clear error (and none may hang)
            all_gather(torch.zeros(3 - rank, 2))
        except ValueError as err:
            result["shape_error"] = str(err)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Run the two-rank job once; each rank's results, in rank order."""
    tmp = tmp_path_factory.mktemp("gather")
    ctx = mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"two-rank job did not finish within {TIMEOUT_S}s")
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


def test_all_gather_returns_the_global_batch_in_rank_order(rank_results):
    img_full, _ = _global_batch()
    for result in rank_results:
        assert torch.equal(result["gathered"], img_full)
        assert not result["gathered"].requires_grad


def test_all_gather_refuses_unequal_shapes_on_every_rank(rank_results):
    for result in rank_results:
        assert "same shape on every rank" in result["shape_error"]
        assert "[(3, 2), (2, 2)]" in result["shape_error"]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_gathered_loss_with_dp_averaging_matches_single_process(rank_results, block_size):
    img_full, txt_full = _global_batch()
    img, txt = img_full.clone().requires_grad_(), txt_full.clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(img, txt, scale, block_size=block_size)
    loss.backward()

    ranks = [result[f"grads/{block_size}"] for result in rank_results]
    for r in ranks:  # every rank computed the same global loss
        assert rel_err(r["loss"], loss.detach()) <= 1e-12
    # Data-parallel averaging: each rank's own-row gradients divided by the world size...
    image_grad = torch.cat([r["image"] / WORLD for r in ranks])
    text_grad = torch.cat([r["text"] / WORLD for r in ranks])
    assert rel_err(image_grad, img.grad) <= 1e-10
    assert rel_err(text_grad, txt.grad) <= 1e-10
    # ...while the scale, which does not pass through the gather, averages identical values.
    scale_grad = sum(r["scale"] for r in ranks) / WORLD
    assert rel_err(scale_grad, scale.grad) <= 1e-10


def test_uninitialised_fallback_returns_input_and_keeps_autograd():
    assert not dist.is_initialized()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert all_gather(x) is x
    gathered = all_gather_with_grad(x)
    assert gathered is x
    (gathered * 2.0).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_single_rank_group_returns_input(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        x = torch.randn(4, 3, requires_grad=True)
        assert all_gather(x) is x
        assert all_gather_with_grad(x) is x
    finally:
        dist.destroy_process_group()
