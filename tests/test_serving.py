"""Serving evaluation: every device scored with the newest version and its own fitted vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.models import build_model
from fedrec.serving import ServeInput, serve

KW = dict(round_=3, seed=0, k=2, fit_steps=40, lr=0.5)


def serve_round(table: np.ndarray, dim: int, devices: list[ServeInput], vectors: dict, **kw):
    """Serving as the product runs it: the mf model's batched fit over the newest item table."""
    return serve(build_model("mf", table.shape[0], dim, init_scale=0.1), {"item.weight": table}, devices, vectors,
                 **kw)


def _table() -> np.ndarray:
    # 8 items, dim 2: items 0-3 point along x, items 4-7 along y; no bias
    t = np.zeros((8, 3), np.float32)
    t[:4, 0] = 1.0
    t[4:, 1] = 1.0
    t[:, :2] += np.linspace(0, 0.01, 8)[:, None]  # break exact ties
    return t


def test_fit_personalises_to_the_device_history():
    d = ServeInput(device=7, history=np.array([0, 1]), new=np.array([2, 5]))
    (res,) = serve_round(_table(), 2, [d], {}, **KW)
    # the vector learnt "x": item 2 (x cluster, not yet had) ranks in the top-2, item 5 does not
    assert res.vector[0] > res.vector[1]
    assert res.counts.n == 2 and res.counts.start.hits == 1.0  # at the round start, from the fitted vector


def test_devices_do_not_depend_on_their_batch():
    devs = [ServeInput(device=1, history=np.array([0, 1, 2]), new=np.array([3]), probe=np.array([3, 4])),
            ServeInput(device=2, history=np.array([4]), new=np.array([5, 6])),
            ServeInput(device=3, history=np.array([], np.int64), new=np.array([7]))]
    prev = {2: np.array([0.0, 0.3], np.float32)}
    together = serve_round(_table(), 2, devs, prev, **KW)
    for d, t in zip(devs, together, strict=True):
        (alone,) = serve_round(_table(), 2, [d], prev, **KW)
        assert alone.device == t.device and alone.counts == t.counts
        assert np.allclose(alone.vector, t.vector, atol=1e-6)
        assert (alone.probe_hits is None) == (t.probe_hits is None)
    assert together[0].probe_hits[0]  # item 3, the last x item it has not had, is in its top-2
    assert together[1].probe_hits is None


def test_same_seed_same_result_and_inputs_untouched():
    h = np.array([0, 4])
    d = ServeInput(device=4, history=h, new=np.array([1]))
    prev = {4: np.array([0.1, 0.1], np.float32)}
    a = serve_round(_table(), 2, [d], prev, **KW)[0]
    b = serve_round(_table(), 2, [d], prev, **KW)[0]
    assert np.array_equal(a.vector, b.vector) and a.counts == b.counts
    assert h.tolist() == [0, 4] and prev[4].tolist() == [np.float32(0.1)] * 2


def test_batched_per_event_counts_equal_each_events_own_rank(monkeypatch):
    """The batch's events are scored together, in groups of rows: each device's counts under every blend equal a
    brute-force rank of each event by its own row (the items had before it excluded, repeats not scored), also
    for a device whose events span several blocks and when groups are small."""
    import fedrec.serving as serving
    from fedrec.eval.metrics import BLENDS, target_rank

    monkeypatch.setattr(serving, "ROWS", 7)
    monkeypatch.setattr(serving, "CELLS", 50 * 12)  # groups of at most 12 rows of 50 items
    rng = np.random.default_rng(5)
    table = rng.normal(size=(50, 5)).astype(np.float32)
    devs = [ServeInput(device=d, history=rng.integers(0, 50, rng.integers(0, 9)), new=rng.integers(0, 50, n))
            for d, n in enumerate([1, 3, 20, 0, 2, 7, 5])]
    devs = [d for d in devs if len(d.new)]
    k = 5
    got = serve_round(table, 4, devs, {}, **{**KW, "k": k}, blend=BLENDS.index("model"))
    model = build_model("mf", 50, 4, init_scale=0.1)
    model.load({"item.weight": __import__("torch").as_tensor(table)})
    for d, res in zip(devs, got, strict=True):
        rows = model.score_events(d.history, d.new, res.vector, context=10).numpy()
        seq = np.concatenate([d.history, d.new])
        start_row = table[:, :4] @ res.vector + table[:, 4]  # the round-start scores of its fitted vector
        n = hits = start_hits = ndcg = 0
        for j, t in enumerate(d.new):
            had = np.zeros(50, bool)
            had[seq[: len(d.history) + j]] = True
            if had[t]:
                continue
            n += 1
            rank = target_rank(rows[j], int(t), had)
            hits += rank < k
            ndcg += 1.0 / np.log2(rank + 2) if rank < k else 0.0
            start_hits += target_rank(start_row, int(t), had) < k
        assert res.counts.start.n == n and res.counts.start.hits == start_hits, d.device
        for name in ("model", "graph", "start"):
            c = res.counts.blends[BLENDS.index(name)]
            assert c.n == n and c.hits == (start_hits if name == "start" else hits), (d.device, name)
        assert res.counts.blends[BLENDS.index("model")].ndcg == pytest.approx(ndcg)
        np.testing.assert_allclose(res.next_scores, rows[-1], atol=1e-6)
    alone = [serve_round(table, 4, [d], {}, **{**KW, "k": k})[0] for d in devs]
    assert [a.counts for a in alone] == [g.counts for g in got]
    # served the round-start blend (ranked from one row per piece), a device's last row is its round-start row
    for res in serve_round(table, 4, devs, {}, **{**KW, "k": k}, blend=BLENDS.index("start")):
        np.testing.assert_allclose(res.next_scores, table[:, :4] @ res.vector + table[:, 4], atol=1e-5)


