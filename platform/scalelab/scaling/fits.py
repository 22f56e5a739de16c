"""Power-law fits of a sweep: per-axis laws (BASIC) and the compute frontier (Cherti et al. 2023).

Per-axis laws, as in BASIC (Pham et al. 2021, "Combined scaling for zero-shot transfer learning"):
error E against one axis with the other two held fixed, E = a·x^b (optionally + c, an irreducible
floor). One curve per combination of the fixed axes: error vs data per (model, batch), vs params per
(data, batch), vs batch per (data, model). Several trials at the same point (e.g. an lr grid in
`extra`) collapse to their best (lowest) error — the law describes tuned runs.

Compute frontier, as in Cherti et al. 2023 ("Reproducible scaling laws for contrastive language-image
learning"): split log10(compute) into equal-width bins, keep the lowest error of each non-empty bin
(the Pareto frontier: the best any configuration achieved at that compute), fit log10 E on log10 C by
least squares, E = A·C^B, and bootstrap the frontier points for a confidence interval of B.

Everything here is numpy/scipy; the returned `fit_axes` dict is JSON-serialisable (`fits.json`).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import curve_fit

from scalelab.scaling.table import TrialResult, finite_errors

__all__ = ["FrontierFit", "PowerLawFit", "axis_x", "best_points", "bootstrap_lines", "curve_key", "fit_axes",
           "fit_frontier", "fit_power_law", "flat_fit_metrics", "percentile_interval"]


@dataclass(frozen=True)
class PowerLawFit:
    """E = a·x^b + c (c = 0 without a floor). r2 is measured on log10(E)."""

    a: float
    b: float
    c: float
    r2: float
    n: int

    def predict(self, x: Any) -> np.ndarray:
        return self.a * np.power(np.asarray(x, dtype=float), self.b) + self.c


@dataclass(frozen=True)
class FrontierFit:
    """E = A·C^B over the per-bin minima of log10(compute); b_ci is the bootstrap interval of B."""

    A: float
    B: float
    r2: float
    b_ci: tuple[float, float]
    frontier_idx: tuple[int, ...]
    bin_edges: tuple[float, ...]  # in log10(compute)
    n_points: int

    def predict(self, compute: Any) -> np.ndarray:
        return self.A * np.power(np.asarray(compute, dtype=float), self.B)


def _positive_finite(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values: {arr.tolist()}")
    if np.any(arr <= 0):
        raise ValueError(f"{name} must be strictly positive for a log-log fit, got {arr.tolist()}")
    return arr


def _checked_xy(x: Any, y: Any, need: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _positive_finite("x", x), _positive_finite("y", y)
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    if x.size < need:
        raise ValueError(f"{what} needs at least {need} points, got {x.size}")
    if np.unique(x).size < 2:
        raise ValueError(f"{what} needs at least 2 distinct x values, got {np.unique(x).tolist()}")
    return x, y


def _r2(y: np.ndarray, y_hat: np.ndarray) -> float:
    ss_res = float(np.sum((y - y_hat) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:  # flat data: a perfect fit explains everything, anything else nothing
        return 1.0 if ss_res <= 1e-24 else 0.0
    return 1.0 - ss_res / ss_tot


def _loglog(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    """Least-squares line ly = intercept + slope·lx (closed form, float64)."""
    dx = lx - lx.mean()
    slope = float(np.dot(dx, ly - ly.mean()) / np.dot(dx, dx))
    return float(ly.mean() - slope * lx.mean()), slope


def fit_power_law(x: Any, y: Any, *, floor: bool = False) -> PowerLawFit:
    """Fit E = a·x^b (floor=False: least squares of log10 y on log10 x) or E = a·x^b + c (floor=True:
    nonlinear least squares on log10 y, c in [0, min y), started from the log-log fit)."""
    x, y = _checked_xy(x, y, 3 if floor else 2, "a power-law fit" + (" with floor" if floor else ""))
    lx, ly = np.log10(x), np.log10(y)
    intercept, slope = _loglog(lx, ly)
    if not floor:
        return PowerLawFit(a=10**intercept, b=slope, c=0.0, r2=_r2(ly, intercept + slope * lx), n=x.size)
    return _fit_with_floor(x, ly, intercept, slope)


def _fit_with_floor(x: np.ndarray, ly: np.ndarray, intercept: float, slope: float) -> PowerLawFit:
    y_min = float(10 ** ly.min())
    c_hi = y_min * (1 - 1e-9)  # c < min(y) keeps every residual's log finite

    def model(xv: np.ndarray, log_a: float, b: float, c: float) -> np.ndarray:
        return np.log10(10**log_a * np.power(xv, b) + c)

    best: tuple[float, np.ndarray] | None = None
    # The floor makes the problem non-convex: try a few starting floors, keep the lowest residual.
    for frac in (0.0, 0.3, 0.6, 0.9):
        c0 = frac * c_hi
        a0 = max(10**intercept - c0, 1e-12)  # keep a·x^b + c0 near the data at x = 1
        p0 = [math.log10(a0), slope, c0]
        try:
            bounds = ([-np.inf, -np.inf, 0.0], [np.inf, np.inf, c_hi])
            params, _ = curve_fit(model, x, ly, p0=p0, bounds=bounds, maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        cost = float(np.sum((model(x, *params) - ly) ** 2))
        if np.isfinite(cost) and (best is None or cost < best[0]):
            best = (cost, params)
    if best is None:
        raise ValueError("power-law fit with floor did not converge from any starting point")
    log_a, b, c = (float(p) for p in best[1])
    return PowerLawFit(a=10**log_a, b=b, c=c, r2=_r2(ly, model(x, log_a, b, c)), n=x.size)


def fit_frontier(compute: Any, error: Any, *, bins: int = 5, bootstrap: int = 1000, seed: int = 0,
                 ci: float = 0.95) -> FrontierFit:
    """Compute-frontier law E = A·C^B (Cherti et al. 2023); see the module docstring.

    b_ci is the percentile interval of B over `bootstrap` resamples (with replacement) of the frontier
    points; resamples with fewer than 2 distinct compute values are skipped. It is (nan, nan) when no
    resample is usable (bootstrap=0)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    c, e = _positive_finite("compute", compute), _positive_finite("error", error)
    if c.shape != e.shape:
        raise ValueError(f"compute and error differ in length: {c.size} vs {e.size}")
    if c.size < 2:
        raise ValueError(f"a frontier fit needs at least 2 points, got {c.size}")
    lc, le = np.log10(c), np.log10(e)
    edges = np.linspace(lc.min(), lc.max(), bins + 1)
    # Right-closed last bin: the largest compute belongs to bin bins-1, not to a bin of its own.
    which = np.clip(np.searchsorted(edges, lc, side="right") - 1, 0, bins - 1)
    keep = []
    for k in range(bins):
        members = np.flatnonzero(which == k)
        if members.size:  # empty bins are skipped
            keep.append(int(members[np.argmin(e[members])]))  # argmin: first index on ties
    if len(keep) < 2:
        raise ValueError(f"a frontier fit needs at least 2 non-empty compute bins, got {len(keep)} "
                         f"(compute spans {c.min():.3g}..{c.max():.3g} in {bins} bins)")
    idx = np.array(keep)
    intercept, slope = _loglog(lc[idx], le[idx])
    r2 = _r2(le[idx], intercept + slope * lc[idx])
    b_ci = _bootstrap_slope(lc[idx], le[idx], bootstrap, seed, ci)
    return FrontierFit(A=10**intercept, B=slope, r2=r2, b_ci=b_ci,
                       frontier_idx=tuple(keep), bin_edges=tuple(float(v) for v in edges), n_points=len(keep))


