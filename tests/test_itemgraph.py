"""The federated item graph: device pairs by hand, the server's table against a brute-force one, hostile
pairs refused alone, and the pairs carried from device to server in a real in-process federation."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.checkpoint import load_checkpoint, save_checkpoint
from fedrec.clients.app import app as client_app
from fedrec.clients.records import from_records, to_records
from fedrec.config import RunConfig
from fedrec.eval.metrics import PrequentialCounts
from fedrec.federation.replies import GraphCheck, Reply, collect
from fedrec.federation.state import init_state
from fedrec.itemgraph import (
    ALPHA,
    DECAY,
    PAIR_CAP,
    PRIOR,
    PRIOR_EVAL,
    PRIOR_FALSE,
    PRIOR_TOP,
    PRIOR_WINDOWS,
    RECENT_ROUNDS,
    ItemGraph,
    Pairs,
    contexts,
    device_pairs,
    session_scores,
)
from fedrec.messages import DeviceUpdate, MessageError, NodeReply, UpdateReport, decode_reply, encode_reply
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid
from fedrec.wire import encode_delta

V = 8  #: catalogue of the toy cases


def _pairs(p: Pairs) -> dict[tuple[int, int], float]:
    return {(int(a), int(b)): float(w) for a, b, w in zip(p.a, p.b, p.w, strict=True)}


def _items(p: Pairs) -> dict[int, float]:
    return {int(i): float(c) for i, c in zip(p.items, p.counts, strict=True)}


# ---- the device's pairs, by hand -------------------------------------------------------------------


def test_each_new_event_pairs_with_the_window_before_it():
    items, new = np.array([0, 1, 2, 3]), np.array([False, False, False, True])
    assert _pairs(device_pairs(items, new, 1)) == {(3, 2): 1.0}
    assert _pairs(device_pairs(items, new, 3)) == {(3, 2): 1.0, (3, 1): 1.0, (3, 0): 1.0}
    assert _pairs(device_pairs(items, new, 10)) == {(3, 2): 1.0, (3, 1): 1.0, (3, 0): 1.0}  # only what exists
    assert _items(device_pairs(items, new, 3)) == {3: 1.0}


def test_self_pairs_are_dropped_and_old_events_pair_only_as_context():
    # event 2 (item 1) sees item 2 and itself (dropped); event 3 (item 3) sees items 1 and 2
    p = device_pairs(np.array([1, 2, 1, 3]), np.array([False, False, True, True]), 2)
    assert _pairs(p) == {(1, 2): 1.0, (3, 1): 1.0, (3, 2): 1.0}
    assert _items(p) == {1: 1.0, 3: 1.0}


def test_repeated_pairs_are_counted():
    p = device_pairs(np.array([5, 7, 5, 7]), np.ones(4, bool), 3)
    # event 1: (7,5); event 2: (5,7), (5,5) dropped; event 3: (7,5), (7,7) dropped, (7,5)
    assert _pairs(p) == {(5, 7): 1.0, (7, 5): 3.0}
    assert _items(p) == {5: 2.0, 7: 2.0}


def test_no_new_events_give_empty_pairs():
    p = device_pairs(np.array([1, 2, 3]), np.zeros(3, bool), 5)
    assert len(p.a) == len(p.items) == 0
    assert Pairs.from_arrays(p.arrays(), V, events=0, window=5).w.size == 0


# ---- the server's sums and table, against a brute-force computation --------------------------------------


def _brute(contribs: list[list[Pairs]], n_items: int, top: int):
    C, n = np.zeros((n_items, n_items)), np.zeros(n_items)
    per_round = []
    for round_ in contribs:
        now = np.zeros(n_items)
        for p in round_:
            one = np.zeros((n_items, n_items))  # this device's round: (a, b) and (b, a) are one pair
            for a, b, w in zip(p.a, p.b, p.w, strict=True):
                one[min(a, b), max(a, b)] += w
            one = np.minimum(one, PAIR_CAP)  # a device counts at most PAIR_CAP per pair and round
            C += one + one.T
            for i, c in zip(p.items, p.counts, strict=True):
                now[i] += c
        n += now
        per_round.append(now)
    m = np.maximum(n, 1.0)
    S = np.where(C > 0, C / (m[:, None] ** ALPHA * m[None, :] ** (1 - ALPHA)), 0.0)
    tops = [np.sort(row[row > 0])[::-1][:top] for row in S]
    prior = np.sum(per_round[-_window(per_round, n_items):], axis=0) + 1e-3 * n
    return C, n, S, tops, prior / prior.max()


def _window(per_round: list[np.ndarray], n_items: int, noise_std: float = 0.0) -> int:
    """The prior's window by brute force: the longest of PRIOR_WINDOWS, unless a shorter one's PRIOR_TOP best items,
    ranked by the rounds before, caught more of the last PRIOR_EVAL rounds' counts than the longest one's, by more
    than z noise stds of the cells they differ in (the largest such gain; a tie: the longer)."""
    if len(per_round) < 2:
        return RECENT_ROUNDS
    k, longest = min(PRIOR_TOP, n_items), PRIOR_WINDOWS[-1]
    z = NormalDist().inv_cdf(1 - PRIOR_FALSE / (len(PRIOR_WINDOWS) - 1))

    def top(t: int, w: int) -> set[int]:  # exact counts: of the items some round before t counted
        ranked, known = sum(per_round[max(0, t - w):t]), sum(per_round[:t])
        pool = [i for i in range(n_items) if noise_std or known[i] > 0]
        return set(sorted(pool, key=lambda i: -ranked[i])[:k])

    best, lead = longest, 0.0
    for w in sorted(PRIOR_WINDOWS[:-1], reverse=True):
        gain = moved = 0.0
        for t in range(max(1, len(per_round) - PRIOR_EVAL), len(per_round)):
            mine, theirs = top(t, w), top(t, longest)
            gain += sum(per_round[t][i] for i in mine - theirs) - sum(per_round[t][i] for i in theirs - mine)
            moved += len(mine ^ theirs)
        if gain > max(lead, z * noise_std * math.sqrt(moved)):
            best, lead = w, gain
    return best


def test_the_table_is_the_top_neighbours_of_the_asymmetric_cosine():
    rng = np.random.default_rng(3)
    contribs = [[device_pairs(rng.integers(0, V, 12), rng.random(12) < 0.6, 3) for _ in range(3)] for _ in range(4)]
    g = ItemGraph(V, neighbours=3)
    for round_ in contribs:
        g.add(round_)
    C, n, S, tops, prior = _brute(contribs, V, 3)
    np.testing.assert_allclose(g.C.toarray(), C)
    np.testing.assert_allclose(g.n, n)
    t = g.table()
    assert t["graph.ids"].shape == t["graph.sim"].shape == (V, 3)
    for h in range(V):
        sim, ids = t["graph.sim"][h], t["graph.ids"][h]
        used = sim > 0
        np.testing.assert_allclose(np.sort(sim[used])[::-1], tops[h], rtol=1e-6)  # the N best scores
        np.testing.assert_allclose(sim[used], S[h, ids[used]], rtol=1e-6)  # each with its own item
        assert len(set(ids[used].tolist())) == used.sum()
    np.testing.assert_allclose(t["graph.prior"], prior, rtol=1e-6)


def _rounds_of(popular: list[np.ndarray], n_items: int, rng: np.random.Generator, per_round: int = 3000):
    """One exact round of item counts per entry of ``popular``: each event's item drawn from that round's list, the
    list's first items the likeliest (a long tail)."""
    z = np.zeros(0, np.int64)
    out = []
    for items in popular:
        p = 1.0 / (np.arange(len(items)) + 20.0)
        out.append((z, z, np.zeros(0), np.bincount(rng.choice(items, per_round, p=p / p.sum()),
                                                   minlength=n_items).astype(float), z, z))
    return out


