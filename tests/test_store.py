"""The on-device event store and the device SDK: durability, atomic rounds, retention, bad files."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from fedrec.client_update import DeviceState, client_update
from fedrec.clients.device import Device
from fedrec.clients.store import EventStore, StoreError
from fedrec.config import RunConfig
from fedrec.models import build_model

N_ITEMS = 60


def _global(cfg: RunConfig) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in build_model("mf", N_ITEMS, cfg.dim, seed=1).global_state().items()}


def test_record_survives_sigkill_of_the_recording_process(tmp_path):
    """Every event whose record() returned is there after the writer is killed mid-stream."""
    path = tmp_path / "dev.sqlite"
    Device(path, create=True, device_id=0, n_items=N_ITEMS).close()
    writer = (
        "import sys\n"
        "from fedrec.clients.device import Device\n"
        f"d = Device({str(path)!r})\n"
        "i = 0\n"
        "while True:\n"
        "    seq = d.record(i % 60, timestamp=float(i), kind='click')\n"
        "    print(seq, flush=True)\n"
        "    i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    acked: list[int] = []
    t0 = time.time()
    while len(acked) < 300 and time.time() - t0 < 60:
        line = proc.stdout.readline()
        if not line:
            break
        acked.append(int(line))
    proc.send_signal(signal.SIGKILL)  # mid-write, most likely: it records as fast as it can
    proc.wait(10)
    acked += [int(x) for x in proc.stdout.read().split()]  # acknowledged before the kill landed
    assert len(acked) >= 300, "the writer did not get going"
    with EventStore(path) as s:  # opens with a quick_check: the file is whole
        seqs = {r[0] for r in s._db.execute("SELECT seq FROM events")}
        assert set(acked) <= seqs
        assert s.count() >= len(acked)
        assert s.count(pending=True) == s.count()  # no round took anything


def _sql(path, statement: str) -> None:
    db = sqlite3.connect(path)
    db.execute(statement)
    db.commit()
    db.close()


def test_corrupt_wrong_version_and_foreign_files_are_refused_with_the_path(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all " * 200)
    with pytest.raises(StoreError, match=r"junk\.sqlite is not a usable fedrec device store"):
        EventStore(junk)

    good = tmp_path / "good.sqlite"
    with Device(good, create=True, device_id=3, n_items=N_ITEMS) as d:
        d.record_many([(i % N_ITEMS, float(i), "view", 1.0) for i in range(3000)])
    old = tmp_path / "old.sqlite"
    old.write_bytes(good.read_bytes())
    _sql(old, "PRAGMA user_version = 7")
    with pytest.raises(StoreError, match=r"old\.sqlite has device-store schema version 7; this fedrec reads version 1"):
        EventStore(old)

    foreign = tmp_path / "foreign.sqlite"
    _sql(foreign, "CREATE TABLE t (x)")
    with pytest.raises(StoreError, match=r"foreign\.sqlite is an SQLite database but not a fedrec device store"):
        EventStore(foreign)

    # a damaged page in the middle of an otherwise valid store
    bad = tmp_path / "bad.sqlite"
    raw = bytearray(good.read_bytes())
    assert len(raw) > 8 * 4096
    raw[4 * 4096: 6 * 4096] = b"\xff" * (2 * 4096)
    bad.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"bad\.sqlite (is corrupt|is not a usable)"):
        EventStore(bad)

    with pytest.raises(StoreError, match=r"No device store at .*missing\.sqlite"):
        EventStore(tmp_path / "missing.sqlite")
    with pytest.raises(StoreError, match="already exists"):
        EventStore(good, create=True, device_id=1, n_items=5)


@pytest.mark.parametrize("bad", [{"item": N_ITEMS}, {"item": -1}, {"item": 1.5}, {"timestamp": math.nan},
                                 {"kind": "swipe"}, {"weight": math.inf}])
def test_a_malformed_event_is_refused_and_nothing_is_written(tmp_path, bad):
    with Device(tmp_path / "d.sqlite", create=True, device_id=0, n_items=N_ITEMS) as d:
        d.record(1, timestamp=0.0)
        ev = {"item": 2, "timestamp": 1.0, "kind": "click", "weight": 1.0, **bad}
        with pytest.raises(StoreError, match="Event"):
            d.record(ev["item"], timestamp=ev["timestamp"], kind=ev["kind"], weight=ev["weight"])
        with pytest.raises(StoreError, match="Event"):  # a batch is all or nothing
            d.record_many([(3, 2.0, "click", 1.0), (ev["item"], ev["timestamp"], ev["kind"], ev["weight"])])
        assert d.store.count() == 1


def test_rounds_take_events_by_clock_and_the_device_matches_client_update(tmp_path):
    """The SDK's round is exactly client_update on the store's events; state survives a reopen."""
    cfg = RunConfig(privacy="user", rounds=3, user_fit_steps=5)
    g = _global(cfg)
    path = tmp_path / "d.sqlite"
    rng = np.random.default_rng(0)
    items = rng.integers(0, N_ITEMS, 30)
    with Device(path, create=True, device_id=5, n_items=N_ITEMS) as d:
        d.record_many([(int(i), float(t), "click", 1.0) for t, i in enumerate(items)])
        r1 = d.run_round(g, cfg, 1, train=True, clock=9.0, secret=0)
    assert r1.taken == 10 and r1.update.n_new == 10

    # the same round computed directly from the events, as the simulation does
    model = build_model("mf", N_ITEMS, cfg.dim, seed=cfg.seed, init_scale=cfg.init_scale)
    ref = client_update(model, g, DeviceState(), items[:10], np.ones(10, np.int64), 1, cfg, device_id=5,
                        noise_multiplier=0.0)
    np.testing.assert_array_equal(r1.update.delta["item.weight"], ref.delta["item.weight"])

    with Device(path) as d:  # a restarted device continues from its stored state
        r2 = d.run_round(g, cfg, 2, train=True, clock=19.0, secret=0)
        assert r2.taken == 10 and r2.update.n_new == 10 and r2.update.state.participations == 2
        rounds = np.concatenate([np.ones(10, np.int64), np.full(10, 2)])
        ref2 = client_update(model, g, ref.state, items[:20], rounds, 2, cfg, device_id=5, noise_multiplier=0.0)
        np.testing.assert_array_equal(r2.update.delta["item.weight"], ref2.delta["item.weight"])
        assert r2.served is not None and r2.served.counts.n == r2.update.counts.n > 0  # the round's events, as served
        # a round that is not asked to train still serves, and consumes nothing
        r3 = d.run_round(g, cfg, 3, train=False, clock=24.0)
        assert r3.taken == 5 and r3.update is None and 0 < r3.served.counts.n <= 5
        assert DeviceState.from_config(d.store.load_state()).cursors[-1] == 2


def test_the_server_cannot_redraw_a_deployed_devices_noise(tmp_path):
    """By default a device mixes fresh entropy into its seed: the run seed, its id and the round (all the server
    knows) do not determine its Poisson samples and DP noise; the same round with secret 0 is client_update's."""
    cfg = RunConfig(privacy="event", event_noise="device", noise_multiplier=1.0, rounds=1)
    g = _global(cfg)
    deltas = []
    for k, secret in enumerate([None, None, 0]):
        with Device(tmp_path / f"d{k}.sqlite", create=True, device_id=5, n_items=N_ITEMS) as d:
            d.record_many([(i % N_ITEMS, float(i), "click", 1.0) for i in range(12)])
            deltas.append(d.run_round(g, cfg, 1, train=True, noise_multiplier=1.0, secret=secret).update.delta)
    assert not np.array_equal(deltas[0]["item.weight"], deltas[1]["item.weight"])
    model = build_model("mf", N_ITEMS, cfg.dim, seed=cfg.seed, init_scale=cfg.init_scale)
    ref = client_update(model, g, DeviceState(), np.arange(12) % N_ITEMS, np.ones(12, np.int64), 1, cfg, device_id=5,
                        noise_multiplier=1.0)
    np.testing.assert_array_equal(deltas[2]["item.weight"], ref.delta["item.weight"])
    assert not np.array_equal(deltas[0]["item.weight"], ref.delta["item.weight"])


