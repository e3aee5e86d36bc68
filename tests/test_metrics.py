"""Tests for :mod:`fedrec.eval.metrics` against an independent brute-force reference.

The reference sorts the candidate items (all items minus the excluded ones) by score,
descending, putting every item that ties with a target ABOVE it (pessimistic tie-breaking, as
the module docstring says), and reads each target's position off that list. Among targets
that tie with each other any order gives the same HR, Recall and DCG, so they are laid out in
id order. HR@K = any target in the top K; Recall@K = hits / |targets|; NDCG@K = DCG / IDCG with
IDCG over ``min(|targets|, K)`` positions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrec.eval.metrics import PrequentialCounts, prequential_counts, ranking_metrics, target_rank

# ----------------------------------------------------------------------------------------------
# reference implementation


def ref_positions(scores, targets, exclude=()):
    """0-based position of each target in the pessimistic full ranking (sorted targets order)."""
    tset = set(int(t) for t in targets)
    ex = set(int(e) for e in exclude) - tset  # a target is always ranked
    cand = [i for i in range(len(scores)) if i not in ex]
    # key: higher score first; at equal score non-targets (False < True is wrong way) go first
    cand.sort(key=lambda i: (-float(scores[i]), i in tset, i))
    pos = {i: p for p, i in enumerate(cand)}
    return {t: pos[t] for t in sorted(tset)}


def ref_metrics(scores, targets, k, exclude=()):
    tset = sorted(set(int(t) for t in targets))
    if not tset:
        return math.nan, math.nan, math.nan
    pos = ref_positions(scores, tset, exclude)
    hits = [p for p in pos.values() if p < k]
    hr = 1.0 if hits else 0.0
    recall = len(hits) / len(tset)
    dcg = sum(1.0 / math.log2(p + 2) for p in hits)
    idcg = sum(1.0 / math.log2(p + 2) for p in range(min(len(tset), k)))
    return hr, dcg / idcg, recall


def ref_rank_single(scores, target, exclude_mask=None):
    """Items not excluded, other than the target, scoring >= the target."""
    s = scores[target]
    return sum(1 for i in range(len(scores))
               if i != target and scores[i] >= s and not (exclude_mask is not None and exclude_mask[i]))


def ref_prequential(scores, seen, new_items, k):
    ex = set(np.flatnonzero(seen).tolist())
    n, hits, ndcg = 0, 0.0, 0.0
    for i in new_items:
        i = int(i)
        if i in ex:
            continue
        r = sum(1 for j in range(len(scores)) if j != i and j not in ex and scores[j] >= scores[i])
        n += 1
        if r < k:
            hits += 1
            ndcg += 1 / math.log2(r + 2)
        ex.add(i)
    return n, hits, ndcg


# ----------------------------------------------------------------------------------------------
# the reference itself, on cases worked by hand


def test_reference_hand_cases():
    s = np.array([0.9, 0.1, 0.5, 0.5, 0.3])
    # order: 0 (.9), 2/3 (.5), 4 (.3), 1 (.1)
    assert ref_positions(s, [3]) == {3: 2}  # item 2 ties with it and is placed above
    assert ref_positions(s, [0]) == {0: 0}
    assert ref_positions(s, [1], exclude=[0, 4]) == {1: 2}


# ----------------------------------------------------------------------------------------------
# target_rank


def test_target_rank_hand():
    s = np.array([0.9, 0.1, 0.5, 0.5, 0.3])
    assert target_rank(s, 0) == 0
    assert target_rank(s, 2) == 2  # 0 above, 3 ties -> counted above
    assert target_rank(s, 3) == 2
    assert target_rank(s, 4) == 3
    assert target_rank(s, 1) == 4
    ex = np.array([True, False, False, True, False])
    assert target_rank(s, 2, ex) == 0
    assert target_rank(s, 1, ex) == 2


def test_all_equal_scores_earn_nothing():
    s = np.zeros(20)
    out = ranking_metrics(s[None, :], [[5]], k=10)
    assert out["hr"][0] == 0.0 and out["ndcg"][0] == 0.0 and out["recall"][0] == 0.0
    assert target_rank(s, 5) == 19


# ----------------------------------------------------------------------------------------------
# ranking_metrics on toy cases


def test_ranking_metrics_hand_single_target():
    # 5 items; scores give the ranking 3, 0, 4, 1, 2
    s = np.array([[0.8, 0.2, 0.1, 0.9, 0.5]])
    for target, rank in [(3, 0), (0, 1), (4, 2), (1, 3), (2, 4)]:
        out = ranking_metrics(s, [[target]], k=3)
        hit = rank < 3
        assert out["hr"][0] == float(hit)
        assert out["recall"][0] == float(hit)
        assert out["ndcg"][0] == pytest.approx(1 / math.log2(rank + 2) if hit else 0.0)


def test_ranking_metrics_hand_two_targets_and_exclude():
    s = np.array([[0.8, 0.2, 0.1, 0.9, 0.5]])
    # targets {0, 4}; excluding 3 gives ranking 0, 4, 1, 2 -> ranks 0 and 1
    out = ranking_metrics(s, [[0, 4]], k=2, exclude=[[3]])
    assert out["hr"][0] == 1.0
    assert out["recall"][0] == 1.0
    assert out["ndcg"][0] == pytest.approx(1.0)
    # without excluding 3: ranks 1 and 2; k=2 -> one hit at rank 1
    out = ranking_metrics(s, [[0, 4]], k=2)
    assert out["recall"][0] == 0.5
    assert out["ndcg"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    # IDCG over min(|targets|, K) = 1 position when K = 1
    out = ranking_metrics(s, [[0, 4, 1]], k=1, exclude=[[3]])
    assert out["ndcg"][0] == pytest.approx(1.0)
    assert out["recall"][0] == pytest.approx(1 / 3)


def test_ranking_metrics_empty_targets_nan_and_rows_independent():
    s = np.array([[0.8, 0.2, 0.1], [0.1, 0.2, 0.3]])
    out = ranking_metrics(s, [[], [2]], k=1)
    assert math.isnan(out["hr"][0]) and math.isnan(out["ndcg"][0]) and math.isnan(out["recall"][0])
    assert out["hr"][1] == 1.0 and out["ndcg"][1] == 1.0


def test_ranking_metrics_tie_with_nontarget_is_pessimistic():
    s = np.array([[0.5, 0.5, 0.1, 0.0, 0.0]])
    out = ranking_metrics(s, [[1]], k=1)
    assert out["hr"][0] == 0.0  # item 0 ties and goes above
    out = ranking_metrics(s, [[1]], k=1, exclude=[[0]])
    assert out["hr"][0] == 1.0


@pytest.mark.parametrize("scores,k,expect", [
    # two targets tied at the top, K = 1: only one fits in a top-1 list (library: recall 1, NDCG 2)
    ([1.0, 1.0, 0.0, 0.0, 0.0], 1, (1.0, 1.0, 0.5)),
    # a non-target ties with both and goes above; K = 2 holds one target (library: recall 1)
    ([1.0, 1.0, 1.0, 0.0, 0.0], 2, (1.0, (1 / math.log2(3)) / (1 + 1 / math.log2(3)), 0.5)),
])
def test_ranking_metrics_targets_tied_with_each_other(scores, k, expect):
    s = np.array([scores])
    assert ref_metrics(s[0], [0, 1], k) == pytest.approx(expect)
    out = ranking_metrics(s, [[0, 1]], k=k)
    assert (out["hr"][0], out["ndcg"][0], out["recall"][0]) == pytest.approx(expect)


# ----------------------------------------------------------------------------------------------
# property tests against the reference


@st.composite
def ranking_case(draw, distinct_target_scores: bool):
    V = draw(st.integers(2, 12))
    B = draw(st.integers(1, 4))
    k = draw(st.integers(1, V + 2))
    scores = np.array(draw(st.lists(st.lists(st.integers(0, 4), min_size=V, max_size=V),
                                    min_size=B, max_size=B)), dtype=np.float64)
    targets, excludes = [], []
    for b in range(B):
        t = draw(st.sets(st.integers(0, V - 1), max_size=V))
        if distinct_target_scores:
            # keep only one target per score value (ties with non-targets stay)
            byscore = {}
            for i in sorted(t):
                byscore.setdefault(scores[b, i], i)
            t = set(byscore.values())
        rest = [i for i in range(V) if i not in t]
        e = draw(st.sets(st.sampled_from(rest), max_size=len(rest))) if rest else set()
        targets.append(sorted(t))
        excludes.append(sorted(e))
    return scores, targets, excludes, k


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ranking_case(distinct_target_scores=True))
def test_ranking_metrics_matches_reference(case):
    scores, targets, excludes, k = case
    out = ranking_metrics(scores, targets, k, exclude=excludes)
    for b in range(len(scores)):
        hr, ndcg, recall = ref_metrics(scores[b], targets[b], k, excludes[b])
        if not targets[b]:
            assert math.isnan(out["hr"][b]) and math.isnan(out["ndcg"][b]) and math.isnan(out["recall"][b])
            continue
        assert out["hr"][b] == hr
        assert out["recall"][b] == pytest.approx(recall)
        assert out["ndcg"][b] == pytest.approx(ndcg)
        assert 0.0 <= out["ndcg"][b] <= 1.0 + 1e-12
        assert 0.0 <= out["recall"][b] <= 1.0


@settings(max_examples=200, deadline=None)
@given(ranking_case(distinct_target_scores=False))
def test_ranking_metrics_match_reference_with_any_ties(case):
    # HR only depends on the best target, so it must match even when targets tie with each other
    scores, targets, excludes, k = case
    out = ranking_metrics(scores, targets, k, exclude=excludes)
    for b in range(len(scores)):
        if targets[b]:
            hr, ndcg, recall = ref_metrics(scores[b], targets[b], k, excludes[b])
            assert out["hr"][b] == hr
            assert out["ndcg"][b] == pytest.approx(ndcg)
            assert out["recall"][b] == pytest.approx(recall)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=15).flatmap(
    lambda s: st.tuples(st.just(np.array(s, float)), st.integers(0, len(s) - 1),
                        st.lists(st.booleans(), min_size=len(s), max_size=len(s)))))
def test_target_rank_matches_reference(case):
    scores, t, ex = case
    ex = np.array(ex)
    assert target_rank(scores, t, ex) == ref_rank_single(scores, t, ex)
    assert target_rank(scores, t) == ref_rank_single(scores, t)
    # the pessimistic rank is also the reference list position (single target, target never excluded)
    ex2 = ex.copy()
    ex2[t] = False
    assert target_rank(scores, t, ex2) == ref_positions(scores, [t], np.flatnonzero(ex2))[t]


# ----------------------------------------------------------------------------------------------
# prequential_counts


def test_prequential_hand_case():
    # ranking by score: 3, 0, 4, 1, 2
    s = np.array([0.8, 0.2, 0.1, 0.9, 0.5])
    seen = np.array([False, False, False, True, False])  # the user had item 3
    before = seen.copy()
    c = prequential_counts(s, seen, [4, 0, 3, 4, 1], k=2)
    # 4: candidates {0,1,2,4} -> 0 above -> rank 1 (hit); now 4 is had
    # 0: candidates {0,1,2}   -> rank 0 (hit)
    # 3: had before -> skipped; 4: consumed earlier in the window -> skipped
    # 1: candidates {1,2}     -> rank 0 (hit)
    assert c.n == 3
    assert c.hits == 3
    assert c.ndcg == pytest.approx(1 / math.log2(3) + 1 + 1)
    np.testing.assert_array_equal(seen, before)


def test_prequential_earlier_new_events_are_excluded():
    s = np.array([0.9, 0.8, 0.7, 0.0, 0.0])
    seen = np.zeros(5, bool)
    # item 2 at rank 2 alone; after 0 and 1 are consumed it is rank 0
    assert prequential_counts(s, seen, [2], k=1).hits == 0
    c = prequential_counts(s, seen, [0, 1, 2], k=1)
    assert (c.n, c.hits) == (3, 3)
    assert c.ndcg == pytest.approx(3.0)
    assert not seen.any()


def test_prequential_counts_add_and_means():
    a = PrequentialCounts(2, 1.0, 0.5)
    a.add(PrequentialCounts(2, 1.0, 0.3))
    assert (a.n, a.hits) == (4, 2.0)
    assert a.hr == 0.5 and a.ndcg_mean == pytest.approx(0.2)
    assert math.isnan(PrequentialCounts().hr) and math.isnan(PrequentialCounts().ndcg_mean)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 12).flatmap(lambda V: st.tuples(
    st.lists(st.integers(0, 3), min_size=V, max_size=V),
    st.lists(st.booleans(), min_size=V, max_size=V),
    st.lists(st.integers(0, V - 1), max_size=2 * V),
    st.integers(1, V + 1))))
def test_prequential_matches_reference(case):
    scores, seen, new, k = case
    scores = np.array(scores, float)
    seen = np.array(seen)
    before = seen.copy()
    c = prequential_counts(scores, seen, new, k)
    n, hits, ndcg = ref_prequential(scores, before, new, k)
    assert c.n == n
    assert c.hits == hits
    assert c.ndcg == pytest.approx(ndcg)
    np.testing.assert_array_equal(seen, before)


@pytest.mark.parametrize("short", [64, 0])
def test_event_rows_rank_each_block_as_event_counts_does(monkeypatch, short):
    """Rows of many blocks ranked together give each block what :func:`event_counts` gives it alone (repeats,
    items already had, ties and a NaN included), whichever way the earlier events are marked."""
    import fedrec.eval.metrics as metrics
    from fedrec.eval.metrics import EventRows, event_counts

    monkeypatch.setattr(metrics, "SHORT", short)
    rng = np.random.default_rng(3)
    blocks = [(rng.integers(0, 30, rng.integers(0, 12)), rng.integers(0, 30, n)) for n in (1, 4, 0, 9, 70, 2)]
    rows = sum(len(n) for _, n in blocks)
    scores = rng.integers(0, 6, (rows, 30)).astype(np.float32)  # many ties
    scores[2, 5] = np.nan
    got = EventRows(blocks, 30).counts(scores, 5)
    at = 0
    for (history, new), c in zip(blocks, got, strict=True):
        seen = np.zeros(30, bool)
        seen[history] = True
        want = event_counts(scores[at:at + len(new)], seen, new, 5)
        at += len(new)
        assert (c.n, c.hits) == (want.n, want.hits) and c.ndcg == pytest.approx(want.ndcg)


def test_one_row_per_block_ranks_as_that_row_repeated_for_its_events():
    """The round-start blend's rows: one per block, ranked as if repeated for every event (and trailing row)."""
    from fedrec.eval.metrics import EventRows

    rng = np.random.default_rng(4)
    blocks = [(rng.integers(0, 40, rng.integers(0, 9)), rng.integers(0, 40, n)) for n in (3, 0, 7, 1, 25)]
    ranked = EventRows(blocks, 40, trailing=True)
    per_block = rng.integers(0, 5, (len(blocks), 40)).astype(np.float32)  # many ties
    per_block[0, 3] = np.nan
    got = ranked.counts(per_block, 4, per_block=True)
    want = ranked.counts(np.repeat(per_block, ranked.lens, axis=0), 4)
    assert [(c.n, c.hits, c.ndcg) for c in got] == [(c.n, c.hits, c.ndcg) for c in want]
    assert sum(c.hits for c in got) > 0