def bootstrap_lines(lx: np.ndarray, ly: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(intercept, slope) of the least-squares line for each of `n` resamples (with replacement) of the
    points, shape (k, 2) with k <= n: resamples with fewer than 2 distinct x are skipped. The same
    (points, n, seed) always give the same lines, so B's interval and a prediction band built from
    them describe one bootstrap."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        pick = rng.integers(0, lx.size, size=lx.size)
        if np.unique(lx[pick]).size < 2:  # degenerate: a slope needs two distinct x
            continue
        lines.append(_loglog(lx[pick], ly[pick]))
    return np.asarray(lines, dtype=float).reshape(-1, 2)


def percentile_interval(values: Any, ci: float) -> tuple[Any, Any]:
    """The central `ci` percentile interval of `values` along axis 0 (floats for 1-d values, arrays
    per column otherwise); (nan, nan) when there are no values."""
    values = np.asarray(values, dtype=float)
    if values.shape[0] == 0:
        return (math.nan, math.nan)
    tail = 100 * (1 - ci) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail], axis=0)
    return (lo, hi)


def _bootstrap_slope(lx: np.ndarray, ly: np.ndarray, n: int, seed: int, ci: float) -> tuple[float, float]:
    lo, hi = percentile_interval(bootstrap_lines(lx, ly, n, seed)[:, 1], ci)
    return (float(lo), float(hi))


