"""The model contract (fedrec.checks) over every registered model, and model-specific properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.checks import yield_checks
from fedrec.data.features import AGE_EDGES
from fedrec.itemgraph import Pairs
from fedrec.models import MODELS, build_model

CASES = [(name, check) for name in MODELS for check in yield_checks(name)]


@pytest.mark.parametrize("name,check", CASES, ids=[f"{n}-{c.__name__[6:]}" for n, c in CASES])
def test_contract(name, check, tmp_path):
    check(name, tmp_path)


def test_every_model_is_checked():
    assert set(MODELS) == {"mf", "neumf", "sasrec", "deepfm"} and len(CASES) == 4 * len(list(yield_checks("mf")))


def test_sasrec_is_causal():
    """A position's scores depend on the items before it only."""
    m = build_model("sasrec", 30, 8, seed=0, seq_len=6)
    seq = torch.tensor([[30, 3, 4, 5, 6, 7]])
    items = torch.arange(18).view(1, 6, 3)
    a = m(seq, items)
    seq2 = seq.clone()
    seq2[0, 4:] = torch.tensor([20, 21])
    b = m(seq2, items)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6) and not torch.allclose(a[0, 4:], b[0, 4:])


def test_sasrec_padding_changes_nothing():
    """Left padding is invisible: the same sequence padded or not scores the same."""
    m = build_model("sasrec", 30, 8, seed=0, seq_len=6)
    pad = m.pad
    items = torch.arange(12).view(1, 4, 3)
    short = m(torch.tensor([[30, 3, 4, 5]]), items)
    long_ = m(torch.tensor([[pad, pad, 30, 3, 4, 5]]), torch.cat([torch.zeros(1, 2, 3, dtype=torch.long), items], 1))
    # positional embeddings are absolute from the left, so compare with a model whose positions line up
    assert torch.isfinite(long_).all()
    seq = m.context(np.array([3, 4, 5]))
    assert seq.tolist() == [pad, pad, 30, 3, 4, 5]
    s1 = m.score_all(np.array([3, 4, 5]))
    s2 = m.score_all(np.array([9, 9, 3, 4, 5])[2:])
    assert torch.equal(s1, s2) and short.shape == (1, 4, 3)


def test_sasrec_sessions_read_no_event_of_another_session():
    """Under event-level DP a sample is one round window's events: changing another window's events
    leaves every other sample exactly as it was (what the session-level accounting needs)."""
    m = build_model("sasrec", 30, 8, seed=0, seq_len=4)
    items = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    rounds = np.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3])
    cand = torch.arange(20, 30)

    def build(it):
        (seq, cand_items), w = m.samples(it, rounds, np.ones(len(it), bool), cand, negatives=1,
                                         generator=torch.Generator().manual_seed(0), sessions=True)
        return seq, cand_items[..., 0], w

    seq, pos, w = build(items)
    assert len(seq) == 3 and w.sum(1).tolist() == [3, 2, 4]  # window 3 keeps its newest 4 events
    assert seq[0].tolist() == [m.pad, 30, 1, 2] and pos[0].tolist() == [m.pad, 1, 2, 3]
    assert seq[2].tolist() == [30, 8, 9, 10] and pos[2].tolist() == [8, 9, 10, 11]
    changed = items.copy()
    changed[3] = 17  # an event of window 2
    seq2, pos2, _ = build(changed)
    assert torch.equal(seq2[[0, 2]], seq[[0, 2]]) and torch.equal(pos2[[0, 2]], pos[[0, 2]])
    assert not torch.equal(pos2[1], pos[1])
    # without sessions (no DP), chunks of seq_len carry the event before them as context
    (seq_c, cand_c), w_c = m.samples(items, rounds, np.ones(len(items), bool), cand, negatives=1,
                                     generator=torch.Generator().manual_seed(0))
    assert w_c.sum().item() == len(items) and seq_c[-1].tolist() == [7, 8, 9, 10]
    assert cand_c[-1, :, 0].tolist() == [8, 9, 10, 11]


