"""Secure aggregation (Flower SecAgg+): the server gets the sum of the deltas and nothing finer.

With event noise at the aggregate the devices add noise shares: the unmasked sum is the sum of their
releases plus noise of at least the configured variance, or nothing when too many drop.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message
from scipy import stats

from fedrec.checkpoint import load_checkpoint
from fedrec.client_update import device_seed
from fedrec.clients.app import app as client_app
from fedrec.clients.records import PACKED, from_records
from fedrec.config import ConfigError, RunConfig
from fedrec.federation.replies import GraphCheck, Replies, RowCheck, SecureSum, add_secure_sum, collect
from fedrec.federation.run import discover, event_noise
from fedrec.itemgraph import clip_scale, secure_noise_std
from fedrec.messages import RoundInstruction, record_type
from fedrec.models import build_model
from fedrec.privacy.accounting import graph_multiplier
from fedrec.privacy.aggregate import split
from fedrec.privacy.ledger import Ledger
from fedrec.privacy.shares import (
    SHARE_STREAM,
    SIGNAL_BOUND,
    add_shares,
    device_signal,
    node_share_seed,
    node_threshold,
    share_generator,
    share_plan,
)
from fedrec.server.app import FlowerTransport, run_federation
from fedrec.server.local_grid import LocalGrid
from fedrec.server.secagg import secure_round


class RecordingGrid(LocalGrid):
    """A LocalGrid that keeps every reply the server receives (what the server can see)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.seen: list[Message] = []

    def _deliver(self, msg: Message) -> Message:
        rep = super()._deliver(msg)
        self.seen.append(rep)
        return rep


class DroppingGrid(RecordingGrid):
    """Nodes in ``drop`` fail SecAgg+'s collect stage (they never send their masked vector): a dropout."""

    drop: set[int] = set()

    def _deliver(self, msg: Message) -> Message:
        if msg.metadata.dst_node_id in self.drop and "fitins.parameters" in msg.content:
            return Message(Error(code=503, reason="node dropped out"), reply_to=msg)
        return super()._deliver(msg)


def _arrays_received(m: Message) -> dict[str, int]:
    """Each record of a reply the server received, with the number of arrays it holds: our packed records
    unpacked (:func:`fedrec.clients.records.from_records`), SecAgg+'s own records as they are."""
    if PACKED in m.content:
        return {k: len(v) if record_type(k) == "arrays" else 0 for k, v in from_records(m.content).items()}
    return {k: len(v) if isinstance(v, ArrayRecord) else 0 for k, v in m.content.items()}


def _setup(cfg: RunConfig, grid_type: type[RecordingGrid] = RecordingGrid):
    grid = grid_type(client_app, cfg.nodes, cfg.to_flat())
    transport = FlowerTransport(grid, cfg)
    fed = discover(transport, cfg, event_noise(cfg))
    g = {k: v for k, v in build_model(cfg.model, fed.n_items, cfg.dim, seed=cfg.seed).global_state().items()}
    by_node: dict[int, list[int]] = {}
    for d in sorted(fed.home)[:12]:
        by_node.setdefault(fed.home[d], []).append(d)
    return grid, transport, g, by_node, fed


