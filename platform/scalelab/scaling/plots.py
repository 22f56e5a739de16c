"""Scaling plots of a sweep, as `matplotlib.figure.Figure` objects keyed by their artifact path.

Figures are built with the object API on an explicit Agg canvas (no pyplot, no global backend
switch), so this works headless inside Ray workers and tests. Plots:
- plots/error_vs_compute.png: every finished trial (colour = model, marker = batch, marker size =
  data), the Cherti et al. 2023 frontier points ringed, the fitted frontier E = A·C^B, and the
  extrapolated prediction if any;
- plots/holdout.png: the frontier fitted without the largest-compute trials, its bootstrap band, and
  those held-out trials measured vs predicted (`scalelab.scaling.holdout`);
- plots/error_vs_{data,params,batch}.png: BASIC's per-axis curves, one solid line per combination of
  the fixed axes (colour by one fixed axis, marker by the other), its power-law fit dashed;
- plots/loss_curves.png: train loss / ln B against samples seen, one line per trial (colour = model,
  line style = data, marker = batch, width = repeat at one grid point).
Every axis of the sweep has its own encoding in every plot, so no two trials that differ in an axis
look alike. Compute axes are labelled `COMPUTE_AXIS_LABEL`. A plot whose axis has nothing to fit (a
single value) is left out rather than drawn empty.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from scalelab.scaling.table import COMPUTE_AXIS_LABEL, TrialResult, finite_errors, is_accuracy_metric

__all__ = ["make_plots"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
# Named styles first; beyond them distinct dash patterns, so any number of data values stays distinct.
_STYLES: tuple[Any, ...] = ("-", "--", ":", "-.", *((0, (d, 2, 1, 2)) for d in (6, 10, 14, 18)))
_MAX_TRIAL_LEGEND = 12
_AXIS_MARKS = {"data": "<", "model": "^", "batch": ">"}  # per-axis law predictions in the holdout plot


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


def _trial_encoding(results: Sequence[TrialResult]) -> tuple[dict, dict, dict, list[Line2D]]:
    """colour by model, marker by batch, marker area by data (grows with data), and legend handles
    naming each: one point per trial, each axis readable off the point."""
    models = _models_by_size(results)
    batches, datas = sorted({r.batch for r in results}), sorted({r.data for r in results})
    colour, marker = _colours(models), {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(batches)}
    size = {d: 25.0 * 1.8**i for i, d in enumerate(datas)}
    handles = [Line2D([], [], color=colour[m], marker="o", ls="", label=m) for m in models]
    handles += [Line2D([], [], color="grey", marker=marker[b], ls="", label=f"batch {b}") for b in batches]
    # Line2D's marker size is a diameter in points, a scatter's size an area in points²
    handles += [Line2D([], [], color="grey", marker="o", mfc="none", ls="", ms=size[d] ** 0.5,
                       label=f"data {_fmt_int(d)}") for d in datas]
    return colour, marker, size, handles


def _plot_compute(pairs: list[tuple[TrialResult, float]], fits: dict[str, Any], metric: str) -> Figure:
    fig, ax = _figure()
    colour, marker, size, handles = _trial_encoding([r for r, _ in pairs])
    for r, err in pairs:
        ax.scatter(r.compute, err, color=colour[r.model], marker=marker[r.batch], s=size[r.data], alpha=0.85,
                   zorder=3, gid=r.trial_id)
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
    ax.set(xscale="log", yscale="log", xlabel=COMPUTE_AXIS_LABEL, ylabel=_error_label(metric),
           title=f"{metric}: error vs compute ({len(pairs)} trials)\n"
                 "colour = model, marker = batch, size = data")
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
    """Loss / ln B: the softmax contrastive loss of uniform (chance) predictions over a batch of B is
    ln B, so raw losses of different batches start at different heights; divided by ln B they share
    the chance level 1 and read as "fraction of chance loss left"."""
    with_curve = [r for r in results if len(r.curve) >= 1 and r.batch > 1]
    if not with_curve:
        return None
    fig, ax = _figure(width=9.0)
    models = _models_by_size(with_curve)
    batches, datas = sorted({r.batch for r in with_curve}), sorted({r.data for r in with_curve})
    colour = _colours(models)
    style = {d: _STYLES[i % len(_STYLES)] for i, d in enumerate(datas)}
    marker = {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(batches)}
    # Trials at one grid point (an lr grid): a thicker line per repeat, and the trial id in the label.
    per_point = Counter((r.model, r.data, r.batch) for r in with_curve)
    repeat: dict[tuple, int] = {}
    for r in sorted(with_curve, key=lambda r: (models.index(r.model), r.batch, r.data, r.trial_id)):
        point = (r.model, r.data, r.batch)
        k = repeat[point] = repeat.get(point, -1) + 1
        s, loss = zip(*r.curve)
        label = f"{r.model}, data {_fmt_int(r.data)}, batch {r.batch}"
        label += f" ({r.trial_id})" if per_point[point] > 1 else ""
        ax.plot(s, np.asarray(loss, dtype=float) / np.log(r.batch), color=colour[r.model], ls=style[r.data],
                marker=marker[r.batch], markevery=max(1, len(s) // 6), ms=5, lw=1.2 + 1.3 * k, label=label)
    ax.axhline(1.0, color="black", ls=(0, (1, 3)), lw=1, label="chance: loss = ln B")
    ax.set(xscale="log", xlabel="samples seen (image-text pairs)",
           ylabel="train contrastive loss / ln B  (1 = chance, B = batch)",
           title=f"train loss relative to chance ln B ({len(with_curve)} trials)\n"
                 "colour = model, line style = data, marker = batch")
    if len(with_curve) > _MAX_TRIAL_LEGEND:  # too many to name one by one: name the encodings instead
        handles = [Line2D([], [], color=colour[m], label=m) for m in models]
        handles += [Line2D([], [], color="grey", ls=style[d], label=f"data {_fmt_int(d)}") for d in datas]
        handles += [Line2D([], [], color="grey", marker=marker[b], ls="", label=f"batch {b}")
                    for b in batches]
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def _plot_holdout(pairs: list[tuple[TrialResult, float]], holdout: dict[str, Any], metric: str) -> Figure:
    fig, ax = _figure(width=9.0)
    fr, trials = holdout["frontier"], holdout["trials"]
    held = {t["trial_id"] for t in trials}
    fitted = [(r, e) for r, e in pairs if r.trial_id not in held]
    ax.scatter([r.compute for r, _ in fitted], [e for _, e in fitted], s=25, color="grey", alpha=0.7,
               zorder=3, label=f"fitted on: {len(fitted)} trials")
    ax.scatter([p["compute"] for p in fr["points"]], [p["error"] for p in fr["points"]], s=120,
               facecolors="none", edgecolors="black", lw=1.2, zorder=4, label="their frontier points")
    band = fr["band_curve"]
    cs = np.asarray(band["compute"])
    split = max(r.compute for r, _ in fitted)  # solid where the fit saw data, dashed beyond
    inner, outer = np.append(cs[cs < split], split), np.insert(cs[cs > split], 0, split)
    ax.plot(inner, fr["A"] * inner ** fr["B"], "k-", lw=1.5,
            label=f"frontier fit E = {fr['A']:.3g}·C^{fr['B']:.3f}")
    ax.plot(outer, fr["A"] * outer ** fr["B"], "k--", lw=1.5, label="its extrapolation")
    if band["lo"][0] is not None:
        ax.fill_between(cs, band["lo"], band["hi"], color="tab:blue", alpha=0.2, lw=0,
                        label=f"{100 * fr['ci']:.0f}% bootstrap band of the frontier")
    if holdout["compute_min"]:
        ax.axvline(holdout["compute_min"], color="dimgrey", ls=":", lw=1, label="held out from here")
    for t in trials:
        mark = "o" if t["frontier_point"] else "s"
        ax.scatter(t["compute"], t["measured"], marker=mark, s=60, color="crimson", zorder=5)
        ax.scatter(t["compute"], t["predicted"], marker="x", s=70, color="tab:blue", zorder=6)
        ax.plot([t["compute"]] * 2, [t["measured"], t["predicted"]], color="crimson", lw=0.8, zorder=4)
        ax.annotate(f"{t['trial_id']}: {100 * t['rel_error']:+.1f}%", (t["compute"], t["measured"]),
                    xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
        for pa in t["axes"]:
            ax.scatter(t["compute"], pa["predicted"], marker=_AXIS_MARKS[pa["axis"]], s=35, color="tab:green",
                       zorder=6)
    s = holdout["summary"]["frontier"]
    handles, _ = ax.get_legend_handles_labels()
    for mark, col, label in (("o", "crimson", "held out, measured (frontier point)"),
                             ("s", "crimson", "held out, measured (not the best at its compute)"),
                             ("x", "tab:blue", "held out, predicted by the frontier")):
        handles.append(Line2D([], [], marker=mark, color=col, ls="", label=label))
    used = sorted({pa["axis"] for t in trials for pa in t["axes"]}, key=list(_AXIS_MARKS).index)
    handles += [Line2D([], [], marker=_AXIS_MARKS[a], color="tab:green", ls="",
                       label=f"predicted by the error-vs-{'params' if a == 'model' else a} law")
                for a in used]
    inside = "" if s["inside_band_frac"] is None else f", {100 * s['inside_band_frac']:.0f}% inside band"
    mare = "n/a" if s["mean_abs_rel_error"] is None else f"{100 * s['mean_abs_rel_error']:.1f}%"
    ax.set(xscale="log", yscale="log", xlabel=COMPUTE_AXIS_LABEL, ylabel=_error_label(metric),
           title=f"{metric}: held-out check of the frontier\n{holdout['n']} largest-compute trials "
                 f"predicted from the other {holdout['n_fit']}: mean |rel. error| {mare}{inside}")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def make_plots(results: Sequence[TrialResult], fits: dict[str, Any], metric: str) -> dict[str, Figure]:
    """The sweep's scaling figures keyed by artifact path; plots with nothing to show are omitted."""
    results = list(results)
    pairs = [(r, e) for r, e in finite_errors(results, metric) if r.compute > 0]  # log axis
    figs: dict[str, Figure] = {}
    if pairs:
        figs["plots/error_vs_compute.png"] = _plot_compute(pairs, fits, metric)
    holdout = fits.get("holdout")
    if pairs and holdout and holdout.get("frontier") and holdout["trials"]:
        figs["plots/holdout.png"] = _plot_holdout(pairs, holdout, metric)
    order = _models_by_size(results)
    for axis, (stem, *_) in _AXIS_PLOTS.items():
        if fits.get(axis):
            figs[f"plots/{stem}.png"] = _plot_axis(axis, fits[axis], metric, order)
    loss = _plot_loss(results)
    if loss is not None:
        figs["plots/loss_curves.png"] = loss
    return figs
