from matplotlib.figure import Figure

from scalelab.scaling import fit_axes, make_plots

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
