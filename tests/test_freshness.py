"""Freshness metrics on hand-made sequences with known answers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedrec.eval.freshness import adaptation_lag, staleness, uptake_rounds, windowed_rate


def test_windowed_rate_by_hand():
    hits = [1, 0, 3, 0]
    n = [2, 0, 4, 4]
    assert windowed_rate(hits, n, 1) == [0.5, None, 0.75, 0.0]
    assert windowed_rate(hits, n, 2) == [0.5, 0.5, 0.75, 3 / 8]
    assert windowed_rate(hits, n, 10) == [0.5, 0.5, 4 / 6, 4 / 10]


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=20), st.integers(1, 6))
def test_windowed_rate_matches_direct_sums(rows, w):
    hits = [min(h, c) for h, c in rows]
    n = [c for _, c in rows]
    got = windowed_rate(hits, n, w)
    for r in range(1, len(rows) + 1):
        den = sum(n[max(0, r - w):r])
        want = sum(hits[max(0, r - w):r]) / den if den else None
        assert got[r - 1] == (pytest.approx(want) if want is not None else None)


def test_windowed_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="window"):
        windowed_rate([1], [1], 0)
    with pytest.raises(ValueError, match="one value per round"):
        windowed_rate([1, 2], [1], 1)


def test_adaptation_lag_by_hand():
    ref = [0.5, 0.5, 0.3, 0.4, 0.5, 0.5]
    series = [0.5, 0.5, 0.1, 0.2, 0.46, 0.5]
    # drift at round 3: round 3 is 0.1 < 0.27, round 4 is 0.2 < 0.36, round 5 is 0.46 >= 0.45
    assert adaptation_lag(series, ref, 3) == 2
    assert adaptation_lag(series, ref, 3, tolerance=0.5) == 1  # 0.2 >= 0.2
    assert adaptation_lag(ref, ref, 3) == 0  # the reference never lags itself
    assert adaptation_lag([0.1] * 6, ref, 3) is None  # never recovers: censored, not a number
    assert adaptation_lag([None, None, None, 0.5, 0.5, 0.5], ref, 3) == 1  # missing rounds skipped


def test_adaptation_lag_rejects_a_drift_outside_the_run():
    with pytest.raises(ValueError, match="outside"):
        adaptation_lag([0.1], [0.1], 2)


def test_uptake_by_hand():
    share = [None, 0.0, 0.1, 0.4, 0.6, 0.9]
    assert uptake_rounds(2, share) == 3  # reaches 0.5 at round 5
    assert uptake_rounds(2, share, threshold=0.1) == 1
    assert uptake_rounds(5, share) == 0
    assert uptake_rounds(2, [0.0] * 6) is None


def test_staleness_by_hand():
    assert staleness([True, True, False, False, True]) == [None, 1, 1, 2, 3]
    assert staleness([False, False]) == [None, None]
