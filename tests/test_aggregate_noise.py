"""Server-side event-level DP on sparse item rows (:mod:`fedrec.privacy.aggregate`).

Four kinds of checks: hand-computed toys (``noised=True`` leaves the arithmetic noise-free);
a brute-force dense reference (hypothesis); chi-square tests that the gradient and count noise
have the claimed std, each paired with a test that a 10% wrong std is rejected (so the test has
power); and the accounting checked against independent references: the analytic epsilon of a
Gaussian mechanism (Balle & Wang 2018; Dong, Roth & Su, GDP) and Opacus's PRV accountant.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant
from scipy import optimize, stats

from fedrec.privacy.accounting import epsilon
from fedrec.privacy.aggregate import NORM_SIGMAS, Split, effective, noisy_counts, noisy_rows, split

LEVEL = 1e-3  # two-sided significance of every statistical test here


def _sparse(ids, values) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(ids, np.int64), np.asarray(values, np.float32)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chi2_p(x: np.ndarray, std: float) -> float:
    """Two-sided p-value of ``sum(x^2)/std^2 ~ chi2(len(x))`` (zero-mean Gaussian of that std)."""
    t = float(np.sum(np.square(x, dtype=np.float64))) / std**2
    return 2 * min(stats.chi2.cdf(t, len(x)), stats.chi2.sf(t, len(x)))


# ----------------------------------------------------------------------------------------------
# split / effective

@pytest.mark.parametrize(("z", "s"), [(0.5, 0.5), (1.0, 0.1), (3.7, 0.9), (1e-3, 0.999)])
def test_split_round_trip(z: float, s: float) -> None:
    sp = split(z, s)
    assert effective(sp) == pytest.approx(z, rel=1e-12)
    assert 1 / sp.count**2 == pytest.approx(s / z**2, rel=1e-12)
    assert 1 / sp.grad**2 == pytest.approx((1 - s) / z**2, rel=1e-12)


@pytest.mark.parametrize(("z", "s"), [(0.0, 0.5), (-1.0, 0.5), (math.nan, 0.5), (math.inf, 0.5),
                                      (1.0, 0.0), (1.0, 1.0), (1.0, -0.1), (1.0, 1.5), (1.0, math.nan)])
def test_split_refuses_bad_values(z: float, s: float) -> None:
    with pytest.raises(ValueError, match="should"):
        split(z, s)


@pytest.mark.parametrize(("g", "c"), [(0.0, 1.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)])
def test_split_record_refuses_bad_values(g: float, c: float) -> None:
    with pytest.raises(ValueError, match="positive, finite"):
        Split(grad=g, count=c)


# ----------------------------------------------------------------------------------------------
# hand-computed toys (noised=True: the inputs already carry noise, nothing is drawn)

# two devices, 5 items, width 2; summed counts [2, 0, 2, 0.5, 3]; summed rows
# 0: [1, 2], 2: [3+1, 4+1] = [4, 5], 3: [5, 5], 4: none -> [0, 0]
TOY_SUMS = [_sparse([0, 2], [[1, 2], [3, 4]]), _sparse([2, 3], [[1, 1], [5, 5]])]
TOY_COUNTS = [_sparse([0, 2], [2.0, 0.5]), _sparse([2, 3, 4], [1.5, 0.5, 3.0])]


def _toy(threshold: float, row_average: bool, count: float = 1.0):
    return noisy_rows(5, 2, TOY_SUMS, TOY_COUNTS, sensitivity=1.0, split=Split(grad=1.0, count=count),
                      threshold=threshold, row_average=row_average, generator=_gen(), noised=True)


def test_toy_row_average() -> None:
    ids, rows, diag = _toy(threshold=1.5, row_average=True)  # c > 1.5: rows 0, 2, 4
    assert ids.tolist() == [0, 2, 4] and ids.dtype == torch.int64 and rows.dtype == torch.float32
    assert rows.tolist() == [[0.5, 1.0], [2.0, 2.5], [0.0, 0.0]]
    assert diag["rows_selected"] == 3 and diag["normaliser"] == 2.0  # median of [2, 2, 3]
    assert "rows_true_positive_server_only" not in diag  # under SecAgg+ no true count is known


def test_toy_global_normaliser() -> None:
    ids, rows, diag = _toy(threshold=1.5, row_average=False)
    assert ids.tolist() == [0, 2, 4]
    assert diag["normaliser"] == 7.0  # the selected rows' noisy counts: 2 + 2 + 3 (not all rows': 7.5)
    np.testing.assert_allclose(rows.numpy(), np.array([[1, 2], [4, 5], [0, 0]]) / 7.0, rtol=1e-6)


def test_toy_threshold_scales_with_count_noise_and_normaliser_is_clamped() -> None:
    ids, rows, _ = _toy(threshold=0.2, row_average=True, count=2.0)  # c > 0.4: rows 0, 2, 3, 4
    assert ids.tolist() == [0, 2, 3, 4]
    assert rows[2].tolist() == [5.0, 5.0]  # count 0.5 clamped to 1
    ids, _, _ = _toy(threshold=1.0, row_average=True, count=2.5)  # c > 2.5: row 4 only
    assert ids.tolist() == [4]


def test_toy_unselected_rows_are_untouched_and_inputs_not_mutated() -> None:
    before = [(i.copy(), r.copy()) for i, r in TOY_SUMS]
    ids, _, _ = _toy(threshold=10.0, row_average=True)
    assert ids.numel() == 0
    for (i, r), (i0, r0) in zip(TOY_SUMS, before, strict=True):
        np.testing.assert_array_equal(i, i0)
        np.testing.assert_array_equal(r, r0)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_matches_dense_reference(data: st.DataObject) -> None:
    n, w = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 3))
    vals = st.floats(-4, 4, width=32)
    sums, counts = [], []
    for _ in range(data.draw(st.integers(0, 3))):
        ids = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
        sums.append(_sparse(ids, data.draw(st.lists(st.lists(vals, min_size=w, max_size=w),
                                                    min_size=len(ids), max_size=len(ids))) or np.zeros((0, w))))
        cids = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
        counts.append(_sparse(cids, data.draw(st.lists(vals, min_size=len(cids), max_size=len(cids)))))
    threshold, row_average = data.draw(st.floats(-2, 2)), data.draw(st.booleans())
    ids, rows, _ = noisy_rows(n, w, sums, counts, sensitivity=1.0, split=Split(1.0, 1.5), threshold=threshold,
                              row_average=row_average, generator=_gen(), noised=True)
    dense, c = np.zeros((n, w)), np.zeros(n)
    for (i, r), (ci, cv) in zip(sums, counts, strict=True):
        dense[i] += r
        c[ci] += cv
    sel = np.flatnonzero(c > threshold * 1.5)
    # ``noised`` (SecAgg+): a row's count is raised to the fewest events its norm can hold (grad std 1 x sensitivity 1)
    chosen = np.maximum(c[sel], np.linalg.norm(dense[sel], axis=1) - (math.sqrt(w) + NORM_SIGMAS))
    norm = np.maximum(chosen, 1.0)[:, None] if row_average else max(chosen.sum(), 1.0)
    assert ids.tolist() == sel.tolist()
    np.testing.assert_allclose(rows.numpy(), dense[sel] / norm, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# the noise: chi-square tests, each with a check that a wrong std would be rejected

def _grad_noise(z_g: float, sensitivity: float) -> np.ndarray:
    """Pure gradient noise of the selected rows (zero sums; undone global normaliser)."""
    zero = [_sparse(np.arange(0, 4000, 7), np.zeros((572, 4)))]
    _, rows, diag = noisy_rows(4000, 4, zero, [_sparse([], [])], sensitivity=sensitivity,
                               split=Split(grad=z_g, count=1.3), threshold=0.0, row_average=False,
                               generator=_gen(11))
    assert 1700 < diag["rows_selected"] < 2300  # threshold 0: about half the rows
    assert diag["noise_std"] == pytest.approx(z_g * sensitivity / diag["normaliser"])
    return rows.numpy().astype(np.float64).ravel() * diag["normaliser"]


def test_gradient_noise_has_the_claimed_std() -> None:
    z_g, sens = 1.7, 0.05
    x = _grad_noise(z_g, sens)
    assert _chi2_p(x, z_g * sens) > LEVEL
    assert abs(x.mean()) < 4 * z_g * sens / math.sqrt(len(x))
    # power: a 10% error in the std either way is rejected
    assert _chi2_p(x, 1.1 * z_g * sens) < LEVEL
    assert _chi2_p(x, z_g * sens / 1.1) < LEVEL


def test_count_noise_has_the_claimed_std() -> None:
    z_c, n = 2.3, 8000
    true = [_sparse([3, 5, 7], [4.0, 1.0, 2.0]), _sparse([5, 9], [3.0, 1.0])]
    summed, noisy = noisy_counts(n, true, std=z_c, generator=_gen(5))
    assert summed[[3, 5, 7, 9]].tolist() == [4.0, 4.0, 2.0, 1.0] and float(summed.sum()) == 11.0
    x = (noisy - summed).numpy()
    assert _chi2_p(x, z_c) > LEVEL
    assert _chi2_p(x, 1.1 * z_c) < LEVEL and _chi2_p(x, z_c / 1.1) < LEVEL


def test_selection_rate_matches_the_count_noise() -> None:
    """With no replies, a row is selected iff N(0, z_c^2) > t z_c: rate Phi(-t) (binomial test)."""
    n, t, z_c = 100_000, 2.0, 0.7
    ids, rows, diag = noisy_rows(n, 2, [], [], sensitivity=1.0, split=Split(grad=1.0, count=z_c), threshold=t,
                                 row_average=True, generator=_gen(3))
    _, noisy = noisy_counts(n, [], std=z_c, generator=_gen(3))  # the same draws: counts come first
    assert ids.tolist() == torch.nonzero(noisy > t * z_c).flatten().tolist()
    k = diag["rows_selected"]
    assert stats.binomtest(k, n, stats.norm.sf(t)).pvalue > LEVEL
    assert stats.binomtest(k, n, stats.norm.sf(t / 1.1)).pvalue < LEVEL  # power: std 10% too large
    assert diag["rows_true_positive_server_only"] == 0


# ----------------------------------------------------------------------------------------------
# determinism, empty cohorts, bad input

def _run(seed: int, **kw):
    sums = [_sparse([1, 4, 9], np.ones((3, 3))), _sparse([4], [[2.0, 0.0, 0.0]])]
    counts = [_sparse([1, 4, 9], [1.0, 1.0, 1.0]), _sparse([4], [2.0])]
    return noisy_rows(20, 3, sums, counts, sensitivity=1.0, split=split(1.0, 0.3), threshold=0.5,
                      row_average=True, generator=_gen(seed), **kw)


def test_same_seed_same_output() -> None:
    a, b, c = _run(7), _run(7), _run(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_output_lands_on_the_requested_device() -> None:
    ids, rows, _ = _run(7, device=torch.device("cpu"))
    assert ids.device.type == "cpu" and rows.device.type == "cpu" and rows.shape == (len(ids), 3)


def test_empty_cohort_still_releases_noise() -> None:
    ids, rows, diag = noisy_rows(1000, 3, [], [], sensitivity=0.1, split=Split(grad=1.0, count=1.0),
                                 threshold=1.0, row_average=True, generator=_gen(1))
    assert 100 < len(ids) < 230 and rows.shape == (len(ids), 3)  # ~ 1000 * Phi(-1) = 159 false positives
    assert bool(torch.all(rows != 0)) and diag["rows_true_positive_server_only"] == 0
    ids, rows, diag = noisy_rows(1000, 3, [], [], sensitivity=0.1, split=Split(grad=1.0, count=1.0),
                                 threshold=50.0, row_average=True, generator=_gen(1))
    assert ids.shape == (0,) and rows.shape == (0, 3) and math.isnan(diag["normaliser"])


@pytest.mark.parametrize(("sums", "counts", "match"), [
    ([_sparse([0], [[1.0, 1.0]])], [], "one pair per device"),
    ([_sparse([5], [[0.1, 0.1]])], [_sparse([0], [1.0])], "outside"),
    ([_sparse([0], [[0.1, 0.1, 0.1]])], [_sparse([0], [1.0])], "shape"),
    ([_sparse([0], [[np.nan, 0.1]])], [_sparse([0], [1.0])], "non-finite"),
    ([_sparse([0], [[0.1, 0.1]])], [_sparse([0], [-1.0])], "negative"),
    ([_sparse([0, 1], [[1.0, 0.0], [0.0, 1.0]])], [_sparse([0], [1.0])], "exceeds"),  # norm sqrt 2 > 1 * 1
])
def test_bad_replies_are_refused(sums, counts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        noisy_rows(5, 2, sums, counts, sensitivity=1.0, split=Split(1.0, 1.0), threshold=0.0, row_average=True,
                   generator=_gen())


def test_noised_sums_skip_the_bound_checks_only() -> None:
    over = [_sparse([0, 1], [[3.0, 0.0], [0.0, 3.0]])]
    noisy_rows(5, 2, over, [_sparse([0], [-1.0])], sensitivity=1.0, split=Split(1.0, 1.0), threshold=0.0,
               row_average=True, generator=_gen(), noised=True)
    with pytest.raises(ValueError, match="outside"):
        noisy_rows(5, 2, [_sparse([7], [[0.0, 0.0]])], [_sparse([], [])], sensitivity=1.0, split=Split(1.0, 1.0),
                   threshold=0.0, row_average=True, generator=_gen(), noised=True)


@pytest.mark.parametrize("w", [8, 64])
def test_a_noised_sum_divides_by_its_counts_when_they_are_honest_and_by_its_norm_when_they_lie(w: int) -> None:
    """SecAgg+ (``noised``): the worst honest case, every event's clipped gradient of norm ``lr C`` pointing
    the same way, in 2,000 rows under the full noise (float rounding aside, the floor binds on none: it leaves
    6 noise stds beyond sqrt(width)); then the same sums with every count lowered to 1 are divided by at least
    the events their norm needs, so each row moves at most one event's bound plus its noise over the floor."""
    n, sens, z = 2000, 0.5, Split(grad=2.0, count=3.0)  # at width 64 a margin without sqrt(width) would bind
    g = _gen(11)
    c = torch.randint(1, 400, (n,), generator=g).double()
    direction = torch.nn.functional.normalize(torch.randn(n, w, generator=g, dtype=torch.float64), dim=1)
    noisy = c[:, None] * sens * direction + torch.randn(n, w, generator=g, dtype=torch.float64) * z.grad * sens
    sums = [_sparse(np.arange(n), noisy.numpy())]
    for lie in (False, True):
        counts = [_sparse(np.arange(n), np.ones(n) if lie else c.numpy())]
        ids, rows, diag = noisy_rows(n, w, sums, counts, sensitivity=sens, split=z, threshold=-1e9, row_average=True,
                                     generator=_gen(), noised=True)
        assert ids.tolist() == list(range(n)) and (diag["rows_floored"] > n // 2 if lie else diag["rows_floored"] == 0)
        if not lie:
            np.testing.assert_allclose(rows.numpy(), (noisy / c[:, None]).numpy(), rtol=1e-6)
        else:
            moved = rows.double().norm(dim=1)
            assert float(moved.max()) <= sens * (1 + 1e-6) + z.grad * sens * (math.sqrt(w) + 6)  # one event + margin
            assert float(moved.median()) < 2 * sens and float(moved.median()) > 0.5 * sens
            assert float(noisy.norm(dim=1).median()) > 50 * sens  # what a divisor of 1 would have moved


@pytest.mark.parametrize(("sens", "thr"), [(0.0, 0.0), (math.nan, 0.0), (1.0, math.inf), (1.0, math.nan)])
def test_bad_parameters_are_refused(sens: float, thr: float) -> None:
    with pytest.raises(ValueError, match="should be"):
        noisy_rows(5, 2, [], [], sensitivity=sens, split=Split(1.0, 1.0), threshold=thr, row_average=True,
                   generator=_gen())


# ----------------------------------------------------------------------------------------------
# accounting against independent references

DELTA = 1e-5


def _gdp_epsilon(mu: float, delta: float) -> float:
    """Exact ε(δ) of a Gaussian mechanism of sensitivity/std ``mu`` (Balle & Wang 2018, Theorem 8):
    δ = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2), solved for ε."""
    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2)) - delta
    return float(optimize.brentq(gap, 0.0, 500.0, xtol=1e-10))