def test_a_failed_round_consumes_nothing(tmp_path):
    cfg = RunConfig(privacy="none")
    with Device(tmp_path / "d.sqlite", create=True, device_id=0, n_items=N_ITEMS) as d:
        d.record_many([(i, float(i), "view", 1.0) for i in range(8)])
        bad = {"item.weight": np.zeros((N_ITEMS, cfg.dim + 1), np.float32), "other": np.zeros(3, np.float32)}
        with pytest.raises(Exception):  # noqa: B017 - whatever client_update raises, the store must roll back
            d.run_round(bad, cfg, 1, train=True)
        assert d.store.count(pending=True) == 8 and d.store.load_state() is None
        with pytest.raises(StoreError, match=r"\(60 items\) needs"):
            d.run_round({"item.weight": np.zeros((10, cfg.dim + 1), np.float32)}, cfg, 1, train=True)
        d.run_round(_global(cfg), cfg, 1, train=True)
        assert d.store.count(pending=True) == 0


def test_event_level_privacy_ledger_and_state_live_on_the_device(tmp_path):
    cfg = RunConfig(privacy="event", noise_multiplier=1.0, local_steps=3, replay_rounds=1)
    g = _global(cfg)
    path = tmp_path / "d.sqlite"
    with Device(path, create=True, device_id=2, n_items=N_ITEMS) as d:
        for r in range(1, 4):
            d.record_many([(int(i), float(10 * r + i), "click", 1.0) for i in range(6)])
            d.run_round(g, cfg, r, train=True, noise_multiplier=1.0)
    with Device(path) as d:
        led = d.store.privacy_ledger()
        assert [x["round"] for x in led] == [1, 2, 3]
        assert [x["max_exposure"] for x in led] == [3, 6, 6]  # replay window of 1: at most 2 updates per event
        eps = [x["epsilon"] for x in led]
        assert eps[0] < eps[1] == eps[2] == d.epsilon()
        assert all(x["accountant"] == "prv" and x["delta"] == cfg.delta for x in led)


