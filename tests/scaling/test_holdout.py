"""Held-out validation: laws fitted without the largest-compute trials predict those trials."""

import json
import math

import numpy as np
import pytest

from scalelab.scaling import (
    COMPUTE_AXIS_LABEL,
    TrialResult,
    fit_axes,
    fit_holdout,
    flat_fit_metrics,
    make_plots,
)
from scalelab.scaling.fits import fit_frontier

from .conftest import METRIC, make_grid
from .reference import per_bin_argmin

LOSS = "train/loss"  # a "lower is better" metric: the error is the value itself


def _data_sweep(n=8, b=-0.1, noise=0.005, seed=0, plateau_last=0) -> list[TrialResult]:
    """One model and batch, data from 1e4 to 1e7 pairs: C ∝ data and E = 5·C^b exactly, times a small
    log-normal noise. plateau_last=k: the k largest-compute trials stop improving (the law breaks)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, d in enumerate(np.logspace(4, 7, n).astype(int)):
        compute = 4.0 * 2_000_000 * 2 * int(d)
        err = 5.0 * compute**b * math.exp(rng.normal(0.0, noise))
        out.append(TrialResult(
            trial_id=f"d{i}", data=int(d), model="tiny", batch=256, params=1_000_000,
            macs_per_sample=2_000_000, samples_seen=2 * int(d), compute=compute, wall_s=1.0,
            metrics={LOSS: err}, curve=[(10, 5.5), (2 * int(d), 5.0)]))
    for r in out[n - plateau_last:]:
        r.metrics[LOSS] = out[n - plateau_last - 1].metrics[LOSS]
    return out


def test_power_law_sweep_is_predicted_within_its_band():
    ho = fit_holdout(_data_sweep(), LOSS)
    assert (ho["n"], ho["n_fit"]) == (1, 7)
    (t,) = ho["trials"]
    assert t["trial_id"] == "d7" and t["frontier_point"] and t["best_at_point"]
    assert abs(t["rel_error"]) < 0.01 and t["inside_band"] is True
    lo, hi = t["band"]
    assert lo < t["predicted"] < hi and hi / lo < 1.1  # informative, not vacuous
    (axis,) = t["axes"]  # only the data axis has a curve through the held-out trial
    assert axis["axis"] == "data" and abs(axis["rel_error"]) < 0.01 and axis["n"] == 7
    s = ho["summary"]
    assert s["frontier"] == {"mean_abs_rel_error": abs(t["rel_error"]), "n": 1, "inside_band_frac": 1.0}
    assert s["axes"] == {"mean_abs_rel_error": abs(axis["rel_error"]), "n": 1}
    assert s["by_axis"] == {"data": s["axes"]}


def test_holdout_fits_match_a_naive_numpy_reference():
    results = _data_sweep(n=10, noise=0.02, seed=3)
    boot, seed, ci = 300, 5, 0.9
    ho = fit_holdout(results, LOSS, holdout=2, bins=4, bootstrap=boot, seed=seed, ci=ci)
    rest, held = results[:8], results[8:]
    assert [t["trial_id"] for t in ho["trials"]] == ["d9", "d8"]  # largest compute first
    lc = np.log10([r.compute for r in rest])
    le = np.log10([r.metrics[LOSS] for r in rest])
    idx = per_bin_argmin(lc, 10**le, 4)
    assert [p["trial_id"] for p in ho["frontier"]["points"]] == [rest[i].trial_id for i in idx]
    slope, intercept = np.polyfit(lc[idx], le[idx], 1)
    fr = ho["frontier"]
    np.testing.assert_allclose([fr["A"], fr["B"]], [10**intercept, slope], rtol=1e-10)
    assert fr["b_ci"] == pytest.approx(list(fit_frontier(
        [r.compute for r in rest], [r.metrics[LOSS] for r in rest], bins=4, bootstrap=boot, seed=seed,
        ci=ci).b_ci), rel=1e-12)
    # the band: the same resamples of the frontier points, each refitted by polyfit, predicting
    rng = np.random.default_rng(seed)
    held_lc = np.log10([r.compute for r in held])
    preds = []
    for _ in range(boot):
        pick = rng.integers(0, len(idx), size=len(idx))
        x, y = lc[idx][pick], le[idx][pick]
        if np.unique(x).size >= 2:
            preds.append(np.polyval(np.polyfit(x, y, 1), held_lc))
    lo, hi = 10 ** np.percentile(preds, [5, 95], axis=0)
    for k, (t, r) in enumerate(zip(ho["trials"], reversed(held))):
        assert t["measured"] == r.metrics[LOSS]
        assert t["predicted"] == pytest.approx(10 ** np.polyval([slope, intercept], held_lc[::-1][k]),
                                               rel=1e-10)
        assert t["band"] == pytest.approx([lo[::-1][k], hi[::-1][k]], rel=1e-9)
        assert t["rel_error"] == pytest.approx((t["predicted"] - t["measured"]) / t["measured"], rel=1e-12)
        assert t["inside_band"] == bool(t["band"][0] <= t["measured"] <= t["band"][1])
        # per-axis law: plain polyfit of log error on log data over the 8 remaining points
        b, a = np.polyfit(np.log10([q.data for q in rest]), le, 1)
        assert t["axes"][0]["predicted"] == pytest.approx(10**a * r.data**b, rel=1e-10)


def test_a_plateau_beyond_the_fit_is_caught():
    ho = fit_holdout(_data_sweep(noise=0.0, plateau_last=2), LOSS, holdout=2)
    assert ho["n"] == 2
    for t in ho["trials"]:
        assert t["inside_band"] is False
        assert t["rel_error"] < -0.05  # the law promised a lower error than the trials reached
    s = ho["summary"]
    assert s["frontier"]["inside_band_frac"] == 0.0 and s["frontier"]["mean_abs_rel_error"] > 0.05
    assert s["axes"]["mean_abs_rel_error"] > 0.05
    # the same sweep without the plateau: an exact law, predicted exactly, inside its zero-width band
    good = fit_holdout(_data_sweep(noise=0.0), LOSS, holdout=2)
    assert good["summary"]["frontier"]["mean_abs_rel_error"] < 1e-9
    assert good["summary"]["frontier"]["inside_band_frac"] == 1.0
    assert all(t["band"][1] / t["band"][0] - 1 < 1e-9 for t in good["trials"])


def test_which_trials_are_held_out():
    grid = make_grid()  # compute ∝ data × params: four levels, each holding both batches
    top = {r.trial_id for r in grid if r.data == 1_000_000 and r.model == "small"}
    by_rule = {rule: {t["trial_id"] for t in fit_holdout(grid, METRIC, holdout=rule, bootstrap=20)["trials"]}
               for rule in (None, 1, 2, 2.0, 0.25, 0.5)}
    assert by_rule[None] == by_rule[1] == by_rule[2] == by_rule[2.0] == by_rule[0.25] == top
    assert len(by_rule[0.5]) == 4 and top < by_rule[0.5]  # ceil(0.5 · 8) trials = the top two levels
    assert fit_holdout(grid, METRIC, holdout=0) is None
    ho = fit_holdout(grid, METRIC, bootstrap=20)
    # at one compute the frontier predicts the best trial: the other is reported, not scored
    assert sorted(t["frontier_point"] for t in ho["trials"]) == [False, True]
    best = min(ho["trials"], key=lambda t: t["measured"])
    assert best["frontier_point"] and best["batch"] == 1024 and ho["summary"]["frontier"]["n"] == 1
    for bad in (-1, 1.5, True, math.nan, "2"):
        with pytest.raises(ValueError, match="holdout must be"):
            fit_holdout(grid, METRIC, holdout=bad)


def test_nearly_equal_computes_are_one_level():
    results = _data_sweep(n=6, noise=0.0)
    twin = _data_sweep(n=6, noise=0.0)[-1]
    twin.trial_id, twin.batch, twin.compute = "twin", 512, twin.compute * 0.95  # batch rounding
    ho = fit_holdout([*results, twin], LOSS, bootstrap=20)
    assert {t["trial_id"] for t in ho["trials"]} == {"d5", "twin"} and ho["n_fit"] == 5


def test_too_few_trials_say_why_and_never_crash():
    one_level = make_grid(datas=(1000,), models=("tiny",), batches=(256, 1024))
    ho = fit_holdout(one_level, METRIC)
    assert ho["n"] == 0 and ho["trials"] == [] and "leaves no trial to fit" in ho["error"]
    assert ho["summary"]["frontier"]["mean_abs_rel_error"] is None
    two_levels = make_grid(datas=(1000,), models=("tiny", "small"), batches=(256,))
    ho = fit_holdout(two_levels, METRIC)
    assert ho["n"] == 1 and ho["frontier"] is None and "2 points" in ho["frontier_error"]
    assert ho["trials"][0]["predicted"] is None and ho["trials"][0]["axes"] == []
    assert ho["summary"]["frontier"] == {"mean_abs_rel_error": None, "n": 0, "inside_band_frac": None}
    assert "error" in fit_holdout([], METRIC)
    for r in one_level:
        r.compute = 0.0  # compute not logged
    assert "no finished trial" in fit_holdout(one_level, METRIC)["error"]
    for case in (one_level, two_levels, []):
        fits = fit_axes(case, METRIC, bootstrap=10)
        fits["holdout"] = fit_holdout(case, METRIC, bootstrap=10)
        json.dumps(fits, allow_nan=False)
        assert "plots/holdout.png" not in make_plots(case, fits, METRIC)


def test_json_flat_metrics_and_plot(tmp_path):
    results = _data_sweep(plateau_last=1)
    fits = fit_axes(results, LOSS, bootstrap=100)
    fits["holdout"] = fit_holdout(results, LOSS, holdout=2, bootstrap=100)
    back = json.loads(json.dumps(fits, allow_nan=False))
    assert back["holdout"] == fits["holdout"]
    no_band = fit_holdout(results, LOSS, bootstrap=0)
    json.dumps(no_band, allow_nan=False)
    assert no_band["trials"][0]["band"] == [None, None] and no_band["trials"][0]["inside_band"] is None
    assert no_band["summary"]["frontier"]["inside_band_frac"] is None
    flat = flat_fit_metrics(fits)
    s = fits["holdout"]["summary"]
    assert flat["holdout/n"] == 2.0 and flat["holdout/n_fit"] == 6.0
    assert flat["holdout/frontier/mean_abs_rel_error"] == s["frontier"]["mean_abs_rel_error"]
    assert flat["holdout/frontier/inside_band_frac"] == s["frontier"]["inside_band_frac"]
    assert flat["holdout/axes/mean_abs_rel_error"] == s["axes"]["mean_abs_rel_error"]
    assert flat["holdout/axes/data/mean_abs_rel_error"] == s["axes"]["mean_abs_rel_error"]
    assert flat["holdout/frontier/B"] == fits["holdout"]["frontier"]["B"]
    assert all(isinstance(v, float) for v in flat.values())
    fig = make_plots(results, fits, LOSS)["plots/holdout.png"]
    ax = fig.axes[0]
    assert ax.get_xlabel() == COMPUTE_AXIS_LABEL and ax.get_xscale() == "log"
    legend = " | ".join(t.get_text() for t in ax.get_legend().get_texts())
    for phrase in ("fitted on: 6 trials", "95% bootstrap band", "held out, measured",
                   "predicted by the frontier", "error-vs-data law"):
        assert phrase in legend
    assert "2 largest-compute trials" in ax.get_title()
    fig.savefig(tmp_path / "holdout.png", dpi=60)
    assert (tmp_path / "holdout.png").read_bytes()[:4] == b"\x89PNG"
