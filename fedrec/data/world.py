"""A seeded synthetic world with ground-truth drift: the embedded default data.

Users hold latent interests over topics; items belong to topics and have a quality. At known
times a share of users shift their interest to another topic, new items launch mid-stream, and a
few existing items trend (a burst of interest from everyone that spikes, then fades).
Everything the generator decided is recorded in ``EventLog.meta["world"]`` so tests and
freshness metrics can compare what the model learned with what really happened.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from .events import KINDS, EventLog


@dataclass(frozen=True)
class WorldSpec:
    """Parameters of a synthetic world. Time runs over ``[0, horizon)``."""

    users: int = 400
    items: int = 600
    topics: int = 12
    events_per_user: int = 120
    horizon: float = 30.0
    seed: int = 0
    shift_share: float = 0.3  #: share of users whose interest shifts
    shift_time: float = 0.5  #: when, as a fraction of the horizon
    new_item_share: float = 0.1  #: share of items that launch mid-stream
    launch_window: tuple[float, float] = (0.3, 0.8)  #: launch times, as fractions of the horizon
    focus: float = 0.85  #: probability an event follows the user's main topic
    novelty_boost: float = 6.0  #: extra appeal of an item right after launch, decaying
    novelty_decay: float = 0.1  #: decay time of the boost, as a fraction of the horizon
    zipf: float = 1.0  #: item quality within a topic ~ 1 / rank**zipf
    bursts: int = 0  #: number of items that trend
    burst_time: float = 0.6  #: peak of the burst, as a fraction of the horizon
    burst_width: float = 0.06  #: its width (std of a Gaussian bump), as a fraction of the horizon
    burst_share: float = 0.25  #: at the peak, this share of all events goes to the trending items

    def __post_init__(self) -> None:
        if self.topics < 2:
            raise ValueError("A world needs at least 2 topics.")
        if self.items < 2 * self.topics:
            raise ValueError("A world needs at least 2 items per topic.")
        if not 0 <= self.shift_share <= 1 or not 0 <= self.new_item_share < 1:
            raise ValueError("shift_share must lie in [0, 1] and new_item_share in [0, 1).")
        if not 0 <= self.bursts <= self.items * (1 - self.new_item_share) / 2 or not 0 <= self.burst_share < 1:
            raise ValueError("bursts must be at most half the items launched at the start; burst_share in [0, 1).")
        if self.events_per_user >= self.items * (1 - self.new_item_share):
            raise ValueError("events_per_user must be below the number of items launched at the start.")


def make_world(spec: WorldSpec) -> EventLog:
    """Generate the world's event log (dense ids; ``meta['world']`` holds the ground truth). Users are drawn
    a block at a time (:func:`_block`), each block's events together, one event of every user of the block per step."""
    rng = np.random.default_rng(spec.seed)
    layout = _draw_layout(spec, rng)
    block = _block(spec)
    parts = [_block_events(spec, layout, np.arange(a, min(a + block, spec.users)), rng)
             for a in range(0, spec.users, block)]
    users, items, times = (np.concatenate([p[j] for p in parts]) for j in range(3))
    return _event_log(spec, layout, users, items, times)


@dataclass(frozen=True)
class _Layout:
    """What the generator draws before any event (the world's ground truth, with the spec)."""

    item_topic: np.ndarray
    quality: np.ndarray
    launch: np.ndarray  #: launch time of each item (0 for the items there from the start)
    new_items: np.ndarray
    main_topic: np.ndarray
    shifted: np.ndarray  #: bool per user: does the user's interest shift at ``shift_time``
    new_topic: np.ndarray
    burst_items: np.ndarray

    @functools.cached_property
    def members(self) -> np.ndarray:
        """``(topics, m)``: each topic's item ids, padded with -1 to the largest topic's size."""
        ids = [np.flatnonzero(self.item_topic == t) for t in range(int(self.item_topic.max()) + 1)]
        out = np.full((len(ids), max(len(i) for i in ids)), -1, np.int64)
        for t, row in enumerate(ids):
            out[t, :len(row)] = row
        return out


BLOCK = 4096  #: users whose events are drawn together, at most (fewer for catalogues above 4,096 items)


