"""Held-out validation of a sweep's laws: fit on the smaller-compute trials, predict the largest.

A scaling law is only worth its extrapolation. `fit_holdout` holds out the largest-compute finished
trials, fits the compute frontier (Cherti et al. 2023) and BASIC's per-axis power laws on the rest
exactly as `fit_axes` does, and compares what those fits predict for the held-out trials with what the
trials measured.

Which trials are held out (`holdout`):
- None (default): the trials at the largest compute level;
- an int n >= 1 (or an integral float): the n largest-compute trials;
- a float in (0, 1): that fraction of the finished trials, rounded up;
- 0: no held-out validation (`fit_holdout` returns None).
A count is rounded up to whole compute levels, so no trial at a held-out compute stays in the fit
(predicting it would be interpolation). A compute level is a group of trials whose compute lies within
`LEVEL_RTOL` of the level's largest: `train.steps = ceil(samples / batch)` makes trials of one budget
differ by up to a batch of samples, and they should count as one compute value.

What is compared:
- frontier: E = A·C^B fitted on the remaining trials predicts the *best* error at a compute, so it is
  scored on the held-out frontier points (the lowest error of each held-out compute level); its band
  is the `ci` percentile interval of the prediction over the same bootstrap of frontier points that
  gives B's interval (a band for the frontier line, not for one noisy trial);
- per-axis laws: a held-out trial is predicted from each curve through it (the other two axes fixed)
  that has a fit on >= 2 remaining points; scored on the trials that are the best held-out trial at
  their (data, model, batch) point. These laws have no band.
The result (layout in `fit_holdout`) is JSON-serialisable; it goes into `fits.json` as "holdout".
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

from scalelab.scaling.fits import (
    axis_x,
    best_points,
    bootstrap_lines,
    curve_key,
    fit_frontier,
    fit_power_law,
    percentile_interval,
)
from scalelab.scaling.table import TrialResult, finite_errors

__all__ = ["LEVEL_RTOL", "fit_holdout", "select_holdout"]

LEVEL_RTOL = 0.1  # compute values within 10% of a level's largest belong to that level
_AXIS_NAMES = ("data", "model", "batch")
_BAND_POINTS = 40  # resolution of the band curve stored for the plot
# An exact power law gives a zero-width band; its own points must not fall outside it by float rounding.
_ROUNDING = 1e-9


def _levels(computes: list[float]) -> list[int]:
    """Compute level of each value, 0 = the largest (see LEVEL_RTOL)."""
    order = sorted(range(len(computes)), key=lambda i: -computes[i])
    level, top, out = -1, math.inf, [0] * len(computes)
    for i in order:
        if computes[i] < top / (1 + LEVEL_RTOL):
            level, top = level + 1, computes[i]
        out[i] = level
    return out


def _requested_count(holdout: int | float | None, n: int) -> int | None:
    """How many trials `holdout` asks for (None = one compute level); ValueError for nonsense."""
    if holdout is None:
        return None
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not math.isfinite(holdout):
        raise ValueError(f"holdout must be None, a count >= 0 or a fraction in (0, 1), got {holdout!r}")
    if 0 < holdout < 1:
        return max(1, math.ceil(holdout * n))
    if holdout < 0 or float(holdout) != int(holdout):
        raise ValueError(f"holdout must be None, a count >= 0 or a fraction in (0, 1), got {holdout!r}")
    return int(holdout)


def select_holdout(pairs: list[tuple[TrialResult, float]], holdout: int | float | None
                   ) -> tuple[list[int], str | None]:
    """Indices into `pairs` (all with positive compute) of the held-out trials, largest compute first,
    and why none could be held out (None when some were)."""
    if not pairs:
        return [], "no finished trial with a positive error and compute"
    levels = _levels([r.compute for r, _ in pairs])
    want = _requested_count(holdout, len(pairs))
    by_compute = sorted(range(len(pairs)), key=lambda i: (-pairs[i][0].compute, pairs[i][0].trial_id))
    if want is None:
        chosen = [i for i in by_compute if levels[i] == 0]
    else:
        last_level = levels[by_compute[min(want, len(pairs)) - 1]]
        chosen = [i for i in by_compute if levels[i] <= last_level]
    if len(chosen) == len(pairs):
        return [], (f"holding out {len(chosen)} trials leaves no trial to fit (all {len(pairs)} trials "
                    f"are at the held-out compute level(s), >= {min(r.compute for r, _ in pairs):.3g} MACs)")
    return chosen, None


def _frontier_part(rest: list[tuple[TrialResult, float]], held: list[tuple[TrialResult, float]],
                   opts: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None, list[dict[str, Any]]]:
    """The frontier fitted on `rest`, and its prediction + band at each held-out trial's compute."""
    c = np.array([r.compute for r, _ in rest])
    e = np.array([err for _, err in rest])
    try:
        fr = fit_frontier(c, e, **opts)
    except ValueError as exc:
        return None, f"fitting the frontier on the {len(rest)} remaining trials: {exc}", []
    idx = list(fr.frontier_idx)
    lines = bootstrap_lines(np.log10(c[idx]), np.log10(e[idx]), opts["bootstrap"], opts["seed"])

    def band(at: np.ndarray) -> tuple[list[float | None], list[float | None]]:
        lo, hi = percentile_interval(lines[:, :1] + lines[:, 1:] * np.log10(at)[None, :], opts["ci"])
        if np.ndim(lo) == 0:  # no usable resample (bootstrap=0)
            return [None] * at.size, [None] * at.size
        return [float(v) for v in 10**lo], [float(v) for v in 10**hi]

    held_c = np.array([r.compute for r, _ in held])
    lo, hi = band(held_c)
    preds = [{"predicted": float(fr.predict(cv)), "band": [lo[k], hi[k]]} for k, cv in enumerate(held_c)]
    grid = np.logspace(np.log10(c.min()), np.log10(max(c.max(), held_c.max())), _BAND_POINTS)
    g_lo, g_hi = band(grid)
    part = {
        "A": fr.A, "B": fr.B, "r2": fr.r2, "b_ci": [v if math.isfinite(v) else None for v in fr.b_ci],
        "ci": opts["ci"], "n_points": fr.n_points,
        "points": [{"trial_id": rest[i][0].trial_id, "compute": rest[i][0].compute, "error": rest[i][1]}
                   for i in idx],
        "band_curve": {"compute": [float(v) for v in grid], "lo": g_lo, "hi": g_hi},
    }
    return part, None, preds


