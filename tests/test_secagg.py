"""Secure aggregation (Flower SecAgg+): the server gets the sum of the deltas and nothing finer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message

from fedrec.clients.app import app as client_app
from fedrec.config import ConfigError, RunConfig
from fedrec.federation.replies import collect
from fedrec.federation.run import discover, event_noise
from fedrec.messages import RoundInstruction
from fedrec.models import build_model
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


def _setup(cfg: RunConfig):
    grid = RecordingGrid(client_app, cfg.nodes, cfg.to_flat())
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
    got = collect(transport.exchange(2, requests, host, cfg.to_flat(), None), g, cfg.clip, 2, fed.home)
    plain = sum(d["item.weight"] for d in got.deltas)
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
    # what the server received: key material and masked vectors, never an array of a device's delta
    assert grid2.seen and all(len(a) == 0 for m in grid2.seen if not m.has_error() for a in m.content.array_records.values())
    assert not any(k.startswith("delta-") for m in grid2.seen for k in m.content.keys())


def test_a_secure_federation_runs_and_accounts_every_release(tmp_path):
    cfg = RunConfig(world_users=80, nodes=2, rounds=3, cohort=30, privacy="user", secure_aggregation=True,
                    uptake_probe=False, out=str(tmp_path), progress=False, engine="local")
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    assert summary["rounds"] == 3 and summary["privacy"]["user"]["releases"] == 3
    assert summary["metrics"]["events_scored"] > 0  # serving evaluation ran in its own messages


def test_secure_aggregation_needs_user_level_dp():
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunConfig(privacy="event", secure_aggregation=True)
    with pytest.raises(ConfigError, match="secure-aggregation"):
        RunConfig(privacy="none", secure_aggregation=True)
    assert torch.is_tensor(torch.zeros(1))
