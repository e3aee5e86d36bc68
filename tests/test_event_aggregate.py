"""Event-level DP with the noise added once to the cohort's sum: the device's release, the server's checks,
the ledger, and a real federation in that mode.

The mechanism itself (noise, selection, normalisers, accounting against references) is tested in
``tests/test_aggregate_noise.py``; here: what the device releases against a brute-force per-event
autograd reference, that every number of that release is checked, that the ledger composes what the
accountant analyses, and what a user of ``fedrec simulate`` gets.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedrec.clients.app import app as client_app
from fedrec.config import ConfigError, RunConfig
from fedrec.eval.metrics import PrequentialCounts
from fedrec.federation.replies import Reply, RowCheck, collect
from fedrec.messages import DeviceUpdate, NodeReply, UpdateReport, decode_reply, encode_reply
from fedrec.privacy.accounting import epsilon
from fedrec.privacy.aggregate import effective, split
from fedrec.privacy.fast_dpsgd import clipped_step_mf
from fedrec.privacy.ledger import Ledger
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid
from fedrec.wire import encode_delta

V, D = 12, 3


def _brute_force(item: torch.Tensor, user: torch.Tensor, items: torch.Tensor, take: torch.Tensor, clip: float,
                 lr: float, lr_user: float, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-event autograd: each taken event's BPR gradient (item table and user vector together), clipped to
    ``clip``, summed; the item release ``-lr * sum`` (dense) and the user vector after its step."""
    total_i, total_u = torch.zeros_like(item), torch.zeros_like(user)
    for row in items[take]:
        it, u = item.clone().requires_grad_(True), user.clone().requires_grad_(True)
        e = it[row]
        s = e[:, :D] @ u[0] + e[:, D]
        loss = torch.nn.functional.softplus(-(s[0] - s[1:])).mean()
        gi, gu = torch.autograd.grad(loss, [it, u])
        f = min(1.0, clip / (float(torch.sqrt((gi ** 2).sum() + (gu ** 2).sum())) + 1e-6))
        total_i += f * gi
        total_u += f * gu
    return -lr * total_i, user - lr_user / (q * len(items)) * total_u


ONE_NEGATIVE = [[0, 5], [1, 5], [0, 7], [2, 2], [3, 9], [0, 1]]
THREE_NEGATIVES = [[0, 5, 5, 7], [2, 2, 7, 1], [3, 9, 4, 4], [0, 1, 2, 3], [6, 6, 6, 6], [1, 8, 0, 1]]  # repeats too


@pytest.mark.parametrize("events", [ONE_NEGATIVE, THREE_NEGATIVES], ids=["K=1", "K=3"])
@pytest.mark.parametrize("clip", [0.05, 10.0])  # clipping binds / never binds
def test_the_release_is_the_sum_of_clipped_per_event_gradients(clip, events):
    g = torch.Generator().manual_seed(3)
    item, user = torch.randn(V, D + 1, generator=g), torch.randn(1, D, generator=g)
    items = torch.tensor(events)
    q, lr, lr_user = 0.7, 0.5, 0.3
    take = torch.rand(len(items), generator=torch.Generator().manual_seed(11)) < q
    want_rows, want_user = _brute_force(item, user, items, take, clip, lr, lr_user, q)
    before, u = item.clone(), user.clone()
    (ids, rows), (cids, counts) = clipped_step_mf(item, u, items, sample_rate=q, lr_item=lr, lr_user=lr_user,
                                                  clip=clip, noise_multiplier=0.0,
                                                  generator=torch.Generator().manual_seed(11))
    assert torch.equal(item, before)  # the item table is not changed on the device: the release is a sum
    dense = torch.zeros_like(item)
    dense[ids] = rows
    torch.testing.assert_close(dense, want_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, want_user, rtol=1e-5, atol=1e-6)
    pos = items[take][:, 0]
    assert cids.tolist() == sorted(set(pos.tolist()))
    assert counts.tolist() == [int((pos == i).sum()) for i in cids.tolist()]
    # the release is within its bound: each taken event adds at most lr * clip
    assert float(rows.norm()) <= lr * clip * float(counts.sum()) * (1 + 1e-5)


