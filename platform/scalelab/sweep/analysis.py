"""Fits and plots of a sweep, written to a folder and/or logged to the sweep's parent MLflow run.

Re-run after every finished trial and at the end (`runner`), and offline by `scalelab plot`. The
primary metric (e.g. in-distribution zero-shot top-1) gives `fits.json["primary"]` and `plots/*.png`;
the robustness metric, when configured and reported, gives `fits.json["robustness"]` and
`plots/robustness/*.png`. Fit parameters also become parent-run metrics (`fit/...`,
`robustness/fit/...`) with step = the number of finished trials, so their history shows how the
estimates settled as the sweep progressed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalelab.scaling import TrialResult, axis_trends, fit_axes, flat_fit_metrics, make_plots, write_csv
from scalelab.sweep.results import SweepState

__all__ = ["Analysis", "analyse", "log_analysis", "summary_lines", "write_analysis"]


@dataclass
class Analysis:
    fits: dict[str, Any]
    figures: dict[str, Any]  # artifact path -> matplotlib Figure
    metrics: dict[str, float]
    finished: int


def analyse(state: SweepState, results: list[TrialResult]) -> Analysis:
    finished = sum(r.finished for r in results)
    fits: dict[str, Any] = {"primary": fit_axes(results, state.metric, predict_compute=state.predict_compute)}
    figures = make_plots(results, fits["primary"], state.metric)
    metrics = flat_fit_metrics(fits["primary"])
    robust = state.robustness_metric
    if robust and any(robust in r.metrics for r in results if r.finished):
        fits["robustness"] = fit_axes(results, robust, predict_compute=state.predict_compute)
        extra = make_plots(results, fits["robustness"], robust)
        figures.update({k.replace("plots/", "plots/robustness/", 1): v for k, v in extra.items()
                        if k != "plots/loss_curves.png"})
        metrics.update({f"robustness/{k}": v for k, v in flat_fit_metrics(fits["robustness"]).items()})
    return Analysis(fits, figures, metrics, finished)


def write_analysis(out_dir: str | Path, results: list[TrialResult], analysis: Analysis) -> Path:
    """results.csv, fits.json and plots/*.png under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "results.csv")
    (out / "fits.json").write_text(json.dumps(analysis.fits, indent=1))
    for path, fig in analysis.figures.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110, bbox_inches="tight")
    return out


def log_analysis(state: SweepState, results: list[TrialResult], analysis: Analysis, scratch: Path) -> None:
    """Everything `write_analysis` writes, as artifacts of the parent run, plus the fit metrics."""
    from scalelab.tracking import RunHandle

    parent = RunHandle(state.tracking_uri, state.parent_run_id)
    out = write_analysis(scratch, results, analysis)
    parent.log_artifact(out / "results.csv")
    parent.log_artifact(out / "fits.json")
    for path, fig in analysis.figures.items():
        parent.log_figure(fig, path)
    parent.log_metrics({**analysis.metrics, "sweep/finished_trials": float(analysis.finished)},
                       step=analysis.finished)


def summary_lines(state: SweepState, results: list[TrialResult], analysis: Analysis) -> list[str]:
    """The results table and the fitted laws, as printed at the end of a sweep and by `scalelab plot`."""
    head = f"{'trial':<28} {'state':<10} {'samples':>9} {'GMACs':>10} {'loss':>7}"
    lines = [f"{head} {_short(state.metric):>10}"]
    for r in results:
        loss = r.curve[-1][1] if r.curve else float("nan")
        value = r.metrics.get(state.metric, float("nan"))
        lines.append(f"{r.trial_id:<28} {r.state:<10} {r.samples_seen:>9} {r.compute / 1e9:>10.4g} "
                     f"{loss:>7.3f} {value:>10.4f}")
    for key, fits in analysis.fits.items():
        frontier = fits.get("frontier")
        if frontier:
            lo, hi = frontier["b_ci"]
            law = f"E = {frontier['A']:.3g} * C^{frontier['B']:.3f}"
            lines.append(f"{key} frontier ({fits['metric']} error): {law}  R2 {frontier['r2']:.2f}  "
                         f"B {100 * frontier['ci']:.0f}% CI [{_num(lo)}, {_num(hi)}]")
        else:
            lines.append(f"{key} frontier: not fitted ({fits.get('frontier_error')})")
        if fits.get("prediction"):
            p = fits["prediction"]
            lines.append(f"  predicted error at {p['compute']:.3g} MACs: {p['error']:.4f}")
        for axis in ("data", "model", "batch"):
            for curve in fits.get(axis, []):
                if curve.get("b") is not None:
                    lines.append(f"  error vs {axis:<5} {_fixed(curve)}: exponent b = {curve['b']:+.3f}")
        for axis, trend in axis_trends(fits).items():
            means = " → ".join(f"{_value(v)}: {e:.3f}" for v, e in trend["mean_error"])
            lines.append(f"  along {axis:<5} error falls on {trend['falling']}/{trend['curves']} curves; "
                         f"mean error {means}")
    return lines


def _value(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _short(metric: str) -> str:
    return "/".join(metric.split("/")[-2:])[-10:]


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _fixed(curve: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (curve.get("fixed") or {}).items())
