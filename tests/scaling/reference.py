"""Naive references the fits are checked against (plain numpy loops, written for reading)."""

import numpy as np


def per_bin_argmin(log_compute, errors, bins):
    """Index of the lowest error in each non-empty one of `bins` equal-width log-compute bins."""
    lc, e = np.asarray(log_compute), np.asarray(errors)
    edges = np.linspace(lc.min(), lc.max(), bins + 1)
    out = []
    for k in range(bins):
        hi_ok = lc <= edges[k + 1] if k == bins - 1 else lc < edges[k + 1]
        members = np.flatnonzero((lc >= edges[k]) & hi_ok)
        if members.size:
            out.append(int(members[np.argmin(e[members])]))
    return out