@pytest.mark.parametrize(("z", "n"), [(0.8, 3), (1.5, 10), (4.0, 50)])
def test_full_batch_composition_matches_the_analytic_gaussian(z: float, n: int) -> None:
    # n Gaussian steps with multiplier z compose to one Gaussian mechanism with mu = sqrt(n)/z (GDP)
    assert epsilon([(z, 1.0, n)], DELTA, "prv") == pytest.approx(_gdp_epsilon(math.sqrt(n) / z, DELTA), rel=0.01)


@pytest.mark.parametrize(("z_eff", "share", "n"), [(0.8, 0.3, 3), (1.5, 0.5, 10)])
def test_split_mechanism_is_one_gaussian_with_the_effective_multiplier(z_eff: float, share: float, n: int) -> None:
    sp = split(z_eff, share)
    mu = math.sqrt(n * (1 / sp.grad**2 + 1 / sp.count**2))  # the two parts' mus, combined
    assert mu == pytest.approx(math.sqrt(n) / effective(sp), rel=1e-12)
    exact = _gdp_epsilon(mu, DELTA)
    assert epsilon([(effective(sp), 1.0, n)], DELTA, "prv") == pytest.approx(exact, rel=0.01)
    # the two parts as separate releases compose to the same thing
    assert epsilon([(sp.grad, 1.0, n), (sp.count, 1.0, n)], DELTA, "prv") == pytest.approx(exact, rel=0.01)


@pytest.mark.parametrize(("z", "q", "n"), [(1.0, 0.01, 100), (0.8, 0.05, 40), (2.0, 0.2, 200)])
def test_subsampled_ledger_matches_opacus_prv(z: float, q: float, n: int) -> None:
    ref = PRVAccountant()
    ref.history = [(z, q, n)]
    with warnings.catch_warnings():  # PRV's discretisation warnings are not what is tested
        warnings.simplefilter("ignore")
        expected = float(ref.get_epsilon(delta=DELTA))
    assert epsilon([(z, q, n)], DELTA, "prv") == pytest.approx(expected, rel=0.01)