def test_the_prior_window_is_short_where_popularity_moves_and_long_where_noise_dominates():
    n_items, rng = 2000, np.random.default_rng(0)
    # popularity that slides 40 items a round: only the newest round knows where it is
    moving = ItemGraph(n_items)
    for round_ in _rounds_of([np.arange(40 * r, 40 * r + 400) for r in range(12)], n_items, rng):
        moving.add_sums(*round_)
    assert moving.prior_window() == 1
    # popularity that stays, under noise of std 8 on every count of every round: the longest window stays
    still = ItemGraph(n_items, noise_std=8.0, pairs=False)
    for a, b, w, counts, _f, _before in _rounds_of([np.arange(1500)] * 12, n_items, rng, per_round=30000):
        still.add([Pairs(a, b, w, np.flatnonzero(counts), counts[counts > 0])])
    released = [r[still.cand] for r in still.recent]
    assert len(still.cand) > PRIOR_TOP  # the top items differ between windows: the test is not a tie
    assert still.prior_window() == PRIOR_WINDOWS[-1] == _window(released, len(still.cand), 8.0)
    # the table's prior sums exactly the chosen rounds (of the candidates, negative sums as 0)
    want = np.zeros(n_items)
    want[still.cand] = np.maximum(np.sum(still.recent, axis=0)[still.cand] + 1e-3 * still.n[still.cand], 0)
    np.testing.assert_allclose(still.table()["graph.prior"], want / want.max(), rtol=1e-6)