def _axis_predictions(rest: list[tuple[TrialResult, float]], r: TrialResult) -> list[dict[str, Any]]:
    """Per-axis laws fitted on `rest` through the held-out trial `r`, each predicting its error."""
    out = []
    for axis in _AXIS_NAMES:
        pts = best_points(rest, axis).get(curve_key(r, axis), {})
        if len(pts) < 2:
            continue
        xs = sorted(pts)
        fit = fit_power_law(xs, [pts[x][0] for x in xs])
        x = axis_x(r, axis)
        out.append({"axis": axis, "x": x, "predicted": float(fit.predict(x)), "a": fit.a, "b": fit.b,
                    "n": fit.n, "x_range": [xs[0], xs[-1]]})
    return out


def _best_flags(held: list[tuple[TrialResult, float]], key: Any) -> list[bool]:
    """True for the lowest-error held-out trial of each group (`key` of a trial; first on ties)."""
    best: dict[Any, int] = {}
    for k, (r, err) in enumerate(held):
        g = key(r)
        if g not in best or err < held[best[g]][1]:
            best[g] = k
    return [best[key(r)] == k for k, (r, _) in enumerate(held)]


def _mean_abs(values: list[float]) -> float | None:
    return float(np.mean(np.abs(values))) if values else None


def _summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [t for t in trials if t["frontier_point"] and t["predicted"] is not None]
    banded = [t for t in scored if t["inside_band"] is not None]
    axes = [(p["axis"], p["rel_error"]) for t in trials if t["best_at_point"] for p in t["axes"]]
    by_axis: dict[str, list[float]] = defaultdict(list)
    for axis, rel in axes:
        by_axis[axis].append(rel)
    return {
        "frontier": {"mean_abs_rel_error": _mean_abs([t["rel_error"] for t in scored]), "n": len(scored),
                     "inside_band_frac": (sum(t["inside_band"] for t in banded) / len(banded)
                                          if banded else None)},
        "axes": {"mean_abs_rel_error": _mean_abs([rel for _, rel in axes]), "n": len(axes)},
        "by_axis": {a: {"mean_abs_rel_error": _mean_abs(v), "n": len(v)} for a, v in by_axis.items()},
    }