def _simulate(out, **extra):
    """A small in-process federation (the synthetic world); its summary and final global model."""
    from fedrec.checkpoint import load_checkpoint
    from fedrec.clients.app import app as client_app
    from fedrec.config import RunConfig
    from fedrec.server.app import run_federation
    from fedrec.server.local_grid import LocalGrid

    cfg = RunConfig.from_mapping({"world-users": 240, "world-items": 80, "world-events-per-user": 12, "rounds": 4,
                                  "cohort": 40, "nodes": 2, "engine": "local", "progress": False, "dim": 4,
                                  "item-features": "none", "out": str(out), **extra}, where="test")
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    return cfg, summary, load_checkpoint(out / "checkpoint.npz")["global"]


def test_a_serving_panel_scores_exactly_its_devices_events_and_leaves_training_alone(tmp_path):
    """``serve-panel``: only a fixed panel of devices is served and scored; the model and the baselines are scored
    on exactly the panel's events, and training (which serving never shapes) gives the same global model."""
    from fedrec.data.source import load_stream
    from fedrec.serving import serve_panel

    cfg, whole, model = _simulate(tmp_path / "all", **{"serve-panel": 0})
    _, part, model_p = _simulate(tmp_path / "panel", **{"serve-panel": 60})
    stream = load_stream(cfg)
    panel = serve_panel(stream.n_devices, 60, cfg.seed)
    assert panel.sum() == 60 and np.array_equal(panel, serve_panel(stream.n_devices, 60, cfg.seed))
    n_panel = int(panel[stream.log.user].sum())
    assert 0 < n_panel < len(stream.log)
    assert whole["metrics"]["events_scored"] == len(stream.log) and "served_panel" not in whole["metrics"]
    assert part["metrics"]["events_scored"] == n_panel
    assert part["metrics"]["served_panel"]["devices"] == 60 and part["metrics"]["served_panel"]["of"] == 240
    for name in ("popularity", "recent_popularity", "item_knn", "centralised_mf"):
        assert part["baselines"][name]["events_scored"] == n_panel, name
    assert model.keys() == model_p.keys()
    for k in model:
        np.testing.assert_array_equal(np.asarray(model[k]), np.asarray(model_p[k]), err_msg=k)


def test_devices_of_very_different_history_lengths_fit_as_alone():
    """The round-start fit pads a batch to its longest history, so devices are fitted in groups of similar length:
    a device's vector and scores are the same beside one with a history a hundred times longer as alone."""
    from fedrec.models.mf import fit_users

    rng = np.random.default_rng(1)
    table = rng.normal(0, 0.3, (500, 5)).astype(np.float32)
    hist = [rng.choice(500, n, replace=False) for n in (3, 400, 0, 7, 60)]
    vecs = [None, np.full(4, 0.1, np.float32), None, None, None]

    def fit(idx):
        gens = [torch.Generator().manual_seed(10 + a) for a in idx]
        return fit_users(table, 4, [hist[a] for a in idx], [vecs[a] for a in idx], gens, fit_steps=12, lr=0.5,
                         init_scale=0.1, negatives=2)

    scores, users = fit(range(len(hist)))
    for a in range(len(hist)):
        s1, u1 = fit([a])
        assert np.allclose(u1[0], users[a], atol=1e-6) and np.allclose(s1[0], scores[a], atol=1e-5)
    assert not np.allclose(users[0], users[3])


def test_length_groups_cover_every_device_with_a_history_once_within_the_padding_bound():
    from fedrec.models.base import FIT_GROUP, FIT_GROUP_FLOOR, length_groups

    lengths = np.array([0, 1, 5, 16, 17, 33, 40, 1000, 2, 31, 0, 2100])
    groups = length_groups(lengths)
    got = np.concatenate(groups)
    assert sorted(got.tolist()) == [a for a in range(len(lengths)) if lengths[a] > 0]
    for g in groups:
        assert lengths[g].max() <= FIT_GROUP * max(lengths[g].min(), FIT_GROUP_FLOOR)
    assert len(groups) == 4  # 1-31, 33-40, 1000, 2100
