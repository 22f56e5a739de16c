"""Two data-parallel ranks (torch.distributed, gloo): the cached step over the gathered global batch,
followed by data-parallel gradient averaging, gives the single-process full-batch gradient — with both
towers trained, and with the image tower locked (LiT: encoded once, never replayed, no gradient)."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalelab.gradcache import NonFiniteError, cached_step
from scalelab.models import create_model

WORLD = 2
BATCH = 12  # global


def _setup(seed=0):
    torch.manual_seed(seed)
    model = create_model("micro").double().train()  # no dropout: ranks draw independent noise
    spec = model.config
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(BATCH, 3, spec.image_size, spec.image_size, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, spec.vocab_size, (BATCH, spec.context_length), generator=g)
    tokens[:, spec.context_length // 2 :] = 0
    return model, images, tokens


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, images, tokens = _setup()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        result = cached_step(model, images[rows], tokens[rows], micro_batch_size=4,
                             distributed=True, block_size=5)
        grads = _averaged_grads(model)
        model.zero_grad(set_to_none=True)
        model.lock_image_tower(True)
        locked = cached_step(model, images[rows], tokens[rows], micro_batch_size=4, text_micro_batch_size=3,
                             distributed=True, block_size=5, lock_image=True)
        torch.save({"grads": grads, "loss": result.loss, "locked_grads": _averaged_grads(model),
                    "locked_loss": locked.loss}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _averaged_grads(model) -> dict[str, torch.Tensor | None]:
    """What data-parallel training does with the gradients: average them over ranks."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_ranks_match_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    model, images, tokens = _setup()
    model.zero_grad(set_to_none=True)
    single = cached_step(model, images, tokens, micro_batch_size=BATCH)  # one micro-batch: plain step
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.lock_image_tower(True)
    single_locked = cached_step(model, images, tokens, micro_batch_size=BATCH, lock_image=True)
    want_locked = {k: p.grad for k, p in model.named_parameters()}
    assert all(want_locked[k] is None for k in want_locked if k.startswith("image_tower."))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(single.loss, rel=1e-12)
        assert got["locked_loss"] == pytest.approx(single_locked.loss, rel=1e-12)
        for key, expected in (("grads", want), ("locked_grads", want_locked)):
            for name, ref in expected.items():
                if ref is None:
                    assert got[key][name] is None, f"rank {rank} {name} ({key}) got a gradient"
                    continue
                err = (got[key][name] - ref).norm() / ref.norm()
                assert err <= 1e-10, f"rank {rank} {name} ({key}): relative error {err:.3g}"


def _nan_on_one_rank_worker(rank, init_file, out_dir):
    """Rank 1's rows hold a NaN, rank 0's are clean: both ranks must raise (or skip) together."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, images, tokens = _setup()
        images[BATCH - 1, 0, 0, 0] = float("nan")  # the last row: rank 1's
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        try:
            cached_step(model, images[rows], tokens[rows], micro_batch_size=4, distributed=True)
            raised = None
        except NonFiniteError as error:
            raised = str(error)
        skip = cached_step(model, images[rows], tokens[rows], micro_batch_size=4, distributed=True,
                           on_nonfinite="skip")
        dist.barrier()  # both ranks are still in step with each other
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch.save({"raised": raised, "skipped": skip.skipped, "loss": skip.loss, "grads": len(grads)},
                   f"{out_dir}/nan{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)  # before the fix, rank 1 raised alone and rank 0 waited in all_gather forever
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    mp.start_processes(_nan_on_one_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                       nprocs=WORLD, start_method="spawn", join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"nan{rank}.pt")
        assert got["raised"].startswith("non-finite image embeddings in 1 of 12 samples of the global "
                                        "batch (first rows: [11])"), got["raised"]
        assert got["skipped"] and math.isnan(got["loss"]) and got["grads"] == 0


def test_distributed_needs_a_process_group():
    model, images, tokens = _setup()
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        cached_step(model, images, tokens, micro_batch_size=4, distributed=True)
