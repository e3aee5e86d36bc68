"""Event context from the data's ``kind`` column (view, click, purchase, rating) reaching the models: the device
store's kinds, a device that recommends in the context of what its user just did, and a real simulation of a
generic CSV with kinds whose model learns a context embedding from them."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from fedrec.checkpoint import load_checkpoint
from fedrec.clients.app import app as client_app
from fedrec.clients.device import Device
from fedrec.clients.store import StoreError
from fedrec.config import RunConfig
from fedrec.data.events import KINDS
from fedrec.models import build_model
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid

N_ITEMS = 40


def test_the_store_gives_each_event_its_kind_in_time_order(tmp_path):
    with Device(tmp_path / "d.sqlite", create=True, device_id=0, n_items=N_ITEMS) as d:
        d.record_many([(3, 2.0, "purchase", 1.0), (1, 1.0, "view", 1.0), (2, 5.0, "click", 1.0)])
        d.store.take(1, 3.0)  # the first two (by time) go to round 1; the click waits
        items, _ = d.store.events()
        assert items.tolist() == [1, 3]
        assert [KINDS[k] for k in d.store.kinds()] == ["view", "purchase"]
        assert [KINDS[k] for k in d.store.kinds(taken=False)] == ["view", "purchase", "click"]
        path = d.store.path
    with sqlite3.connect(path) as db:  # damaged behind the SDK's back
        db.execute("UPDATE events SET kind = 'glance' WHERE item = 3")
    with Device(path) as d, pytest.raises(StoreError, match="unknown kind 'glance'"):
        d.store.kinds()


def test_a_device_recommends_in_the_context_of_what_its_user_just_did(tmp_path):
    """deepfm reads the kind of the last event: the same items, a purchase last instead of a view, another ranking;
    mf reads no kinds, and under event-level DP deepfm reads none either: the same ranking."""
    cfg = {"deepfm": RunConfig(model="deepfm", privacy="none", user_fit_steps=5),
           "mf": RunConfig(model="mf", privacy="none", user_fit_steps=5),
           "deepfm-event": RunConfig(model="deepfm", privacy="event", user_fit_steps=5)}
    for name, c in cfg.items():
        model = build_model(c.model, N_ITEMS, c.dim, seed=2)
        if c.model == "deepfm":
            with torch.no_grad():  # a context embedding that matters: a purchase points at other items than a view
                model.ctx.weight.mul_(30.0)
        glob = {k: v.numpy() for k, v in model.global_state().items()}
        tops = []
        for last in ("view", "purchase"):
            with Device(tmp_path / f"{name}-{last}.sqlite", create=True, device_id=0, n_items=N_ITEMS) as d:
                d.record_many([(i, float(i), "click", 1.0) for i in range(5)] + [(5, 5.0, last, 1.0)])
                d.run_round(glob, c, 1, train=False)
                tops.append(d.recommend(10))
        assert (tops[0] != tops[1]) == (name == "deepfm"), (name, tops)


def test_a_stored_version_of_another_shape_is_one_sentence_on_recommend(tmp_path):
    """A store whose saved version no longer fits the model (e.g. a deepfm version from before its context table)."""
    cfg = RunConfig(model="deepfm", privacy="none", user_fit_steps=5)
    glob = {k: v.numpy() for k, v in build_model("deepfm", N_ITEMS, cfg.dim, seed=2).global_state().items()}
    with Device(tmp_path / "d.sqlite", create=True, device_id=0, n_items=N_ITEMS) as d:
        d.record_many([(i, float(i), "click", 1.0) for i in range(5)])
        d.run_round(glob, cfg, 1, train=False)
        old = {k: v for k, v in glob.items() if k != "ctx.weight"}
        d.store.put_arrays("global", 1, old)
        with pytest.raises(StoreError, match="needs"):
            d.recommend(5)


def _csv(path, kinds: bool) -> None:
    """40 users, 12 events each: after a purchase the next item comes from items 20-39, after a view from 0-19."""
    rng = np.random.default_rng(0)
    rows = ["user,item,timestamp,kind"]
    for u in range(40):
        kind = "view"
        for t in range(12):
            item = int(rng.integers(20, 40) if kind == "purchase" else rng.integers(0, 20))
            kind = str(rng.choice(["view", "purchase"]))
            rows.append(f"u{u},i{item},{t * 40 + u},{kind if kinds else 'click'}")
    path.write_text("\n".join(rows) + "\n")


def test_a_simulation_of_a_csv_with_kinds_trains_its_context_embedding(tmp_path):
    finals = {}
    for kinds in (True, False):
        data = tmp_path / f"events-{kinds}.csv"
        _csv(data, kinds)
        cfg = RunConfig(data=str(data), model="deepfm", privacy="none", rounds=3, cohort=40, nodes=2, engine="local",
                        progress=False, uptake_probe=False, out=str(tmp_path / f"run-{kinds}"))
        summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
        assert summary["rounds"] == 3
        finals[kinds] = load_checkpoint(tmp_path / f"run-{kinds}" / "checkpoint.npz")["global"]["ctx.weight"]
    start = build_model("deepfm", 40, RunConfig().dim).ctx.weight.detach().numpy()
    used = [KINDS.index(k) for k in ("view", "purchase")]
    moved = np.abs(finals[True] - start).sum(axis=1)
    assert (moved[used] > 1e-4).all()  # the views' and the purchases' contexts were trained
    assert moved[KINDS.index("click")] < 1e-7  # no event was a click: its row is untouched
    assert np.abs(finals[False] - start).sum(axis=1)[KINDS.index("click")] > 1e-4  # the other run: only clicks


def test_under_event_level_dp_no_sample_reads_another_events_kind():
    """An event's context is the kind of the event before it: under event-level DP a sample reading it would let one
    event shape two samples. There the update and the serving read no kind at all; under user-level DP they do."""
    from fedrec.client_update import DeviceState, client_update
    from fedrec.device_round import serve_devices
    from fedrec.serving import ServeInput

    items = np.random.default_rng(0).integers(0, N_ITEMS, 24)
    rounds = np.repeat([1, 2, 3], 8)
    a, b = (np.full(24, KINDS.index(k), np.int8) for k in ("view", "purchase"))
    for privacy, same in (("event", True), ("user", False)):
        cfg = RunConfig(model="deepfm", privacy=privacy, noise_multiplier=1.0, epsilon=0.0, event_noise="device",
                        local_steps=2, user_fit_steps=3) if privacy == "event" else \
            RunConfig(model="deepfm", privacy=privacy, noise_multiplier=1.0, epsilon=0.0, user_fit_steps=3)
        glob = {k: v.numpy() for k, v in build_model("deepfm", N_ITEMS, cfg.dim, seed=1).global_state().items()}
        ups = [client_update(build_model("deepfm", N_ITEMS, cfg.dim, seed=1), glob, DeviceState(), items, rounds, 3,
                             cfg, device_id=2, noise_multiplier=1.0, kinds=k) for k in (a, b)]
        equal = all(np.array_equal(ups[0].delta[n], ups[1].delta[n]) for n in ups[0].delta)
        assert equal == same, privacy
        served = [serve_devices(build_model("deepfm", N_ITEMS, cfg.dim, seed=1), glob,
                                [ServeInput(2, items[:16], items[16:], kinds=k)], {}, cfg, 3)[0] for k in (a, b)]
        assert np.array_equal(served[0].next_scores, served[1].next_scores) == same, privacy