def test_the_user_vector_takes_its_own_noise_and_the_table_none():
    g = torch.Generator().manual_seed(0)
    item, user = torch.randn(V, D + 1, generator=g), torch.randn(1, D, generator=g)
    items = torch.tensor([[0, 5], [1, 5]])
    outs = []
    for z in (0.0, 4.0):
        u = user.clone()
        (ids, rows), _ = clipped_step_mf(item, u, items, sample_rate=1.0, lr_item=1.0, lr_user=0.3, clip=0.25,
                                         noise_multiplier=z, generator=torch.Generator().manual_seed(5))
        outs.append((rows, u))
    torch.testing.assert_close(outs[0][0], outs[1][0])  # no item noise on the device
    # the user vector's step carries exactly -lr_user / (q n) * z * clip * N(0, I), drawn after the sampling
    draws = torch.Generator().manual_seed(5)
    torch.rand(len(items), generator=draws)
    want = -0.3 / (1.0 * len(items)) * 4.0 * 0.25 * torch.randn(D, generator=draws)
    torch.testing.assert_close(outs[1][1] - outs[0][1], want.unsqueeze(0), rtol=1e-5, atol=1e-6)


# ---- the server checks every number of a release ---------------------------------------------------------------
def _update(d: int, ids, rows, cids, counts, n: int = 4) -> DeviceUpdate:
    report = UpdateReport(num_examples=n, n_new=n, counts=PrequentialCounts(n, 1.0, 0.5), epsilon=0.0, steps=1,
                          max_exposure=1, clipped=False, preclip_norm=0.0)
    delta = {"item.weight": (np.asarray(ids, np.int64), np.asarray(rows, np.float32))}
    rowrec = None if cids is None else {"ids": np.asarray(cids), "counts": np.asarray(counts)}
    return DeviceUpdate(d, encode_delta(delta, "fp16"), report, None, None, rowrec)


ROWS = RowCheck(V, 1.0)


def _collect(updates, check=ROWS):
    body = decode_reply(encode_reply(NodeReply(updates=updates)))
    reply = Reply(asked=1, node=7, body=body, devices=frozenset(u.device for u in updates))
    return collect([reply], {"item.weight": torch.zeros(V, 2)}, None, 1, {u.device: 7 for u in updates},
                   rows=check)


def test_good_releases_pass_and_each_bad_one_fails_alone():
    good = ([1, 4], [[0.3, 0.1], [-0.2, 0.0]], [1], [2])
    bad = {
        2: ([1], [[0.1, 0.1]], None, None),  # no counts
        3: ([1], [[0.1, 0.1]], [V], [1]),  # a row outside the catalogue
        4: ([1], [[0.1, 0.1]], [1, 1], [1, 1]),  # a row twice
        5: ([1], [[0.1, 0.1]], [1], [1.5]),  # not whole
        6: ([1], [[0.1, 0.1]], [1], [0]),  # a listed row with no event
        7: ([1], [[0.1, 0.1]], [1, 2], [3, 2]),  # more events than it trained on (4)
        8: ([1], [[5.0, 0.0]], [1], [2]),  # a release larger than 2 events x lr x clip
        9: ([1], [[0.1, 0.1]], [1], [np.nan]),
    }
    got = _collect([_update(1, *good)] + [_update(d, *v) for d, v in bad.items()])
    assert got.done == [1] and len(got.row_counts) == 1
    np.testing.assert_array_equal(got.row_counts[0][0], [1])
    assert sorted(d for d, _ in got.failed) == sorted(bad)
    assert all(f"device {d}" in why for d, why in got.failed)
    # and the same counts where event noise is not at the aggregate: refused
    off = _collect([_update(1, *good)], check=None)
    assert not off.done and "does not ask for" in off.failed[0][1]


# ---- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,key", [({"privacy": "user"}, "event-noise"), ({"local_steps": 3}, "local-steps"),
                                    ({"model": "sasrec"}, "event-noise"), ({"async_buffer": 4}, "async-buffer")])
def test_the_config_refuses_what_the_argument_does_not_cover(kw, key):
    base = {"privacy": "event", "event_noise": "aggregate", "local_steps": 1}
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig(**{**base, **kw})


