"""Item x feature affinities: each new event's item with the public features of the event before it, summed by the
server (noised under event-level DP at the aggregate, inside the graph's one Gaussian), and the item profiles
learned from them that the ``features`` blend reads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _checkpoints import forget_config_key
from scipy import stats

from fedrec.checkpoint import load_checkpoint, save_checkpoint
from fedrec.clients.app import app as client_app
from fedrec.config import RunConfig
from fedrec.federation.state import init_state
from fedrec.itemgraph import (
    COUNTS,
    FEATURES,
    NOISE_STREAM,
    PAIR_WEIGHT,
    PROFILE_PRIOR,
    PROFILE_THRESHOLD,
    PROFILES,
    ItemGraph,
    Pairs,
    capped_pairs,
    contexts,
    device_pairs,
    graph_scores,
    sensitivity,
)
from fedrec.privacy.accounting import graph_multiplier
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid

V, NF = 12, 4


def _onehot(topics: list[int]) -> np.ndarray:
    F = np.zeros((len(topics), NF))
    F[np.arange(len(topics)), topics] = 1.0
    return F


TOPIC = [i % NF for i in range(V)]  # item i lists topic i % 4


def test_each_new_event_after_the_first_brings_the_item_before_it():
    p = device_pairs(np.array([3, 5, 5, 7, 2]), np.array([True, True, False, True, True]), window=2)
    assert p.follow.tolist() == [5, 7, 2] and p.before.tolist() == [3, 5, 7]
    back = Pairs.from_arrays(p.arrays(), V, events=4, window=2)
    assert back.follow.tolist() == [5, 7, 2] and back.before.tolist() == [3, 5, 7]


@pytest.mark.parametrize("follow,before,why", [
    ([5, 5], [3, 7], "more follow items"), ([5], [V], "before item id"), ([5], [3, 4], "different lengths")])
def test_a_device_cannot_send_more_follows_than_its_new_events(follow, before, why):
    p = device_pairs(np.array([3, 5, 7]), np.array([False, True, False]), window=2)
    d = p.arrays() | {"pairs.follow": np.array(follow, np.int32), "pairs.before": np.array(before, np.int32)}
    with pytest.raises(ValueError, match=why):
        Pairs.from_arrays(d, V, events=1, window=2)


def _device_rounds(rng: np.random.Generator, rounds: int = 4, length: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A device's sequence and the round (1..rounds) each event is new in, non-decreasing."""
    return rng.integers(0, V, length), np.sort(rng.integers(0, rounds, length))


def _releases(seqs: list[tuple[np.ndarray, np.ndarray]], F: np.ndarray, window: int, rounds: int = 4,
              every: int = 1) -> np.ndarray:
    """Every round's exact sums (item counts, the upper triangle of the capped pairs), and the affinities summed over
    ``every`` rounds at a time (``affinity_every``), one vector."""
    out, aff = [], []
    for r in range(rounds):
        contribs = [device_pairs(items[rd <= r], rd[rd <= r] == r, window) for items, rd in seqs if (rd == r).any()]
        g = ItemGraph(V, features=F)
        g.add(contribs)
        a, b, w = capped_pairs(contribs, V)
        pairs = np.zeros((V, V))
        np.add.at(pairs, (a, b), w)
        assert g.A is not None
        out += [g.n, PAIR_WEIGHT * pairs[np.triu_indices(V, 1)]]  # as released: the pairs weighted
        aff.append(g.A.ravel())
    return np.concatenate(out + [sum(aff[b:b + every]) for b in range(0, rounds, every)])


