"""Batched devices (issue 18): a node's devices' local steps run together (``train_devices``: ``train_batch``,
``sgd_mf_many``) give each device what its own round (``client_update``) gives, up to float rounding."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.client_update import DeviceState, batched_fits, batched_updates, client_update
from fedrec.config import RunConfig
from fedrec.data.stream import RoundStream
from fedrec.data.world import WorldSpec, make_world
from fedrec.device_round import DeviceData, train_devices
from fedrec.messages import RoundInstruction
from fedrec.models import build_model
from fedrec.wire import encode_delta


def _dense(delta: dict, table: dict) -> np.ndarray:
    """A batched device's item-table delta as a dense array (the batch sends the rows that moved)."""
    v = delta["item.weight"]
    if not isinstance(v, tuple):
        return v
    out = np.zeros_like(table["item.weight"])
    out[v[0]] = v[1]
    return out


@pytest.mark.parametrize("privacy, extra", [("none", {}), ("user", {}), ("none", {"row_average": True}),
                                            ("user", {"wire": "dense"}), ("event", {"event_noise": "aggregate"}),
                                            ("event", {"event_noise": "device"}), ("both", {})])
def test_batched_local_steps_give_each_devices_own_update(privacy, extra):
    """Devices new and with state (trained before: their replayed windows), with and without a user-level clip,
    per-row averaging's row counts, and a device with no events yet (no steps). Under event noise at the aggregate
    (and with DP-SGD on each device, alone or with user-level DP besides) the round-start fits are batched and each
    device's update (its noise drawn from its own generator after the fit's draws) runs alone from its own vector and
    the version."""
    stream = RoundStream.build(make_world(WorldSpec(users=40, items=60, topics=4, events_per_user=16, seed=2)), 4)
    cfg = RunConfig(privacy=privacy, dim=4, clip=0.05, seed=3, graph_window=2, user_fit_steps=5, sample_rate=0.6,
                    **extra)
    assert batched_fits(cfg) and batched_updates(cfg) == (privacy in ("none", "user"))
    z = 0.8 if privacy in ("event", "both") else 0.0
    model = build_model("mf", stream.log.n_items, cfg.dim, init_scale=0.1)
    rng = np.random.default_rng(0)
    table = {"item.weight": (rng.normal(size=(stream.log.n_items, cfg.dim + 1)) * 0.1).astype(np.float32)}
    states = {d: DeviceState() for d in range(40)}
    for round_ in (1, 2, 3):
        devices = [d for d in range(40) if (d + round_) % 3]  # some devices train again, with their state
        one, devs = {}, []
        for d in devices:
            idx = stream.device_events(d, round_)
            one[d] = client_update(model, table, states[d], stream.log.item[idx], stream.round_of[idx], round_, cfg,
                                   device_id=d, noise_multiplier=z, affinities=False)
            devs.append(DeviceData(d, stream.log.item[idx], stream.round_of[idx], states[d]))
        empty = np.zeros(0, np.int64)
        one[99] = client_update(model, table, DeviceState(), empty, empty, round_, cfg, device_id=99,
                                noise_multiplier=z)
        devs.append(DeviceData(99, empty, empty))
        got = train_devices(model, table, devs, cfg, RoundInstruction(round_, (*devices, 99), z), [None] * len(devs))
        for dev, many in zip(devs, got, strict=True):
            assert not isinstance(many, Exception), many
            ref = one[dev.device]
            np.testing.assert_allclose(_dense(many.delta, table), _dense(ref.delta, table), rtol=1e-4, atol=1e-7)
            sent, ref_sent = encode_delta(many.delta, "sparse"), encode_delta(ref.delta, "sparse")
            np.testing.assert_array_equal(sent["item.weight.ids"], ref_sent["item.weight.ids"])  # the same rows sent
            np.testing.assert_allclose(many.state.local["user.weight"], ref.state.local["user.weight"], rtol=1e-4,
                                       atol=1e-7)
            assert (many.steps, many.n_train, many.n_new, many.clipped) == (ref.steps, ref.n_train, ref.n_new,
                                                                           ref.clipped)
            assert many.preclip_norm == pytest.approx(ref.preclip_norm, rel=1e-4)
            assert many.epsilon == ref.epsilon and many.state.max_exposure == ref.state.max_exposure
            assert (many.counts.n, many.counts.hits) == (ref.counts.n, ref.counts.hits)
            assert many.state.cursors == ref.state.cursors
            for a, b in zip(many.row_counts or (), ref.row_counts or (), strict=True):
                np.testing.assert_array_equal(a, b)
            assert (many.row_counts is None) == (ref.row_counts is None)
            assert (many.pairs is None) == (ref.pairs is None)
            if many.pairs is not None:
                np.testing.assert_array_equal(many.pairs.a, ref.pairs.a)
                np.testing.assert_array_equal(many.pairs.w, ref.pairs.w)
            states[dev.device] = ref.state
        moved = [np.abs(_dense(one[d].delta, table)).sum() for d in devices]
        assert sum(m > 0 for m in moved) > len(devices) // 2
        assert one[99].steps == 0 and not np.abs(_dense(one[99].delta, table)).any()
        if privacy in ("user", "both"):
            assert any(one[d].clipped for d in devices)
        if extra.get("row_average"):
            assert all(one[d].row_counts is not None for d in devices)