# ---- a real federation -----------------------------------------------------------------------------------------
def test_a_federation_with_noise_at_the_aggregate(tmp_path):
    cfg = RunConfig(world_users=60, nodes=2, rounds=3, cohort=30, uptake_probe=False, progress=False, engine="local",
                    privacy="event", event_noise="aggregate", local_steps=1, epsilon=8.0, item_graph="off",
                    out=str(tmp_path / "run"))
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    ledger = Ledger(tmp_path / "run" / "privacy_ledger.jsonl")
    kinds = {r.kind for r in ledger.records}
    assert kinds == {"aggregate-gaussian"}
    z = ledger.records[0].noise_multiplier
    # the ledger composes what the accountant analyses: per device, (z, q, its most-used event's exposures)
    worst = max(r.max_steps_per_event for r in ledger.records)
    assert worst <= cfg.replay_rounds + 1
    ev = summary["privacy"]["event"]
    assert ev["epsilon"] == pytest.approx(epsilon([(z, cfg.sample_rate, worst)], cfg.delta, "prv"), rel=1e-5)
    assert ev["epsilon"] <= 8.0 + 1e-6 and ev["noise"] == "aggregate-server" and "trusted aggregator" in ev["trust"]
    # the selection's noisy counts are paid for in the same record: z is the joint multiplier of both noises
    parts = split(z, cfg.count_share)
    assert effective(parts) == pytest.approx(z) and parts.count > z and parts.grad > z
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rows_selected"] is not None for r in rows) and rows[-1]["version"] == 3
    # uploads are sparse: far below a dense fp16 item table per device
    dense_fp16 = cfg.world_items * (cfg.dim + 1) * 2
    per_device = sum(r["bytes_up"] for r in rows) / sum(r["applied"] for r in rows)
    assert per_device <= dense_fp16 / 10


# ---- user level: private sparse rows -------------------------------------------------------------------------
def test_user_level_counts_must_have_norm_at_most_one():
    soft = RowCheck(V, float("inf"), soft=True)
    k = 4
    good = _update(1, [1, 4], [[0.3, 0.1], [-0.2, 0.0]], [1, 2, 3, 4], [1 / np.sqrt(k)] * k)
    heavy = _update(2, [1], [[0.1, 0.1]], [1, 2], [1.0, 1.0])  # norm sqrt(2): one user would count twice
    neg = _update(3, [1], [[0.1, 0.1]], [1], [-0.5])
    got = _collect([good, heavy, neg], check=soft)
    assert got.done == [1] and sorted(d for d, _ in got.failed) == [2, 3]


def test_user_level_selected_rows_change_and_nothing_else(tmp_path):
    from fedrec.checkpoint import load_checkpoint
    from fedrec.federation.state import init_state

    cfg = RunConfig(world_users=80, nodes=2, rounds=2, cohort=40, uptake_probe=False, progress=False, engine="local",
                    privacy="user", select_rows=True, epsilon=8.0, out=str(tmp_path / "run"))
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    ledger = Ledger(tmp_path / "run" / "privacy_ledger.jsonl")
    assert {r.kind for r in ledger.records} == {"server-gaussian"} and len(ledger.records) == 2
    user = summary["privacy"]["user"]
    assert "rows" in user and effective(split(user["noise_multiplier"], cfg.count_share)) == \
        pytest.approx(user["noise_multiplier"])
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    selected = sum(r["rows_selected"] for r in rows)
    final = load_checkpoint(tmp_path / "run" / "checkpoint.npz")["global"]["item.weight"]
    start = init_state(cfg, final.shape[0], z_user=1.0).global_state["item.weight"].numpy()
    changed = int(np.any(final != start, axis=1).sum())
    assert 0 < changed <= selected < final.shape[0]  # a sparse release: most of the table carries no noise


# ---- what a review found -------------------------------------------------------------------------------------
def test_a_dense_table_in_a_release_is_summed_not_a_crash():
    from fedrec.aggregation import AggregateGaussian
    from fedrec.server_opt import ServerOptimizer

    dense = np.zeros((V, 2), np.float32)
    dense[3] = [0.5, -0.5]
    agg = AggregateGaussian("item.weight", sensitivity=1.0, noise=split(1.0, 0.1), threshold=0.0, row_average=True,
                            generator=torch.Generator().manual_seed(0))
    g = {"item.weight": torch.zeros(V, 2)}
    diag = agg.step(g, ServerOptimizer("fedavg"), [{"item.weight": dense}], [1.0], 1.0,
                    counts=[(np.array([3]), np.array([1.0]))])
    assert diag["rows_selected"] > 0 and torch.isfinite(g["item.weight"]).all()