def test_retention_keeps_the_store_bounded_but_never_drops_replayable_or_pending_events(tmp_path):
    cfg = RunConfig(privacy="none", replay_rounds=1, local_steps=1)
    g = _global(cfg)
    with Device(tmp_path / "d.sqlite", create=True, device_id=0, n_items=N_ITEMS, max_events=15) as d:
        t = 0
        for r in range(1, 7):
            d.record_many([(int((t + i) % N_ITEMS), float(t + i), "view", 1.0) for i in range(10)])
            t += 10
            d.run_round(g, cfg, r, train=True)
            _, rounds = d.store.events()
            assert set(range(max(1, r - 1), r + 1)) <= set(rounds.tolist())  # the replay window is whole
            assert (rounds < r - 1).sum() <= 15
        d.record(3, timestamp=1e9)
        assert d.store.count(pending=True) == 1
        assert int(d.store.meta("dropped")) > 0


def test_recommend_ranks_locally_excludes_what_the_user_had_and_follows_new_events(tmp_path):
    cfg = RunConfig(privacy="none", user_fit_steps=30)
    w = np.zeros((N_ITEMS, cfg.dim + 1), np.float32)
    # two clusters of items: 0-29 along one axis, 30-59 along another
    w[:30, 0] = 1.0
    w[30:, 1] = 1.0
    w[:, cfg.dim] = np.linspace(0, 0.01, N_ITEMS)
    with Device(tmp_path / "d.sqlite", create=True, device_id=0, n_items=N_ITEMS) as d:
        with pytest.raises(StoreError, match="has not received a global model"):
            d.recommend(5)
        d.record_many([(i, float(i), "click", 1.0) for i in range(10)])
        d.run_round({"item.weight": w}, cfg, 1, train=False)
        top = d.recommend(5)
        assert len(top) == 5 and not set(top) & set(range(10)) and all(i < 30 for i in top)
        for i in range(30, 50):  # the user's taste moves; no round has run since
            d.record(i, timestamp=100.0 + i)
        top = d.recommend(5)
        assert all(i >= 50 for i in top)  # the other cluster, minus what was had