# ---------------------------------------------------------------- per-axis fits over a results table

# axis -> (x of a trial on that axis, the axes held fixed along one curve)
_AXES: dict[str, tuple[Callable[[TrialResult], float], tuple[str, ...]]] = {
    "data": (lambda r: r.data, ("model", "batch")),
    "model": (lambda r: r.params, ("data", "batch")),
    "batch": (lambda r: r.batch, ("data", "model")),
}


def axis_x(result: TrialResult, axis: str) -> float:
    """The trial's coordinate on `axis` (data pairs, parameters for the model axis, batch)."""
    return float(_AXES[axis][0](result))


def curve_key(result: TrialResult, axis: str) -> tuple:
    """The values of the two axes held fixed along `axis`'s curve through this trial."""
    return tuple(getattr(result, k) for k in _AXES[axis][1])


def best_points(pairs: list[tuple[TrialResult, float]],
                axis: str) -> dict[tuple, dict[float, tuple[float, TrialResult]]]:
    """curve key -> {x: (error, trial)}, the lowest error per point (e.g. over an lr grid): the law
    describes tuned runs."""
    groups: dict[tuple, dict[float, tuple[float, TrialResult]]] = defaultdict(dict)
    for r, err in pairs:
        best = groups[curve_key(r, axis)]
        x = axis_x(r, axis)
        if x not in best or err < best[x][0]:
            best[x] = (err, r)
    return groups