def test_per_row_mean_with_no_weight_moves_nothing():
    from fedrec.aggregation import per_row_mean
    from fedrec.server_opt import ServerOptimizer

    g = {"item.weight": torch.zeros(V, 2)}
    out = per_row_mean(g, ServerOptimizer("fedavg"), [{"item.weight": (np.array([1]), np.ones((1, 2), np.float32))}], [0.0],
                       [(np.array([1]), np.array([1]))], ("item.weight",))
    assert float(out["item.weight"].abs().sum()) == 0.0


def test_a_new_simulated_event_run_on_an_event_ledger_is_refused(tmp_path):
    from fedrec.federation.state import FederationError

    cfg = RunConfig(world_users=40, nodes=2, rounds=1, cohort=20, uptake_probe=False, progress=False, engine="local",
                    privacy="event", event_noise="aggregate", local_steps=1, epsilon=8.0, item_graph="off",
                    out=str(tmp_path / "run"))
    run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)  # finished, outputs written
    before = (tmp_path / "run" / "privacy_ledger.jsonl").read_bytes()
    again = RunConfig.from_mapping({**cfg.to_flat(), "rounds": 1, "seed": 1})
    with pytest.raises(FederationError, match="new --out"):
        run_federation(LocalGrid(client_app, again.nodes, again.to_flat()), again)
    assert (tmp_path / "run" / "privacy_ledger.jsonl").read_bytes() == before


def test_a_deployed_server_keeps_a_secret_in_its_checkpoint(tmp_path):
    from fedrec.checkpoint import load_checkpoint
    from fedrec.federation.state import init_state, mixed_seed

    cfg = RunConfig(privacy="event", event_noise="aggregate", local_steps=1, epsilon=8.0)
    state = init_state(cfg, 50)
    state.secret = 12345
    assert state.graph is not None
    state.graph.seed = mixed_seed(cfg.seed, state.secret)  # as a fresh start mixes it in (federation.run)
    state.save(tmp_path / "ck.npz", cfg)
    back = init_state(cfg, 50)
    back.load_state_dict(load_checkpoint(tmp_path / "ck.npz"))
    assert back.secret == 12345 and back.graph is not None and back.graph.seed == mixed_seed(cfg.seed, 12345)
    assert mixed_seed(cfg.seed, 0) == cfg.seed and mixed_seed(cfg.seed, 1) != mixed_seed(cfg.seed, 2)


# ---- every model with one sample per event: the release through Opacus's clipping -----------------------------
def _batch(n: int, negatives: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, V, (n, 1 + negatives), generator=g)
    items[0, 1] = items[0, 0]  # a negative equal to its positive: the two rows' gradients cancel
    return torch.zeros(n, dtype=torch.long), items


@pytest.mark.parametrize("negatives", [1, 3])
def test_opacus_release_equals_the_closed_form_for_mf(negatives):
    from fedrec.models import build_model

    batch = _batch(20, negatives)
    kw = dict(sample_rate=0.7, lr_global=0.5, lr_local=0.3, clip=0.1, noise_multiplier=1.0)
    closed, opacus = build_model("mf", V, D, seed=0), build_model("mf", V, D, seed=0)
    r1, c1 = closed.clipped_release(batch, generator=torch.Generator().manual_seed(5), **kw)
    r2, c2 = opacus.clipped_release(batch, generator=torch.Generator().manual_seed(5), backend="autograd", **kw)
    np.testing.assert_array_equal(r1["item.weight"][0], r2["item.weight"][0])
    np.testing.assert_allclose(r1["item.weight"][1], r2["item.weight"][1], atol=1e-6)
    assert float(np.abs(r1["item.weight"][1]).max()) > 0.01  # a real release
    for a, b in zip(c1, c2, strict=True):
        np.testing.assert_array_equal(a, b)
    torch.testing.assert_close(closed.user.weight, opacus.user.weight)  # the same draws, the same noisy step


