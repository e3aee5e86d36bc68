"""Tests for the synthetic world (:mod:`fedrec.data.world`) and :class:`fedrec.data.stream.RoundStream`."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.data.stream import RoundStream
from fedrec.data.world import WorldSpec, make_world

SPEC = dict(users=60, items=240, topics=4, events_per_user=30, horizon=10.0)


@pytest.fixture(scope="module")
def world():
    return make_world(WorldSpec(**SPEC, seed=3))


def test_same_seed_same_log_different_seed_different(world):
    again = make_world(WorldSpec(**SPEC, seed=3))
    for col in ("user", "item", "timestamp", "weight", "kind"):
        np.testing.assert_array_equal(getattr(world, col), getattr(again, col))
    assert world.meta == again.meta
    other = make_world(WorldSpec(**SPEC, seed=4))
    assert len(other) == len(world)
    assert not (np.array_equal(other.item, world.item) and np.array_equal(other.timestamp, world.timestamp))
    assert other.meta["world"]["item_topic"] != world.meta["world"]["item_topic"]


def test_shape_and_ids(world):
    assert len(world) == SPEC["users"] * SPEC["events_per_user"]
    assert world.n_users == SPEC["users"] and world.n_items == SPEC["items"]
    assert np.all(np.diff(world.timestamp) >= 0)
    assert world.timestamp.min() >= 0 and world.timestamp.max() < SPEC["horizon"]
    assert np.bincount(world.user, minlength=world.n_users).tolist() == [SPEC["events_per_user"]] * SPEC["users"]
    assert world.item.min() >= 0 and world.item.max() < world.n_items


def test_no_user_consumes_an_item_twice(world):
    pairs = world.user * world.n_items + world.item
    assert len(np.unique(pairs)) == len(pairs)


def test_no_event_before_launch(world):
    truth = world.meta["world"]
    launch = np.asarray(truth["launch_time"])
    assert np.all(world.timestamp >= launch[world.item])
    new = np.asarray(truth["new_items"])
    lo, hi = WorldSpec().launch_window
    assert len(new) == round(0.1 * SPEC["items"])
    assert np.all((launch[new] >= lo * SPEC["horizon"]) & (launch[new] <= hi * SPEC["horizon"]))
    old = np.setdiff1d(np.arange(world.n_items), new)
    assert np.all(launch[old] == 0)


def test_new_items_get_consumed_after_launch(world):
    truth = world.meta["world"]
    new = set(truth["new_items"])
    is_new = np.array([int(i) in new for i in world.item])
    assert is_new.sum() >= 10  # novelty boost: new items are popular right after launch
    launch = np.asarray(truth["launch_time"])
    assert np.all(world.timestamp[is_new] >= launch[world.item[is_new]])
    # a good share of the new items are consumed at all
    assert len(set(world.item[is_new].tolist())) >= len(new) // 3


def _topic_share(world, users, topic_of_user, after: bool):
    truth = world.meta["world"]
    item_topic = np.asarray(truth["item_topic"])
    st = truth["shift_time"]
    m = np.isin(world.user, users) & ((world.timestamp >= st) if after else (world.timestamp < st))
    ev_topic = item_topic[world.item[m]]
    want = np.asarray(topic_of_user)[world.user[m]]
    return float((ev_topic == want).mean()), int(m.sum())


def test_drift_really_happens(world):
    truth = world.meta["world"]
    shifted = truth["shifted_users"]
    assert 0 < len(shifted) < world.n_users
    assert truth["shift_time"] == pytest.approx(0.5 * SPEC["horizon"])
    main, new_topic = truth["main_topic"], truth["new_topic"]
    assert all(new_topic[u] != main[u] for u in shifted)
    stay = [u for u in range(world.n_users) if u not in set(shifted)]
    assert all(new_topic[u] == main[u] for u in stay)

    after_new, n_after = _topic_share(world, shifted, new_topic, after=True)
    before_new, n_before = _topic_share(world, shifted, new_topic, after=False)
    before_main, _ = _topic_share(world, shifted, main, after=False)
    after_main, _ = _topic_share(world, shifted, main, after=True)
    assert n_after > 50 and n_before > 50
    assert after_new > 0.7, after_new
    assert before_new < 0.2, before_new
    assert before_main > 0.7 and after_main < 0.2

    for after in (False, True):
        share, n = _topic_share(world, stay, main, after=after)
        assert n > 100 and share > 0.7, (after, share)


def test_spec_validation():
    with pytest.raises(ValueError):
        WorldSpec(topics=1)
    with pytest.raises(ValueError):
        WorldSpec(items=10, topics=6)
    with pytest.raises(ValueError):
        WorldSpec(items=100, events_per_user=95)


# ----------------------------------------------------------------------------------------------
# RoundStream


@pytest.mark.parametrize("rounds", [1, 3, 10, 17])
def test_count_split(world, rounds):
    s = RoundStream.build(world, rounds, split="count")
    assert s.round_of.shape == (len(world),)
    assert s.round_of.min() == 1 and s.round_of.max() == rounds
    counts = np.bincount(s.round_of, minlength=rounds + 1)[1:]
    assert np.all(counts > 0)
    # about equal events per round
    assert counts.max() - counts.min() <= max(2, len(world) // rounds // 5)
    assert np.all(np.diff(s.round_of) >= 0)  # the log is in time order, rounds are time windows
    # ties never straddle a boundary
    for r in range(1, rounds):
        assert world.timestamp[s.round_of == r].max() < world.timestamp[s.round_of == r + 1].min()
        assert s.round_end_time(r) == world.timestamp[s.round_of == r].max()


def test_count_split_with_ties_never_straddles():
    log = make_world(WorldSpec(**SPEC, seed=1))
    from dataclasses import replace

    t = np.floor(log.timestamp * 2) / 2  # many tied timestamps
    tied = replace(log, timestamp=t)
    s = RoundStream.build(tied, 7, split="count")
    for value in np.unique(t):
        assert len(set(s.round_of[t == value].tolist())) == 1
    assert np.all(np.diff(s.round_of) >= 0)


def test_time_split_equal_windows(world):
    R = 5
    s = RoundStream.build(world, R, split="time")
    lo, hi = world.timestamp[0], world.timestamp[-1]
    w = (hi - lo) / R
    for r in range(1, R + 1):
        ts = world.timestamp[s.round_of == r]
        assert len(ts) > 0
        assert ts.min() >= lo + (r - 1) * w - 1e-9
        if r < R:
            assert ts.max() < lo + r * w + 1e-9
    assert s.round_of[-1] == R and s.round_of[0] == 1
    assert np.all(np.diff(s.round_of) >= 0)


def test_unknown_split_fails(world):
    with pytest.raises(ValueError, match="split"):
        RoundStream.build(world, 3, split="bogus")


def test_device_events(world):
    R = 6
    s = RoundStream.build(world, R)
    assert s.n_devices == world.n_users
    for u in [0, 7, 31, world.n_users - 1]:
        all_u = np.flatnonzero(world.user == u)
        np.testing.assert_array_equal(s.device_events(u, R), all_u)
        prev = np.zeros(0, np.int64)
        for r in range(0, R + 1):
            idx = s.device_events(u, r)
            assert np.all(world.user[idx] == u)
            assert np.all(s.round_of[idx] <= r)
            assert np.all(np.diff(world.timestamp[idx]) >= 0)
            expect = all_u[s.round_of[all_u] <= r]
            np.testing.assert_array_equal(idx, expect)
            assert len(idx) >= len(prev)
            np.testing.assert_array_equal(idx[: len(prev)], prev)  # a prefix grows
            prev = idx
    assert len(s.device_events(0, 0)) == 0


def test_trending_burst_really_spikes_then_fades():
    """Ground truth vs generated events: the trending items' share peaks at the burst time and fades."""
    spec = WorldSpec(users=300, items=300, topics=6, events_per_user=60, horizon=30.0, seed=3, bursts=3,
                     burst_time=0.5, burst_width=0.05, burst_share=0.3)
    log = make_world(spec)
    truth = log.meta["world"]
    hot = np.isin(log.item, truth["burst_items"])
    assert len(truth["burst_items"]) == 3 and not set(truth["burst_items"]) & set(truth["new_items"])
    t = log.timestamp
    peak = np.abs(t - truth["burst_time"]) < truth["burst_width"]
    far = np.abs(t - truth["burst_time"]) > 4 * truth["burst_width"]
    share_peak, share_far = hot[peak].mean(), hot[far].mean()
    assert share_peak > 0.15  # about burst_share of the events at the peak
    assert share_far < share_peak / 5  # and it fades
    # with no bursts the world is exactly the one before bursts existed (same RNG draws)
    base = make_world(WorldSpec(users=50, items=120, topics=4, events_per_user=20, seed=1))
    assert base.meta["world"]["burst_items"] == []


