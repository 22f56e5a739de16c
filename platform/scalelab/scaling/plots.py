"""Scaling plots of a sweep, as `matplotlib.figure.Figure` objects keyed by their artifact path.

Figures are built with the object API on an explicit Agg canvas (no pyplot, no global backend
switch), so this works headless inside Ray workers and tests. Plots:
- plots/error_vs_compute.png: every finished trial (colour = model, marker = batch), the Cherti et al.
  2023 frontier points ringed, the fitted frontier E = A·C^B, and the extrapolated prediction if any;
- plots/error_vs_{data,params,batch}.png: BASIC's per-axis curves, one solid line per combination of
  the fixed axes (colour by the other axis named in the title), its power-law fit dashed;
- plots/loss_curves.png: train loss against samples seen, one line per trial.
A plot whose axis has nothing to fit (a single value) is left out rather than drawn empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from scalelab.scaling.table import TrialResult, finite_errors, is_accuracy_metric

__all__ = ["make_plots"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_STYLES = ("-", "--", ":", "-.")
_MAX_TRIAL_LEGEND = 12


def _figure(width: float = 7.5) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, 5.0), layout="constrained")
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: savefig never consults a global backend
    ax = fig.add_subplot()
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _error_label(metric: str) -> str:
    short = metric.rsplit("/", 1)[-1]
    return f"error (1 − {short})" if is_accuracy_metric(metric) else short


def _models_by_size(results: Sequence[TrialResult]) -> list[str]:
    sizes: dict[str, int] = {}
    for r in results:
        sizes.setdefault(r.model, r.params)
    return sorted(sizes, key=lambda m: (sizes[m], m))


def _colours(keys: Sequence[Any]) -> dict[Any, Any]:
    cmap = matplotlib.colormaps["viridis" if len(keys) > 10 else "tab10"]
    n = max(len(keys) - 1, 1)
    return {k: cmap(i / n if len(keys) > 10 else i) for i, k in enumerate(keys)}


def _fmt_int(v: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _plot_compute(pairs: list[tuple[TrialResult, float]], fits: dict[str, Any], metric: str) -> Figure:
    fig, ax = _figure()
    models = _models_by_size([r for r, _ in pairs])
    batches = sorted({r.batch for r, _ in pairs})
    colour, marker = _colours(models), {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(batches)}
    for r, err in pairs:
        ax.scatter(r.compute, err, color=colour[r.model], marker=marker[r.batch], s=40, alpha=0.85, zorder=3)
    handles = [Line2D([], [], color=colour[m], marker="o", ls="", label=m) for m in models]
    handles += [Line2D([], [], color="grey", marker=marker[b], ls="", label=f"batch {b}") for b in batches]
    fr, pred = fits.get("frontier"), fits.get("prediction")
    if fr:
        pts = fr["points"]
        ax.scatter([p["compute"] for p in pts], [p["error"] for p in pts], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.5, zorder=4)
        handles.append(Line2D([], [], marker="o", mfc="none", mec="black", ls="", ms=10,
                              label="frontier point (best per compute bin)"))
        c_all = [r.compute for r, _ in pairs] + ([pred["compute"]] if pred else [])
        cs = np.logspace(np.log10(min(c_all)), np.log10(max(c_all)), 100)
        lo, hi = fr["b_ci"]
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        label = f"E = {fr['A']:.3g}·C^{fr['B']:.3f}{ci}, R² = {fr['r2']:.3f}"
        (line,) = ax.plot(cs, fr["A"] * cs ** fr["B"], "k--", lw=1.5, label=label, zorder=2)
        handles.append(line)
    if pred:
        (star,) = ax.plot(pred["compute"], pred["error"], marker="*", color="crimson", ms=16, ls="",
                          label=f"prediction at C = {pred['compute']:.3g}: E = {pred['error']:.3f}", zorder=5)
        handles.append(star)
    ax.set(xscale="log", yscale="log", xlabel="training compute C (MACs)", ylabel=_error_label(metric),
           title=f"{metric}: error vs compute ({len(pairs)} trials)")
    ax.legend(handles=handles, fontsize=8, loc="best")
    return fig


# axis in fits.json -> (artifact stem, x label, fixed axis coloured, fixed axis as marker/style)
_AXIS_PLOTS = {
    "data": ("error_vs_data", "training pairs (distinct image-text pairs)", "model", "batch"),
    "model": ("error_vs_params", "model parameters", "batch", "data"),
    "batch": ("error_vs_batch", "global contrastive batch size (pairs)", "model", "data"),
}


def _curve_label(fixed: dict[str, Any], by: str, other: str, b: float) -> str:
    def show(k: str) -> str:
        v = fixed[k]
        if k == "model":
            return str(v)
        return f"batch {v}" if k == "batch" else f"{k} {_fmt_int(v)}"
    return f"{show(by)}, {show(other)}: b = {b:.3f}"


def _plot_axis(axis: str, curves: list[dict[str, Any]], metric: str, model_order: list[str]) -> Figure:
    _, xlabel, by, other = _AXIS_PLOTS[axis]
    fig, ax = _figure(width=10.0)
    by_vals = sorted({c["fixed"][by] for c in curves},
                     key=(lambda m: (model_order.index(m) if m in model_order else len(model_order), m))
                     if by == "model" else None)
    other_vals = sorted({c["fixed"][other] for c in curves}, key=str if other == "model" else None)
    colour = _colours(by_vals)
    marker = {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(other_vals)}
    def rank(c: dict[str, Any]) -> tuple[int, int]:
        return by_vals.index(c["fixed"][by]), other_vals.index(c["fixed"][other])

    for c in sorted(curves, key=rank):
        col, mk = colour[c["fixed"][by]], marker[c["fixed"][other]]
        xs = np.asarray(c["x"], dtype=float)
        ax.plot(xs, c["error"], color=col, marker=mk, ls="-", lw=1.5,
                label=_curve_label(c["fixed"], by, other, c["b"]))
        grid = np.logspace(np.log10(xs.min()), np.log10(xs.max()), 50)
        ax.plot(grid, c["a"] * grid ** c["b"], color=col, ls="--", lw=1, alpha=0.8)
    if axis == "model":  # label the params ticks with preset names too
        names = {x: m for c in curves for x, m in zip(c["x"], c.get("models", []))}
        for x, m in names.items():
            ax.annotate(m, (x, 1), xycoords=("data", "axes fraction"), xytext=(0, -3),
                        textcoords="offset points", ha="center", va="top", fontsize=7, color="dimgrey")
    ax.plot([], [], color="grey", ls="--", lw=1, label="fit E = a·x^b (dashed)")
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=_error_label(metric),
           title=f"{metric}: error vs {'params' if axis == 'model' else axis}, one line per {by}")
    # Outside the axes: with one line per curve the legend would hide the lines it names.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def _plot_loss(results: Sequence[TrialResult]) -> Figure | None:
    with_curve = [r for r in results if len(r.curve) >= 1]
    if not with_curve:
        return None
    fig, ax = _figure()
    models = _models_by_size(with_curve)
    batches = sorted({r.batch for r in with_curve})
    colour, style = _colours(models), {b: _STYLES[i % len(_STYLES)] for i, b in enumerate(batches)}
    for r in sorted(with_curve, key=lambda r: (models.index(r.model), r.batch, r.data, r.trial_id)):
        s, loss = zip(*r.curve)
        label = f"{r.model}, batch {r.batch}, data {_fmt_int(r.data)}"
        ax.plot(s, loss, color=colour[r.model], ls=style[r.batch], lw=1.2,
                marker="o" if len(s) == 1 else None, label=label)
    ax.set(xscale="log", xlabel="samples seen (image-text pairs)", ylabel="train contrastive loss",
           title=f"train loss curves ({len(with_curve)} trials; colour = model, line style = batch)")
    if len(with_curve) > _MAX_TRIAL_LEGEND:  # too many to name one by one: name the encodings instead
        handles = [Line2D([], [], color=colour[m], label=m) for m in models]
        handles += [Line2D([], [], color="grey", ls=style[b], label=f"batch {b}") for b in batches]
        ax.legend(handles=handles, fontsize=8, loc="best")
    else:
        ax.legend(fontsize=7, loc="best", ncols=2 if len(with_curve) > 8 else 1)
    return fig


def make_plots(results: Sequence[TrialResult], fits: dict[str, Any], metric: str) -> dict[str, Figure]:
    """The sweep's scaling figures keyed by artifact path; plots with nothing to show are omitted."""
    results = list(results)
    pairs = [(r, e) for r, e in finite_errors(results, metric) if r.compute > 0]  # log axis
    figs: dict[str, Figure] = {}
    if pairs:
        figs["plots/error_vs_compute.png"] = _plot_compute(pairs, fits, metric)
    order = _models_by_size(results)
    for axis, (stem, *_) in _AXIS_PLOTS.items():
        if fits.get(axis):
            figs[f"plots/{stem}.png"] = _plot_axis(axis, fits[axis], metric, order)
    loss = _plot_loss(results)
    if loss is not None:
        figs["plots/loss_curves.png"] = loss
    return figs