@pytest.mark.parametrize("name", ["deepfm", "neumf"])
@pytest.mark.parametrize("clip", [0.02, 100.0])  # clipping binds / never binds
def test_a_release_of_any_model_is_the_sum_of_clipped_per_event_gradients(name, clip):
    import copy

    from fedrec.models import build_model
    from fedrec.models.base import BPRLoss, score_diff

    features = (np.arange(V * 4).reshape(V, 4) % 3 == 0).astype(np.float32) if name == "deepfm" else None
    model = build_model(name, V, D, seed=0, features=features)
    ref = copy.deepcopy(model)
    batch = _batch(15, 2)
    release, (ids, counts) = model.clipped_release(batch, sample_rate=1.0, lr_global=0.5, lr_local=0.0, clip=clip,
                                                   noise_multiplier=0.0, generator=torch.Generator().manual_seed(0))
    params = dict(ref.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(len(batch[0])):  # brute force: one event at a time, every parameter together
        loss = BPRLoss(reduction="sum")(score_diff(ref, batch[0][i:i + 1], batch[1][i:i + 1]))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params.values(), strict=True)]
        f = min(1.0, clip / (float(torch.sqrt(sum((g ** 2).sum() for g in grads))) + 1e-6))
        for k, g in zip(params, grads, strict=True):
            total[k] += f * g
    assert set(release) == set(model.global_names)
    for k in model.global_names:
        want = -0.5 * total[k]
        if k == "item.weight":
            rows, got = release[k]
            np.testing.assert_array_equal(rows, np.unique(batch[1].numpy()))  # the touched rows, sparse
            np.testing.assert_allclose(got, want[torch.from_numpy(rows)].numpy(), atol=1e-6)
        else:
            np.testing.assert_allclose(release[k], want.numpy(), atol=1e-6)
    np.testing.assert_array_equal(ids, np.unique(batch[1][:, 0].numpy()))
    assert counts.sum() == len(batch[0])


def test_parameters_beside_the_item_rows_get_the_rows_noise_over_the_noisy_total():
    """A dense parameter's noise in the released mean: chi-square against the mechanism's std, and none when the
    sum carries it already (SecAgg+ shares)."""
    from scipy import stats

    from fedrec.aggregation import AggregateGaussian
    from fedrec.server_opt import ServerOptimizer

    noise, sens = split(1.3, 0.1), 0.2
    g = {"item.weight": torch.zeros(V, 2), "mlp.weight": torch.zeros(60, 50)}
    deltas = [{"item.weight": (np.array([3]), np.full((1, 2), 0.1, np.float32)),
               "mlp.weight": np.zeros((60, 50), np.float32)}]
    agg = AggregateGaussian("item.weight", sensitivity=sens, noise=noise, threshold=-1e9, row_average=False,
                            generator=torch.Generator().manual_seed(0))
    diag = agg.step(g, ServerOptimizer("fedavg"), deltas, [1.0], 1.0, counts=[(np.array([3]), np.array([1.0]))])
    x = g["mlp.weight"].double().numpy().ravel() * diag["noisy_total"] / (noise.grad * sens)
    chi2 = float((x ** 2).sum())
    assert 0.001 < stats.chi2.sf(chi2, len(x)) < 0.999 and abs(x.mean()) < 4 / np.sqrt(len(x))
    g = {"item.weight": torch.zeros(V, 2), "mlp.weight": torch.zeros(60, 50)}
    deltas = [{"item.weight": (np.arange(V), np.zeros((V, 2), np.float32)), "mlp.weight": np.full((60, 50), 0.05, np.float32)}]
    diag = agg.step(g, ServerOptimizer("fedavg"), deltas, [1.0], 1.0, presummed=4,
                    counts=[(np.arange(V), np.full(V, 2.0))])
    torch.testing.assert_close(g["mlp.weight"], torch.full((60, 50), 0.05 / diag["noisy_total"]))


