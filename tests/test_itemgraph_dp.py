"""The noisy item graph (event-level DP, noise at the aggregate): the noise has the claimed std, the table reads
released (noisy) sums only, candidates come from earlier noisy counts, a checkpoint resumes the same tables,
and a real federation in that mode accounts for the graph."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedrec.checkpoint import load_checkpoint, save_checkpoint
from fedrec.clients.app import app as client_app
from fedrec.config import RunConfig
from fedrec.federation.state import init_state
from fedrec.itemgraph import ENTER, NOISE_STREAM, PAIR_WEIGHT, ItemGraph, Pairs, capped_pairs, device_pairs
from fedrec.privacy.accounting import epsilon, graph_multiplier
from fedrec.privacy.ledger import Ledger
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid

V, SIGMA = 30, 2.0


def _counts(items: dict[int, int]) -> Pairs:
    """A contribution of item counts only (no pairs)."""
    z = np.zeros(0, np.int64)
    return Pairs(z, z, np.zeros(0), np.array(list(items), np.int64), np.array(list(items.values()), np.float64))


def _rounds(seed: int, rounds: int = 5, devices: int = 6) -> list[list[Pairs]]:
    """Random devices' pairs among items 0..19, round by round, with items 0..9 made popular (candidates)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        contribs = [device_pairs(rng.integers(0, 20, 15), rng.random(15) < 0.7, 3) for _ in range(devices)]
        out.append([*contribs, _counts({i: 40 for i in range(10)})])
    return out


def _graph(**kw) -> ItemGraph:
    return ItemGraph(V, neighbours=5, noise_std=SIGMA, seed=7, **kw)


# ---- the noise ---------------------------------------------------------------------------------------------------


def test_released_counts_have_the_claimed_noise_std():
    g = _graph()
    g.add([_counts({i: 100 for i in range(20)})])  # items 0..19 become candidates, far above ENTER stds
    assert sorted(g.cand.tolist()) == list(range(20))
    pairs, items = [], []
    for _ in range(60):  # nothing happens: every released change is pure noise
        P, n = g.P.copy(), g.n.copy()
        g.add([])
        inc = g.P - P
        np.testing.assert_array_equal(inc, inc.T)  # one draw per unordered pair, mirrored
        assert not np.diag(inc).any()
        pairs.append(inc[np.triu_indices(len(g.cand), 1)])
        items.append(g.n - n)
    # the pairs' std is the graph's over their weight (their share of the sensitivity shrinks by as much)
    for x, std in ((np.concatenate(pairs), SIGMA / PAIR_WEIGHT), (np.concatenate(items), SIGMA)):
        chi = float(np.sum(x ** 2) / std ** 2)  # chi-square with len(x) degrees of freedom at the claimed std
        assert 1e-3 < stats.chi2.cdf(chi, len(x)) < 1 - 1e-3
        # a std 10% off is far outside: the test can fail
        assert stats.chi2.cdf(float(np.sum(x ** 2) / (1.1 * std) ** 2), len(x)) < 1e-6
        assert stats.chi2.cdf(float(np.sum(x ** 2) / (0.9 * std) ** 2), len(x)) > 1 - 1e-6