def _axis_curves(pairs: list[tuple[TrialResult, float]], axis: str) -> list[dict[str, Any]]:
    fixed_keys = _AXES[axis][1]
    groups = best_points(pairs, axis)
    curves = []
    # numbers numerically, preset names alphabetically
    for key in sorted(groups, key=lambda k: tuple((0, v, "") if isinstance(v, int) else (1, 0, str(v))
                                                  for v in k)):
        pts = sorted(groups[key].items())
        if len(pts) < 2:
            continue
        xs, errs = [p[0] for p in pts], [p[1][0] for p in pts]
        fit = fit_power_law(xs, errs)
        curve = {"fixed": dict(zip(fixed_keys, key)), "a": fit.a, "b": fit.b, "r2": fit.r2, "n": fit.n,
                 "x": xs, "error": errs, "trial_ids": [p[1][1].trial_id for p in pts]}
        if axis == "model":
            curve["models"] = [p[1][1].model for p in pts]
        curves.append(curve)
    return curves


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def fit_axes(results: Iterable[TrialResult], metric: str, *, predict_compute: float | None = None,
             bins: int = 5, bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> dict[str, Any]:
    """Per-axis power laws and the compute frontier over the finished trials (the `fits.json` content).

    Only TERMINATED trials reporting `metric` with a positive error count. "frontier" is None (and
    "frontier_error" says why) when fewer than 2 compute bins are populated; "prediction" is present
    when `predict_compute` is given and the frontier exists. Each axis entry carries its points
    (x, error, trial_ids) so plots and reports need not regroup the table."""
    if predict_compute is not None and not (math.isfinite(predict_compute) and predict_compute > 0):
        raise ValueError(f"predict_compute must be a positive number of MACs, got {predict_compute}")
    pairs = finite_errors(results, metric)
    out: dict[str, Any] = {"metric": metric, "n_trials": len(pairs), "frontier": None}
    timed = [(r, e) for r, e in pairs if math.isfinite(r.compute) and r.compute > 0]  # compute was logged
    if timed:
        try:
            fr = fit_frontier([r.compute for r, _ in timed], [e for _, e in timed], bins=bins,
                              bootstrap=bootstrap, seed=seed, ci=ci)
        except ValueError as exc:
            out["frontier_error"] = str(exc)
        else:
            out["frontier"] = {
                "A": fr.A, "B": fr.B, "r2": fr.r2, "b_ci": [_finite_or_none(v) for v in fr.b_ci],
                "ci": ci, "bins": bins, "bootstrap": bootstrap, "seed": seed, "n_points": fr.n_points,
                "bin_edges_log10": list(fr.bin_edges),
                "points": [{"trial_id": timed[i][0].trial_id, "compute": timed[i][0].compute,
                            "error": timed[i][1]} for i in fr.frontier_idx],
            }
            if predict_compute is not None:
                out["prediction"] = {"compute": float(predict_compute),
                                     "error": float(fr.predict(predict_compute))}
    else:
        out["frontier_error"] = f"no finished trial reports {metric!r} with a positive compute"
    for axis in _AXES:
        out[axis] = _axis_curves(pairs, axis)
    return out


def axis_trends(fits: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """How the error moves along each axis of a `fit_axes` result, read off its per-axis curves.

    Per axis with at least one curve: `curves` (one per combination of the other axes), `falling` (how
    many of them lower the error at every step up the axis), and `mean_error`: [(value, mean error over
    the curves)] in axis order, the value being the preset name on the model axis."""
    out: dict[str, dict[str, Any]] = {}
    for axis in _AXES:
        curves = fits.get(axis) or []
        if not curves:
            continue
        by_value: dict[Any, list[float]] = defaultdict(list)
        order: dict[Any, float] = {}
        for curve in curves:
            labels = curve.get("models") or curve["x"]
            for x, label, err in zip(curve["x"], labels, curve["error"]):
                by_value[label].append(err)
                order[label] = x
        falling = sum(all(b < a for a, b in zip(c["error"], c["error"][1:])) for c in curves)
        means = [(v, float(np.mean(by_value[v]))) for v in sorted(by_value, key=order.get)]
        out[axis] = {"curves": len(curves), "falling": falling, "mean_error": means}
    return out


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def _curve_name(axis: str, fixed: dict[str, Any]) -> str:
    if axis == "data":
        name = f"{fixed['model']}-b{fixed['batch']}"
    elif axis == "model":
        name = f"d{fixed['data']}-b{fixed['batch']}"
    else:
        name = f"d{fixed['data']}-{fixed['model']}"
    return _UNSAFE.sub("_", name)


def flat_fit_metrics(fits: dict[str, Any]) -> dict[str, float]:
    """Stable MLflow metric keys for a `fit_axes` result, e.g. fit/frontier/B, fit/frontier/B_ci_lo,
    fit/prediction/error, fit/data/<model>-b<batch>/b, fit/model/d<data>-b<batch>/b,
    fit/batch/d<data>-<model>/b. Missing or non-finite values are left out."""
    flat: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if value is not None and math.isfinite(float(value)):
            flat[key] = float(value)

    fr = fits.get("frontier")
    if fr:
        for name in ("A", "B", "r2", "n_points"):
            put(f"fit/frontier/{name}", fr.get(name))
        lo, hi = fr.get("b_ci") or (None, None)
        put("fit/frontier/B_ci_lo", lo)
        put("fit/frontier/B_ci_hi", hi)
    if fits.get("prediction"):
        put("fit/prediction/error", fits["prediction"]["error"])
        put("fit/prediction/compute", fits["prediction"]["compute"])
    for axis in _AXES:
        for curve in fits.get(axis, []):
            base = f"fit/{axis}/{_curve_name(axis, curve['fixed'])}"
            for name in ("a", "b", "r2", "n"):
                put(f"{base}/{name}", curve.get(name))
    _flat_holdout(fits.get("holdout"), put)
    return flat


def _flat_holdout(holdout: dict[str, Any] | None, put: Callable[[str, Any], None]) -> None:
    """holdout/n, holdout/n_fit, holdout/frontier/{mean_abs_rel_error,inside_band_frac,n,A,B},
    holdout/axes/{mean_abs_rel_error,n} and holdout/axes/<axis>/{mean_abs_rel_error,n} (see
    `scalelab.scaling.holdout`)."""
    if not holdout:
        return
    put("holdout/n", holdout.get("n"))
    put("holdout/n_fit", holdout.get("n_fit"))
    summary = holdout.get("summary") or {}
    for part in ("frontier", "axes"):
        for name, value in (summary.get(part) or {}).items():
            put(f"holdout/{part}/{name}", value)
    for axis, stats in (summary.get("by_axis") or {}).items():
        for name, value in stats.items():
            put(f"holdout/axes/{axis}/{name}", value)
    fr = holdout.get("frontier")
    if fr:
        put("holdout/frontier/A", fr.get("A"))
        put("holdout/frontier/B", fr.get("B"))

