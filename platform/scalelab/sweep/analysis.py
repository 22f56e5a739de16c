"""Fits and plots of a sweep, written to a folder and/or logged to the sweep's parent MLflow run.

Re-run after every finished trial and at the end (`runner`), and offline by `scalelab plot`. The
primary metric (e.g. in-distribution zero-shot top-1) gives `fits.json["primary"]` and `plots/*.png`;
the robustness metric, when configured and reported, gives `fits.json["robustness"]` and
`plots/robustness/*.png`. Fit parameters also become parent-run metrics (`fit/...`,
`robustness/fit/...`) with step = the number of finished trials, so their history shows how the
estimates settled as the sweep progressed.

Each fit also carries a held-out check (`scalelab.scaling.fit_holdout`, under "holdout" in fits.json,
`holdout/...` metrics, `plots/holdout.png`): the laws fitted without the largest-compute trials predict
them. Which trials are held out comes from `state.holdout` when the sweep state has one (None: the
largest compute level; a count; a fraction; 0: off).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scalelab.scaling import (
    TrialResult,
    axis_trends,
    fit_axes,
    fit_holdout,
    flat_fit_metrics,
    make_plots,
    write_csv,
)
from scalelab.sweep.results import SweepState
from scalelab.train.compute import COMPUTE_CONVENTION

__all__ = ["Analysis", "analyse", "description", "fit_lines", "holdout_lines", "log_analysis",
           "summary_lines", "write_analysis"]


@dataclass
class Analysis:
    fits: dict[str, Any]
    figures: dict[str, Any]  # artifact path -> matplotlib Figure
    metrics: dict[str, float]
    finished: int


def _fit(state: SweepState, results: list[TrialResult], metric: str) -> dict[str, Any]:
    fits = fit_axes(results, metric, predict_compute=state.predict_compute)
    # getattr: sweep.json files written before the holdout option have no such field
    fits["holdout"] = fit_holdout(results, metric, holdout=getattr(state, "holdout", None))
    return fits


def analyse(state: SweepState, results: list[TrialResult]) -> Analysis:
    finished = sum(r.finished for r in results)
    fits: dict[str, Any] = {"primary": _fit(state, results, state.metric)}
    figures = make_plots(results, fits["primary"], state.metric)
    metrics = flat_fit_metrics(fits["primary"])
    robust = state.robustness_metric
    if robust and any(robust in r.metrics for r in results if r.finished):
        fits["robustness"] = _fit(state, results, robust)
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
    from scalelab.tracking import DESCRIPTION_TAG, RunHandle

    parent = RunHandle(state.tracking_uri, state.parent_run_id)
    out = write_analysis(scratch, results, analysis)
    parent.log_artifact(out / "results.csv")
    parent.log_artifact(out / "fits.json")
    # The PNGs write_analysis rendered, not the figures again: rendering is most of a refit's time (0.15 s
    # a figure, 22 figures at 27 trials), and the refit runs after every trial on the trials' cores.
    for folder in sorted({Path(path).parts[0] for path in analysis.figures}):  # "plots": all of them
        parent.log_artifact(out / folder, folder)
    parent.log_metrics({**analysis.metrics, "sweep/finished_trials": float(analysis.finished)},
                       step=analysis.finished)
    parent.set_tags({DESCRIPTION_TAG: description(state, results, analysis)})


def summary_lines(state: SweepState, results: list[TrialResult], analysis: Analysis) -> list[str]:
    """The results table and the fitted laws, as printed at the end of a sweep and by `scalelab plot`."""
    head = f"{'trial':<28} {'state':<10} {'samples':>9} {'GMACs':>10} {'loss':>7}"
    lines = [f"{head} {_short(state.metric):>10}"]
    for r in results:
        loss = r.curve[-1][1] if r.curve else float("nan")
        value = r.metrics.get(state.metric, float("nan"))
        lines.append(f"{r.trial_id:<28} {r.state:<10} {r.samples_seen:>9} {r.compute / 1e9:>10.4g} "
                     f"{loss:>7.3f} {value:>10.4f}")
    return lines + fit_lines(analysis)


# MLflow keeps at most 8000 characters of a tag (the description is the `mlflow.note.content` tag).
_DESCRIPTION_LIMIT = 7900


def description(state: SweepState, results: list[TrialResult], analysis: Analysis) -> str:
    """The parent run's description (Markdown, the first thing its MLflow page shows): the answer of
    the sweep — best trial, results table, fits, trends and the held-out check — and where the plots are."""
    done = [r for r in results if r.finished and state.metric in r.metrics]
    best = max(done, key=lambda r: r.metrics[state.metric], default=None)
    head = [f"### Sweep `{state.name}`: {analysis.finished}/{len(results)} trials finished",
            f"Metric: `{state.metric}` (the fits use its error, 1 − accuracy). "
            f"Compute: {COMPUTE_CONVENTION}."]
    if best is not None:
        head.append(f"Best: **{best.trial_id}** {state.metric.rsplit('/', 2)[-2]} "
                    f"{best.metrics[state.metric]:.4f}.")
    rows = []
    for r in results:
        loss = f"{r.curve[-1][1]:.3f}" if r.curve else ""
        value = r.metrics.get(state.metric)
        rows.append(f"| {r.trial_id} | {r.data} | {r.model} | {r.batch} | {r.state} | {r.samples_seen} | "
                    f"{r.compute / 1e9:.4g} | {loss} | {'' if value is None else f'{value:.4f}'} |")
    fits = "\n".join(["```", *fit_lines(analysis), "```"])
    tail = ("Plots: the run's artifacts `plots/` (error vs compute, data, params and batch; loss curves; the "
            "held-out check); numbers: `results.csv`, `fits.json`.")
    shown = len(rows)
    while True:  # a huge grid: the table gives way first
        more = [] if shown == len(rows) else [f"| … {len(rows) - shown} more in results.csv |||||||||"]
        table = "\n".join(["| trial | data | model | batch | state | samples | GMACs | loss | metric |",
                           "|---|--:|---|--:|---|--:|--:|--:|--:|", *rows[:shown], *more])
        text = "\n\n".join(["\n".join(head), table, fits, tail])
        if len(text) <= _DESCRIPTION_LIMIT or shown == 0:
            break
        shown -= 1
    return text[:_DESCRIPTION_LIMIT]


def fit_lines(analysis: Analysis) -> list[str]:
    """The fitted laws, per-axis trends and held-out check of every fitted metric."""
    lines: list[str] = []
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
        lines += holdout_lines(fits.get("holdout"))
    return lines


_MAX_HOLDOUT_LINES = 8


def holdout_lines(holdout: dict[str, Any] | None) -> list[str]:
    """The held-out check of one fit: what was held out, per held-out trial the frontier's prediction
    (band) vs the measurement and the per-axis laws' predictions, then the aggregates."""
    if not holdout:
        return []
    if holdout.get("error"):
        return [f"  holdout: not fitted ({holdout['error']})"]
    trials = "trial" if holdout["n"] == 1 else f"{holdout['n']} trials"
    lines = [f"  holdout: held out the largest-compute {trials} (compute >= "
             f"{holdout['compute_min']:.3g} MACs), laws fitted on the other {holdout['n_fit']}"]
    if holdout.get("frontier") is None:
        lines.append(f"    frontier: not fitted ({holdout.get('frontier_error')})")
    for t in holdout["trials"][:_MAX_HOLDOUT_LINES]:
        lines.append(f"    {t['trial_id']}: {_holdout_trial(t, holdout)}")
    if len(holdout["trials"]) > _MAX_HOLDOUT_LINES:
        lines.append(f"    ... {len(holdout['trials']) - _MAX_HOLDOUT_LINES} more in fits.json")
    fr, ax = holdout["summary"]["frontier"], holdout["summary"]["axes"]
    scores = []
    if fr["n"]:
        inside = ("" if fr["inside_band_frac"] is None
                  else f", {round(fr['inside_band_frac'] * fr['n'])}/{fr['n']} inside band")
        scores.append(f"frontier: mean |rel. error| {_pct(fr['mean_abs_rel_error'])} over {fr['n']} "
                      f"held-out frontier point(s){inside}")
    if ax["n"]:
        scores.append(f"per-axis laws: mean |rel. error| {_pct(ax['mean_abs_rel_error'])} over {ax['n']} "
                      "prediction(s)")
    nothing = "nothing to score: no frontier, and no per-axis curve through a held-out trial has 2 points"
    lines.append("    " + ("; ".join(scores) or nothing))
    return lines


def _holdout_trial(t: dict[str, Any], holdout: dict[str, Any]) -> str:
    if t["predicted"] is None:
        text = f"measured error {t['measured']:.4f} (no frontier prediction)"
    else:
        lo, hi = t["band"]
        band = "" if lo is None else f" ({100 * holdout['frontier']['ci']:.0f}% band [{lo:.4f}, {hi:.4f}])"
        where = "" if lo is None else ("inside band" if t["inside_band"] else "OUTSIDE band")
        text = (f"frontier predicts error {t['predicted']:.4f}{band} vs measured {t['measured']:.4f}, "
                f"rel. error {_pct(t['rel_error'], signed=True)}" + (f", {where}" if where else ""))
        if not t["frontier_point"]:
            text += " (not the best at its compute: the frontier predicts the best)"
    for p in t["axes"]:
        text += f"; error-vs-{p['axis']} law {p['predicted']:.4f} ({_pct(p['rel_error'], signed=True)})"
    return text


def _pct(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None else f"{100 * v:{'+' if signed else ''}.1f}%"


def _value(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _short(metric: str) -> str:
    return "/".join(metric.split("/")[-2:])[-10:]


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _fixed(curve: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (curve.get("fixed") or {}).items())
