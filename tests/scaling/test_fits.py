import numpy as np
import pytest

from scalelab.scaling import fit_frontier, fit_power_law

from .reference import per_bin_argmin


def _noisy_power_law(n=40, a=3.0, b=-0.3, c=0.0, sigma=0.02, seed=0):
    rng = np.random.default_rng(seed)
    x = np.logspace(1, 7, n)
    y = (a * x**b + c) * np.exp(rng.normal(0.0, sigma, n))
    return x, y


def test_no_floor_recovers_exponent_and_matches_polyfit():
    x, y = _noisy_power_law()
    fit = fit_power_law(x, y)
    assert fit.b == pytest.approx(-0.3, abs=0.01)
    assert fit.a == pytest.approx(3.0, rel=0.1)
    assert fit.c == 0.0 and fit.n == 40 and fit.r2 > 0.99
    slope, intercept = np.polyfit(np.log10(x), np.log10(y), 1)  # naive reference
    assert fit.b == pytest.approx(slope, rel=1e-10)
    assert fit.a == pytest.approx(10**intercept, rel=1e-10)
    resid = np.log10(y) - np.polyval([slope, intercept], np.log10(x))
    r2 = 1 - resid @ resid / np.sum((np.log10(y) - np.log10(y).mean()) ** 2)
    assert fit.r2 == pytest.approx(r2, rel=1e-10)


def test_exact_power_law_is_exact():
    x = np.array([1.0, 10.0, 100.0])
    fit = fit_power_law(x, 2.0 * x**-0.5)
    assert (fit.a, fit.b, fit.r2) == pytest.approx((2.0, -0.5, 1.0), rel=1e-12)


def test_floor_recovers_exponent_and_floor():
    x, y = _noisy_power_law(n=60, a=3.0, b=-0.3, c=0.2, sigma=0.005, seed=1)
    fit = fit_power_law(x, y, floor=True)
    assert fit.b == pytest.approx(-0.3, abs=0.03)
    assert fit.c == pytest.approx(0.2, abs=0.02)
    assert 0 <= fit.c < y.min()
    assert fit.r2 > 0.99
    # The plain log-log fit is biased toward a flatter slope by the floor; the floor fit is not.
    assert abs(fit_power_law(x, y).b + 0.3) > abs(fit.b + 0.3)


def test_floor_on_pure_power_law_finds_no_floor():
    x, y = _noisy_power_law(sigma=0.01, seed=2)
    fit = fit_power_law(x, y, floor=True)
    assert fit.b == pytest.approx(-0.3, abs=0.02)
    assert fit.c < 0.05 * y.min()


def test_power_law_predict():
    x, y = _noisy_power_law(n=60, c=0.2, sigma=0.005)
    for floor in (False, True):
        fit = fit_power_law(x, y, floor=floor)
        assert fit.predict(x) == pytest.approx(fit.a * x**fit.b + fit.c)
        assert np.isscalar(float(fit.predict(10.0)))


@pytest.mark.parametrize(("x", "y", "floor", "match"), [
    ([1.0], [1.0], False, "at least 2 points"),
    ([1.0, 2.0], [1.0, 0.5], True, "at least 3 points"),
    ([1.0, 0.0], [1.0, 0.5], False, "strictly positive"),
    ([1.0, 2.0], [1.0, -0.5], False, "strictly positive"),
    ([1.0, np.nan], [1.0, 0.5], False, "NaN"),
    ([1.0, 2.0, 3.0], [1.0, 0.5], False, "differ in length"),
    ([2.0, 2.0], [1.0, 0.5], False, "distinct x"),
])
def test_power_law_rejects_bad_input(x, y, floor, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y, floor=floor)


# ------------------------------------------------------------------------------------------- frontier

def _dominated_data(bins=5, per_bin=4, seed=0):
    """Compute spread over `bins` decades; in each bin one point on E = 2·C^-0.1, the rest worse."""
    rng = np.random.default_rng(seed)
    c, e, best = [], [], []
    for k in range(bins):
        for j in range(per_bin):
            cj = 10 ** (k + 0.1 + 0.8 * rng.random()) if j else 10 ** (k + 0.5)
            ej = 2.0 * cj**-0.1 * (1.0 if j == 0 else 1.2 + rng.random())
            if j == 0:
                best.append(len(c))
            c.append(cj)
            e.append(ej)
    # bin edges are anchored on min and max compute: pin the extremes to decade boundaries
    c += [1.0, 10.0**bins]
    e += [10.0, 10.0]
    order = rng.permutation(len(c))
    c, e = np.array(c)[order], np.array(e)[order]
    new_best = sorted(int(np.flatnonzero(order == i)[0]) for i in best)
    return c, e, new_best


