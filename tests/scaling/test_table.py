import math

import pytest

from scalelab.scaling import TrialResult, error_of, read_csv, write_csv
from scalelab.scaling.table import is_accuracy_metric

from .conftest import METRIC


def test_csv_round_trip_is_exact(grid, tmp_path):
    grid[0].state = "ERROR"
    grid[1].metrics = {}  # a trial that reported nothing
    grid[2].extra = {"lr": 3e-4, "nested": {"a": [1, 2]}}
    grid[3].curve = []
    path = write_csv(grid, tmp_path / "sub" / "results.csv")
    back = read_csv(path)
    assert back == grid
    assert isinstance(back[2].extra["lr"], float) and isinstance(back[0].data, int)


def test_read_csv_rejects_other_tables(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_csv(path)


def test_error_of(grid):
    r = grid[0]
    assert error_of(r, METRIC) == pytest.approx(1.0 - r.metrics[METRIC])
    assert error_of(r, "train/loss") == r.metrics["train/loss"]  # losses are errors already
    expected = r"no metric 'eval/x/top1'.*available: eval/zeroshot/test/top1, train/loss"
    with pytest.raises(KeyError, match=expected):
        error_of(r, "eval/x/top1")


@pytest.mark.parametrize("key", ["eval/zeroshot/test/top1", "eval/zeroshot/robustness_avg/top5",
                                 "eval/retrieval/coco/i2t_r1", "eval/retrieval/coco/t2i_r10", "recall@5",
                                 "eval/x/accuracy"])
def test_accuracy_like(key):
    assert is_accuracy_metric(key)


@pytest.mark.parametrize("key", ["train/loss", "eval/loss", "train/lr"])
def test_not_accuracy_like(key):
    assert not is_accuracy_metric(key)


def test_default_state_is_finished():
    r = TrialResult("a", 1, "m", 2, 3, 4, 5, 6.0, 7.0)
    assert r.finished and r.metrics == {} and r.curve == [] and not math.isnan(r.compute)
