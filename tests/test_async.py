"""Stragglers: rounds close at a reply share or deadline; late updates are dropped or (FedBuff) buffered."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.asynchrony import Buffer, Update, discounted, lateness, slow_set, staleness_weight
from fedrec.clients.app import app as client_app
from fedrec.config import ConfigError, RunConfig
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid

# ---- the pure pieces, by hand ----------------------------------------------------------------------


def test_staleness_weights_and_the_buffer_by_hand():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    with pytest.raises(ValueError):
        staleness_weight(-1)
    buf = Buffer(size=2, max_staleness=1)
    a = Update(0, {"t": np.ones(2, np.float32)}, weight=3.0, base_version=4)
    b = Update(1, {"t": (np.array([1]), np.array([4.0], np.float32))}, weight=1.0, base_version=3)
    assert buf.add(a, version=4) and not buf.ready()
    assert not buf.add(Update(2, a.delta, 1.0, base_version=2), version=4)  # 2 versions old: dropped
    assert buf.add(b, version=4) and buf.ready()
    ups, st = buf.take(version=4)
    assert [u.device for u in ups] == [0, 1] and st == [0, 1] and not buf.items
    deltas, weights = discounted(ups, st)
    assert weights == [3.0, 1.0]  # normalised by plain counts: a stale update counts for less
    np.testing.assert_allclose(deltas[1]["t"][1], [4.0 / np.sqrt(2)])
    np.testing.assert_allclose(deltas[0]["t"], [1.0, 1.0])


def test_slow_devices_are_seeded():
    assert slow_set(100, 0.3, seed=1) == slow_set(100, 0.3, seed=1) and len(slow_set(100, 0.3, seed=1)) == 30
    assert slow_set(100, 0.0, seed=1) == frozenset()
    late = {lateness(d, r, 3, seed=0) for d in range(20) for r in range(1, 5)}
    assert late == {1, 2, 3}


def test_async_mode_is_refused_where_it_would_break_the_accounting():
    with pytest.raises(ConfigError, match="async-buffer"):
        RunConfig(privacy="user", async_buffer=10)
    with pytest.raises(ConfigError, match="min-reply-share"):
        RunConfig(min_reply_share=0.0)
    RunConfig(privacy="event", async_buffer=10, noise_multiplier=1.0)


# ---- simulated slow devices: async buffered mode converges ------------------------------------------

def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _sim(tmp_path, name: str, **kw) -> tuple[dict, list[dict]]:
    kw = {"world_users": 200, "nodes": 2, "rounds": 10, "cohort": 30, "uptake_probe": False, "progress": False,
          "privacy": "none", "out": str(tmp_path / name), "engine": "local", **kw}
    cfg = RunConfig(**kw)
    s = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    return s, _rows(tmp_path / name)


def test_an_async_run_with_slow_devices_converges(tmp_path):
    slow = {"slow_devices": 0.3, "slow_rounds": 3}
    s_async, rows = _sim(tmp_path, "async", async_buffer=40, **slow)
    s_sync, sync_rows = _sim(tmp_path, "sync", **slow)
    s_fast, _ = _sim(tmp_path, "fast")
    # the mechanism: updates arrive late, wait in the buffer, and are applied with their staleness
    assert sum(r["late_arrived"] for r in rows) > 20 and sum(r["late_dropped"] for r in rows) == 0
    assert any(r["applied"] == 0 for r in rows) and rows[-1]["version"] < len(rows)
    assert max(r["mean_staleness"] or 0 for r in rows) > 0
    assert sum(r["applied"] for r in rows) + rows[-1]["buffered"] == sum(r["devices"] + r["late_arrived"]
                                                                         for r in rows)
    # synchronous rounds drop the same stragglers
    assert sum(r["late_dropped"] for r in sync_rows) == sum(r["late_arrived"] for r in sync_rows) > 20
    # ... and it learns: well above popularity, and near the run without stragglers
    last5 = s_async["metrics"]["last5_hr@10"]
    assert last5 > 1.5 * s_async["baselines"]["popularity"]["hr@10"]
    assert last5 > 0.8 * s_fast["metrics"]["last5_hr@10"]
    assert rows[-1]["whr@10"] > 1.5 * rows[0]["whr@10"]


# ---- real late replies: a node that answers after its round closed -----------------------------------

class SlowNodeGrid(LocalGrid):
    """The real ClientApp in-process, but one node's train replies are withheld until the server has
    pushed the messages of ``lag`` more rounds (a device that takes that long)."""

    def __init__(self, slow_node: int, lag: int, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.slow_node, self.lag = slow_node, lag
        self.held: dict[str, int] = {}
        self.pushes: list[list[int]] = []  # the destinations of each push

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        self.pushes.append([m.metadata.dst_node_id for m in messages])
        for i, m in zip(ids, messages, strict=True):
            if m.metadata.dst_node_id == self.slow_node and m.metadata.message_type == "train":
                self.held[i] = len(self.pushes) + self.lag
        return ids

    def pull_messages(self, message_ids):
        return super().pull_messages([i for i in message_ids if self.held.get(i, 0) <= len(self.pushes)])


class SlowPullGrid(LocalGrid):
    """One node's train replies come only at the server's ``lag``-th pull for them (a node that is
    slow but answers within the round)."""

    def __init__(self, slow_node: int, lag: int, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.slow_node, self.lag, self.pulls = slow_node, lag, {}
        self.pushes: list[list[int]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.pushes.append(sorted(m.metadata.dst_node_id for m in messages))
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        ready = []
        for i in message_ids:
            self.pulls[i] = self.pulls.get(i, 0) + 1
            if i not in self._replies or self._replies[i].metadata.src_node_id != self.slow_node \
                    or self.pulls[i] >= self.lag:
                ready.append(i)
        return super().pull_messages(ready)


def _slow_run(tmp_path, name: str, **kw) -> tuple[SlowNodeGrid, dict, list[dict]]:
    kw = {"world_users": 40, "nodes": 2, "rounds": 3, "cohort": 40, "uptake_probe": False, "progress": False,
          "privacy": "none", "out": str(tmp_path / name), "engine": "local", **kw}
    cfg = RunConfig(**kw)
    grid = SlowNodeGrid(1002, 1, client_app, cfg.nodes, cfg.to_flat())
    s = run_federation(grid, cfg)
    return grid, s, _rows(tmp_path / name)


@pytest.mark.parametrize("close", ["share", "deadline"])
def test_a_round_closes_without_the_slow_node_and_drops_its_late_reply(tmp_path, close):
    kw = {"min_reply_share": 0.5} if close == "share" else {"round_timeout": 0.2}
    grid, s, rows = _slow_run(tmp_path, close, **kw)
    assert s["rounds"] == 3
    # round 1: only node 1001's 20 devices in time; node 1002's 20 are late (it answers while round 2
    # runs, and the server takes the reply in at the end of round 2) and are dropped
    assert rows[0]["devices"] == 20 and rows[0]["late"] == 20 and rows[0]["failed"] == 0
    assert rows[1]["late_arrived"] == 20 and rows[1]["late_dropped"] == 20 and rows[1]["devices"] == 20
    assert rows[2]["devices"] == 20 and rows[2]["late"] == 20  # (its round-3 reply is late again)
    # while its reply was outstanding the slow node was sent nothing: no message in round 2
    rounds = [p for p in grid.pushes if p]  # (the discovery query is push 1)
    assert [1002 in p for p in rounds] == [True, True, False, True]
    assert all(r["applied"] == r["devices"] for r in rows)


@pytest.mark.parametrize("share,late", [(1.0, 0), (0.5, 20)])
def test_with_the_whole_share_a_round_waits_for_every_node(tmp_path, share, late):
    kw = {"world_users": 40, "nodes": 2, "rounds": 2, "cohort": 40, "uptake_probe": False, "progress": False,
          "privacy": "none", "out": str(tmp_path / f"s{share}"), "engine": "local", "min_reply_share": share}
    cfg = RunConfig(**kw)
    run_federation(SlowPullGrid(1002, 4, client_app, cfg.nodes, cfg.to_flat()), cfg)
    rows = _rows(tmp_path / f"s{share}")
    assert rows[0]["late"] == late and rows[0]["devices"] == 40 - late


def test_a_slow_serving_only_node_is_waited_for_and_asked_again(tmp_path):
    # 3 nodes of one device each, one device trains per round: the other two nodes only serve; node
    # 1003 answers late within the round
    kw = {"world_users": 3, "nodes": 3, "rounds": 3, "cohort": 1, "uptake_probe": False, "progress": False,
          "privacy": "none", "out": str(tmp_path / "serve"), "engine": "local"}
    cfg = RunConfig(**kw)
    grid = SlowPullGrid(1003, 4, client_app, cfg.nodes, cfg.to_flat())
    run_federation(grid, cfg)
    assert grid.pushes[1:] == [[1001, 1002, 1003]] * 3  # after the discovery query, every round, every node


def test_async_mode_applies_the_late_reply_with_its_staleness(tmp_path):
    _, s, rows = _slow_run(tmp_path, "async", min_reply_share=0.5, async_buffer=10)
    assert rows[1]["late_arrived"] == 20 and sum(r["late_dropped"] for r in rows) == 0
    assert rows[1]["mean_staleness"] > 0 and rows[1]["applied"] >= 20


def test_a_resumed_async_server_keeps_its_buffered_updates(tmp_path):
    kw = {"world_users": 60, "nodes": 2, "rounds": 4, "cohort": 10, "uptake_probe": False, "progress": False,
          "privacy": "none", "out": str(tmp_path / "run"), "engine": "local", "async_buffer": 25}

    class Crash(Exception):
        pass

    def crash_after_2(row):
        if row["round"] == 2:
            raise Crash

    cfg = RunConfig(**kw)
    with pytest.raises(Crash):  # the server dies after round 2 was checkpointed, 20 updates waiting
        run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg, on_round=crash_after_2)
    rows = _rows(tmp_path / "run")
    assert [r["buffered"] for r in rows] == [10, 20] and rows[-1]["version"] == 0
    run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    rows = _rows(tmp_path / "run")
    # round 3 finds the 20 waiting updates and its own 10: 30 >= 25, all applied
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["applied"] == 30 and rows[2]["buffered"] == 0 and rows[2]["version"] == 1