def test_frontier_keeps_exactly_the_per_bin_minima():
    c, e, best = _dominated_data()
    fit = fit_frontier(c, e, bins=5, bootstrap=200)
    assert list(fit.frontier_idx) == per_bin_argmin(np.log10(c), e, 5)
    assert sorted(fit.frontier_idx, key=lambda i: c[i]) == sorted(best, key=lambda i: c[i])
    assert fit.n_points == 5
    np.testing.assert_allclose([fit.A, fit.B], [2.0, -0.1], rtol=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert len(fit.bin_edges) == 6
    assert fit.bin_edges[0] == pytest.approx(0.0) and fit.bin_edges[-1] == pytest.approx(5.0)


def test_adding_worse_points_does_not_change_the_fit():
    c, e, _ = _dominated_data()
    base = fit_frontier(c, e, bootstrap=100)
    rng = np.random.default_rng(5)
    extra_c = 10 ** rng.uniform(0.0, 5.0, 30)
    extra_e = 2.0 * extra_c**-0.1 * rng.uniform(1.05, 3.0, 30)
    more = fit_frontier(np.r_[c, extra_c], np.r_[e, extra_e], bootstrap=100)
    assert more.frontier_idx == base.frontier_idx
    assert (more.A, more.B, more.r2, more.b_ci) == (base.A, base.B, base.r2, base.b_ci)


def test_frontier_fit_matches_polyfit_on_frontier_points():
    rng = np.random.default_rng(3)
    c = 10 ** rng.uniform(6, 12, 80)
    e = 5.0 * c**-0.08 * np.exp(rng.normal(0, 0.05, 80)) * rng.uniform(1.0, 1.5, 80)
    fit = fit_frontier(c, e, bins=8)
    idx = list(fit.frontier_idx)
    assert idx == per_bin_argmin(np.log10(c), e, 8)
    slope, intercept = np.polyfit(np.log10(c[idx]), np.log10(e[idx]), 1)
    np.testing.assert_allclose([fit.A, fit.B], [10**intercept, slope], rtol=1e-10)
    assert fit.predict(c[idx]) == pytest.approx(10 ** np.polyval([slope, intercept], np.log10(c[idx])))


def test_bootstrap_ci_contains_true_exponent_and_is_reproducible():
    rng = np.random.default_rng(11)
    c = np.logspace(6, 12, 12)
    e = 5.0 * c**-0.08 * np.exp(rng.normal(0, 0.03, 12))
    fit = fit_frontier(c, e, bins=12, bootstrap=2000, seed=7)
    assert fit.n_points == 12
    lo, hi = fit.b_ci
    assert lo < -0.08 < hi
    assert lo < fit.B < hi
    assert hi - lo < 0.05  # informative, not vacuous
    again = fit_frontier(c, e, bins=12, bootstrap=2000, seed=7)
    assert again.b_ci == fit.b_ci
    other = fit_frontier(c, e, bins=12, bootstrap=2000, seed=8)
    assert other.b_ci != fit.b_ci and other.B == fit.B
    narrow = fit_frontier(c, e, bins=12, bootstrap=2000, seed=7, ci=0.5)
    assert lo < narrow.b_ci[0] <= narrow.b_ci[1] < hi


def test_bootstrap_two_points_and_zero_resamples():
    fit = fit_frontier([1.0, 100.0], [1.0, 0.5], bins=2, bootstrap=50)
    assert fit.b_ci == pytest.approx((fit.B, fit.B))  # every usable resample is the two points
    none = fit_frontier([1.0, 100.0], [1.0, 0.5], bins=2, bootstrap=0)
    assert all(np.isnan(none.b_ci))


def test_empty_bins_are_skipped():
    c = np.array([1.0, 2.0, 3e3, 1e5])  # bins of width 1 decade: bins 1 and 2 are empty
    e = np.array([1.0, 0.9, 0.5, 0.4])
    fit = fit_frontier(c, e, bins=5)
    assert fit.frontier_idx == (1, 2, 3)
    assert fit.n_points == 3


@pytest.mark.parametrize(("c", "e", "bins", "match"), [
    ([1e6, 1e6, 1e6], [0.5, 0.4, 0.3], 5, "2 non-empty compute bins"),  # all in one bin
    ([1e6, 1e9], [0.5, 0.4], 1, "2 non-empty compute bins"),
    ([1e6], [0.5], 5, "at least 2 points"),
    ([1e6, 1e7], [0.5, 0.0], 5, "strictly positive"),
    ([1e6, np.nan], [0.5, 0.4], 5, "NaN"),
    ([1e6, 1e7], [0.5, 0.4], 0, "bins must be"),
])
def test_frontier_rejects_bad_input(c, e, bins, match):
    with pytest.raises(ValueError, match=match):
        fit_frontier(c, e, bins=bins)