def _block(spec: WorldSpec) -> int:
    """Users drawn together: :data:`BLOCK`, or fewer so that a block's seen-items matrix stays at 16 M cells (a
    function of the spec alone: the world does not depend on the machine)."""
    return max(1, min(BLOCK, (1 << 24) // spec.items))


def _draw_layout(spec: WorldSpec, rng: np.random.Generator) -> _Layout:
    """Items (topic, quality, launch), users (topic, shift) and trending items, drawn in that order."""
    U, V, T, H = spec.users, spec.items, spec.topics, spec.horizon

    item_topic = rng.permutation(np.arange(V) % T)
    quality = np.empty(V)
    for t in range(T):
        members = np.flatnonzero(item_topic == t)
        quality[members] = 1.0 / (1.0 + rng.permutation(len(members))) ** spec.zipf
    launch = np.zeros(V)
    n_new = int(round(spec.new_item_share * V))
    new_items = rng.choice(V, size=n_new, replace=False)
    lo, hi = spec.launch_window
    launch[new_items] = rng.uniform(lo * H, hi * H, size=n_new)

    main_topic = rng.integers(0, T, size=U)
    shifted = rng.random(U) < spec.shift_share
    new_topic = main_topic.copy()
    offs = rng.integers(1, T, size=U)
    new_topic[shifted] = (main_topic[shifted] + offs[shifted]) % T

    old_items = np.setdiff1d(np.arange(V), new_items)
    burst_items = np.sort(rng.choice(old_items, size=spec.bursts, replace=False)) if spec.bursts else np.zeros(0, int)
    return _Layout(item_topic, quality, launch, new_items, main_topic, shifted, new_topic, burst_items)


def _block_events(spec: WorldSpec, w: _Layout, users: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(user, item, time)`` of every event of ``users``, each user's in time order; a user never sees an item
    twice. Each event: with the burst's probability at its time a trending item the user has not seen, whatever the
    user's topic; else an item of the user's topic at that time (another topic at random with probability
    ``1 - focus``), drawn by its appeal among the launched items the user has not seen (among all of them where the
    topic has none left)."""
    B, E, V = len(users), spec.events_per_user, spec.items
    ts = np.sort(rng.uniform(0, spec.horizon, size=(B, E)), axis=1)
    seen = np.zeros((B, V), bool)
    items = np.empty((B, E), np.int64)
    for e in range(E):
        t = ts[:, e]
        topic = np.where(t >= spec.shift_time * spec.horizon, w.new_topic[users], w.main_topic[users])
        off = rng.random(B) >= spec.focus
        topic[off] = rng.integers(0, spec.topics, size=int(off.sum()))
        pick = _burst_picks(spec, w, t, seen, rng)
        rest = np.flatnonzero(pick < 0)
        pick[rest] = _appeal_draw(spec, w, w.members[topic[rest]], t[rest], seen[rest], rng)
        items[:, e] = pick
        seen[np.arange(B), pick] = True
    return np.repeat(users, E), items.ravel(), ts.ravel()


def _burst_picks(spec: WorldSpec, w: _Layout, t: np.ndarray, seen: np.ndarray, rng: np.random.Generator
                 ) -> np.ndarray:
    """Per row, a trending item it has not seen, uniformly, where the burst takes this event; else -1."""
    pick = np.full(len(t), -1, np.int64)
    if not len(w.burst_items):
        return pick
    width = max(spec.burst_width * spec.horizon, 1e-9)
    taken = rng.random(len(t)) < spec.burst_share * np.exp(-0.5 * ((t - spec.burst_time * spec.horizon) / width) ** 2)
    free = taken[:, None] & ~seen[:, w.burst_items]
    rows = np.flatnonzero(free.any(axis=1))
    keys = np.where(free[rows], rng.random((len(rows), len(w.burst_items))), -1.0)
    pick[rows] = w.burst_items[keys.argmax(axis=1)]
    return pick


def _appeal_draw(spec: WorldSpec, w: _Layout, cand: np.ndarray, t: np.ndarray, seen: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """Per row, one of its candidate items (``cand``: ``(rows, m)`` ids, ``-1`` padding) by appeal at ``t`` among
    those launched and not ``seen``; rows with none left draw from every item instead."""
    rows = np.arange(len(t))[:, None]
    p = np.where(cand >= 0, _appeal(spec, w, cand, t[:, None]), 0.0) * ~seen[rows, cand]
    out = cand[rows[:, 0], _inverse_cdf(p, rng)]
    empty = np.flatnonzero(p.sum(axis=1) <= 0)
    if len(empty):
        every = np.broadcast_to(np.arange(spec.items), (len(empty), spec.items))
        p = _appeal(spec, w, every, t[empty, None]) * ~seen[empty]
        out[empty] = _inverse_cdf(p, rng)
    return out


def _appeal(spec: WorldSpec, w: _Layout, items: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The appeal of ``items`` at the times ``t`` (broadcast): its quality, boosted right after its launch; 0
    before it launches."""
    launch = w.launch[items]
    age = t - launch
    decay = max(spec.novelty_decay * spec.horizon, 1e-9)
    boost = 1.0 + spec.novelty_boost * np.exp(-np.maximum(age, 0) / decay) * (launch > 0)
    return np.where(age >= 0, w.quality[items] * boost, 0.0)


def _inverse_cdf(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per row of the weights ``p``, one column drawn in proportion to them (a column of positive weight; for a row
    of zeros, any column: the caller draws those rows again)."""
    cdf = p.cumsum(axis=1)
    u = rng.random(len(p)) * cdf[:, -1]
    last = p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)  # where u rounds up to the total, its column
    return np.minimum((cdf <= u[:, None]).sum(axis=1), last)


def _event_log(spec: WorldSpec, w: _Layout, users: np.ndarray, items: np.ndarray, times: np.ndarray) -> EventLog:
    """The events sorted by time, with the ground truth in ``meta['world']``."""
    U, V, T, H = spec.users, spec.items, spec.topics, spec.horizon
    truth = {
        "spec": asdict(spec),
        "item_topic": w.item_topic.tolist(),
        "launch_time": w.launch.tolist(),
        "new_items": sorted(int(i) for i in w.new_items),
        "main_topic": w.main_topic.tolist(),
        "shift_time": spec.shift_time * H,
        "shifted_users": np.flatnonzero(w.shifted).tolist(),
        "new_topic": w.new_topic.tolist(),
        "burst_items": w.burst_items.tolist(),
        "burst_time": spec.burst_time * H,
        "burst_width": max(spec.burst_width * H, 1e-9),
    }
    order = np.argsort(times, kind="stable")
    return EventLog(
        user=users[order],
        item=items[order],
        timestamp=times[order],
        weight=np.ones(len(order), np.float32),
        kind=np.full(len(order), KINDS.index("click"), np.int8),
        n_users=U,
        n_items=V,
        user_ids=np.arange(U),
        item_ids=np.arange(V),
        source=f"synthetic(seed={spec.seed}, users={U}, items={V}, topics={T})",
        meta={"format": "synthetic", "world": truth},
    )