def test_an_item_only_the_scored_round_knows_fills_no_top():
    """Exact counts, a catalogue whose rounds count disjoint items: no window of the rounds before a round knows its
    items, so none predicts it, and the longest window stays (a top filled from the scored round's own items would
    have caught it: the window with the fewest known items would win)."""
    g = ItemGraph(1000)
    z = np.zeros(0, np.int64)
    for items in (np.arange(700, 1000), np.arange(500, 600), np.arange(200, 500)):
        g.add_sums(z, z, np.zeros(0), np.bincount(items, minlength=1000).astype(float), z, z)
    assert g.prior_window() == PRIOR_WINDOWS[-1]
    assert _window([np.bincount(i, minlength=1000).astype(float)
                    for i in (np.arange(700, 1000), np.arange(500, 600), np.arange(200, 500))], 1000) == PRIOR_WINDOWS[-1]


@pytest.mark.parametrize("shift", [0, 2, 5, 20, 60])
def test_the_prior_window_matches_a_brute_force_choice(shift):
    rng = np.random.default_rng(shift)
    exact, noised = ItemGraph(1000), ItemGraph(1000, noise_std=1.0, pairs=False)
    per_round, face = [], []
    for a, b, w, counts, f, before in _rounds_of([np.arange(shift * r, shift * r + 500) for r in range(9)], 1000, rng,
                                                 per_round=2500):
        exact.add_sums(a, b, w, counts, f, before)
        noised.add([Pairs(a, b, w, np.flatnonzero(counts), counts[counts > 0])])
        per_round.append(counts)
        assert exact.prior_window() == _window(per_round, 1000)
        if len(noised.cand):
            released = [r[noised.cand] for r in noised.recent]
            assert noised.prior_window() == _window(released, len(noised.cand), 1.0)
            face.append(_window(released, len(noised.cand), 0.0) != noised.prior_window())
    if shift in (2, 5):  # slow drift: a shorter window's gain was there, but within the noise, in some round
        assert any(face)


def test_a_graph_survives_its_state():
    rng = np.random.default_rng(4)
    g = ItemGraph(V, neighbours=4)
    for _ in range(RECENT_ROUNDS + 1):
        g.add([device_pairs(rng.integers(0, V, 10), rng.random(10) < 0.5, 2) for _ in range(2)])
    h = ItemGraph(V, neighbours=4)
    h.load(g.state())
    for k, v in g.table().items():
        np.testing.assert_array_equal(h.table()[k], v)


# ---- a device's pairs are hostile until checked ----------------------------------------------------------------


def _good() -> dict[str, np.ndarray]:
    """4 new events, 6 pairs (window 2): (1,0) (2,1) (2,0) (1,2) (3,1) (3,2)."""
    return device_pairs(np.array([0, 1, 2, 1, 3]), np.array([False, True, True, True, True]), 2).arrays()


def _with(key: str, i: int, value: float, dtype=None) -> dict[str, np.ndarray]:
    d = _good()
    x = d[key].astype(dtype or d[key].dtype)
    x[i] = value
    return {**d, key: x}


