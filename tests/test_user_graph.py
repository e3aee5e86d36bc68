"""The item graph under user-level DP: each sampled device's counts of a round (item counts and item x feature
affinities; no pairs) are clipped to L2 norm 1 and noised on the sum, as one part of the round's one Gaussian (the
delta is the other part), so the ledger and ε are those of user-level DP without the graph."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _checkpoints import forget_config_key
from scipy import stats

from fedrec.clients.app import app as client_app
from fedrec.config import ConfigError, RunConfig
from fedrec.federation.state import init_state
from fedrec.itemgraph import ItemGraph, Pairs, device_pairs
from fedrec.privacy.accounting import epsilon, user_parts
from fedrec.privacy.ledger import Ledger
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid

V, F, SIGMA = 30, 4, 0.5


def _user_cfg(**kw) -> RunConfig:
    return RunConfig(world_users=60, world_items=V, rounds=3, cohort=30, privacy="user", epsilon=4.0,
                     progress=False, engine="local", uptake_probe=False, **kw)


def _features() -> np.ndarray:
    x = np.random.default_rng(0).random((V, F))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _graph() -> ItemGraph:
    """A graph whose items 0..19 are candidates, with affinities: two graphs made so are equal."""
    g = ItemGraph(V, neighbours=5, noise_std=SIGMA, seed=3, features=_features(), clip=1.0, pairs=False)
    z = np.zeros(0, np.int64)
    for _ in range(2):  # ten users of 2 events each of items 0..19: 20 / sqrt(2)... far above ENTER stds
        g.add([Pairs(z, z, np.zeros(0), np.array([i, i + 10]), np.ones(2)) for i in range(10) for _ in range(10)])
    assert sorted(g.cand.tolist()) == list(range(20))
    return g


def _released(contribs: list[Pairs]) -> float:
    """The L2 norm, in the graph's noise units, of what ``contribs`` add to one release: the released sums with
    them minus the same release without them (same seed, same release number, so the same draws)."""
    with_, without = _graph(), _graph()
    with_.add(contribs)
    without.add([])
    assert with_.P.size == 0  # no pairs are released
    dn, dA = with_.n - without.n, with_.A - without.A
    return float(np.sqrt(np.sum(dn**2) + np.sum(dA**2)))


def _raw_norm(p: Pairs, g: ItemGraph) -> float:
    """The unclipped norm of what the release counts of it: its item counts and affinity rows."""
    G = g.profiles().astype(np.float64)
    A = np.zeros((V, F))
    np.add.at(A, p.follow, G[p.before])
    return float(np.sqrt(np.sum(p.counts**2) + np.sum(A**2)))


def test_a_heavy_device_moves_the_release_by_at_most_the_clip():
    rng = np.random.default_rng(1)
    items = rng.integers(0, 25, 80)  # 80 new events, repeats, pairs in and outside the candidates
    heavy = device_pairs(items, np.ones(80, bool), 0)
    assert _raw_norm(heavy, _graph()) > 5
    assert _released([heavy]) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("new", [[True], [False, True]])
def test_a_small_device_is_scaled_only_as_far_as_it_must(new):
    """One event that is its device's first: its count alone, norm 1, released as it is; one event after another:
    its count and its affinity row (norm sqrt(2)) are scaled to 1."""
    items = np.array([3, 5][-len(new):])
    one = device_pairs(items, np.array(new), 0)
    raw = _raw_norm(one, _graph())
    assert raw == pytest.approx(1.0 if len(new) == 1 else math.sqrt(2))
    assert _released([one]) == pytest.approx(min(raw, 1.0), rel=1e-9)


def test_devices_are_clipped_one_by_one():
    """Two heavy devices: each is clipped alone, so together they move the release by at most 2, and by exactly
    the norm of the sum of their clipped parts."""
    rng = np.random.default_rng(2)
    a, b = (device_pairs(rng.integers(0, 20, 60), np.ones(60, bool), 0) for _ in range(2))
    assert _released([a]) == pytest.approx(1.0) and _released([b]) == pytest.approx(1.0)
    assert 1.0 < _released([a, b]) <= 2.0 + 1e-9


def test_pairs_are_never_released():
    """Pairs a device sends anyway (a hostile one: the server refuses them first) reach no sum and no table."""
    g = _graph()
    rng = np.random.default_rng(4)
    for _ in range(3):
        g.add([device_pairs(rng.integers(0, 20, 40), np.ones(40, bool), 3) for _ in range(5)])
    assert g.P.size == 0 and not g.table()["graph.sim"].any()
    assert g.state()["pairs"].size == 0


def test_released_user_counts_and_affinities_have_the_claimed_noise_std():
    g = ItemGraph(V, noise_std=SIGMA, seed=5, clip=1.0, pairs=False, features=_features())
    counts, cells = [], []
    for _ in range(40):
        n, A = g.n.copy(), (g.A.copy() if g.A is not None else np.zeros((V, F)))
        g.add([])
        counts.append(g.n - n)
        cells.append((g.A - A).reshape(-1))
    for x in (np.concatenate(counts), np.concatenate(cells)):
        chi = float(np.sum(x**2) / SIGMA**2)
        assert 1e-3 < stats.chi2.cdf(chi, len(x)) < 1 - 1e-3
        assert stats.chi2.cdf(float(np.sum(x**2) / (1.1 * SIGMA) ** 2), len(x)) < 1e-6


def test_an_item_listed_twice_is_clipped_as_its_sum():
    """A hostile device that lists one item 16 times (count 1 each) moves that count by at most the clip."""
    z = np.zeros(0, np.int64)
    liar = Pairs(z, z, np.zeros(0), np.full(16, 5), np.ones(16))
    assert _released([liar]) == pytest.approx(1.0, rel=1e-9)


def test_a_resumed_graph_keeps_its_noise_seed():
    g = _graph()
    g.seed = 987654321  # as a run that continues a ledger, or a deployed server's secret, makes it
    h = ItemGraph(V, neighbours=5, noise_std=SIGMA, seed=3, features=_features(), clip=1.0, pairs=False)
    h.load(g.state())
    assert h.seed == g.seed
    g.add([])
    h.add([])
    np.testing.assert_array_equal(h.n, g.n)


def test_late_replies_reach_no_user_level_graph():
    """A straggler was sampled for an earlier round: its counts stay out of this round's noisy sums (its delta is
    dropped too); without DP (no `on_time_only`) they are summed in as before."""
    import torch

    from fedrec.federation.replies import GraphCheck, Reply, collect
    from fedrec.messages import NodeReply, decode_reply, encode_reply
    from tests.test_itemgraph import V as W
    from tests.test_itemgraph import _update

    counts = device_pairs(np.array([1, 2, 3, 4]), np.ones(4, bool), 0).arrays()
    late, now = _update(1, counts), _update(2, counts)
    late.report.base_round = 1
    body = NodeReply(updates=[late, now])
    reply = Reply(asked=2, node=7, body=decode_reply(encode_reply(body)), devices=frozenset({1, 2}))
    gstate = {"item.weight": torch.zeros(W, 2)}
    user = collect([reply], gstate, None, 2, {1: 7, 2: 7}, GraphCheck(W, 0, on_time_only=True))
    assert [u.device for u in user.late] == [1] and user.done == [2] and len(user.pairs) == 1
    assert not user.failed
    plain = collect([reply], gstate, None, 2, {1: 7, 2: 7}, GraphCheck(W, 0))
    assert len(plain.pairs) == 2 and not plain.failed


# ---- the budget -------------------------------------------------------------------------------------------------


def test_the_graph_takes_its_share_of_one_gaussian():
    cfg = _user_cfg(user_graph_share=0.3)
    assert cfg.graph and cfg.graph_noised and cfg.user_graph
    model, graph = user_parts(cfg, 2.0)
    assert 1 / model**2 + 1 / graph**2 == pytest.approx(1 / 2.0**2, rel=1e-12)
    assert (1 / graph**2) / (1 / 2.0**2) == pytest.approx(0.3, rel=1e-12)
    assert cfg.pair_window == 0  # the devices send no pairs
    state = init_state(cfg, V, z_user=2.0)
    assert state.graph is not None and state.graph.clip == 1.0 and not state.graph.pairs
    assert state.graph.noise_std == pytest.approx(graph)


@pytest.mark.parametrize("kw", [{"user_graph_share": 0.0}, {"item_graph": "off"},
                                {"user_graph_share": 0.0, "secure_aggregation": True}])
def test_no_graph_leaves_the_model_all_of_it(kw):
    cfg = _user_cfg(**kw)
    assert not cfg.graph and not cfg.user_graph
    assert user_parts(cfg, 2.0) == (2.0, 0.0)


def test_under_secure_aggregation_the_graph_is_summed_masked_and_shares_the_gaussian():
    cfg = _user_cfg(secure_aggregation=True)
    assert cfg.graph and cfg.user_graph and cfg.secure_graph and not cfg.graph_sent and cfg.pair_window == 0
    assert user_parts(cfg, 2.0) == user_parts(_user_cfg(), 2.0)  # the same split of the one Gaussian
    with pytest.raises(ConfigError, match="item-graph"):
        _user_cfg(item_graph="on", user_graph_share=0.0)


def _delta(eps: float, shift: np.ndarray, n: int = 400_000) -> float:
    """Monte Carlo hockey-stick divergence of N(shift, I) from N(0, I) at ``eps``."""
    x = np.random.default_rng(0).normal(size=(n, len(shift))) + shift
    loss = x @ shift - 0.5 * shift @ shift
    return float(np.mean(np.maximum(0.0, 1.0 - np.exp(eps - loss))))


def test_two_parts_are_one_gaussian_of_the_combined_multiplier():
    """Independent check of the split: a user moving the delta's sum by ``clip`` (noise ``z_model * clip``) and
    the graph's by 1 (noise ``z_graph``) is, at every ε, the one Gaussian of multiplier ``z_user`` (the closed
    form of Balle and Wang 2018), which is what the ledger accounts."""
    z = 1.3
    model, graph = user_parts(_user_cfg(user_graph_share=0.4), z)
    shift = np.array([1.0 / model, 1.0 / graph])  # in noise stds, whatever the clip
    mu = 1.0 / z
    for eps in (0.2, 0.8, 1.5):
        closed = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
        assert _delta(eps, shift) == pytest.approx(closed, abs=3e-3)


# ---- a real federation ---------------------------------------------------------------------------------------------


def test_a_user_level_federation_with_the_graph(tmp_path):
    cfg = _user_cfg(nodes=2, out=str(tmp_path / "run"))
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    user = summary["privacy"]["user"]
    z = user["noise_multiplier"]
    assert (user["noise_multiplier_model"], user["graph_noise_multiplier"]) == pytest.approx(user_parts(cfg, z))
    ledger = Ledger(tmp_path / "run" / "privacy_ledger.jsonl")
    assert {r.kind for r in ledger.records} == {"server-gaussian"}  # the graph is in the round's one Gaussian
    assert user["epsilon"] == pytest.approx(epsilon([(z, user["sample_rate"], 3)], cfg.delta, "prv"), rel=1e-5)
    assert user["epsilon"] <= 4.0 + 1e-6
    import json

    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(r["failed"] == 0 for r in rows)  # every reply, affinities and all, passes the server's checks
    expected = user["sample_rate"] * user["population"]
    # the model's sum carries its part of the noise only, over the expected cohort
    assert rows[0]["noise_std"] == pytest.approx(user["noise_multiplier_model"] * cfg.clip / expected, rel=1e-6)
    blends = summary["metrics"]["blends"]
    assert blends["features"] != blends["model"]  # served a graph: without one `features` ranks as the model


def test_a_device_that_sends_pairs_under_user_level_is_refused():
    """The server checks pairs against the run's window, 0 under user-level DP: any pair fails that reply."""
    sent = device_pairs(np.array([1, 2, 3]), np.ones(3, bool), 1)
    assert len(sent.a)
    with pytest.raises(ValueError, match="pairs"):
        Pairs.from_arrays(sent.arrays(), V, events=3, window=_user_cfg().pair_window)
    none = device_pairs(np.array([1, 2, 3]), np.ones(3, bool), 0)
    assert Pairs.from_arrays(none.arrays(), V, events=3, window=0).counts.sum() == 3


def test_a_checkpoint_from_before_the_graph_resumes_only_without_it(tmp_path):
    """A user-level checkpoint whose config has no ``user-graph-share`` ran without the graph: resuming it with the
    graph on is refused with the resume sentence naming the key; with ``user-graph-share = 0`` it resumes."""
    from fedrec.federation.state import ResumeError, checkpoint_to_continue

    old = _user_cfg(user_graph_share=0.0, out=str(tmp_path))
    state = init_state(old, V, z_user=2.0)
    path = tmp_path / "checkpoint.npz"
    state.save(path, old)
    forget_config_key(path, "user-graph-share")
    ledger = Ledger(tmp_path / "privacy_ledger.jsonl")
    with pytest.raises(ResumeError, match="user-graph-share = 0.0, not 0.1"):
        checkpoint_to_continue(_user_cfg(out=str(tmp_path)), init_state(_user_cfg(), V, z_user=2.0), path, ledger)
    assert checkpoint_to_continue(old, init_state(old, V, z_user=2.0), path, ledger) is not None