def _trial_row(r: TrialResult, err: float, pred: dict[str, Any] | None, axes: list[dict[str, Any]],
               flags: tuple[bool, bool]) -> dict[str, Any]:
    row: dict[str, Any] = {"trial_id": r.trial_id, "data": r.data, "model": r.model, "batch": r.batch,
                           "compute": r.compute, "measured": err, "predicted": None, "band": None,
                           "inside_band": None, "rel_error": None, "frontier_point": flags[0],
                           "best_at_point": flags[1]}
    if pred is not None:
        lo, hi = pred["band"]
        inside = None if lo is None else bool(lo * (1 - _ROUNDING) <= err <= hi * (1 + _ROUNDING))
        row.update(predicted=pred["predicted"], band=pred["band"], rel_error=(pred["predicted"] - err) / err,
                   inside_band=inside)
    row["axes"] = [{**p, "rel_error": (p["predicted"] - err) / err} for p in axes]
    return row


def fit_holdout(results: list[TrialResult], metric: str, *, holdout: int | float | None = None,
                bins: int = 5, bootstrap: int = 1000, seed: int = 0,
                ci: float = 0.95) -> dict[str, Any] | None:
    """Held-out validation (see the module docstring); None when `holdout` is 0.

    Keys: "metric", "holdout" (as requested), "n" (trials held out), "n_fit" (finished trials the laws
    were fitted on), "compute_min" (smallest held-out compute, None when none), "trials" (per held-out
    trial, largest compute first: trial_id, data, model, batch, compute, measured, predicted, band
    [lo, hi], inside_band, rel_error = (predicted - measured) / measured, frontier_point,
    best_at_point, axes: [{axis, x, predicted, rel_error, a, b, n, x_range}]), "frontier" (the fit on
    the remaining trials: A, B, r2, b_ci, ci, n_points, points, band_curve {compute, lo, hi}; None with
    "frontier_error" saying why), "error" (why nothing was held out, when so) and "summary": frontier
    {mean_abs_rel_error, inside_band_frac, n}, axes {mean_abs_rel_error, n}, by_axis {<axis>: {...}};
    an aggregate with nothing to average is None. `bins`, `bootstrap`, `seed`, `ci` as in
    `fit_frontier`."""
    if holdout is not None and _requested_count(holdout, 1) == 0:
        return None
    pairs = finite_errors(results, metric)
    timed = [(r, e) for r, e in pairs if math.isfinite(r.compute) and r.compute > 0]
    chosen, why = select_holdout(timed, holdout)
    held = [timed[i] for i in chosen]
    held_ids = {r.trial_id for r, _ in held}
    rest = [(r, e) for r, e in pairs if r.trial_id not in held_ids]
    out: dict[str, Any] = {"metric": metric, "holdout": holdout, "n": len(held), "n_fit": len(rest),
                           "compute_min": min((r.compute for r, _ in held), default=None),
                           "trials": [], "frontier": None}
    if why is not None:
        out.update(error=why, frontier_error=why, summary=_summary([]))
        return out
    rest_timed = [(r, e) for r, e in rest if math.isfinite(r.compute) and r.compute > 0]
    opts = {"bins": bins, "bootstrap": bootstrap, "seed": seed, "ci": ci}
    out["frontier"], frontier_error, preds = _frontier_part(rest_timed, held, opts)
    if frontier_error is not None:
        out["frontier_error"] = frontier_error
    levels = _levels([r.compute for r, _ in held])
    level_of = {r.trial_id: lv for (r, _), lv in zip(held, levels)}
    on_frontier = _best_flags(held, lambda r: level_of[r.trial_id])
    best_at = _best_flags(held, lambda r: (r.data, r.model, r.batch))
    out["trials"] = [_trial_row(r, err, preds[k] if preds else None, _axis_predictions(rest, r),
                                (on_frontier[k], best_at[k])) for k, (r, err) in enumerate(held)]
    out["summary"] = _summary(out["trials"])
    return out
