"""The sweep's analysis of a results table: fits (with the held-out check), metrics, plots, summary."""

import itertools
import json

import pytest

from scalelab.scaling import TrialResult
from scalelab.sweep.analysis import analyse, holdout_lines, summary_lines, write_analysis
from scalelab.sweep.results import SweepState

METRIC = "eval/zeroshot/test/top1"
ROBUST = "eval/zeroshot/shifted/top1"
PRESETS = {"tiny": 1_000_000, "small": 8_000_000}


def make_grid(datas=(100_000, 1_000_000), models=("tiny", "small"), batches=(256, 1024)) -> list[TrialResult]:
    """Error = 4·data^-0.1·params^-0.05·batch^-0.02 exactly; compute = 4 × forward MACs × samples."""
    results = []
    for i, (d, m, b) in enumerate(itertools.product(datas, models, batches)):
        params, samples = PRESETS[m], 2 * d
        err = 4.0 * d**-0.1 * params**-0.05 * b**-0.02
        results.append(TrialResult(
            trial_id=f"t{i:03d}", data=d, model=m, batch=b, params=params, macs_per_sample=2 * params,
            samples_seen=samples, compute=4.0 * 2 * params * samples, wall_s=1.0,
            metrics={METRIC: 1.0 - err}, curve=[(s, 5.0 / (1 + s / 1000)) for s in (256, 4096, samples)]))
    return results


def _state(**changes) -> SweepState:
    state = SweepState("s", "sqlite:///unused.db", "0", "run", metric=METRIC, robustness_metric=None,
                       predict_compute=None)
    for key, value in changes.items():
        setattr(state, key, value)  # `holdout` may not be a SweepState field (sweep.json before it)
    return state


@pytest.fixture
def results():
    grid = make_grid(datas=(100_000, 300_000, 1_000_000))  # 3 data values: the data law can predict
    for r in grid:
        r.metrics[ROBUST] = r.metrics[METRIC] - 0.05
    return grid


def test_analysis_carries_the_holdout_everywhere(results, tmp_path):
    analysis = analyse(_state(), results)  # no `holdout` attribute: the default, the top compute level
    ho = analysis.fits["primary"]["holdout"]
    assert ho["n"] == 2 and {t["data"] for t in ho["trials"]} == {1_000_000}
    assert ho["summary"]["axes"]["n"] == 2  # each held-out trial predicted by its error-vs-data curve
    assert ho["summary"]["axes"]["mean_abs_rel_error"] < 1e-9  # the synthetic law is exact per axis
    for key in ("holdout/n", "holdout/frontier/mean_abs_rel_error", "holdout/frontier/inside_band_frac",
                "holdout/axes/mean_abs_rel_error", "holdout/axes/data/mean_abs_rel_error"):
        assert key in analysis.metrics, key
    assert "plots/holdout.png" in analysis.figures
    out = write_analysis(tmp_path, results, analysis)
    assert json.loads((out / "fits.json").read_text())["primary"]["holdout"] == ho
    assert (out / "plots" / "holdout.png").stat().st_size > 1000
    lines = summary_lines(_state(), results, analysis)
    text = "\n".join(lines)
    assert "holdout: held out the largest-compute 2 trials" in text and "laws fitted on the other 10" in text
    best = next(t for t in ho["trials"] if t["frontier_point"])
    assert (f"{best['trial_id']}: frontier predicts error {best['predicted']:.4f} (95% band "
            f"[{best['band'][0]:.4f}, {best['band'][1]:.4f}]) vs measured {best['measured']:.4f}, "
            f"rel. error {100 * best['rel_error']:+.1f}%") in text
    assert "error-vs-data law" in text
    assert ("frontier: mean |rel. error| 0.3% over 1 held-out frontier point(s), 1/1 inside band; "
            "per-axis laws: mean |rel. error| 0.0% over 2 prediction(s)") in text


def test_state_holdout_is_honoured_and_robustness_gets_its_own(results):
    analysis = analyse(_state(holdout=0.5, robustness_metric=ROBUST), results)
    assert analysis.fits["primary"]["holdout"]["n"] == 6  # ceil(0.5 · 12), whole compute levels
    assert analysis.fits["robustness"]["holdout"]["n"] == 6
    assert "robustness/holdout/frontier/mean_abs_rel_error" in analysis.metrics
    assert "plots/robustness/holdout.png" in analysis.figures
    off = analyse(_state(holdout=0), results)
    assert off.fits["primary"]["holdout"] is None and "plots/holdout.png" not in off.figures
    assert not any(k.startswith("holdout/") for k in off.metrics)
    assert not any("holdout" in line for line in summary_lines(_state(), results, off))


def test_too_few_trials_say_not_fitted():
    few = make_grid(datas=(1000,), models=("tiny",), batches=(256, 1024))
    analysis = analyse(_state(), few)
    lines = summary_lines(_state(), few, analysis)
    assert any(line.startswith("  holdout: not fitted (holding out 2 trials leaves no trial")
               for line in lines)
    two = make_grid(datas=(1000,), models=("tiny", "small"), batches=(256,))
    lines = holdout_lines(analyse(_state(), two).fits["primary"]["holdout"])
    assert "frontier: not fitted (fitting the frontier on the 1 remaining trials" in lines[1]
    assert "no frontier prediction" in lines[2] and lines[3].startswith("    nothing to score")