@pytest.mark.parametrize("arrays,events,why", [
    (_with("pairs.a", -1, V), 4, "pair item id outside"),
    (_with("pairs.b", 0, -1), 4, "pair item id outside"),
    (_with("pairs.items", 0, V + 5), 4, "item id outside"),
    (_with("pairs.b", 0, 1.0, np.float32), 4, "pair item id outside"),  # ids that are not integers
    (_with("pairs.w", 0, -1.0), 4, "pair count that is not a whole non-negative"),
    (_with("pairs.w", 0, 0.5), 4, "pair count that is not a whole non-negative"),
    (_with("pairs.counts", 0, math.nan), 4, "item count that is not a whole non-negative"),
    (_with("pairs.w", -1, 4.0), 4, "more pairs than its events of an item allow"),  # item 3: 1 event, window 2
    (_with("pairs.a", 0, 7), 4, "pairs of items it had no new event of"),  # a pair that starts nowhere
    ({**_good(), "pairs.a": np.array([0, 1, 2, 1, 3, 3, 3] * 2, np.int32),
      "pairs.b": np.array([1, 0, 0, 2, 1, 2, 0] * 2, np.int32), "pairs.w": np.ones(14, np.float32)}, 4,
     "14 pairs for 4 new events"),  # more pair entries than window x events = 8
    (_good(), 5, "4 item counts"),  # item counts that do not sum to the reported new events
    ({**_good(), "pairs.a": np.array([0, 1], np.int32)}, 4, "different lengths"),
])
def test_bad_pairs_are_refused(arrays, events, why):
    good = Pairs.from_arrays(_good(), V, events=4, window=2)  # the honest one passes
    assert good.w.sum() == 6 and good.counts.sum() == 4
    with pytest.raises(ValueError, match=why):
        Pairs.from_arrays(arrays, V, events=events, window=2)


# ---- on-device session scores, against a brute-force loop -------------------------------------------------------


def test_contexts_and_session_scores_match_a_loop():
    rng = np.random.default_rng(5)
    history, new, L = rng.integers(0, V, 3), rng.integers(0, V, 4), 5
    ctx, w = contexts(history, new, L)
    assert ctx.shape == w.shape == (len(new) + 1, L)
    seq = list(history) + list(new)
    for j in range(len(new) + 1):
        before = seq[: len(history) + j][::-1][:L]
        want = before + [-1] * (L - len(before))
        assert ctx[j].tolist() == want
        np.testing.assert_allclose(w[j], [DECAY ** i if i < len(before) else 0.0 for i in range(L)])
    g = ItemGraph(V, neighbours=3)
    g.add([device_pairs(rng.integers(0, V, 20), np.ones(20, bool), 3)])
    t = g.table()
    got = session_scores(t, ctx, w).numpy()
    for r in range(len(ctx)):
        want = np.zeros(V)
        for c, wc in zip(ctx[r], w[r], strict=True):
            if c >= 0:
                for i, s in zip(t["graph.ids"][c], t["graph.sim"][c], strict=True):
                    want[i] += wc * s
        want = want / max(want.max(), 1e-12) + PRIOR * t["graph.prior"]
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-7)


# ---- on the wire: the pairs travel with their update, and a bad one fails its device alone ----------------------


def _update(d: int, pairs: dict[str, np.ndarray] | None, n_new: int = 4) -> DeviceUpdate:
    report = UpdateReport(num_examples=n_new, n_new=n_new, counts=PrequentialCounts(n_new, 1.0, 0.5), epsilon=0.0,
                          steps=1, max_exposure=0, clipped=False, preclip_norm=0.0)
    return DeviceUpdate(d, encode_delta({"item.weight": np.ones((V, 2), np.float32)}, "dense"), report, None, pairs)


def test_pairs_round_trip_through_the_reply_and_flower_records():
    reply = NodeReply(updates=[_update(3, _good()), _update(4, None)])
    back = decode_reply(from_records(to_records(encode_reply(reply))))
    assert not back.failures and [u.device for u in back.updates] == [3, 4]
    assert back.updates[0].pairs is not None and back.updates[1].pairs is None
    for k, v in _good().items():
        np.testing.assert_array_equal(back.updates[0].pairs[k], v)
        assert back.updates[0].pairs[k].dtype == v.dtype