def test_the_secure_sum_equals_the_plain_sum_and_no_reply_holds_a_delta():
    cfg = RunConfig(world_users=60, nodes=3, rounds=4, privacy="user", secure_aggregation=True, serve_eval=False, wire="dense",
                    uptake_probe=False)
    # the plain protocol: every device's clipped delta reaches the server, which sums them
    grid, transport, g, by_node, fed = _setup(cfg)
    host = {k: v.numpy() for k, v in g.items()}
    requests = {n: RoundInstruction(2, tuple(ds), 0.0, 0.0) for n, ds in sorted(by_node.items())}
    got = collect(transport.exchange(2, requests, host, cfg.to_flat(), None), g, cfg.clip, 2, fed.home,
                  GraphCheck(fed.n_items, 0, on_time_only=True))  # in the clear the graph's counts come as pairs
    plain = sum(d["item.weight"] for d in got.deltas)
    counts = [np.bincount(p.items, p.counts, minlength=fed.n_items) for p in got.pairs]
    graph = sum(c * clip_scale([c], 1.0) for c in counts)  # each device's counts clipped to norm 1
    # the same devices, the same round, fresh nodes: under SecAgg+
    grid2, _, g2, by_node2, _ = _setup(cfg)
    assert by_node2 == by_node
    grid2.seen.clear()
    sec = secure_round(grid2, by_node2, {k: v.numpy() for k, v in g2.items()},
                       {**cfg.to_flat(), **RoundInstruction(2, (), 0.0, 0.0).to_flat()}, 2, timeout=60)
    assert sec.failures == [] and sorted(sec.devices) == sorted(got.done)
    # quantisation: 2^22 levels over [-clip, clip] times the largest device count of a node
    np.testing.assert_allclose(sec.total["item.weight"], plain, atol=1e-4)
    assert np.abs(plain).max() > 1e-3  # a real signal was compared
    # the item graph's clipped counts, summed masked in the delta's range and back in their units (no profiles yet)
    assert len(sec.graph) == 1 and max(np.linalg.norm(c) for c in counts) > 1.5  # some were clipped
    np.testing.assert_allclose(sec.graph[0], graph, atol=1e-4)
    # what the server received: key material and masked vectors, never an array of a device's delta
    assert grid2.seen and all(n == 0 for m in grid2.seen if not m.has_error() for n in _arrays_received(m).values())
    assert not any(k.startswith("delta-") for m in grid2.seen if not m.has_error() for k in _arrays_received(m))