@pytest.mark.parametrize("every", [1, 2, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_one_event_moves_every_release_together_by_at_most_the_sensitivity(signed, every):
    """Remove each event of each device in turn, over random devices (whose items repeat), windows and feature
    tables: the L2 change of all rounds' released sums stays within ``sensitivity``, and exceeds what the pairs and
    counts alone allow (the affinities' share is needed). The same holds with the affinities of ``every`` rounds
    released together: one event moves two rows, its item's and the next event's, and where those are one row the
    two moves cancel down to one profile."""
    rng = np.random.default_rng(3)
    worst = 0.0
    for trial in range(30):
        window = 1 + trial % 3
        F = rng.random((V, NF)) - (0.5 if signed else 0.0)
        F /= np.linalg.norm(F, axis=1, keepdims=True)
        seqs = [_device_rounds(rng) for _ in range(3)]
        base = _releases(seqs, F, window, every=every)
        items, rd = seqs[0]
        for j in range(len(items)):
            keep = np.arange(len(items)) != j
            moved = np.linalg.norm(_releases([(items[keep], rd[keep]), *seqs[1:]], F, window, every=every) - base)
            assert moved <= sensitivity(window, F) + 1e-9
            worst = max(worst, moved / math.sqrt(3 * window * PAIR_WEIGHT**2 + 1))
    assert worst > 1.0
    pairs = 6 * PAIR_WEIGHT**2  # window 2
    assert sensitivity(2, None) == pytest.approx(math.sqrt(pairs + 1))
    assert sensitivity(2, np.eye(3)) == pytest.approx(math.sqrt(pairs + 4))
    assert sensitivity(2, -np.eye(3)) == pytest.approx(math.sqrt(pairs + 6))


def test_affinities_are_exact_sums_without_noise():
    rng = np.random.default_rng(0)
    F = _onehot(TOPIC)
    g = ItemGraph(V, features=F)
    want = np.zeros((V, NF))
    for k in range(5):
        contribs = [device_pairs(rng.integers(0, V, 8), rng.random(8) < 0.6, 2) for _ in range(4)]
        G = g.profiles().astype(np.float64)  # what this release reads: the profiles of the releases before it
        if k == 0:
            np.testing.assert_array_equal(G, F)  # at first, the lists
        g.add(contribs)
        for p in contribs:
            for f, b in zip(p.follow, p.before, strict=True):
                want[f] += G[b]
    assert g.A is not None
    np.testing.assert_allclose(g.A, want, rtol=0, atol=1e-12)
    assert ItemGraph(V).A is None or not ItemGraph(V).A.any()  # no features, no affinities


def test_a_release_reads_the_profiles_of_the_releases_before_it():
    """Item 0 lists topic 0, but its users came from topic-2 items: once its profile says topic 2, an event after
    item 0 adds topic 2 to its own item's row, not the list's topic 0."""
    F = _onehot(TOPIC)
    g = ItemGraph(V, features=F)
    g.add([Pairs(*(np.zeros(0, np.int64),) * 2, np.zeros(0), np.array([0]), np.array([10.0]),
                 np.full(10, 0), np.full(10, 2))])
    assert g.profiles()[0].argmax() == 2
    before = g.A.copy()
    g.add([Pairs(np.array([7]), np.array([0]), np.ones(1), np.array([7]), np.ones(1), np.array([7]), np.array([0]))])
    added = g.A[7] - before[7]
    np.testing.assert_allclose(added, _profile_at(F, before)[0], rtol=0, atol=1e-6)
    assert added.argmax() == 2 and added[0] < added[2]


def _profile_at(F: np.ndarray, A: np.ndarray) -> np.ndarray:
    """The profiles of a no-noise graph whose affinities are ``A``."""
    h = ItemGraph(V, features=F)
    h.A = A.copy()
    return h.profiles()


def test_affinity_noise_has_the_claimed_std_and_leaves_the_other_draws_as_they_were():
    sigma = 1.5
    g = ItemGraph(V, noise_std=sigma, seed=4, features=_onehot(TOPIC))
    plain = ItemGraph(V, noise_std=sigma, seed=4)
    incs = []
    for _ in range(40):
        before = g.A.copy() if g.A is not None else np.zeros((V, NF))
        g.add([])
        plain.add([])
        assert g.A is not None
        incs.append((g.A - before).ravel())
        np.testing.assert_array_equal(g.n, plain.n)  # the counts' and pairs' noise is drawn first, as before
        np.testing.assert_array_equal(g.P, plain.P)
    x = np.concatenate(incs)
    assert 1e-3 < stats.chi2.cdf(float(np.sum(x ** 2) / sigma ** 2), len(x)) < 1 - 1e-3
    assert stats.chi2.cdf(float(np.sum(x ** 2) / (1.1 * sigma) ** 2), len(x)) < 1e-6
    assert stats.chi2.cdf(float(np.sum(x ** 2) / (0.9 * sigma) ** 2), len(x)) > 1 - 1e-6
    # the draws are the tail of release k's stream, after the counts' (no candidates here: no pairs)
    rng = np.random.default_rng([4, NOISE_STREAM, 0])
    rng.normal(0.0, sigma, V)
    np.testing.assert_allclose(incs[0], rng.normal(0.0, sigma, (V, NF)).ravel(), rtol=0, atol=1e-12)


def _random_round(rng: np.random.Generator) -> list[Pairs]:
    return [device_pairs(rng.integers(0, V, 8), rng.random(8) < 0.6, 2) for _ in range(4)]


def _exact_affinities(g: ItemGraph, contribs: list[Pairs]) -> np.ndarray:
    """The round's exact affinities as ``g`` sums them: read from the profiles it published before the round."""
    G, out = g.profiles().astype(np.float64), np.zeros((V, NF))
    for p in contribs:
        np.add.at(out, p.follow, G[p.before])
    return out


def test_batched_affinities_are_released_every_k_rounds_with_one_draw(tmp_path):
    """``affinity_every = 3``: rounds 1 and 2 add nothing to ``A`` (their exact sums wait, unreleased), round 3
    adds the three rounds' sums plus one draw, the tail of release 3's stream as an unbatched release draws it; the
    profiles move only then, and read the noise of one release; a graph saved between releases resumes to the
    same sums."""
    sigma, K = 1.5, 3

    def graph() -> ItemGraph:
        return ItemGraph(V, noise_std=sigma, seed=4, features=_onehot(TOPIC), pairs=False, affinity_every=K)

    g, rng, waited = graph(), np.random.default_rng(1), np.zeros((V, NF))
    for _ in range(2):
        contribs = _random_round(rng)
        waited += _exact_affinities(g, contribs)
        g.add(contribs)
    assert g.A is not None and not g.A.any() and g.aff_releases == 0
    np.testing.assert_allclose(g.pending, waited, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(g.profiles(), _onehot(TOPIC).astype(np.float32))  # nothing released yet
    save_checkpoint(tmp_path / "g.npz", round_=2, global_state={}, optimizer={}, lr_schedule={}, graph=g.state())
    third = _random_round(rng)
    want = waited + _exact_affinities(g, third)
    g.add(third)
    draws = np.random.default_rng([4, NOISE_STREAM, 2])
    draws.normal(0.0, sigma, V)  # the counts' draw comes first
    np.testing.assert_allclose(g.A, want + draws.normal(0.0, sigma, (V, NF)), rtol=0, atol=1e-12)
    assert g.aff_releases == 1 and g.pending is None
    assert not np.allclose(g.profiles(), _onehot(TOPIC), atol=1e-3)
    resumed = graph()
    resumed.load(load_checkpoint(tmp_path / "g.npz")["graph"])
    resumed.add(third)
    np.testing.assert_array_equal(resumed.A, g.A)
    np.testing.assert_array_equal(resumed.profiles(), g.profiles())


@pytest.mark.parametrize("every", [1, 2, 3])
def test_the_graph_s_batched_releases_move_by_at_most_the_sensitivity(every):
    """Through ``ItemGraph`` itself (pairs off, so every release draws the same cells): two graphs with one seed,
    the second without one event of one device, released over 6 rounds with ``affinity_every`` rounds a batch. The
    noise (std 10^6) cancels in the difference, and is so large beside the data that both graphs read the same
    profiles to 10^-5 (one query for both, as the adaptive composition takes it): every release's counts and
    affinities together differ by at most the sensitivity, and by more than the counts alone allow."""
    rng, worst = np.random.default_rng(7), 0.0
    F = rng.random((V, NF))
    F /= np.linalg.norm(F, axis=1, keepdims=True)

    def released(seqs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        g = ItemGraph(V, noise_std=1e6, seed=2, features=F, pairs=False, affinity_every=every)
        out, read = [], []
        for r in range(6):
            n0, a0 = g.n.copy(), (g.A.copy() if g.A is not None else np.zeros((V, NF)))
            read.append(g.profiles())
            g.add([device_pairs(items[rd <= r], rd[rd <= r] == r, 0) for items, rd in seqs if (rd == r).any()])
            out += [g.n - n0, (g.A - a0).ravel()]
        return np.concatenate(out), np.stack(read)

    for _ in range(10):
        seqs = [_device_rounds(rng, rounds=6) for _ in range(3)]
        base, query = released(seqs)
        items, rd = seqs[0]
        for j in range(len(items)):
            keep = np.arange(len(items)) != j
            moved, other = released([(items[keep], rd[keep]), *seqs[1:]])
            np.testing.assert_allclose(other, query, rtol=0, atol=1e-5)
            worst = max(worst, float(np.linalg.norm(moved - base)))
    assert 1.0 < worst <= sensitivity(0, F) + 1e-3


def test_a_checkpoint_from_before_batched_affinities_loads_with_every_release_noised():
    g = ItemGraph(V, noise_std=1.0, seed=3, features=_onehot(TOPIC))
    rng = np.random.default_rng(0)
    for _ in range(3):
        g.add(_random_round(rng))
    old = {k: v for k, v in g.state().items() if k not in ("aff_releases", "pending")}  # as written before
    h = ItemGraph(V, noise_std=1.0, seed=3, features=_onehot(TOPIC))
    h.load(old)
    assert h.aff_releases == h.releases == 3 and h.pending is None
    np.testing.assert_array_equal(h.profiles(), g.profiles())


@pytest.mark.parametrize("kw", [{}, {"noise_std": 1.0, "clip": 1.0, "pairs": False}, {"noise_std": 1.0, "every": 0}])
def test_only_an_event_level_noised_graph_batches_its_affinities(kw):
    with pytest.raises(ValueError, match="event-level noised"):
        ItemGraph(V, features=_onehot(TOPIC), affinity_every=kw.pop("every", 2), **kw)
    secure = ItemGraph(V, noise_std=1.0, features=_onehot(TOPIC), pairs=False, affinity_every=2)
    with pytest.raises(ValueError, match="released every round"):  # SecAgg+ sums carry each round's noise
        secure.add_released(np.zeros(V), np.zeros((V, NF)))
    base = dict(world_users=40, world_items=V, world_topics=NF, world_events_per_user=5, rounds=6, cohort=20,
                progress=False, engine="local", epsilon=8.0)
    assert RunConfig(privacy="event", event_noise="aggregate", local_steps=1, **base).affinity_every == 4
    assert RunConfig(privacy="event", event_noise="aggregate", local_steps=1, affinity_rounds=1, **base
                     ).affinity_every == 1
    assert RunConfig(privacy="event", event_noise="aggregate", local_steps=1, secure_aggregation=True, **base
                     ).affinity_every == 1  # the devices' shares noise each round's sum
    assert RunConfig(privacy="user", **base).affinity_every == 1  # each round's clipped sums are its release
    assert RunConfig(privacy="none", **{**base, "epsilon": 0.0}).affinity_every == 1  # no budget without DP


def test_profiles_follow_behaviour_where_the_listed_features_are_wrong():
    """Item 5 lists topic 1, but its users come to it from topic-3 items: its profile moves to topic 3; an item
    nobody had keeps its listed features; with noise the list weighs more (PROFILE_PRIOR noise stds)."""
    F = _onehot(TOPIC)
    g = ItemGraph(V, features=F)
    g.add([Pairs(*(np.zeros(0, np.int64),) * 2, np.zeros(0), np.array([5]), np.array([20.0]),
                 np.full(20, 5), np.full(20, 3))])
    G = g.profiles()
    assert G[5].argmax() == 3 and G[5, 1] > 0  # mostly behaviour, a trace of the list
    np.testing.assert_allclose(G[7], F[7])
    np.testing.assert_allclose(np.linalg.norm(G, axis=1), 1.0, rtol=1e-6)
    weight = PROFILE_PRIOR * 1.0
    assert G[5, 3] / G[5, 1] == pytest.approx(20.0 / weight, rel=1e-6)
    noisy = ItemGraph(V, noise_std=10.0, features=F)
    noisy.A, noisy.releases, noisy.aff_releases = g.A, 1, 1
    assert noisy.profiles()[5].argmax() == 1  # 20 events do not stand above PROFILE_THRESHOLD (2) stds of 10
    noisy.A = g.A * 2.0  # 40 do: 40 - 20 against the list's weight PROFILE_PRIOR * (10 + 1)
    assert noisy.profiles()[5].argmax() == 3
    assert noisy.profiles()[5, 3] / noisy.profiles()[5, 1] == pytest.approx(
        (40 - PROFILE_THRESHOLD * 10) / (PROFILE_PRIOR * 11), rel=1e-3)


def test_a_model_that_reads_features_gets_the_learned_profiles_with_each_version():
    """deepfm's version carries the item graph's profiles in place of the listed rows, once the graph has
    published them: item 5 lists topic 1, but its users came to it from topic-3 items, so the version says
    topic 3 for it; before any release it carries the lists. A cold item's profile is its list."""
    from fedrec.data.features import ModelFeatures, published_features
    from fedrec.itemgraph import MODEL_FEATURES

    F = _onehot(TOPIC).astype(np.float32)
    state = init_state(RunConfig(model="deepfm", dim=4, privacy="none"), V, F, ModelFeatures(F, None))
    np.testing.assert_array_equal(state.host_state(1)[MODEL_FEATURES], published_features(F))
    state.graph.add([Pairs(*(np.zeros(0, np.int64),) * 2, np.zeros(0), np.array([5]), np.array([20.0]),
                           np.full(20, 5), np.full(20, 3))])
    state.graph_table = state.graph.table()
    got = state.host_state(2)[MODEL_FEATURES]
    assert got[5].astype(np.float32).argmax() == 3 and F[5].argmax() == 1
    np.testing.assert_array_equal(got, published_features(state.graph.profiles()))
    np.testing.assert_array_equal(got[7], published_features(F)[7])
    with pytest.raises(ValueError, match="in place of the listed"):
        ModelFeatures(F, None).at(2, F[:, :2])


def test_pure_noise_below_the_threshold_leaves_the_listed_features():
    F = _onehot(TOPIC)
    g = ItemGraph(V, noise_std=1.0, seed=2, features=F)
    for _ in range(4):
        g.add([])
    assert g.A is not None and (np.abs(g.A) > 0).all()  # every cell got a draw
    std = math.sqrt(4)
    below = (g.A < PROFILE_THRESHOLD * std).all(axis=1)
    assert below.sum() >= V // 2  # most rows: nothing stands above 2 stds
    np.testing.assert_allclose(g.profiles()[below], F[below], atol=1e-6)


def test_the_features_blend_ranks_by_the_learned_profiles():
    """Same counts, same listed features: with the profile that puts item 5 in topic 3, a topic-3 context ranks it
    first; with the listed features alone it ranks below every topic-3 item."""
    g = ItemGraph(V, features=_onehot(TOPIC))
    g.add([Pairs(*(np.zeros(0, np.int64),) * 2, np.zeros(0), np.arange(V), np.full(V, 10.0),
                 np.full(30, 5), np.full(30, 3))])
    table = g.table()
    assert {FEATURES, COUNTS, PROFILES} <= set(table)
    ctx, w = contexts(np.array([3, 7, 11]), np.zeros(0, np.int64), 3)  # the device's topic-3 items
    _, content = graph_scores(table, ctx, w)
    assert content is not None and int(torch.argmax(content[-1])) in (3, 5, 7, 11)
    assert content[-1, 5] > 0.9 * content[-1].max()
    listed = {k: v for k, v in table.items() if k != PROFILES}
    _, plain = graph_scores(listed, ctx, w)
    assert plain is not None and plain[-1, 5] < 0.01 * plain[-1].max()


def test_a_run_with_features_noises_its_graph_for_the_larger_sensitivity():
    cfg = RunConfig(world_users=40, world_items=V, world_topics=NF, world_events_per_user=5, rounds=6, cohort=20, privacy="event", event_noise="aggregate",
                    local_steps=1, epsilon=8.0, progress=False, engine="local")
    F = _onehot(TOPIC)
    with_f, without = init_state(cfg, V, F).graph, init_state(cfg, V).graph
    assert with_f is not None and without is not None
    assert with_f.noise_std == pytest.approx(graph_multiplier(cfg) * math.sqrt(3 * cfg.pair_window * PAIR_WEIGHT**2 + 4))
    assert without.noise_std == pytest.approx(graph_multiplier(cfg) * math.sqrt(3 * cfg.pair_window * PAIR_WEIGHT**2 + 1))


def test_a_real_federation_with_the_worlds_features_releases_affinities_and_reports_their_cost(tmp_path):
    """The world's topics are the run's features (``item-features = auto``): devices send the item before each new
    event from round 2 on (round 1's version has no table yet), the checkpointed graph holds noisy affinities (released
    every ``affinity-rounds``) and profiles, and the privacy block states the larger sensitivity."""
    cfg = RunConfig(world_users=60, nodes=2, rounds=3, cohort=30, uptake_probe=False, progress=False, engine="local",
                    privacy="event", event_noise="aggregate", local_steps=1, epsilon=8.0, affinity_rounds=2,
                    out=str(tmp_path / "run"))
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    block = summary["privacy"]["event"]
    assert block["graph_sensitivity"] == pytest.approx(math.sqrt(3 * cfg.pair_window * PAIR_WEIGHT**2 + 4), rel=1e-6)
    assert "affinities" in block["graph"] and block["graph_affinity_rounds"] == cfg.affinity_every == 2
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    A, G = ck["graph"]["affinity"], ck["graph"]["graph.profiles"]
    # round 2 released rounds 1-2; round 3's sums waited, and the finished checkpoint dropped them unreleased
    assert int(ck["graph"]["aff_releases"]) == 1 and A.any() and "pending" not in ck["graph"]
    assert A.shape == (cfg.world_items, cfg.world_topics) and G.shape == A.shape
    assert np.allclose(np.linalg.norm(G.astype(np.float64), axis=1), 1.0, atol=1e-2)


def test_without_dp_the_affinities_are_the_exact_sums_the_devices_sent(tmp_path):
    """Through the real message path: from round 2 on, devices send the item before each new event, and without noise
    the affinities are sums of non-negative profile rows (round 2 reads the lists: whole counts of one-hot rows)."""
    cfg = RunConfig(world_users=60, nodes=2, rounds=2, cohort=30, uptake_probe=False, progress=False, engine="local",
                    privacy="none", out=str(tmp_path / "run"))
    run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    A = load_checkpoint(tmp_path / "run" / "checkpoint.npz")["graph"]["affinity"]
    assert A.sum() > 20 and np.array_equal(A, np.round(A))  # round 2 alone: whole counts of one-hot list rows


def test_an_item_with_no_features_listed_gets_no_profile_from_noise_alone():
    F = _onehot(TOPIC)
    F[[2, 6]] = 0.0
    g = ItemGraph(V, noise_std=1.0, seed=5, features=F)
    for _ in range(4):
        g.add([])
    assert not g.profiles()[[2, 6]].any()
    g.A[6, 2] += 30.0  # behaviour that outweighs a list: the profile follows it
    assert g.profiles()[6].argmax() == 2 and not g.profiles()[2].any()


def test_a_follow_must_be_one_of_the_devices_pairs():
    p = device_pairs(np.array([3, 5, 7]), np.array([False, True, True]), window=2)
    # (7, 3) is one of its pairs (3 is two events before 7): a device may name it, nothing can tell
    Pairs.from_arrays(p.arrays() | {"pairs.before": np.array([3, 3], np.int32)}, V, events=2, window=2)
    d = p.arrays() | {"pairs.follow": np.array([5, 7], np.int32), "pairs.before": np.array([3, 9], np.int32)}
    with pytest.raises(ValueError, match="not among its pairs"):
        Pairs.from_arrays(d, V, events=2, window=2)


def test_a_checkpointed_graph_without_affinities_is_refused_for_a_run_with_features():
    g = ItemGraph(V, noise_std=1.0, features=_onehot(TOPIC))
    plain = ItemGraph(V, noise_std=1.0)
    plain.add([])
    with pytest.raises(ValueError, match="without item x feature affinities"):
        g.load(plain.state())
    h = ItemGraph(V, noise_std=1.0, features=_onehot(TOPIC))
    h.add([])
    g.load(h.state())
    np.testing.assert_array_equal(g.A, h.A)


def test_an_event_level_checkpoint_from_before_batched_affinities_resumes_only_with_every_round(tmp_path):
    """An event-level checkpoint whose config has no ``affinity-rounds`` released the affinities every round:
    resuming it with the default 4 is refused with the resume sentence naming the key; with 1 it resumes."""
    from fedrec.federation.state import ResumeError, checkpoint_to_continue
    from fedrec.privacy.ledger import Ledger

    def cfg(**kw: object) -> RunConfig:
        return RunConfig(world_users=40, world_items=V, world_topics=NF, world_events_per_user=5, rounds=6, cohort=20,
                         progress=False, engine="local", privacy="event", event_noise="aggregate", local_steps=1,
                         epsilon=8.0, out=str(tmp_path), **kw)

    old = cfg(affinity_rounds=1)
    path = tmp_path / "checkpoint.npz"
    init_state(old, V, _onehot(TOPIC)).save(path, old)
    forget_config_key(path, "affinity-rounds")
    ledger = Ledger(tmp_path / "privacy_ledger.jsonl")
    with pytest.raises(ResumeError, match="affinity-rounds = 1, not 4"):
        checkpoint_to_continue(cfg(), init_state(cfg(), V, _onehot(TOPIC)), path, ledger)
    assert checkpoint_to_continue(old, init_state(old, V, _onehot(TOPIC)), path, ledger) is not None