def test_a_garbled_pairs_record_fails_its_device_alone():
    records = encode_reply(NodeReply(updates=[_update(3, _good()), _update(4, _good())]))
    records["pairs-3"] = {**records["pairs-3"], "pairs.a": ["x", None]}  # not a numeric array
    records["pairs-9"] = _good()  # pairs without an update
    back = decode_reply(records)
    assert [u.device for u in back.updates] == [4]
    assert sorted(f.device for f in back.failures) == [3, 9]
    assert any("without an update" in f.reason for f in back.failures)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["pairs.a", "pairs.b", "pairs.w", "pairs.items", "pairs.counts", "x"]),
                       st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=3),
                                 st.lists(st.floats(allow_nan=True), max_size=3)), max_size=6))
def test_any_pairs_record_decodes_or_fails_its_device(rec):
    records = {**encode_reply(NodeReply(updates=[_update(3, None)])), "pairs-3": rec}
    try:
        back = decode_reply(records)
    except MessageError:
        pytest.fail("a bad pairs record must fail its device, not the reply")
    for u in back.updates:
        assert u.pairs is None or all(isinstance(v, np.ndarray) and v.dtype.kind in "biuf" for v in u.pairs.values())


def test_the_server_takes_good_pairs_and_fails_bad_ones_by_device():
    bad = {**_good(), "pairs.a": np.array([0, 1, 2, 99], np.int32)}
    body = NodeReply(updates=[_update(1, _good()), _update(2, bad), _update(3, None)])
    reply = Reply(asked=1, node=7, body=decode_reply(encode_reply(body)), devices=frozenset({1, 2, 3}))
    gstate = {"item.weight": torch.zeros(V, 2)}
    got = collect([reply], gstate, None, 1, {1: 7, 2: 7, 3: 7}, GraphCheck(V, 2))
    assert got.done == [1, 3] and len(got.pairs) == 1
    assert [d for d, _ in got.failed] == [2] and "device 2" in got.failed[0][1]
    assert got.bytes_up == sum(v.nbytes for u in (body.updates[0], body.updates[2]) for v in u.arrays.values()) + \
        sum(v.nbytes for v in _good().values())
    off = collect([reply], gstate, None, 1, {1: 7, 2: 7, 3: 7})  # the graph is off: any pairs fail their device
    assert off.done == [3] and not off.pairs
    assert all("the item graph is off" in why for _, why in off.failed)


# ---- end to end: a real in-process federation ------------------------------------------------------------------


def test_a_federation_builds_the_graph_and_its_checkpoint_keeps_it(tmp_path):
    cfg = RunConfig(world_users=30, nodes=2, rounds=2, cohort=30, uptake_probe=False, progress=False, engine="local",
                    privacy="none", graph_neighbours=5, out=str(tmp_path / "run"))
    assert cfg.graph
    run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    g = ck["graph"]
    assert g["val"].sum() > 0 and g["n"].sum() == sum(r["new_events"] for r in rows) > 0  # every new event counted
    n_items = len(g["n"])
    assert g["graph.ids"].shape == (n_items, 5) and g["graph.sim"].max() > 0
    # a resumed server holds the same graph and the same published table
    state = init_state(cfg, n_items)
    state.load_state_dict(ck)
    assert state.graph is not None
    for k, v in state.graph.state().items():
        np.testing.assert_array_equal(v, g[k])
    for k, v in state.graph_table.items():
        np.testing.assert_array_equal(v, g[k])
    assert set(state.host_state()) >= {"graph.ids", "graph.sim", "graph.prior"}
    # and saving it again writes the same arrays
    save_checkpoint(tmp_path / "again.npz", **state.state_dict(cfg))
    again = load_checkpoint(tmp_path / "again.npz")["graph"]
    assert set(again) == set(g)
    for k, v in g.items():
        np.testing.assert_array_equal(again[k], v)