def test_a_secure_federation_runs_and_accounts_every_release(tmp_path):
    cfg = RunConfig(world_users=80, nodes=2, rounds=3, cohort=30, privacy="user", secure_aggregation=True,
                    uptake_probe=False, out=str(tmp_path), progress=False, engine="local")
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    assert summary["rounds"] == 3 and summary["privacy"]["user"]["releases"] == 3
    assert summary["metrics"]["events_scored"] > 0  # serving evaluation ran in its own messages
    # the item graph's clipped counts and affinities, summed masked and noised on the server, once a round
    assert cfg.secure_graph and "the server sees only the sum" in summary["privacy"]["user"]["graph"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failed"] == 0 and r["applied"] > 0 for r in rows)  # every sum taken in, none refused
    graph = load_checkpoint(tmp_path / "checkpoint.npz")["graph"]
    assert int(graph["releases"]) == 3 and graph["affinity"].shape[0] == graph["n"].shape[0]


def test_secure_aggregation_needs_user_level_dp_or_event_noise_at_the_aggregate():
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunConfig(privacy="event", event_noise="device", secure_aggregation=True)
    assert RunConfig(privacy="event", secure_aggregation=True).aggregate_noise  # auto: distributed noise shares
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunConfig(privacy="none", secure_aggregation=True)
    assert torch.is_tensor(torch.zeros(1))


# ---- event noise at the aggregate: distributed noise shares -------------------------------------------------

def _aggregate_cfg(**kw) -> RunConfig:
    base = dict(world_users=60, world_items=2000, nodes=6, rounds=4, privacy="event", event_noise="aggregate",
                local_steps=1, secure_aggregation=True, serve_eval=False, wire="dense", uptake_probe=False,
                noise_multiplier=1.0)
    return RunConfig(**{**base, **kw})


def _plain_and_secure(cfg: RunConfig, per_node: int, drop: set[int] = frozenset()):  # type: ignore[assignment]
    """The round-2 releases of the chosen devices in the clear (summed), and their SecAgg+ round."""
    grid, transport, g, by_node, fed = _setup(cfg)
    by_node = {n: ds[:per_node] for n, ds in sorted(by_node.items())}
    host = {k: v.numpy() for k, v in g.items()}
    requests = {n: RoundInstruction(2, tuple(ds), fed.z_event, 0.0) for n, ds in by_node.items()}
    # in the clear the devices' graph contributions come as pairs (window 0: counts and affinities only)
    got = collect(transport.exchange(2, requests, host, cfg.to_flat(), None), g, None, 2, fed.home,
                  GraphCheck(fed.n_items, 0) if cfg.secure_graph else None,
                  rows=RowCheck(fed.n_items, cfg.lr * cfg.event_clip))
    assert not got.failed and len(got.done) == sum(map(len, by_node.values()))
    grid2, _, g2, _, _ = _setup(cfg, DroppingGrid)
    grid2.drop = {n for i, n in enumerate(sorted(by_node)) if i in drop}  # ``drop``: indices of nodes
    sec = secure_round(grid2, by_node, {k: v.numpy() for k, v in g2.items()},
                       {**cfg.to_flat(), **RoundInstruction(2, (), fed.z_event, 0.0).to_flat(),
                        "graph-noise-std": _graph_noise(cfg)}, 2, timeout=60)
    return got, sec, by_node, fed, grid2


def _dense_sum(got, devices, n_items: int, width: int):
    table, counts = np.zeros((n_items, width)), np.zeros(n_items)
    for d, delta, (cids, cnt) in zip(got.done, got.deltas, got.row_counts, strict=True):
        if d in devices:
            ids, rows = delta["item.weight"]
            np.add.at(table, ids, rows)
            np.add.at(counts, cids, cnt)
    return table, counts


def _graph_noise(cfg: RunConfig) -> float:
    """The item graph's noise std a secure round is told (this version carries no features: sensitivity 1)."""
    return secure_noise_std(graph_multiplier(cfg), None)


def _graph_std(got, sec: SecureSum, n_items: int) -> float:
    """The std of (unmasked graph counts - the devices' counts as sent in the clear)."""
    true = np.zeros(n_items)
    for d, p in zip(got.done, got.pairs, strict=True):
        if d in set(sec.devices):
            np.add.at(true, p.items, p.counts)
    assert true.sum() > 0 and len(sec.graph) == 1  # no profiles in this version: counts only
    return float(np.std(sec.graph[0] - true))


def _noise_stds(got, sec: SecureSum, fed) -> tuple[float, float, float]:
    """The std of (unmasked sum - sum of the releases) over the table and over the counts; and the signal."""
    table, counts = _dense_sum(got, set(sec.devices), fed.n_items, sec.total["item.weight"].shape[1])
    return (float(np.std(sec.total["item.weight"] - table)), float(np.std(sec.counts - counts)),
            float(np.abs(table).max()))


def test_noise_shares_of_all_devices_add_up_to_the_configured_noise():
    cfg = _aggregate_cfg(dropout_tolerance=0.0)  # m = every sampled device: the shares sum to exactly sigma^2
    got, sec, by_node, fed, grid = _plain_and_secure(cfg, per_node=2)
    assert sec.failures == [] and sorted(sec.devices) == sorted(got.done) and sec.required == 12
    z = split(fed.z_event, cfg.count_share)
    grad_std, count_std, signal = _noise_stds(got, sec, fed)
    assert signal > 0.1  # a real release was summed
    # 16000 table coordinates (std estimate within ~0.6%) and 2000 counts (~1.6%)
    assert grad_std == pytest.approx(z.grad * cfg.lr * cfg.event_clip, rel=0.03)
    assert count_std == pytest.approx(z.count, rel=0.06)
    assert _graph_std(got, sec, fed.n_items) == pytest.approx(_graph_noise(cfg), rel=0.06)  # the item graph's counts
    # what the server received: key material and masked vectors, never a device's release or counts
    seen = [_arrays_received(m) for m in grid.seen if not m.has_error()]
    assert seen and not any(k.startswith(("delta-", "rows-")) for got in seen for k in got)
    assert all(n == 0 for got in seen for n in got.values())
    # taken in, it is one presummed delta over all rows, which the aggregator does not noise again
    out = Replies()
    add_secure_sum(out, sec, {k: torch.as_tensor(v) for k, v in sec.total.items()}, cfg.clip, len(by_node),
                   [(fed.n_items,)])
    assert out.presummed == 12 and len(out.graph) == 1 and len(out.deltas) == 1 and out.row_counts[0][1].shape == (fed.n_items,)
    assert sorted(out.done) == sorted(sec.devices) and all("steps" in m for m in out.metrics)


def test_a_node_adds_its_devices_shares_to_their_clamped_summed_signals():
    """``device_signal`` clamps each part of one device's release, counts and graph parts; ``add_shares`` adds one
    device's share exactly as drawn before (table keys, then counts, then the graph, from its generator), and a
    node's ``k`` devices' shares as one draw of ``k`` times the variance (a chi-square test on the table part)."""
    plan = share_plan(1.2, 0.1, 0.2, devices=50, graph=3.0)
    shapes = {"item.weight": (40, 8)}
    release = {"item.weight": (np.array([1, 1, 7]), np.full((3, 8), 50.0))}  # item 1 twice: 100 / 1.0 clamps to 64
    graph = [np.array([0.0, 90.0] + [1.0] * 38), np.ones((40, 3))]
    sig = device_signal(release, (np.array([2, 2]), np.array([1.0, 1.0])), shapes, 1.0, graph)
    assert sig[0][1].tolist() == [SIGNAL_BOUND] * 8 and sig[0][7].tolist() == [50.0] * 8 and not sig[0][0].any()
    assert sig[1][2] == 2.0 and sig[2][1] == SIGNAL_BOUND and sig[3].shape == (40, 3)
    one = add_shares(sig, 1, plan, share_generator(5))
    g = share_generator(5)
    stds = [plan.grad_std, plan.count_std, plan.graph_std, plan.graph_std]
    for got, base, std in zip(one, sig, stds, strict=True):
        want = base + torch.randn(base.shape, generator=g, dtype=torch.float64).numpy() * std
        np.testing.assert_array_equal(got, want)
    # a device alone on its node (deployment) seeds its shares as it always has; a node of several, from all of them
    assert node_share_seed(3, [17], 5) == device_seed(3, 17, 5, SHARE_STREAM)
    assert node_share_seed(3, [17, 18], 5) == node_share_seed(3, [17, 18], 5) != node_share_seed(3, [17, 19], 5)
    k, zeros = 9, [np.zeros((4000, 8)), np.zeros(40)]
    noise = add_shares(zeros, 1, plan, share_generator(6), devices=k)[0].ravel()
    stat = float(np.sum(noise**2) / (k * plan.grad_std**2))
    assert 1e-3 < stats.chi2.cdf(stat, noise.size) < 1 - 1e-3
    assert stats.chi2.cdf(float(np.sum(noise**2) / ((k - 1) * plan.grad_std**2)), noise.size) > 1 - 1e-6


def test_dropouts_within_the_tolerance_still_release_with_the_full_noise():
    cfg = _aggregate_cfg(dropout_tolerance=0.34)  # 6 devices, one per node: m = ceil(0.66 x 6) = 4
    assert share_plan(1.0, cfg.count_share, cfg.dropout_tolerance, 6).required == 4
    assert node_threshold([1] * 6, 4, cfg.dropout_tolerance) == 4
    got, sec, by_node, fed, _ = _plain_and_secure(cfg, per_node=1, drop={1, 2})
    assert sec.total is not None and len(sec.devices) == 4  # exactly m survived
    assert not set(sec.devices) & {d for n in sorted(by_node)[1:3] for d in by_node[n]}
    z = split(fed.z_event, cfg.count_share)
    grad_std, count_std, _ = _noise_stds(got, sec, fed)
    sigma = z.grad * cfg.lr * cfg.event_clip
    assert sigma * 0.97 <= grad_std <= sigma * 1.03  # 4 shares of sigma^2 / 4: the full noise, no less
    assert count_std >= z.count * 0.94 and _graph_std(got, sec, fed.n_items) >= _graph_noise(cfg) * 0.94


def test_dropouts_beyond_the_tolerance_release_nothing():
    cfg = _aggregate_cfg(dropout_tolerance=0.34)
    _, sec, by_node, _, _ = _plain_and_secure(cfg, per_node=1, drop={1, 2, 3})  # 3 of the 4 needed
    assert sec.total is None and sec.devices == [] and sec.required == 4
    assert any("SecAgg+ halted" in f and "need 4 of the 6" in f for f in sec.failures)
    out = Replies()
    gstate = {"item.weight": torch.zeros(2000, 8)}
    add_secure_sum(out, sec, gstate, cfg.clip, len(by_node))
    assert out.presummed == 0 and out.deltas == [] and out.done == []  # no release, no ledger record
    assert any("halted" in why for _, why in out.failed)


def test_a_user_level_sum_whose_graph_part_exceeds_its_devices_is_refused():
    """Each device's graph part has norm at most 1, so the sum of n has norm at most n: more is no honest sum."""
    gstate = {"item.weight": torch.zeros(5, 2)}
    for graph, why in (([np.full(5, 2.0)], "clipped parts"), ([np.zeros(4)], "item graph's sums have shapes")):
        sec = SecureSum({"item.weight": np.zeros((5, 2), np.float32)}, [1, 2], {}, [], graph=graph)
        add_secure_sum(out := Replies(), sec, gstate, 1.0, 2, [(5,)])
        assert out.presummed is None and out.deltas == [] and any(why in w for _, w in out.failed)
    from fedrec.eval.metrics import PrequentialCounts
    from fedrec.messages import UpdateReport

    reports = {d: UpdateReport(1, 1, PrequentialCounts(), -1.0, 1, 1, False, 0.0) for d in (1, 2)}
    sec = SecureSum({"item.weight": np.zeros((5, 2), np.float32)}, [1, 2], reports, [], graph=[np.full(5, 0.5)])
    add_secure_sum(out := Replies(), sec, gstate, 1.0, 2, [(5,)])  # norm 1.12 <= 2 devices: taken in
    assert out.presummed == 2 and len(out.graph) == 1


def test_the_server_refuses_a_sum_of_fewer_devices_than_the_shares_need():
    reports = {}
    gstate = {"item.weight": torch.zeros(5, 2)}
    sec = SecureSum({"item.weight": np.zeros((5, 2), np.float32)}, [], reports, [], counts=np.zeros(5), required=3)
    out = Replies()
    add_secure_sum(out, sec, gstate, 1.0, 2)
    assert out.presummed == 0 and out.deltas == []
    assert any("fewer than the 3" in why for _, why in out.failed)
    bad = SecureSum({"item.weight": np.zeros((5, 2), np.float32)}, [], reports, [], counts=np.full(4, math.nan),
                    required=1)
    add_secure_sum(out := Replies(), bad, gstate, 1.0, 2)
    assert out.presummed == 0 and any("summed counts" in why for _, why in out.failed)


def test_a_secure_federation_with_event_noise_at_the_aggregate_accounts_every_device(tmp_path):
    cfg = _aggregate_cfg(world_items=400, nodes=3, rounds=2, cohort=12, serve_eval=True, out=str(tmp_path),
                         progress=False, engine="local", wire="auto")
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    ev = summary["privacy"]["event"]
    assert summary["rounds"] == 2 and ev["noise"] == "aggregate-secagg" and ev["epsilon"] > 0
    assert ev["trust"].startswith("SecAgg+ with distributed noise")
    records = [r for r in Ledger(tmp_path / "privacy_ledger.jsonl").records if r.kind == "aggregate-gaussian"]
    assert records and {r.round for r in records} == {1, 2}
    # the item graph's counts and affinities, summed masked with their shares: one graph record, its ε composed in
    assert cfg.secure_graph and ev["graph_window"] == 0 and ev["graph_sensitivity"] == 2.0 and "SecAgg+" in ev["graph_noise"]
    graphs = [r for r in Ledger(tmp_path / "privacy_ledger.jsonl").records if r.kind == "graph-gaussian"]
    assert len(graphs) == 1 and graphs[0].noise_multiplier == ev["graph_noise_multiplier"] > 0
    graph = load_checkpoint(tmp_path / "checkpoint.npz")["graph"]
    assert int(graph["releases"]) == 2 and float(np.abs(graph["n"]).sum()) > 0 and len(graph["pairs"]) == 0
    assert graph["affinity"].shape == (400, cfg.world_topics) and float(np.abs(graph["affinity"]).sum()) > 0
    assert "graph.profiles" in graph and float(graph["graph.prior"].max()) > 0  # published: the devices are served it


@pytest.mark.parametrize("privacy", ["event", "user"])
def test_a_secure_deepfm_federation_releases_every_parameter(tmp_path, privacy):
    """A model with parameters beside the item rows (deepfm: feature table, deep part) and public item features
    sent with each version: the masked vectors sum the parameters alone (the features ride beside them; they once
    made every user-level round halt), under event noise with their noise shares and the counts on the item
    table's rows (the keys are sorted, so the item table is not the first); every parameter moves."""
    from fedrec.federation.state import init_state

    extra = {"event_noise": "auto", "local_steps": 0, "epsilon": 8.0} if privacy == "user" else {}
    cfg = _aggregate_cfg(world_items=300, nodes=3, rounds=2, cohort=12, serve_eval=False, out=str(tmp_path),
                         progress=False, engine="local", wire="auto", model="deepfm", privacy=privacy, **extra)
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    if privacy == "event":
        assert summary["privacy"]["event"]["noise"] == "aggregate-secagg"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failed"] == 0 and r["applied"] > 0 for r in rows)
    final = load_checkpoint(tmp_path / "checkpoint.npz")["global"]
    start = init_state(cfg, final["item.weight"].shape[0], z_user=1.0).global_state
    for k in ("item.weight", "feat.weight", "mlp1.weight", "out.bias"):
        assert not np.allclose(final[k], start[k].numpy()), k


def test_a_round_naming_another_graph_noise_std_is_left_by_every_node():
    """Each device computes the item graph's noise std from the run's settings; a round that names less (a faulty
    or lying server) would have the graph's sums travel with less noise than the ledger says: the nodes leave it."""
    cfg = _aggregate_cfg(dropout_tolerance=0.0)
    grid, _, g, by_node, fed = _setup(cfg)
    sec = secure_round(grid, by_node, {k: v.numpy() for k, v in g.items()},
                       {**cfg.to_flat(), **RoundInstruction(2, (), fed.z_event, 0.0).to_flat(),
                        "graph-noise-std": 0.5 * _graph_noise(cfg)}, 2, timeout=60)
    assert sec.total is None and sec.graph == []
    replies = [m for m in grid.seen if m.has_error()]
    assert replies and all("noise std" in m.error.reason for m in replies)


class FirstRoundDrops(RecordingGrid):
    """Every node fails round 1's collect stage: the first secure sum is never unmasked."""

    def _deliver(self, msg: Message) -> Message:
        if "fitins.parameters" in msg.content and int(msg.content["fitins.config"]["round"]) == 1:
            return Message(Error(code=503, reason="node dropped out"), reply_to=msg)
        return super()._deliver(msg)


def test_a_graph_whose_first_secure_sum_is_refused_is_accounted_once(tmp_path):
    """The graph's one ledger record is written before its first release: a refused round releases nothing, so it
    adds no record (each would count as another Gaussian of the graph's in the ε)."""
    cfg = _aggregate_cfg(world_items=400, nodes=3, rounds=3, cohort=12, out=str(tmp_path), progress=False,
                         engine="local", wire="auto")
    run_federation(FirstRoundDrops(client_app, cfg.nodes, cfg.to_flat()), cfg)
    led = Ledger(tmp_path / "privacy_ledger.jsonl").records
    assert [x.kind for x in led].count("graph-gaussian") == 1
    assert {x.round for x in led if x.kind == "aggregate-gaussian"} == {2, 3}
    graph = load_checkpoint(tmp_path / "checkpoint.npz")["graph"]
    assert int(graph["releases"]) == 2


def test_a_checkpoint_of_a_secure_run_without_the_graph_is_not_continued_with_it(tmp_path):
    """SecAgg+ event noise at the aggregate had no item graph before: its budget was spent without the graph's
    share, so a checkpoint of it is not continued by a version that runs the graph there."""
    from fedrec.federation.state import ResumeError, checkpoint_to_continue, init_state

    cfg = _aggregate_cfg(world_items=50, out=str(tmp_path))
    path = tmp_path / "checkpoint.npz"
    state = init_state(cfg, 50)
    state.round = 2
    state.save(path, cfg)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if not k.startswith("graph:")}  # as an earlier version wrote it
    np.savez(path, **arrays)
    with pytest.raises(ResumeError, match="without the item graph"):
        checkpoint_to_continue(cfg, init_state(cfg, 50), path, Ledger(tmp_path / "privacy_ledger.jsonl"))
