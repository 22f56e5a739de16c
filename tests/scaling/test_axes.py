import json
import re

import pytest

from scalelab.scaling import axis_trends, fit_axes, flat_fit_metrics

from .conftest import METRIC, make_grid


def test_fit_axes_on_a_2x2x2_grid(grid):
    fits = fit_axes(grid, METRIC, predict_compute=1e18, bootstrap=100)
    json.loads(json.dumps(fits, allow_nan=False))  # strict JSON: fits.json must load anywhere
    assert fits["metric"] == METRIC and fits["n_trials"] == 8
    expected = {"data": {"model", "batch"}, "model": {"data", "batch"}, "batch": {"data", "model"}}
    for axis, fixed in expected.items():
        assert len(fits[axis]) == 4, axis  # one curve per combination of the two fixed axes
        for curve in fits[axis]:
            assert set(curve["fixed"]) == fixed and curve["n"] == 2 and curve["r2"] == pytest.approx(1.0)
    # the synthetic law: err ∝ data^-0.1 · params^-0.05 · batch^-0.02
    assert all(c["b"] == pytest.approx(-0.1, abs=1e-9) for c in fits["data"])
    assert all(c["b"] == pytest.approx(-0.05, abs=1e-9) for c in fits["model"])
    assert all(c["b"] == pytest.approx(-0.02, abs=1e-9) for c in fits["batch"])
    assert {tuple(c["models"]) for c in fits["model"]} == {("tiny", "small")}
    fr = fits["frontier"]
    assert 2 <= fr["n_points"] <= 5 and fr["B"] < 0
    lo, hi = fr["b_ci"]
    assert lo <= fr["B"] <= hi
    assert fits["prediction"]["compute"] == 1e18
    assert fits["prediction"]["error"] == pytest.approx(fr["A"] * 1e18 ** fr["B"])


def test_fit_axes_uses_only_finished_trials_and_best_of_duplicates():
    grid = make_grid()
    dup = make_grid()[0]
    dup.trial_id, dup.extra = "lr-better", {"lr": 3e-3}
    dup.metrics = {METRIC: grid[0].metrics[METRIC] + 0.05}  # a better run at the same grid point
    failed = make_grid()[1]
    failed.trial_id, failed.state, failed.metrics = "crashed", "ERROR", {METRIC: 0.999}
    fits = fit_axes([*grid, dup, failed], METRIC, bootstrap=10)
    assert fits["n_trials"] == 9
    ids = {t for axis in ("data", "model", "batch") for c in fits[axis] for t in c["trial_ids"]}
    assert "lr-better" in ids and "t000" not in ids and "crashed" not in ids


def test_fit_axes_one_value_axes_and_no_frontier():
    one = make_grid(datas=(1000,), models=("tiny",), batches=(256, 1024))
    fits = fit_axes(one, METRIC, predict_compute=1e20, bootstrap=10)
    assert fits["data"] == [] and fits["model"] == [] and len(fits["batch"]) == 1
    assert fits["frontier"] is None and "bins" in fits["frontier_error"]  # same compute: one bin
    assert "prediction" not in fits
    empty = fit_axes([], METRIC)
    assert empty["frontier"] is None and empty["data"] == []


def test_flat_fit_metrics_keys_are_stable_and_safe(grid):
    grid[0].model = grid[1].model = "ViT:B/16"  # a name with characters MLflow rejects
    fits = fit_axes(grid, METRIC, predict_compute=1e18, bootstrap=100)
    flat = flat_fit_metrics(fits)
    for key in ("fit/frontier/B", "fit/frontier/A", "fit/frontier/r2", "fit/frontier/B_ci_lo",
                "fit/frontier/B_ci_hi", "fit/prediction/error", "fit/data/small-b1024/b",
                "fit/model/d100000-b256/b", "fit/batch/d1000000-tiny/r2"):
        assert key in flat, key
    assert all(re.fullmatch(r"[A-Za-z0-9_\-. /]+", k) for k in flat)
    assert "fit/batch/d100000-ViT_B/16/b" in flat
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["fit/frontier/B"] == fits["frontier"]["B"]
    assert flat_fit_metrics({"frontier": None, "data": []}) == {}


def test_fit_axes_without_compute_still_fits_axes(grid):
    for r in grid:
        r.compute = 0.0  # not logged
    fits = fit_axes(grid, METRIC, bootstrap=10)
    assert fits["frontier"] is None and len(fits["data"]) == 4
    with pytest.raises(ValueError, match="predict_compute"):
        fit_axes(grid, METRIC, predict_compute=-1.0)


def test_axis_trends_count_falling_curves_and_average_per_value():
    grid = make_grid()
    trends = axis_trends(fit_axes(grid, METRIC, bootstrap=10))
    assert {axis: (t["curves"], t["falling"]) for axis, t in trends.items()} == {
        "data": (4, 4), "model": (4, 4), "batch": (4, 4)}
    # naive per-value means of the error 1 - top1
    axes = {"data": (100_000, 1_000_000), "model": ("tiny", "small"), "batch": (256, 1024)}
    for axis, values in axes.items():
        expected = [sum(1 - r.metrics[METRIC] for r in grid if getattr(r, axis) == v) / 4 for v in values]
        got = trends[axis]["mean_error"]
        assert [v for v, _ in got] == list(values)
        assert [e for _, e in got] == pytest.approx(expected, rel=1e-12)
    # one trial made worse than its smaller-batch neighbour breaks exactly one batch curve
    worse = next(r for r in grid if r.batch == 1024)
    worse.metrics = {METRIC: 0.0}
    assert axis_trends(fit_axes(grid, METRIC, bootstrap=10))["batch"]["falling"] == 3
    assert axis_trends(fit_axes(make_grid(datas=(1000,)), METRIC, bootstrap=10)).keys() == {"model", "batch"}