def test_released_sums_are_true_sums_plus_the_seeded_draws():
    """Each release adds exactly the capped, projected true sums and the draws of ``(seed, release)``."""
    g = _graph()
    for k, contribs in enumerate(_rounds(1)):
        cand, P, n = g.cand.copy(), g.P.copy(), g.n.copy()
        g.add(contribs)
        rng = np.random.default_rng([7, NOISE_STREAM, k])
        true_n = np.zeros(V)
        for p in contribs:
            np.add.at(true_n, p.items, p.counts)
        np.testing.assert_allclose(g.n - n, true_n + rng.normal(0.0, SIGMA, V), rtol=0, atol=1e-9)
        K = len(cand)
        true = np.zeros((V, V))
        a, b, w = capped_pairs(contribs, V)
        np.add.at(true, (a, b), w)
        true = (true + true.T)[np.ix_(cand, cand)]  # pairs of the candidates chosen before this round only
        noise = np.zeros((K, K))
        noise[np.triu_indices(K, 1)] = rng.normal(0.0, SIGMA / PAIR_WEIGHT, K * (K - 1) // 2)
        np.testing.assert_allclose((g.P - np.pad(P, (0, len(g.cand) - K)))[:K, :K], true + noise + noise.T,
                                   rtol=0, atol=1e-9)
        assert not (g.P[K:] != 0).any()  # new candidates' pairs start at the next release
    assert g.C.nnz == 0  # the true pair sums are never kept


# ---- what the table reads ------------------------------------------------------------------------------------------


def test_the_table_is_a_function_of_the_released_sums_only():
    g = _graph()
    for contribs in _rounds(2):
        g.add(contribs)
    released = {k: v for k, v in g.state().items() if k not in ("row", "col", "val")}
    h = _graph()
    h.load({**released, "row": np.zeros(0, np.int32), "col": np.zeros(0, np.int32), "val": np.zeros(0, np.float32)})
    for k, v in g.table().items():
        np.testing.assert_array_equal(h.table()[k], v)
    assert (g.table()["graph.sim"] > 0).any()  # the check has something to compare


def test_true_pairs_outside_the_candidates_never_reach_the_table():
    """Two runs with the same item counts but different true pairs among non-candidates (and in round 1,
    before any candidate): the same noise, the same tables."""
    base = _rounds(3)
    other = [list(r) for r in base]
    other[0].append(Pairs(np.array([0, 1]), np.array([1, 2]), np.ones(2), np.zeros(0, np.int64), np.zeros(0)))
    other[3].append(Pairs(np.array([25, 26]), np.array([27, 28]), np.ones(2), np.zeros(0, np.int64), np.zeros(0)))
    g, h = _graph(), _graph()
    for x, y in zip(base, other, strict=True):
        g.add(x)
        h.add(y)
        assert not np.isin([25, 26, 27, 28], g.cand).any()
        for k, v in g.table().items():
            np.testing.assert_array_equal(h.table()[k], v)


def test_candidates_come_from_earlier_noisy_counts_only():
    g = _graph()
    seen: list[int] = []
    for r, contribs in enumerate(_rounds(4), start=1):
        g.add(contribs)
        assert g.cand[: len(seen)].tolist() == seen  # candidates stay, in order of entry
        new = g.cand[len(seen):]
        # exactly the items whose NOISY count stands ENTER stds of its noise above 0, largest first
        want = [i for i in np.argsort(-g.n, kind="stable")
                if g.n[i] >= ENTER * SIGMA * math.sqrt(r) and i not in seen]
        assert new.tolist() == want
        assert (g.since[len(seen):] == r).all()
        seen = g.cand.tolist()
    capped = _graph(max_candidates=4)
    for contribs in _rounds(4):
        capped.add(contribs)
    assert len(capped.cand) == 4


def test_pure_noise_rows_publish_nothing():
    g = ItemGraph(V, neighbours=5, noise_std=SIGMA, seed=11)
    g.add([_counts({i: 200 for i in range(V)})])  # every item a candidate
    for _ in range(20):
        g.add([])  # no pairs: everything released about pairs is noise
    t = g.table()
    # the threshold expects FALSE_NEIGHBOURS = 0.1 pure-noise neighbours per row: a handful at most here
    assert (t["graph.sim"] > 0).sum() <= 12
    assert (t["graph.prior"] >= 0).all() and t["graph.prior"].max() == pytest.approx(1.0)


# ---- resume ------------------------------------------------------------------------------------------------------


def _noised_cfg(**kw) -> RunConfig:
    return RunConfig(world_users=40, world_items=V, rounds=6, cohort=20, privacy="event", event_noise="aggregate",
                     local_steps=1, epsilon=8.0, progress=False, engine="local", **kw)


def test_the_server_state_noises_the_graph_with_the_accounted_std(tmp_path):
    cfg = _noised_cfg(private_graph_window=4)
    assert cfg.graph and cfg.graph_noised and cfg.pair_window == 4
    state = init_state(cfg, V)
    assert state.graph is not None
    assert state.graph.noise_std == pytest.approx(graph_multiplier(cfg) * math.sqrt(3 * 4 * PAIR_WEIGHT**2 + 1))
    assert state.graph.seed == cfg.seed
    off = init_state(RunConfig(world_users=40, world_items=V, privacy="none"), V).graph
    assert off is not None and off.noise_std == 0.0


def test_a_resumed_graph_publishes_the_same_tables(tmp_path):
    cfg = _noised_cfg()
    rounds = _rounds(5, rounds=6)
    straight, first = init_state(cfg, V), init_state(cfg, V)
    assert straight.graph is not None and first.graph is not None
    for contribs in rounds:
        straight.graph.add(contribs)
        straight.graph_table = straight.graph.table()
    for contribs in rounds[:3]:
        first.graph.add(contribs)
        first.graph_table = first.graph.table()
    first.save(tmp_path / "ck.npz", cfg)
    resumed = init_state(cfg, V)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck.npz"))
    assert resumed.graph is not None
    for k, v in first.graph_table.items():
        np.testing.assert_array_equal(resumed.graph_table[k], v)
    for contribs in rounds[3:]:
        resumed.graph.add(contribs)
        resumed.graph_table = resumed.graph.table()
    for k, v in straight.graph_table.items():
        np.testing.assert_array_equal(resumed.graph_table[k], v)
    np.testing.assert_array_equal(resumed.graph.P, straight.graph.P)


def test_checkpoint_round_trip_of_the_state_is_exact(tmp_path):
    g = _graph()
    for contribs in _rounds(6, rounds=3):
        g.add(contribs)
    save_checkpoint(tmp_path / "g.npz", round_=3, global_state={}, optimizer={}, lr_schedule={}, graph=g.state())
    h = _graph()
    h.load(load_checkpoint(tmp_path / "g.npz")["graph"])
    assert h.releases == g.releases
    np.testing.assert_array_equal(h.P, g.P)
    np.testing.assert_array_equal(h.n, g.n)


# ---- a real federation ---------------------------------------------------------------------------------------------


def test_a_federation_with_the_noisy_graph(tmp_path):
    cfg = RunConfig(world_users=60, nodes=2, rounds=3, cohort=30, uptake_probe=False, progress=False, engine="local",
                    privacy="event", event_noise="aggregate", local_steps=1, epsilon=8.0, out=str(tmp_path / "run"))
    assert cfg.graph_noised
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    ledger = Ledger(tmp_path / "run" / "privacy_ledger.jsonl")
    graph = [r for r in ledger.records if r.kind == "graph-gaussian"]
    assert len(graph) == 1 and graph[0].noise_multiplier == pytest.approx(graph_multiplier(cfg))
    agg = [r for r in ledger.records if r.kind == "aggregate-gaussian"]
    worst = max(r.max_steps_per_event for r in agg)
    z = agg[0].noise_multiplier
    ev = summary["privacy"]["event"]["epsilon"]
    # the event's epsilon composes the graph's one record with its model releases
    want = epsilon([(z, cfg.sample_rate, worst), (graph[0].noise_multiplier, 1.0, 1)], cfg.delta, "prv")
    assert ev == pytest.approx(want, rel=1e-5)
    assert ev > epsilon([(z, cfg.sample_rate, worst)], cfg.delta, "prv")
    assert ev <= 8.0 + 1e-6



def test_sums_released_elsewhere_are_summed_in_as_they_are():
    """SecAgg+ event noise at the aggregate: the devices' shares noised the graph's counts and affinities; the graph
    draws no noise of its own, and its candidates enter on them as on its own releases."""
    V, F, rng = 30, 4, np.random.default_rng(0)
    feats = np.abs(rng.normal(size=(V, F)))
    g = ItemGraph(V, noise_std=2.0, seed=1, pairs=False, features=feats / np.linalg.norm(feats, axis=1, keepdims=True))
    c1, c2 = rng.normal(0.0, 2.0, V), rng.normal(0.0, 2.0, V)
    c1[7] = c2[7] = 100.0
    a1, a2 = rng.normal(0.0, 2.0, (V, F)), rng.normal(0.0, 2.0, (V, F))
    g.add_released(c1, a1)
    g.add_released(c2, a2)
    np.testing.assert_array_equal(g.n, c1 + c2)
    np.testing.assert_array_equal(g.A, a1 + a2)
    assert g.releases == 2 and len(g.recent) == 2 and 7 in g.cand
    assert int(np.argmax(g.table()["graph.prior"])) == 7
    for bad in (ItemGraph(V, noise_std=2.0), ItemGraph(V, pairs=False)):  # pairs to noise; no noise to trust
        with pytest.raises(ValueError, match="without pairs"):
            bad.add_released(c1, None)
    for counts, aff in ((c1[:5], a1), (np.full(V, np.nan), a1), (c1, None), (c1, a1[:, :2]), (c1, a1 * np.nan)):
        with pytest.raises(ValueError, match="30 finite counts"):
            g.add_released(counts, aff)
    plain = ItemGraph(V, noise_std=2.0, pairs=False)  # no features: counts alone
    plain.add_released(c1, None)
    assert plain.A is None and plain.releases == 1


def test_a_device_s_dense_contribution_is_what_the_graph_sums_of_its_pairs():
    """Under SecAgg+ each device sums its own counts and affinities (:func:`dense_contribution`): the same as the
    server's :meth:`ItemGraph.add` of its pairs, from the same profiles; a profile beyond the bounds is cut to them."""
    from fedrec.itemgraph import bounded_profiles, dense_contribution

    V, F, rng = 25, 3, np.random.default_rng(4)
    feats = np.abs(rng.normal(size=(V, F)))
    g = ItemGraph(V, features=feats / np.linalg.norm(feats, axis=1, keepdims=True))
    G = g.profiles()
    devices = [device_pairs(rng.integers(0, V, 12), rng.random(12) < 0.6, 0) for _ in range(5)]
    g.add(devices)
    parts = [dense_contribution(p, V, bounded_profiles(G, nonnegative=True)) for p in devices]
    np.testing.assert_allclose(sum(c for c, _ in parts), g.n, atol=1e-12)
    np.testing.assert_allclose(sum(a for _, a in parts), g.A, atol=1e-6)
    wild = dense_contribution(devices[0], V, bounded_profiles(-3 * G, nonnegative=True))[1]  # a faulty table: negative, too long
    assert wild.min() >= 0 and dense_contribution(devices[0], V, bounded_profiles(3 * G, nonnegative=True))[1] == pytest.approx(parts[0][1], abs=1e-6)
    assert len(dense_contribution(devices[0], V, bounded_profiles(None, nonnegative=True))) == 1  # no profiles yet: counts alone


def test_clipped_sums_released_by_the_graph_are_what_it_releases_of_the_devices_pairs():
    """User level under SecAgg+: each device scales its dense parts by :func:`clip_scale` (the factor
    :meth:`ItemGraph.scales` gives its pairs) and the server releases their sum (:meth:`ItemGraph.add_clipped_sums`)
    with the very noise :meth:`ItemGraph.add` draws for the same round of the devices' pairs."""
    from fedrec.itemgraph import bounded_profiles, clip_scale, dense_contribution

    V, F, rng = 25, 3, np.random.default_rng(5)
    feats = np.abs(rng.normal(size=(V, F)))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    plain, secure = (ItemGraph(V, noise_std=0.7, seed=9, features=feats, clip=1.0, pairs=False) for _ in range(2))
    devices = [device_pairs(rng.integers(0, V, 30), rng.random(30) < 0.7, 0) for _ in range(6)]
    G = plain.profiles()
    parts = [dense_contribution(p, V, bounded_profiles(G, nonnegative=True)) for p in devices]
    np.testing.assert_allclose([clip_scale(x, 1.0) for x in parts], plain.scales(devices, G.astype(np.float64)),
                               rtol=1e-6)
    assert min(clip_scale(x, 1.0) for x in parts) < 1  # some devices were clipped
    plain.add(devices)
    secure.add_clipped_sums(*[sum(x[i] * clip_scale(x, 1.0) for x in parts) for i in range(2)])
    np.testing.assert_allclose(secure.n, plain.n, atol=1e-6)
    np.testing.assert_allclose(secure.A, plain.A, atol=1e-6)
    with pytest.raises(ValueError, match="clipped, noised"):
        ItemGraph(V, noise_std=0.7, pairs=False).add_clipped_sums(plain.n, None)