def test_an_update_the_server_did_not_keep_is_trained_again_from_the_state_before_it(tmp_path):
    """At-least-once delivery (user level): the device keeps the state its last update was trained from; told
    that the server kept nothing newer than an earlier round, it trains those events again from that state,
    exactly as if the lost round had never run; told that the update was kept, it goes on."""
    cfg = RunConfig(privacy="user", rounds=3, user_fit_steps=5)
    g = _global(cfg)
    items = np.random.default_rng(0).integers(0, N_ITEMS, 30)
    events = [(int(i), float(t), "click", 1.0) for t, i in enumerate(items)]
    runs = {}
    for name, acked in (("kept", 1), ("lost", -1), ("never-ran", None)):
        with Device(tmp_path / f"{name}.sqlite", create=True, device_id=5, n_items=N_ITEMS) as d:
            d.record_many(events)
            if name != "never-ran":
                first = d.run_round(g, cfg, 1, train=True, clock=9.0, secret=0)
                assert first.update.n_new == 10 and d.store.pending()[0] == 1 and d.store.pending()[1] is None
            runs[name] = d.run_round(g, cfg, 2, train=True, clock=19.0, secret=0, acked=acked)
            assert d.store.pending()[0] == 2  # this update waits for its own acknowledgement
    assert runs["kept"].update.n_new == 10 and runs["kept"].update.state.participations == 2
    # lost: the first round's 10 events go out again with the next 10, as from a device that never trained
    lost, fresh = runs["lost"].update, runs["never-ran"].update
    assert lost.n_new == 20 and lost.state.participations == 1
    np.testing.assert_array_equal(lost.delta["item.weight"], fresh.delta["item.weight"])


def test_under_event_level_dp_a_lost_update_is_not_trained_again(tmp_path):
    """An event's DP exposures are bounded by its replay window: the device keeps no pending state under event DP,
    and whatever the server says, a lost update's events are not sent as new again."""
    cfg = RunConfig(privacy="event", event_noise="device", noise_multiplier=1.0, local_steps=2)
    g = _global(cfg)
    with Device(tmp_path / "d.sqlite", create=True, device_id=2, n_items=N_ITEMS) as d:
        d.record_many([(i, float(i), "click", 1.0) for i in range(12)])
        d.run_round(g, cfg, 1, train=True, noise_multiplier=1.0, clock=5.0)
        assert d.store.pending() is None
        r2 = d.run_round(g, cfg, 2, train=True, noise_multiplier=1.0, clock=11.0, acked=-1)
        assert r2.update.n_new == 6 and [x["round"] for x in d.store.privacy_ledger()] == [1, 2]


def test_a_pending_update_keeps_its_events_in_the_store(tmp_path):
    """Retention never drops the events of an update still waiting for its acknowledgement."""
    cfg = RunConfig(privacy="none", replay_rounds=0, local_steps=1)
    g = _global(cfg)
    with Device(tmp_path / "d.sqlite", create=True, device_id=0, n_items=N_ITEMS, max_events=2) as d:
        d.record_many([(i, float(i), "view", 1.0) for i in range(10)])
        d.run_round(g, cfg, 1, train=True, clock=4.0)
        d.run_round(g, cfg, 2, train=True, clock=9.0, acked=1)  # round 1 kept: its events may go; round 2 pending
        _, rounds = d.store.events()
        assert (rounds == 2).sum() == 5 and (rounds == 1).sum() == 2
        again = d.run_round(g, cfg, 3, train=True, clock=9.0, acked=1)  # round 2 was lost: its events again
        assert again.update.n_new == 5 and again.update.state.cursors[-1] == 3
