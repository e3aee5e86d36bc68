"""ε of one device composed over rounds by the real local update, checked against Opacus directly.

With ``replay_rounds = R`` an event is trained on in its own participation and the next ``R``,
each ``local_steps`` DP steps, so once a device has taken part ``R + 1`` times with data its
per-event ε is that of ``local_steps * (R + 1)`` steps, and it must not grow after that.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
from _oracle import opacus_epsilon

from fedrec.client_update import DeviceState, client_update
from fedrec.config import RunConfig
from fedrec.data.stream import RoundStream
from fedrec.data.world import WorldSpec, make_world
from fedrec.models import build_model
from fedrec.privacy.accounting import calibrate_noise, compress, epsilon

ROUNDS = 8

pytestmark = pytest.mark.filterwarnings("ignore:.*Full backward hook.*:UserWarning")
N_ITEMS = 80


@pytest.fixture(scope="module")
def stream():
    log = make_world(WorldSpec(users=20, items=N_ITEMS, topics=4, events_per_user=24, horizon=float(ROUNDS), seed=2))
    return RoundStream.build(log, ROUNDS)


def _cfg(**kw) -> RunConfig:
    base = dict(world_users=20, world_items=N_ITEMS, world_topics=4, world_events_per_user=24, rounds=ROUNDS,
                dim=4, local_steps=2, sample_rate=0.5, replay_rounds=1, privacy="event", noise_multiplier=1.1,
                delta=1e-5, lr=0.5, progress=False)
    base.update(kw)
    return RunConfig(**base)


def _device_with_round1_events(stream) -> int:
    for d in range(stream.n_devices):
        idx = stream.device_events(d, 1)
        if len(idx) >= 1 and all(len(stream.device_events(d, r)) > len(stream.device_events(d, r - 1))
                                 for r in (2, 3)):
            return d
    raise AssertionError("no device with events in rounds 1-3")




def _run_rounds(stream, cfg, device, rounds, model=None):
    model = model or build_model("mf", stream.log.n_items, cfg.dim, seed=cfg.seed)
    gstate = {k: v.numpy() for k, v in model.global_state().items()}
    state = DeviceState()
    results = []
    for r in rounds:
        idx = stream.device_events(device, r)
        res = client_update(model, gstate, state, stream.log.item[idx], stream.round_of[idx], r, cfg,
                            device_id=device, noise_multiplier=cfg.noise_multiplier)
        results.append(res)
        state = res.state
        gstate = {k: gstate[k] + res.delta[k] for k in gstate}
    return results


@pytest.mark.parametrize("replay", [1, 2])
def test_epsilon_composes_then_stays_bounded(stream, replay):
    cfg = _cfg(replay_rounds=replay)
    d = _device_with_round1_events(stream)
    res = _run_rounds(stream, cfg, d, range(1, ROUNDS + 1))
    eps = [r.epsilon for r in res]
    z, q = cfg.noise_multiplier, cfg.sample_rate
    assert all(r.steps == cfg.local_steps for r in res)  # it had events (new or replayed) every round
    assert all(b >= a for a, b in zip(eps, eps[1:], strict=False)), eps
    # strictly increasing while the round-1 events are still replayed
    for i in range(replay):
        assert eps[i + 1] > eps[i], eps
    full = cfg.local_steps * (replay + 1)
    ref = opacus_epsilon(z, q, full, cfg.delta)
    assert ref > 0
    for i, r in enumerate(res):
        n_part = i + 1
        exposure = cfg.local_steps * min(n_part, replay + 1)
        assert r.state.max_exposure == exposure
        assert r.epsilon == pytest.approx(opacus_epsilon(z, q, exposure, cfg.delta), rel=1e-9)
        assert r.epsilon == pytest.approx(epsilon([(z, q, r.state.max_exposure)], cfg.delta), rel=1e-12)
        if n_part >= replay + 1:
            assert r.epsilon == pytest.approx(ref, rel=1e-9)
    # bounded: 6 (or more) further rounds after reaching the bound do not raise it
    assert len(eps) - (replay + 1) >= 5
    assert max(eps) == pytest.approx(ref, rel=1e-9)
    # the full per-update history is kept, one record per private update
    assert res[-1].state.history == [(z, q, cfg.local_steps)] * len(res)
    assert res[-1].state.participations == len(res)
    assert len(res[-1].state.cursors) == replay + 1 and res[-1].state.cursors[-1] == ROUNDS


def test_epsilon_with_gap_in_participation(stream):
    """A device that skips rounds: its ε still only counts replay_rounds + 1 participations."""
    cfg = _cfg()
    d = _device_with_round1_events(stream)
    res = _run_rounds(stream, cfg, d, [1, 3, 6, 8])
    ref = opacus_epsilon(cfg.noise_multiplier, cfg.sample_rate, cfg.local_steps * 2, cfg.delta)
    assert res[0].epsilon < res[1].epsilon
    for r in res[1:]:
        assert r.epsilon == pytest.approx(ref, rel=1e-9)


def test_compress_merges_identical_records():
    h = [(1.0, 0.5, 2), (0.8, 0.5, 1), (1.0, 0.5, 3), (1.0, 0.25, 4), (0.8, 0.5, 0), (1.0, 0.5, -1)]
    c = compress(h)
    assert sorted(c) == sorted([(1.0, 0.5, 5), (0.8, 0.5, 1), (1.0, 0.25, 4)])
    assert len(c) == 3
    assert compress([]) == ()
    assert compress([(1, 0.5, 2), (1.0, 0.5, 2)]) == ((1.0, 0.5, 4),)
    assert epsilon(h, 1e-5) == pytest.approx(epsilon(c, 1e-5))
    assert epsilon([(1.0, 0.5, 2), (1.0, 0.5, 3)], 1e-5) == pytest.approx(opacus_epsilon(1.0, 0.5, 5, 1e-5))
    assert epsilon([], 1e-5) == 0.0
    assert math.isinf(epsilon([(0.0, 0.5, 1)], 1e-5))


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_memoised_rdp_gives_opacus_s_own_epsilon(accountant):
    """:func:`~fedrec.privacy.accounting.memoise_rdp` changes no ε by a bit: each history's ε through it against
    Opacus's accountant with its own, unmemoised ``_compute_rdp``; and its memo is used (a device's growing exposure
    sweeps the same (q, z) again)."""
    from opacus.accountants.analysis import rdp
    from opacus.accountants.analysis.prv import prvs

    from fedrec.privacy.accounting import _epsilon_cached, memoise_rdp
    from fedrec.registry import ACCOUNTANTS

    memoise_rdp()
    memo = rdp._compute_rdp
    histories = [[(1.52, 0.5, 1), (0.66, 1.0, 1)], [(1.52, 0.5, 3), (0.66, 1.0, 1)], [(0.9, 0.03, 200)]]
    _epsilon_cached.cache_clear()
    before = memo.cache_info().hits
    got = [epsilon(h, 1e-5, accountant) for h in histories]
    assert memo.cache_info().hits > before
    rdp._compute_rdp = prvs._compute_rdp = memo.__wrapped__
    try:
        ref = []
        for h in histories:
            acc = ACCOUNTANTS.get(accountant)()
            acc.history = list(compress(h))
            ref.append(float(acc.get_epsilon(delta=1e-5)))
    finally:
        rdp._compute_rdp = prvs._compute_rdp = memo
    assert got == ref


@pytest.mark.parametrize("target,q,steps", [(1.0, 0.1, 4)])
def test_calibrate_noise(target, q, steps):
    delta = 1e-5
    z = calibrate_noise(target, q, steps, delta)
    e = opacus_epsilon(z, q, steps, delta)
    assert e <= target * (1 + 1e-9)
    assert e >= 0.98 * target, (z, e)
    assert opacus_epsilon(0.99 * z, q, steps, delta) > target  # (nearly) the smallest such z
    with pytest.raises(ValueError):
        calibrate_noise(0.0, q, steps, delta)


@pytest.mark.parametrize("target,q,steps", [(4.0, 0.5, 9), (1.0, 0.1, 4), (8.0, 0.02, 200), (0.5, 0.3, 30),
                                            (100.0, 0.5, 9)])
def test_calibration_spends_the_budget_in_few_accountant_calls(target, q, steps):
    """Each ε costs the accountant a fraction of a second: regula falsi needs at most 8 (bisection took 12-18), and
    still lands within 0.2% of the budget, never above it."""
    from fedrec.privacy.accounting import _epsilon_cached

    _epsilon_cached.cache_clear()
    z = calibrate_noise(target, q, steps, 1e-5)
    assert _epsilon_cached.cache_info().misses <= 8
    assert 0.998 * target <= epsilon([(z, q, steps)], 1e-5) <= target


def test_no_privacy_zero_epsilon_and_delta_moves_items(stream):
    cfg = _cfg(privacy="none", sample_rate=1.0)
    d = _device_with_round1_events(stream)
    res = _run_rounds(stream, cfg, d, [1, 2, 3])
    for r in res:
        assert r.epsilon == 0.0
        assert set(r.delta) == {"item.weight"}
        assert r.delta["item.weight"].shape == (N_ITEMS, cfg.dim + 1)
        assert r.delta["item.weight"].dtype == np.float32
        assert np.abs(r.delta["item.weight"]).max() > 0
    assert res[-1].state.history == [] and res[-1].state.max_exposure == 0


@pytest.mark.parametrize("privacy", ["event", "none"])
def test_deterministic_and_inputs_not_mutated(stream, privacy):
    cfg = _cfg(privacy=privacy)
    d = _device_with_round1_events(stream)
    model = build_model("mf", N_ITEMS, cfg.dim, seed=0)
    gstate = {k: v.numpy().copy() for k, v in model.global_state().items()}
    # a device state that already trained once (round 1), then round 2
    idx1 = stream.device_events(d, 1)
    first = client_update(model, gstate, DeviceState(), stream.log.item[idx1], stream.round_of[idx1], 1, cfg,
                          device_id=d, noise_multiplier=cfg.noise_multiplier)
    state = first.state
    idx = stream.device_events(d, 2)
    items, rounds = stream.log.item[idx].copy(), stream.round_of[idx].copy()
    g_before = copy.deepcopy(gstate)
    s_before = copy.deepcopy(state)

    a = client_update(model, gstate, state, items, rounds, 2, cfg, device_id=d, noise_multiplier=cfg.noise_multiplier)
    # reused model object and a brand-new model give the same result
    b = client_update(model, gstate, state, items, rounds, 2, cfg, device_id=d, noise_multiplier=cfg.noise_multiplier)
    fresh = build_model("mf", N_ITEMS, cfg.dim, seed=5)
    c = client_update(fresh, gstate, state, items, rounds, 2, cfg, device_id=d, noise_multiplier=cfg.noise_multiplier)
    for other in (b, c):
        np.testing.assert_array_equal(a.delta["item.weight"], other.delta["item.weight"])
        np.testing.assert_array_equal(a.state.local["user.weight"], other.state.local["user.weight"])
        assert a.epsilon == other.epsilon and a.steps == other.steps
        assert a.counts == other.counts
    assert np.abs(a.delta["item.weight"]).max() > 0

    # inputs unchanged
    for k in gstate:
        np.testing.assert_array_equal(gstate[k], g_before[k])
    assert dataclasses.asdict(state).keys() == dataclasses.asdict(s_before).keys()
    for k in state.local:
        np.testing.assert_array_equal(state.local[k], s_before.local[k])
    assert (state.cursors, state.recent_steps, state.max_exposure, state.participations, state.history) == (
        s_before.cursors, s_before.recent_steps, s_before.max_exposure, s_before.participations, s_before.history)
    np.testing.assert_array_equal(items, stream.log.item[idx])
    np.testing.assert_array_equal(rounds, stream.round_of[idx])

    # a different seed gives a different update
    e = client_update(model, gstate, state, items, rounds, 2, dataclasses.replace(cfg, seed=1), device_id=d,
                      noise_multiplier=cfg.noise_multiplier)
    assert not np.array_equal(a.delta["item.weight"], e.delta["item.weight"])


def test_state_roundtrip_through_config(stream):
    cfg = _cfg()
    d = _device_with_round1_events(stream)
    res = _run_rounds(stream, cfg, d, [1, 2])
    s = res[-1].state
    back = DeviceState.from_config(s.to_config())
    np.testing.assert_array_equal(back.local["user.weight"], s.local["user.weight"])
    assert back.cursors == s.cursors and back.recent_steps == s.recent_steps
    assert back.max_exposure == s.max_exposure and back.participations == s.participations
    assert back.history == s.history