def _reference_events(spec: WorldSpec, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The world's events by its definition, written plainly: one user at a time, one event at a time, on the layout
    ``make_world`` draws for ``spec`` (the events themselves from another generator, ``seed``)."""
    from fedrec.data.world import _draw_layout

    w = _draw_layout(spec, np.random.default_rng(spec.seed))
    rng = np.random.default_rng(seed)
    H, decay = spec.horizon, spec.novelty_decay * spec.horizon
    users, items, times = [], [], []
    for u in range(spec.users):
        seen = np.zeros(spec.items, bool)
        for t in np.sort(rng.uniform(0, H, size=spec.events_per_user)):
            age = t - w.launch
            appeal = w.quality * (1 + spec.novelty_boost * np.exp(-np.maximum(age, 0) / decay) * (w.launch > 0))
            avail = (age >= 0) & ~seen
            hot = w.burst_items[avail[w.burst_items]]
            bump = spec.burst_share * np.exp(-0.5 * ((t - spec.burst_time * H) / (spec.burst_width * H)) ** 2)
            if len(hot) and rng.random() < bump:
                i = rng.choice(hot)
            else:
                topic = w.new_topic[u] if t >= spec.shift_time * H else w.main_topic[u]
                if rng.random() >= spec.focus:
                    topic = rng.integers(0, spec.topics)
                p = np.where(avail & (w.item_topic == topic), appeal, 0.0)
                p = p if p.sum() > 0 else np.where(avail, appeal, 0.0)
                i = rng.choice(spec.items, p=p / p.sum())
            seen[i] = True
            users.append(u)
            items.append(i)
            times.append(t)
    return np.asarray(users), np.asarray(items), np.asarray(times)


def test_the_batched_generator_draws_the_worlds_distribution():
    """``make_world`` draws a block of users' events together; a plain per-user, per-event generator on the same
    layout must give the same distribution: of items over three time windows (shift, launches and a burst inside
    them), and of the items of the users' k-th events (a user never sees an item twice, so later events move to
    less appealing items). Two-sample chi-square tests at p > 1e-3 each; a wrong focus or exclusion fails them
    (checked with a focus of 0.75 in place of 0.85: p < 1e-6). 50 items in 4 topics: two topics have 12 items, two
    have 13, so the generator's padding of the smaller topics is in play."""
    from scipy.stats import chi2_contingency

    spec = WorldSpec(users=3000, items=50, topics=4, events_per_user=12, horizon=10.0, seed=5, bursts=2,
                     burst_time=0.55, burst_width=0.05, burst_share=0.3, new_item_share=0.2)
    log = make_world(spec)
    _, ref_item, ref_time = _reference_events(spec, seed=99)
    order = np.lexsort((log.timestamp, log.user))
    rank = np.tile(np.arange(spec.events_per_user), spec.users)
    groups = {
        "time": (np.digitize(log.timestamp, [3.0, 5.5, 8.0]), np.digitize(ref_time, [3.0, 5.5, 8.0])),
        "rank": (np.empty_like(rank), rank // 3),
    }
    groups["rank"][0][order] = rank // 3
    for name, (ours, theirs) in groups.items():
        for g in np.unique(theirs):
            table = np.stack([np.bincount(log.item[ours == g], minlength=spec.items),
                              np.bincount(ref_item[theirs == g], minlength=spec.items)])
            table = table[:, table.sum(axis=0) > 0]
            assert chi2_contingency(table).pvalue > 1e-3, (name, g)