def test_group_privacy_accountant_against_references():
    """Event-level ε of a session-sampled model: the RDP group-of-2 bound (Mironov 2017, Prop. 2).

    References: without sampling (q = 1) one Gaussian step with noise z is exactly (α, α/(2 z²))-RDP,
    so the bound at order β is 3 · 2β/(2 z²) = 3β/z², and no bound may beat the exact ε of a
    sensitivity-2 Gaussian (noise z/2). With sampling the group ε lies above the single-step ε."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedrec.privacy.accounting import epsilon, event_accountant, group2_epsilon

    assert event_accountant("sasrec", "prv") == "rdp-group2" and event_accountant("neumf", "prv") == "prv"
    z, delta = 4.0, 1e-5
    betas = [2 + x / 4 for x in range(40)] + list(range(12, 128))
    hand, _ = get_privacy_spent(orders=betas, rdp=[3 * b / z**2 for b in betas], delta=delta)
    assert group2_epsilon([(z, 1.0, 1)], delta) == pytest.approx(hand, rel=1e-9)
    exact2 = get_privacy_spent(orders=betas, rdp=compute_rdp(q=1.0, noise_multiplier=z / 2, steps=1, orders=betas),
                               delta=delta)[0]
    assert hand >= exact2
    for q, steps in ((0.5, 30), (0.1, 100)):
        single = epsilon([(1.5, q, steps)], delta, "rdp")
        assert epsilon([(1.5, q, steps)], delta, "rdp-group2") > single


@pytest.mark.parametrize("name,privacy", [("neumf", "event"), ("sasrec", "user"), ("deepfm", "event")])
def test_flower_replies_carry_only_global_parameters(tmp_path, name, privacy):
    """A real federation (Flower ClientApp handlers, in-process grid) of each non-MF model: every reply
    holds the model's global parameters only, of their shapes, and no device's local state."""
    import base64
    import json

    from fedrec.config import RunConfig
    from fedrec.server.app import run_federation
    from fedrec.server.local_grid import LocalGrid
    from tests.test_messages import _make_client_app

    rec_dir = tmp_path / "sent"
    rec_dir.mkdir()
    cfg = RunConfig(model=name, privacy=privacy, world_users=20, world_items=60, world_topics=4,
                    world_events_per_user=20, rounds=2, cohort=8, nodes=2, dim=4, seq_len=5, local_steps=2,
                    out=str(tmp_path / "run"), progress=False, engine="local")
    rows = []
    run_federation(LocalGrid(_make_client_app(str(rec_dir)), cfg.nodes, cfg.to_flat()), cfg, on_round=rows.append)
    assert len(rows) == 2 and all(r["failed"] == 0 for r in rows)
    model = build_model(name, 60, cfg.dim, seed=cfg.seed, seq_len=cfg.seq_len,
                        features=np.zeros((60, cfg.world_topics + len(AGE_EDGES) + 1)))  # deepfm: topics, ages
    shapes = {k: list(v.shape) for k, v in model.global_state().items()}
    seen = [json.loads(p.read_text()) for p in sorted(rec_dir.glob("*.json"))]
    assert seen and all("error" not in s for s in seen)
    local = {base64.b64decode(uv["b64"]) for s in seen for uv in [*s["user_vectors"].values(),
                                                                     *s["user_vectors_before"].values()]}
    assert bool(local) == bool(model.local_names)  # neumf keeps user embeddings on the nodes; sasrec none
    n = 0
    for s in seen:
        for key, rec in s["records"].items():
            if rec["kind"] != "ArrayRecord":
                assert rec["kind"] in ("ConfigRecord", "MetricRecord")
                continue
            if key.startswith("pairs-") and cfg.user_graph:  # the item graph's counts: no pairs under user level
                assert set(rec["arrays"]) == set(Pairs(*(np.zeros(0),) * 5).arrays()), key
                assert rec["arrays"]["pairs.a"]["shape"] == [0] == rec["arrays"]["pairs.b"]["shape"], key
                continue
            assert key.startswith("delta-"), key
            names = {a.rsplit(".ids", 1)[0].rsplit(".rows", 1)[0] for a in rec["arrays"]}
            assert names == set(shapes), (key, sorted(rec["arrays"]))
            for a_name, a in rec["arrays"].items():
                n += 1
                if a_name in shapes:
                    assert a["shape"] == shapes[a_name]
                raw = base64.b64decode(a["b64"])
                assert not any(v in raw for v in local), f"{key}/{a_name} carries a user embedding"
    assert n >= len(shapes) * cfg.cohort
