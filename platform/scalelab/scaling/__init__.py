"""Scaling analysis of a sweep: the results table, power-law fits, the compute frontier, plots.

Method: per-axis power laws E = a·x^b (+ c) of error against data size, model size and contrastive
batch size with the other two axes fixed, as in BASIC (Pham et al. 2021, "Combined scaling for zero-shot
transfer learning"); and the compute frontier of Cherti et al. 2023 ("Reproducible scaling laws for
contrastive language-image learning"): per-bin minima of error over log-compute bins, fitted as
E = A·C^B with a bootstrap interval for B. Both are checked on held-out data by `fit_holdout`: fitted
without the largest-compute trials, they predict those trials' error.

Imports only numpy, scipy, matplotlib (Agg, object API) and the standard library, so the analysis runs
anywhere a `results.csv` is: `fit_axes(read_csv(path), metric)` then `make_plots(...)`.
"""

from scalelab.scaling.fits import (
    FrontierFit,
    PowerLawFit,
    axis_trends,
    fit_axes,
    fit_frontier,
    fit_power_law,
    flat_fit_metrics,
)
from scalelab.scaling.holdout import fit_holdout
from scalelab.scaling.plots import make_plots
from scalelab.scaling.table import (
    COMPUTE_AXIS_LABEL,
    COMPUTE_CONVENTION,
    TrialResult,
    error_of,
    read_csv,
    write_csv,
)

__all__ = [
    "COMPUTE_AXIS_LABEL",
    "COMPUTE_CONVENTION",
    "FrontierFit",
    "PowerLawFit",
    "TrialResult",
    "axis_trends",
    "error_of",
    "fit_axes",
    "fit_frontier",
    "fit_holdout",
    "fit_power_law",
    "flat_fit_metrics",
    "make_plots",
    "read_csv",
    "write_csv",
]
