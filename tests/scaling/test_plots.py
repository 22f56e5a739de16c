import math

import numpy as np
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from scalelab.scaling import COMPUTE_AXIS_LABEL, COMPUTE_CONVENTION, fit_axes, make_plots

from .conftest import METRIC, make_grid

ALL = {"plots/error_vs_compute.png", "plots/error_vs_data.png", "plots/error_vs_params.png",
       "plots/error_vs_batch.png", "plots/loss_curves.png"}


def _save_all(figs, tmp_path):
    for key, fig in figs.items():
        assert isinstance(fig, Figure)
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=60)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_grid_makes_every_plot(grid, tmp_path):
    fits = fit_axes(grid, METRIC, predict_compute=1e18, bootstrap=50)
    figs = make_plots(grid, fits, METRIC)
    assert set(figs) == ALL
    _save_all(figs, tmp_path)
    ax = figs["plots/error_vs_compute.png"].axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("R² =" in t for t in legend) and any("prediction" in t for t in legend)
    batch_legend = [t.get_text() for t in figs["plots/error_vs_batch.png"].axes[0].get_legend().get_texts()]
    assert any("b = -0.020" in t for t in batch_legend)


def test_one_value_axes_omit_their_plot(tmp_path):
    one = make_grid(datas=(1000,), models=("tiny",), batches=(256, 1024))
    figs = make_plots(one, fit_axes(one, METRIC, bootstrap=10), METRIC)
    assert set(figs) == {"plots/error_vs_compute.png", "plots/error_vs_batch.png", "plots/loss_curves.png"}
    _save_all(figs, tmp_path)


def test_single_trial_and_nothing_finished(tmp_path):
    single = make_grid(datas=(1000,), models=("tiny",), batches=(256,))
    single[0].curve = [(10, 2.0)]
    figs = make_plots(single, fit_axes(single, METRIC, bootstrap=10), METRIC)
    assert set(figs) == {"plots/error_vs_compute.png", "plots/loss_curves.png"}
    _save_all(figs, tmp_path)
    for r in single:
        r.state, r.curve = "PENDING", []
    assert make_plots(single, fit_axes(single, METRIC), METRIC) == {}


# ------------------------------------------------------------------ every axis readable in every plot

def _trial_lines(ax):
    return [line for line in ax.get_lines() if not line.get_label().startswith(("_", "chance"))]


def test_loss_curves_give_every_trial_its_own_encoding_and_a_chance_baseline():
    grid = make_grid(datas=(1000, 8000, 64_000))  # 3 data × 2 models × 2 batches
    fig = make_plots(grid, fit_axes(grid, METRIC, bootstrap=10), METRIC)["plots/loss_curves.png"]
    ax = fig.axes[0]
    lines = _trial_lines(ax)
    assert len(lines) == len(grid)
    encodings = [(to_hex(line.get_color()), line.get_linestyle(), line.get_marker()) for line in lines]
    assert len(set(encodings)) == len(grid)  # trials differing in any axis never look alike
    # each encoding means one axis: colour ↔ model, line style ↔ data, marker ↔ batch
    by_label = {line.get_label(): enc for line, enc in zip(lines, encodings)}
    for r in grid:
        enc = by_label[f"{r.model}, data {r.data // 1000}k, batch {r.batch}"]
        for other in grid:
            o = by_label[f"{other.model}, data {other.data // 1000}k, batch {other.batch}"]
            assert (enc[0] == o[0]) == (r.model == other.model)
            assert (enc[1] == o[1]) == (r.data == other.data)
            assert (enc[2] == o[2]) == (r.batch == other.batch)
    # loss relative to the chance level ln B, and said so
    assert "ln B" in ax.get_ylabel() and "ln B" in ax.get_title()
    r = grid[0]
    line = next(ln for ln in lines if ln.get_label() == f"{r.model}, data {r.data // 1000}k, batch {r.batch}")
    np.testing.assert_allclose(line.get_ydata(), [v / math.log(r.batch) for _, v in r.curve], rtol=1e-12)
    chance = [ln for ln in ax.get_lines() if ln.get_label().startswith("chance")]
    assert len(chance) == 1 and set(chance[0].get_ydata()) == {1.0}
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"{r.model}, data {r.data // 1000}k, batch {r.batch}" in legend


def test_loss_curves_tell_repeats_apart_and_name_encodings_when_many():
    grid = make_grid()
    repeat = make_grid()[0]
    repeat.trial_id, repeat.extra = "lr-3e-3", {"lr": 3e-3}
    figs = make_plots([*grid, repeat], fit_axes(grid, METRIC, bootstrap=10), METRIC)
    lines = _trial_lines(figs["plots/loss_curves.png"].axes[0])
    enc = [(to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker(), ln.get_linewidth()) for ln in lines]
    assert len(set(enc)) == len(grid) + 1
    assert any("lr-3e-3" in ln.get_label() for ln in lines)
    many = make_grid(datas=(1000, 2000, 4000, 8000))  # 16 trials: the legend names the encodings
    ax = make_plots(many, fit_axes(many, METRIC, bootstrap=10), METRIC)["plots/loss_curves.png"].axes[0]
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"tiny", "small", "data 1k", "data 8k", "batch 256", "batch 1024"} <= legend
    encodings = {(to_hex(ln.get_color()), ln.get_linestyle(), ln.get_marker()) for ln in _trial_lines(ax)}
    assert len(encodings) == 16


def test_compute_plot_encodes_every_axis_and_uses_the_compute_convention(grid):
    fits = fit_axes(grid, METRIC, bootstrap=10)
    ax = make_plots(grid, fits, METRIC)["plots/error_vs_compute.png"].axes[0]
    assert ax.get_xlabel() == COMPUTE_AXIS_LABEL
    assert "4×" in COMPUTE_AXIS_LABEL and "4 x forward" in COMPUTE_CONVENTION
    points = {c.get_gid(): c for c in ax.collections if c.get_gid()}
    assert set(points) == {r.trial_id for r in grid}

    def enc(c):
        return (to_hex(c.get_facecolor()[0]), float(c.get_sizes()[0]), c.get_paths()[0].vertices.tobytes())
    assert len({enc(c) for c in points.values()}) == len(grid)
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"tiny", "small", "batch 256", "batch 1024", "data 100k", "data 1M"} <= legend


def test_axis_plots_give_every_curve_its_own_encoding(grid):
    figs = make_plots(grid, fit_axes(grid, METRIC, bootstrap=10), METRIC)
    for key in ("plots/error_vs_data.png", "plots/error_vs_params.png", "plots/error_vs_batch.png"):
        lines = [ln for ln in figs[key].axes[0].get_lines() if ln.get_marker() not in ("None", "", None)]
        assert len(lines) == 4, key
        assert len({(to_hex(ln.get_color()), ln.get_marker()) for ln in lines}) == 4, key
        assert all(": b = " in ln.get_label() for ln in lines), key