@pytest.mark.parametrize("noise", ["aggregate", "device"])
def test_a_batch_under_an_event_budget_skips_and_scores_as_each_device_alone(noise):
    """Event-level DP with a budget that lets each device train in one round only: its later rounds are skipped by
    the budget guard, in a batch as alone (the same ε, state and counts); each device probed, with event kinds as a
    node passes them (event-level DP reads none)."""
    import dataclasses

    stream = RoundStream.build(make_world(WorldSpec(users=16, items=50, topics=4, events_per_user=18, seed=7)), 3)
    cfg = RunConfig(privacy="event", event_noise=noise, dim=4, seed=5, user_fit_steps=4, sample_rate=0.6,
                    item_graph="off")
    z, rng = 0.9, np.random.default_rng(4)
    model = build_model("mf", stream.log.n_items, cfg.dim, init_scale=0.1)
    table = {"item.weight": (rng.normal(size=(stream.log.n_items, cfg.dim + 1)) * 0.1).astype(np.float32)}
    first = client_update(model, table, DeviceState(), stream.log.item[stream.device_events(0, 1)],
                          stream.round_of[stream.device_events(0, 1)], 1, cfg, device_id=0, noise_multiplier=z)
    cfg = dataclasses.replace(cfg, epsilon=first.epsilon * (1 + 1e-6))  # one round's exposure, not two
    states, skipped = {d: DeviceState() for d in range(16)}, {1: 0, 2: 0, 3: 0}
    for round_ in (1, 2, 3):
        devs, probes, one = [], [], {}
        for d in range(16):
            idx = stream.device_events(d, round_)
            kinds = rng.integers(0, 3, len(idx)).astype(np.int8)
            devs.append(DeviceData(d, stream.log.item[idx], stream.round_of[idx], states[d], kinds))
            probes.append(rng.choice(stream.log.n_items, 3, replace=False))
            one[d] = client_update(model, table, states[d], devs[-1].items, devs[-1].rounds, round_, cfg, device_id=d,
                                   noise_multiplier=z, probe=probes[-1], kinds=kinds)
        got = train_devices(model, table, devs, cfg, RoundInstruction(round_, tuple(range(16)), z), probes)
        for dev, many in zip(devs, got, strict=True):
            ref = one[dev.device]
            assert not isinstance(many, Exception), many
            assert (many.skipped, many.steps, many.epsilon) == (ref.skipped, ref.steps, ref.epsilon)
            np.testing.assert_allclose(_dense(many.delta, table), _dense(ref.delta, table), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(many.state.local["user.weight"], ref.state.local["user.weight"], rtol=1e-4,
                                       atol=1e-7)
            assert (many.counts.n, many.counts.hits) == (ref.counts.n, ref.counts.hits)
            np.testing.assert_array_equal(many.probe_hits, ref.probe_hits)
            skipped[round_] += bool(ref.skipped)
            states[dev.device] = ref.state
    assert skipped[1] == 0 and skipped[2] + skipped[3] >= 16  # a device's first round trains, its later ones do not


def test_batched_fits_need_mf_s_closed_form():
    assert batched_fits(RunConfig(privacy="event")) and batched_fits(RunConfig(privacy="both"))
    assert not batched_fits(RunConfig(update_backend="autograd"))
    assert not batched_fits(RunConfig(model="neumf")) and not batched_fits(RunConfig(model="deepfm"))


def test_a_failing_device_fails_alone_in_a_batch():
    """A device whose events a node cannot train on (an item outside the catalogue) is its exception; the other
    devices of the batch get their updates, equal to their own rounds'."""
    stream = RoundStream.build(make_world(WorldSpec(users=10, items=60, topics=4, events_per_user=16, seed=2)), 2)
    cfg = RunConfig(privacy="none", dim=4, seed=3)
    model = build_model("mf", stream.log.n_items, cfg.dim, init_scale=0.1)
    table = {"item.weight": np.full((stream.log.n_items, cfg.dim + 1), 0.05, np.float32)}
    devs = [DeviceData(d, stream.log.item[stream.device_events(d, 1)], stream.round_of[stream.device_events(d, 1)])
            for d in range(4)]
    devs[1] = DeviceData(1, np.append(devs[1].items, 999), np.append(devs[1].rounds, 1))
    got = train_devices(model, table, devs, cfg, RoundInstruction(1, (0, 1, 2, 3)), [None] * 4)
    assert isinstance(got[1], IndexError)
    for j in (0, 2, 3):
        ref = client_update(model, table, DeviceState(), devs[j].items, devs[j].rounds, 1, cfg, device_id=j,
                            noise_multiplier=0.0)
        np.testing.assert_allclose(_dense(got[j].delta, table), ref.delta["item.weight"], rtol=1e-4, atol=1e-7)



def test_the_batched_round_start_fit_gives_each_device_its_own_fit():
    """``fit_user_mf_many`` against ``fit_user_mf`` one device at a time: devices of different lengths, one whose
    candidates are the whole catalogue (it had every item), each from its own generator."""
    import torch

    from fedrec.models.mf import fit_user_mf, fit_user_mf_many

    rng = np.random.default_rng(1)
    V, d = 12, 4
    item = torch.from_numpy(rng.normal(size=(V, d + 1)).astype(np.float32))
    users = torch.from_numpy(rng.normal(size=(3, d)).astype(np.float32))
    pos = [torch.tensor([1, 5, 5, 7]), torch.tensor([2]), torch.arange(V)]
    cand = [torch.tensor([0, 2, 3, 4, 6, 8, 9, 10, 11]), torch.tensor([0, 1, 3]), torch.arange(V)]
    kw = {"steps": 6, "negatives": 2, "lr": 0.3}
    alone = []
    for a in range(3):
        u = users[a:a + 1].clone()
        fit_user_mf(item, u, pos[a], cand[a], generator=torch.Generator().manual_seed(a), **kw)
        alone.append(u[0])
    many = users.clone()
    fit_user_mf_many(item, many, pos, cand, generators=[torch.Generator().manual_seed(a) for a in range(3)], **kw)
    torch.testing.assert_close(many, torch.stack(alone), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(many, users)


def test_the_batch_runs_as_a_batch_not_by_its_one_by_one_fallback():
    """``train_devices`` falls back to one device at a time should its batch fail, with the same results; so the
    batch's own steps are held here directly: ``fit_batch`` gives each device the vector its own preparation fits,
    and ``train_batch`` takes the prepared devices without failing."""
    from fedrec.client_update import fit_batch, open_update, prepare_update, train_batch

    stream = RoundStream.build(make_world(WorldSpec(users=30, items=50, topics=4, events_per_user=12, seed=5)), 3)
    cfg = RunConfig(privacy="none", dim=4, seed=1, user_fit_steps=5)
    model = build_model("mf", stream.log.n_items, cfg.dim, init_scale=0.1)
    table = {"item.weight": (np.random.default_rng(3).normal(size=(stream.log.n_items, 5)) * 0.1).astype(np.float32)}
    states, events = {}, {d: stream.device_events(d, 3) for d in range(30)}
    for d in range(30):  # a first round trained alone: the second one has past events to fit
        idx = stream.device_events(d, 1)
        states[d] = client_update(model, table, DeviceState(), stream.log.item[idx], stream.round_of[idx], 1, cfg,
                                  device_id=d, noise_multiplier=0.0).state
    items = [stream.log.item[events[d]] for d in range(30)]
    rounds = [stream.round_of[events[d]] for d in range(30)]
    opened = [open_update(model, table, states[d], items[d], rounds[d], 2, cfg, device_id=d) for d in range(30)]
    fitted = fit_batch(model, opened, items, cfg)
    alone = [prepare_update(model, table, states[d], items[d], rounds[d], 2, cfg, device_id=d, noise_multiplier=0.0)
             for d in range(30)]
    assert sum(o.known.any() for o in opened) > 20
    for d in range(30):
        np.testing.assert_allclose(fitted[d], alone[d].local["user.weight"].numpy(), rtol=1e-4, atol=1e-7)
    assert len(train_batch(model, table, alone, cfg)) == 30


def test_a_node_without_a_gpu_runs_its_batch_on_the_cpu():
    """``auto`` keeps a node's batched devices on the CPU; ``cuda`` on a node that sees no GPU (a Ray actor given
    none) runs them there too, with the same updates as ``cpu``."""
    import torch

    from fedrec.server_aggregate import node_device

    assert node_device("auto") == torch.device("cpu") and node_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: node_device('cuda') is CUDA here")
    assert node_device("cuda") == torch.device("cpu") and node_device("cuda:1") == torch.device("cpu")
    stream = RoundStream.build(make_world(WorldSpec(users=12, items=60, topics=4, events_per_user=16, seed=2)), 2)
    model = build_model("mf", stream.log.n_items, 4, init_scale=0.1)
    table = {"item.weight": np.full((stream.log.n_items, 5), 0.05, np.float32)}
    devs = [DeviceData(d, stream.log.item[stream.device_events(d, 1)], stream.round_of[stream.device_events(d, 1)])
            for d in range(12)]
    got = [train_devices(model, table, devs, RunConfig(privacy="none", dim=4, seed=3, device=dev),
                         RoundInstruction(1, tuple(range(12))), [None] * 12) for dev in ("cpu", "cuda")]
    for a, b in zip(*got, strict=True):
        np.testing.assert_array_equal(_dense(a.delta, table), _dense(b.delta, table))
