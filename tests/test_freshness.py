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
    # level with the reference while it dips, then left behind as it recovers: not adapted, and
    # a recovery that does not last does not count either
    assert adaptation_lag([0.5, 0.5, 0.3, 0.3, 0.3, 0.3], ref, 3) is None
    assert adaptation_lag([0.5, 0.5, 0.3, 0.3, 0.5, 0.3], ref, 3) is None
    assert adaptation_lag([0.5, 0.5, 0.3, 0.3, 0.3, 0.48], ref, 3) == 3


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


# ---- uptake summaries, top-K membership, launch rounds, recent popularity -------------------------

def test_uptake_summary_by_hand():
    from fedrec.eval.freshness import uptake_summary

    start = {5: 2, 6: 3, 7: 1}
    shares = {5: [None, 0.2, 0.6, 0.9],  # launched round 2: reaches 0.5 at round 3 -> 1 round
              6: [None, None, None, 0.5],  # launched round 3: 0.5 at round 4 -> 1 round
              7: [0.1, 0.1, 0.1, 0.1]}  # never
    s = uptake_summary(start, shares)
    assert s["per_item"] == {"5": 1, "6": 1, "7": None}
    assert s["items"] == 3 and s["taken_up"] == 2 and s["rate"] == pytest.approx(2 / 3)
    assert s["median_rounds"] == 1.0  # [1, 1, inf] -> 1
    assert s["peak_share_median"] == pytest.approx(0.5)
    # half or more never taken up: the median is censored, so None
    assert uptake_summary({1: 1, 2: 1}, {1: [1.0], 2: [0.0]})["median_rounds"] is None


def test_in_topk_agrees_with_brute_force_ranks():
    import numpy as np

    from fedrec.eval.metrics import in_topk, target_rank

    rng = np.random.default_rng(0)
    for _ in range(300):
        s = rng.integers(0, 6, size=25).astype(float)  # many ties
        ex = rng.random(25) < 0.3
        items = rng.integers(0, 25, size=5)
        k = int(rng.integers(1, 8))
        want = [bool(not ex[i] and target_rank(s, int(i), ex) < k) for i in items]
        assert in_topk(s, items, ex, k).tolist() == want


def test_per_event_counts_agree_with_brute_force_ranks():
    import numpy as np

    from fedrec.eval.metrics import event_counts, target_rank

    rng = np.random.default_rng(1)
    for _ in range(300):
        V, n = 25, int(rng.integers(1, 7))
        S = rng.integers(0, 6, size=(n, V)).astype(float)  # many ties
        seen = rng.random(V) < 0.3
        items = rng.integers(0, V, size=n)  # repeats and items had before the round too
        k = int(rng.integers(1, 8))
        n_scored, hits, ndcg = 0, 0, 0.0
        for j, i in enumerate(items):
            if seen[i] or i in items[:j]:  # had before the round, or earlier in it: not scored
                continue
            had = seen.copy()
            had[items[:j]] = True
            rank = target_rank(S[j], int(i), had)
            n_scored += 1
            if rank < k:
                hits, ndcg = hits + 1, ndcg + 1.0 / np.log2(rank + 2)
        got = event_counts(S, seen, items, k)
        assert (got.n, got.hits) == (n_scored, hits) and abs(got.ndcg - ndcg) < 1e-9


def test_launch_round_and_tracked_items():
    import numpy as np

    from fedrec.data.events import EventLog
    from fedrec.data.stream import RoundStream
    from fedrec.eval.freshness import tracked_items

    # item 0 from round 1; item 1 first seen in round 2 with 5 events; item 2 first seen in round 3 once
    items = [0, 0, 1, 1, 1, 1, 1, 2, 0]
    users = [0, 1, 2, 3, 4, 5, 6, 0, 1]
    ts = [0, 0.1, 1.0, 1.1, 1.2, 1.3, 2.5, 2.6, 2.7]
    log = EventLog.from_arrays(user=np.array(users), item=np.array(items), timestamp=np.array(ts, float))
    st = RoundStream.build(log, 3, "time")
    assert st.launch_round.tolist() == [1, 2, 3]
    start, groups = tracked_items(st, min_users=5)
    assert start.tolist() == [0, 2, 0] and groups == {"new": [1], "burst": []}
    assert st.round_at(0.05) == 1 and st.round_at(2.55) == 3


def test_where_the_world_records_its_launches_new_items_are_those_and_late_old_items_are_apart():
    import numpy as np

    from fedrec.data.events import EventLog
    from fedrec.data.stream import RoundStream
    from fedrec.eval.freshness import tracked_items

    # items 1 and 2 are both first seen in round 2 with 5 events each; only item 2 launched mid-stream
    items = [0, 0] + [1] * 5 + [2] * 5
    users = [0, 1] + list(range(2, 7)) + list(range(2, 7))
    ts = [0.0, 0.1] + [1.0] * 5 + [1.5] * 5
    log = EventLog.from_arrays(user=np.array(users), item=np.array(items), timestamp=np.array(ts, float), n_items=3)
    log.meta["world"] = {"new_items": [2]}
    st = RoundStream.build(log, 2, "time")
    start, groups = tracked_items(st, min_users=5)
    assert start.tolist() == [0, 2, 2] and groups == {"new": [2], "late": [1], "burst": []}


def test_recent_window_popularity_forgets():
    import numpy as np

    from fedrec.data.events import EventLog
    from fedrec.data.stream import RoundStream
    from fedrec.eval.baselines import popularity_prequential

    # rounds 1-2: item 0 is the hit; round 3: item 1 is; device 9 is scored in round 4 on item 1
    items = [0] * 6 + [0] * 6 + [1] * 3 + [1]
    users = list(range(6)) + list(range(6)) + [6, 7, 8] + [9]
    ts = [0.0] * 6 + [1.0] * 6 + [2.0] * 3 + [3.0]
    log = EventLog.from_arrays(user=np.array(users), item=np.array(items), timestamp=np.array(ts, float))
    st = RoundStream.build(log, 4, "time")
    sched = [[], [], [], [9]]  # ids are remapped in order of first appearance: user 9 stays 9
    all_time = list(popularity_prequential(st, sched, k=1))[3]
    recent = list(popularity_prequential(st, sched, k=1, window=1))[3]
    assert all_time.n == recent.n == 1
    assert all_time.hits == 0 and recent.hits == 1  # only the recent window puts item 1 first
