"""lr_at: warmup, peak, cosine, floor, monotonicity, resume continuity; apply_lr."""

import itertools
import math

import pytest
import torch

from scalelab.config import ImageTrainConfig, OptimConfig
from scalelab.train.schedule import apply_lr, image_locked_at, lr_at, lr_for

KW = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)


def test_warmup_is_linear_from_zero_and_peaks_at_its_last_step():
    assert [lr_at(s, **KW) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(9, **KW) == 1.0
    assert lr_at(10, **KW) == 1.0  # cosine starts at the peak


def test_cosine_midpoint_and_floor():
    assert lr_at(60, **KW) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, **KW) == pytest.approx(0.1)
    assert lr_at(500, **KW) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_at(109, **KW) > 0.1


def test_monotone_after_warmup():
    values = [lr_at(s, **KW) for s in range(10, 130)]
    assert all(b <= a for a, b in itertools.pairwise(values))


def test_no_warmup_starts_at_peak_and_zero_floor_reaches_zero():
    kw = dict(peak_lr=3e-4, warmup_steps=0, total_steps=4, min_lr_ratio=0.0)
    assert lr_at(0, **kw) == 3e-4
    assert lr_at(2, **kw) == pytest.approx(1.5e-4)
    assert lr_at(4, **kw) == pytest.approx(0.0, abs=1e-20)


def test_resume_continues_the_same_curve():
    total = KW["total_steps"]
    uninterrupted = []
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    for s in range(total):
        apply_lr(opt, lr_at(s, **KW))
        uninterrupted.append(opt.param_groups[0]["lr"])
    for resume_at in (1, 9, 10, 57):
        fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)  # rebuilt on resume
        resumed = []
        for s in range(resume_at, total):
            apply_lr(fresh, lr_at(s, **KW))
            resumed.append(fresh.param_groups[0]["lr"])
        assert resumed == uninterrupted[resume_at:]  # exactly, not approximately


def test_refuses_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, peak_lr=1.0, warmup_steps=10, total_steps=10, min_lr_ratio=0.0)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, **KW)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_at(0, **{**KW, "min_lr_ratio": 1.5})


def test_lr_for_reads_optim_config():
    cfg = OptimConfig(lr=2e-3, warmup_steps=4, min_lr_ratio=0.5)
    assert lr_for(1, cfg, 20) == pytest.approx(1e-3)
    assert lr_for(20, cfg, 20) == pytest.approx(1e-3)
    assert lr_for(12, cfg, 20) == pytest.approx(1e-3 + 1e-3 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_apply_lr_sets_every_group_including_tensor_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}])
    apply_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    c = torch.nn.Parameter(torch.zeros(2))
    tensor_lr = torch.optim.AdamW([c], lr=torch.tensor(0.01))
    held = tensor_lr.param_groups[0]["lr"]
    apply_lr(tensor_lr, 0.5)
    assert tensor_lr.param_groups[0]["lr"] is held and held.item() == 0.5


def test_apply_lr_honours_each_groups_multiplier_and_pauses():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]
    optimizer = torch.optim.AdamW([
        {"params": [params[0]], "name": "decay"},
        {"params": [params[1]], "name": "no_decay"},
        {"params": [params[2]], "name": "image_tower.decay", "lr_mult": 0.25},
        {"params": [params[3]], "name": "image_tower.no_decay", "lr_mult": 0.25},
    ], lr=1.0)
    apply_lr(optimizer, 0.4)
    assert [g["lr"] for g in optimizer.param_groups] == [0.4, 0.4, 0.1, 0.1]
    apply_lr(optimizer, 0.4, paused=("image_tower.decay", "image_tower.no_decay"))
    assert [g["lr"] for g in optimizer.param_groups] == [0.4, 0.4, 0.0, 0.0]


@pytest.mark.parametrize(("image", "locked"), [
    ({}, [False] * 4),
    ({"lock": True}, [True] * 4),
    ({"lock": True, "unlock_at_step": 2}, [True, True, False, False]),  # step 2 is the first to train
])
def test_image_locked_at_counts_steps_already_taken(image, locked):
    assert [image_locked_at(s, ImageTrainConfig(**image)) for s in range(4)] == locked