def test_a_secure_sum_whose_counts_lie_is_divided_by_the_events_its_norm_needs():
    """Under SecAgg+ no device's counts are checked: a liar that sends a count of about 0 on a row (or on the
    whole sum) would have the row's summed update (or the dense parts') divided by 1. Each divisor is raised
    to the events the sum's norm needs, so the update moves no more than one event's bound (plus noise)."""
    from fedrec.aggregation import AggregateGaussian
    from fedrec.privacy.aggregate import events_floor
    from fedrec.server_opt import ServerOptimizer

    noise, sens = split(1.0, 0.5), 0.1
    agg = AggregateGaussian("item.weight", sensitivity=sens, noise=noise, threshold=-1e9, row_average=True,
                            generator=torch.Generator().manual_seed(0), share_excess=1.25)
    rows = np.zeros((V, 2), np.float32)
    rows[3], rows[5] = [30.0, 40.0], [0.3, 0.4]  # row 3: a sum of norm 50, as only 500 events could give
    counts = np.full(V, 2.0)
    counts[3], counts[5] = 1.0, 5.0  # row 3's count says 1 event; row 5 is honest (norm 0.5 <= 5 x 0.1)
    g = {"item.weight": torch.zeros(V, 2), "mlp.weight": torch.zeros(10, 10)}
    deltas = [{"item.weight": (np.arange(V), rows), "mlp.weight": np.full((10, 10), 8.0, np.float32)}]
    diag = agg.step(g, ServerOptimizer("fedavg"), deltas, [1.0], 1.0, presummed=3,
                    counts=[(np.arange(V), counts)])
    floor = float(events_floor(50.0, 2, sens, noise.grad * sens * math.sqrt(1.25)))
    assert 480 < floor < 500
    torch.testing.assert_close(g["item.weight"][3].double(), torch.tensor([30.0, 40.0], dtype=torch.float64) / floor)
    torch.testing.assert_close(g["item.weight"][5], torch.tensor([0.3, 0.4]) / 5.0)  # the honest count stands
    dense = float(events_floor(80.0, 100, sens, noise.grad * sens * math.sqrt(1.25)))
    assert dense > diag["noisy_total"] and float(g["mlp.weight"].norm()) == pytest.approx(80.0 / dense, rel=1e-5)


def test_a_round_that_selects_no_row_still_averages_the_dense_parameters_over_its_devices():
    """The selected rows' noisy total misses every event of a row not selected; in a small round that is all of
    them, and the dense sums were divided by 1 (a review found steps of 200 on deepfm's deep part)."""
    from fedrec.aggregation import AggregateGaussian
    from fedrec.server_opt import ServerOptimizer

    noise, sens = split(1.0, 0.1), 0.2
    agg = AggregateGaussian("item.weight", sensitivity=sens, noise=noise, threshold=1e9, row_average=False,
                            generator=torch.Generator().manual_seed(0))
    g = {"item.weight": torch.zeros(V, 2), "mlp.weight": torch.zeros(40, 50)}
    deltas = [{"item.weight": (np.array([d % V]), np.full((1, 2), 0.05, np.float32)),
               "mlp.weight": np.full((40, 50), 0.1, np.float32)} for d in range(20)]
    diag = agg.step(g, ServerOptimizer("fedavg"), deltas, [1.0] * 20, 1.0,
                    counts=[(np.array([d % V]), np.array([1.0])) for d in range(20)])
    assert diag["rows_selected"] == 0 and diag["noisy_total"] == 1.0
    step = g["mlp.weight"].double()
    assert abs(float(step.mean()) - 0.1) < 0.01  # the sum (2.0) over the 20 devices, not over 1
    assert float(step.std()) == pytest.approx(noise.grad * sens / 20, rel=0.1)


def test_deepfm_learns_with_event_noise_at_the_aggregate(tmp_path):
    from fedrec.checkpoint import load_checkpoint
    from fedrec.federation.state import init_state

    # few events a device: in each round some sampled devices have none (they release no row, zeros elsewhere)
    cfg = RunConfig(world_users=60, world_events_per_user=4, nodes=2, rounds=3, cohort=30, uptake_probe=False,
                    progress=False, engine="local", privacy="event", model="deepfm", epsilon=8.0,
                    out=str(tmp_path / "run"))
    assert cfg.aggregate_noise  # auto: a model with one sample per event
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    ev = summary["privacy"]["event"]
    assert ev["noise"] == "aggregate-server" and 0 < ev["epsilon"] <= 8.0 + 1e-6
    assert {r.kind for r in Ledger(tmp_path / "run" / "privacy_ledger.jsonl").records} >= {"aggregate-gaussian"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failed"] == 0 and r["applied"] > 0 for r in rows), [r["failures"] for r in rows]
    final = load_checkpoint(tmp_path / "run" / "checkpoint.npz")["global"]
    start = init_state(cfg, final["item.weight"].shape[0], z_user=0.0).global_state
    for k in ("feat.weight", "mlp1.weight", "out.bias"):  # the parameters beside the rows moved too
        assert not np.allclose(final[k], start[k].numpy()), k
