"""The epoch plan without Ray: data-axis subset, per-epoch order, mixing, rank split, per-row crop seeds."""

import numpy as np
import pytest

from scalelab.config import ConfigError
from scalelab.data.plan import RowAugment, plan_epoch, select_subset, source_counts

from .conftest import data_cfg


def test_subset_is_fixed_whole_shards_plus_prefix(sources):
    a, _ = sources
    cfg = data_cfg([a], n_pairs=100, seed=3)
    slices = select_subset(cfg)
    assert select_subset(cfg) == slices
    assert [s.take for s in slices] == [40, 40, 20]  # two whole shards, a prefix of the last one
    assert len({s.path for s in slices}) == 3
    smaller = select_subset(data_cfg([a], n_pairs=50, seed=3))  # data-axis points are nested
    assert [(s.path, s.take) for s in smaller] == [(slices[0].path, 40), (slices[1].path, 10)]


def test_source_counts():
    cfg = data_cfg(["x", "y"], [3.0, 1.0], n_pairs=80)
    assert source_counts(cfg, [120, 80]) == [60, 20]
    assert source_counts(data_cfg(["x", "y"], [3.0, 1.0]), [120, 80]) == [120, 40]  # as many as weights allow
    assert source_counts(data_cfg(["x", "y"]), [120, 80]) == [80, 80]
    with pytest.raises(ConfigError, match="n_pairs"):
        source_counts(data_cfg(["x"], n_pairs=500), [120])


def test_same_rows_every_epoch_new_order(sources):
    a, b = sources
    cfg = data_cfg([a, b], n_pairs=150, seed=1)
    p0, p1 = plan_epoch(cfg, 0), plan_epoch(cfg, 1)
    rows = lambda p: list(zip(p.slice_id.tolist(), p.ordinal.tolist()))  # noqa: E731
    assert len(rows(p0)) == 150 and len(set(rows(p0))) == 150
    assert set(rows(p0)) == set(rows(p1)) and rows(p0) != rows(p1)
    assert rows(plan_epoch(cfg, 0)) == rows(p0)  # deterministic


def test_rank_split_is_disjoint_covers_and_keeps_the_global_order(sources):
    a, b = sources
    cfg = data_cfg([a, b], n_pairs=151)
    full = plan_epoch(cfg, 2)
    parts = [plan_epoch(cfg, 2, rank=r, world_size=3) for r in range(3)]
    assert [len(p) for p in parts] == [50, 50, 50]  # 151 // 3 each, one row left out
    for r, p in enumerate(parts):
        assert (p.index % 3 == r).all()
        assert (p.slice_id == full.slice_id[p.index]).all() and (p.ordinal == full.ordinal[p.index]).all()
    assert sorted(np.concatenate([p.index for p in parts]).tolist()) == list(range(150))
    with pytest.raises(ValueError, match="rank"):
        plan_epoch(cfg, 2, rank=3, world_size=3)


def test_mixing_proportions_hold_in_every_window(sources):
    a, b = sources
    cfg = data_cfg([a, b], [3.0, 1.0], seed=5)  # n_pairs None: 120 from a, 40 from b
    plan = plan_epoch(cfg, 0)
    src = np.array([plan.slices[s].source for s in plan.slice_id])
    assert (src == 1).sum() == 40 and len(src) == 160
    for start in range(0, 160, 16):
        assert abs((src[start : start + 16] == 1).sum() - 4) <= 2  # 16 / 4 = 4 per batch, ±2
    for r in range(2):  # each rank's own batches are mixed too (no aliasing with the pattern)
        mine = plan_epoch(cfg, 0, rank=r, world_size=2)
        share = np.mean([mine.slices[s].source == 1 for s in mine.slice_id])
        assert 0.15 < share < 0.35


def test_a_rows_crop_stream_depends_on_seed_epoch_and_index_only():
    draws = lambda aug, index: aug.rng(index).random(4).tolist()  # noqa: E731
    aug = RowAugment(seed=-3, epoch=2, crop_scale=(0.3, 1.0), hflip=True)  # negative seeds are valid
    assert draws(aug, 5) == draws(aug, 5)  # a resumed epoch redraws the same crop for row 5
    # The crop settings use the stream; they do not choose it.
    assert draws(RowAugment(-3, 2, (0.9, 1.0), False), 5) == draws(aug, 5)
    others = [draws(aug, 6), draws(RowAugment(-3, 3, (0.3, 1.0), True), 5),
              draws(RowAugment(4, 2, (0.3, 1.0), True), 5)]
    assert all(other != draws(aug, 5) for other in others)
