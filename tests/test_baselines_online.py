"""The centralised baselines scored per event (item-kNN and BPR MF), on a hand-checked toy stream and on
ml-latest-small.

The toy stream: 3 users, 6 items, 15 events cut into 3 rounds of 5 (one event per time step):

======  =====================  =====================  ==========================
round   1 (t0-t4)              2 (t5-t9)              3 (t10-t14)
======  =====================  =====================  ==========================
user 0  0, 1, 3                5, 4
user 1  3, 5                   4                      2, 1, 0
user 2                         0, 1                   4, 2
======  =====================  =====================  ==========================

in time order ``u0:0 u0:1 u1:3 u0:3 u1:5 | u2:0 u2:1 u1:4 u0:5 u0:4 | u2:4 u2:2 u1:2 u1:1 u1:0``, scored
with K = 1, a pair window of 1 (each event pairs with its user's event before it) and a context of 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.config import RunConfig
from fedrec.data.events import EventLog
from fedrec.data.source import load_stream
from fedrec.data.stream import RoundStream
from fedrec.eval.baselines import centralised_mf_prequential, item_knn_prequential, popularity_prequential
from fedrec.eval.metrics import PrequentialCounts
from fedrec.report import RunRecorder, below_popularity

EVENTS = [(0, 0), (0, 1), (1, 3), (0, 3), (1, 5),
          (2, 0), (2, 1), (1, 4), (0, 5), (0, 4),
          (2, 4), (2, 2), (1, 2), (1, 1), (1, 0)]  # (user, item), one per time step
SCHEDULE = [[0, 1], [1, 2], [1]]
KNN = {"window": 1, "neighbours": 5, "context": 2}
ML = "/work/shared/data/ml-latest-small/ratings.csv"


def _stream(events: list[tuple[int, int]] = EVENTS) -> RoundStream:
    user, item = np.array(events).T
    log = EventLog.from_arrays(user=user, item=item, timestamp=np.arange(len(events), dtype=float), n_items=6)
    return RoundStream.build(log, 3)


def _pairs(rounds: list[PrequentialCounts]) -> list[tuple[int, float]]:
    return [(c.n, c.hits) for c in rounds]


def test_the_toy_stream_is_cut_as_drawn():
    s = _stream()
    assert s.round_of.tolist() == [1] * 5 + [2] * 5 + [3] * 5
    assert s.log.user.tolist() == [u for u, _ in EVENTS] and s.log.item.tolist() == [i for _, i in EVENTS]


def test_item_knn_hits_what_only_co_occurrence_predicts():
    """Round 2, user 2 (nothing had): event ``0`` has no context, and the prior (round 1's counts) puts 3
    first; event ``1`` follows ``0``, and ``0``'s only neighbour is ``1`` (user 0, round 1): a hit. User 1's
    ``4`` (after 3, 5) was never seen before: a miss. Popularity ranks 3 first every time: no hit."""
    s = _stream()
    knn = list(item_knn_prequential(s, SCHEDULE, 1, **KNN))
    pop = list(popularity_prequential(s, SCHEDULE, 1))
    assert _pairs(knn)[:2] == [(5, 0.0), (3, 1.0)]  # round 1: an empty graph scores all items alike
    assert _pairs(pop)[:2] == [(5, 0.0), (3, 0.0)]


def test_item_knn_never_reads_the_event_it_scores_or_a_later_one():
    """Round 3, user 1 (had 3, 5, 4) does 2, 1, 0. Two planted futures would each turn a miss into a hit:

    * event ``2``: its context (4, 5) reaches no unseen item, and 2 was never seen before round 3, so it
      ranks last of 0, 1, 2. User 2 paired 4 with 2 earlier in round 3: a graph that heard of the round
      being scored would put 2 first.
    * event ``1``: its context (2, 4) reaches nothing unseen (2 has no pairs yet), and 0 and 1 tie on the
      prior: ties count against the target. The next event, ``0``, has ``1`` as its only neighbour:
      a row that read it would put 1 first.

    Event ``0`` is the only unseen item left: a hit. So 1 hit of 3, not 3.
    """
    assert _pairs(item_knn_prequential(_stream(), SCHEDULE, 1, **KNN))[2] == (3, 1.0)
    # with the pair (4, 2) heard before round 3 (user 2 does 4, 2 in round 2 instead of 0, 1), event 2 is a hit
    early = EVENTS[:5] + [(2, 4), (2, 2)] + EVENTS[7:10] + [(2, 0), (2, 1)] + EVENTS[12:]
    assert _pairs(item_knn_prequential(_stream(early), SCHEDULE, 1, **KNN))[2] == (3, 2.0)


@pytest.mark.parametrize("measure", [
    lambda s: list(item_knn_prequential(s, SCHEDULE, 2, **KNN)),
    lambda s: list(centralised_mf_prequential(s, SCHEDULE, 2, dim=4, seed=3, context=2, init_scale=0.1)),
], ids=["item_knn", "centralised_mf"])
def test_a_round_is_scored_from_earlier_rounds_only(measure):
    """Other items in round 3 change nothing in rounds 1 and 2; both score the events popularity scores."""
    s = _stream()
    other = _stream(EVENTS[:10] + [(2, 5), (2, 3), (1, 1), (1, 2), (1, 0)])
    got = measure(s)
    assert _pairs(measure(other))[:2] == _pairs(got)[:2]
    assert [c.n for c in got] == [c.n for c in popularity_prequential(s, SCHEDULE, 2)]


def test_centralised_mf_is_seeded():
    s = _stream()
    run = lambda seed: [(c.n, c.hits, c.ndcg) for c in  # noqa: E731
                        centralised_mf_prequential(s, SCHEDULE, 3, dim=4, seed=seed, context=2, init_scale=0.1)]
    assert run(5) == run(5)


def test_the_centralised_adam_is_torchs_adam_step_for_step():
    from fedrec.centralised import Adam

    g = torch.Generator().manual_seed(0)
    ours, theirs = [torch.randn(7, 3, generator=g).requires_grad_(True) for _ in range(2)]
    with torch.no_grad():
        theirs.copy_(ours)
    first = ours.detach().clone()
    opts = Adam([ours], lr=0.02), torch.optim.Adam([theirs], lr=0.02)
    for step in range(25):
        target = torch.randn(7, 3, generator=g)
        for p, opt in zip((ours, theirs), opts, strict=True):
            opt.zero_grad()
            ((p - target) ** 2 * (step % 3)).sum().backward()  # a zero gradient every third step
            opt.step()
        assert torch.equal(ours, theirs), step
    assert not torch.equal(ours, first)


def test_the_centralised_adams_user_rows_are_torchs_sparse_adam_step_for_step():
    """The user table steps lazily: only the rows of a batch's users, as ``torch.optim.SparseAdam`` on an embedding
    with sparse gradients; rows nobody touched keep their values."""
    from fedrec.centralised import Adam

    g = torch.Generator().manual_seed(1)
    table = torch.randn(9, 3, generator=g)
    emb = torch.nn.Embedding(9, 3, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(table)
    ours, theirs = Adam([table], lr=0.02), torch.optim.SparseAdam(list(emb.parameters()), lr=0.02)
    for step in range(25):
        users = torch.randint(0, 6, (5,), generator=g)  # rows 6-8 are never touched
        target = torch.randn(5, 3, generator=g)
        ids, at = torch.unique(users, return_inverse=True)
        rows = table[ids].requires_grad_(True)
        ((rows[at] - target) ** 2).sum().backward()
        ours.step(rows=(table, ids, rows.grad))
        theirs.zero_grad()
        ((emb(users) - target) ** 2).sum().backward()
        theirs.step()
        torch.testing.assert_close(table, emb.weight.detach(), rtol=1e-6, atol=1e-7, msg=f"step {step}")
    assert torch.equal(table[6:], emb.weight.detach()[6:])


def test_the_summary_names_every_baseline_and_its_round_column(tmp_path):
    s = _stream()
    cfg = RunConfig(out=str(tmp_path), k=1, rounds=3, graph_window=1, graph_neighbours=5, session_len=2, dim=4)
    rec = RunRecorder(cfg, stream=s)
    rec.schedule = [list(d) for d in SCHEDULE]
    rec.rows = [{"round": r} for r in (1, 2, 3)]
    got = rec._baselines()
    rec._f.close()
    assert set(got) == {"popularity", "recent_popularity", "item_knn", "centralised_mf"}
    assert got["item_knn"]["hr@1"] == pytest.approx(2 / 11) and got["item_knn"]["events_scored"] == 11
    assert got["centralised_mf"]["events_scored"] == 11 and "ceiling of the model" in got["centralised_mf"]["what"]
    assert [row["item_knn_hr@1"] for row in rec.rows] == [0.0, pytest.approx(1 / 3), pytest.approx(1 / 3)]
    assert all("centralised_mf_hr@1" in row for row in rec.rows)


def test_item_knn_beats_popularity_on_movielens():
    """ml-latest-small in 20 rounds, every user with events scored every round (popularity: HR@10 0.032;
    item-kNN 0.072 when written)."""
    cfg = RunConfig(data=ML, rounds=20)
    s = load_stream(cfg)
    schedule = [np.unique(s.log.user[s.round_of == r]).tolist() for r in range(1, 21)]
    knn, pop = PrequentialCounts(), PrequentialCounts()
    for c in item_knn_prequential(s, schedule, cfg.k, window=cfg.graph_window, neighbours=cfg.graph_neighbours,
                                  context=cfg.session_len):
        knn.add(c)
    for c in popularity_prequential(s, schedule, cfg.k):
        pop.add(c)
    assert knn.n == pop.n == len(s.log)  # ml-latest-small rates each movie once per user: every event scored
    assert knn.hr > 1.5 * pop.hr


@pytest.mark.parametrize("window", [1, 3])
def test_the_baselines_round_sums_are_every_users_own_contribution_summed(window):
    """The baselines' item graph takes each round's events of every user at once (``round_sums``,
    ``ItemGraph.add_sums``); adding each user's own ``device_pairs`` one by one (``ItemGraph.add``, as the server
    adds devices' updates) must give the same graph: pair sums (capped per user: this stream repeats items, so
    some users' pairs repeat), item counts, recent counts and affinities, round after round."""
    from fedrec.eval.baselines import round_sums
    from fedrec.itemgraph import ItemGraph, device_pairs

    rng = np.random.default_rng(4)
    n, U, V = 3000, 60, 25
    log = EventLog(user=rng.integers(0, U, n), item=rng.integers(0, V, n), timestamp=np.sort(rng.random(n)),
                   weight=np.ones(n, np.float32), kind=np.zeros(n, np.int8), n_users=U, n_items=V,
                   user_ids=np.arange(U), item_ids=np.arange(V), source="test", meta={})
    stream = RoundStream.build(log, 5)
    feats = rng.random((V, 4)) * (rng.random((V, 4)) < 0.5)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    each, summed = ItemGraph(V, 10, features=feats), ItemGraph(V, 10, features=feats)
    repeats = 0  # a user's pairs that repeat within a round: the per-user cap binds on them
    for r in range(1, 6):
        users = np.unique(log.user[stream.round_of == r])
        pairs = [device_pairs(log.item[stream.device_events(int(u), r)],
                              stream.round_of[stream.device_events(int(u), r)] == r, window) for u in users]
        repeats += sum(int((p.w > 1).sum()) for p in pairs)
        each.add(pairs)
        summed.add_sums(*round_sums(stream, r, window))
        assert (each.C != summed.C).nnz == 0 and each.C.sum() > 0
        np.testing.assert_array_equal(each.n, summed.n)
        np.testing.assert_array_equal(np.asarray(each.recent), np.asarray(summed.recent))
        np.testing.assert_allclose(each.A, summed.A, rtol=1e-12, atol=1e-12)
    assert np.abs(each.A).sum() > 0 and repeats > 0
    with pytest.raises(ValueError, match="exact sums"):
        ItemGraph(V, 10, noise_std=1.0).add_sums(*round_sums(stream, 1, window))


def test_the_sparse_had_matrix_answers_as_the_dense_one():
    """``_Had`` (the centralised MF's record of who had what, sorted keys merged round by round) against a dense
    boolean matrix: the same answers after adds with repeats, across and within rounds, on unsorted queries."""
    from fedrec.eval.baselines import _Had

    rng = np.random.default_rng(4)
    U, V = 50, 30
    dense, had = np.zeros((U, V), bool), _Had(V)
    u0, i0 = rng.integers(0, U, 40), rng.integers(0, V, 40)
    assert not had[u0, i0].any()
    for _ in range(5):
        u, i = rng.integers(0, U, 300), rng.integers(0, V, 300)
        dense[u, i] = True
        had.add(u, i)
        qu, qi = rng.integers(0, U, 500), rng.integers(0, V, 500)
        np.testing.assert_array_equal(had[qu, qi], dense[qu, qi])
    assert len(had.keys) == dense.sum() and np.all(np.diff(had.keys) > 0)


@pytest.mark.parametrize("V", [50, 2**31])
def test_distinct_pairs_are_counted_as_a_plain_count_would(V):
    """Both ways ``round_sums`` counts a round's distinct (user, item, item) triples, one int64 key and (where
    that key would pass int64, as with ``2**31`` items here) three sorted columns, give a plain count's answer."""
    from collections import Counter

    from fedrec.eval.baselines import _distinct

    rng = np.random.default_rng(2)
    who, lo, hi = (rng.integers(0, 6, 400), rng.integers(0, 5, 400), rng.integers(0, 5, 400))
    lo, hi = lo * (V // 50), hi * (V // 50)  # far apart where V is large
    want = sorted(Counter(zip(who.tolist(), lo.tolist(), hi.tolist(), strict=True)).items())
    a, b, n = _distinct(who.astype(np.int64), lo.astype(np.int64), hi.astype(np.int64), V)
    assert list(zip(a.tolist(), b.tolist(), n.tolist(), strict=True)) == [(x[1], x[2], c) for x, c in want]


def _bases(pop: float, recent: float) -> dict:
    return {"popularity": {"hr@10": pop}, "recent_popularity": {"hr@10": recent}, "item_knn": {"hr@10": 0.07}}


def test_a_run_below_popularity_gets_a_note_from_its_own_figures():
    """Below popularity or recent popularity, the note says by how much and why, from the run's own figures (the snr of
    its user-level rounds), and what lifts it; at or above both, or with a figure missing, no note."""
    user, event, none = (RunConfig(privacy=p) for p in ("user", "event", "none"))
    rows = [{"snr": 0.05}, {"snr": 0.07}, {"snr": None}]
    assert below_popularity(user, 0.0386, _bases(0.0320, 0.0386), rows) is None  # ties recent popularity
    assert below_popularity(user, None, _bases(0.0320, 0.0386), rows) is None
    assert below_popularity(user, 0.01, {"popularity": {"hr@10": 0.03}}, rows) is None
    note = below_popularity(user, 0.0212, _bases(0.0320, 0.0386), rows)
    assert note is not None and "0.0212 is below popularity's 0.0320 or recent popularity's 0.0386" in note
    assert "0.06x the norm of their noise" in note and "--privacy event" in note
    note = below_popularity(event, 0.0300, _bases(0.0320, 0.0290), [{"snr": None}])
    assert note is not None and "under event-level DP" in note and "--privacy event" not in note
    assert "larger epsilon" in note
    note = below_popularity(none, 0.0300, _bases(0.0290, 0.0386), [])
    assert note is not None and "metrics.blends" in note and "epsilon" not in note
