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
    """Generate the world's event log (dense ids; ``meta['world']`` holds the ground truth)."""
    rng = np.random.default_rng(spec.seed)
    layout = _draw_layout(spec, rng)
    users, items, times = [], [], []
    for u in range(spec.users):
        for t, i in _user_events(spec, layout, u, rng):
            users.append(u)
            items.append(i)
            times.append(t)
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
    def in_topic(self) -> np.ndarray:
        """``(topics, items)``: does each item belong to each topic."""
        return self.item_topic[None, :] == np.arange(int(self.item_topic.max()) + 1)[:, None]


APPEAL_CELLS = 1 << 16  #: item appeals computed at once for a user's next events (events x items)


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


def _user_events(spec: WorldSpec, w: _Layout, u: int, rng: np.random.Generator) -> list[tuple[float, int]]:
    """``(time, item)`` of each of user ``u``'s events, in time order; a user never sees an item twice."""
    V, T, H = spec.items, spec.topics, spec.horizon
    shift_time = spec.shift_time * H
    t_burst, w_burst = spec.burst_time * H, max(spec.burst_width * H, 1e-9)
    events = []
    ts = np.sort(rng.uniform(0, H, size=spec.events_per_user))
    seen = np.zeros(V, bool)
    chunk = max(1, APPEAL_CELLS // V)
    for e, t in enumerate(ts):
        if e % chunk == 0:  # the appeal of every item at the next events' times, a few at a time
            appeal, launched = _appeal(spec, w, ts[e:e + chunk])
        topic = w.new_topic[u] if t >= shift_time else w.main_topic[u]
        if rng.random() >= spec.focus:
            topic = rng.integers(0, T)
        avail = launched[e % chunk] & ~seen
        if len(w.burst_items) and rng.random() < spec.burst_share * np.exp(-0.5 * ((t - t_burst) / w_burst) ** 2):
            hot = w.burst_items[avail[w.burst_items]]
            if len(hot):  # a trending item, whatever the user's topic
                i = rng.choice(hot)
                seen[i] = True
                events.append((t, i))
                continue
        p = np.where(avail & w.in_topic[topic], appeal[e % chunk], 0.0)
        if p.sum() <= 0:
            p = np.where(avail, appeal[e % chunk], 0.0)
        i = _draw(rng, p / p.sum())
        seen[i] = True
        events.append((t, i))
    return events


def _appeal(spec: WorldSpec, w: _Layout, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each item's appeal at each of the times ``ts`` (its quality, boosted right after its launch) and whether it
    has launched by then: ``(len(ts), items)`` each."""
    age = ts[:, None] - w.launch[None, :]
    decay = max(spec.novelty_decay * spec.horizon, 1e-9)
    boost = 1.0 + spec.novelty_boost * np.exp(-np.maximum(age, 0) / decay) * (w.launch > 0)
    return w.quality * boost, age >= 0


def _draw(rng: np.random.Generator, p: np.ndarray) -> int:
    """``rng.choice(len(p), p=p)`` (the same draw from ``rng`` and the same item) without its checks of ``p``."""
    cdf = p.cumsum()
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def _event_log(spec: WorldSpec, w: _Layout, users: list, items: list, times: list) -> EventLog:
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
    u_arr = np.asarray(users, np.int64)
    i_arr = np.asarray(items, np.int64)
    t_arr = np.asarray(times, np.float64)
    order = np.argsort(t_arr, kind="stable")
    return EventLog(
        user=u_arr[order],
        item=i_arr[order],
        timestamp=t_arr[order],
        weight=np.ones(len(order), np.float32),
        kind=np.full(len(order), KINDS.index("click"), np.int8),
        n_users=U,
        n_items=V,
        user_ids=np.arange(U),
        item_ids=np.arange(V),
        source=f"synthetic(seed={spec.seed}, users={U}, items={V}, topics={T})",
        meta={"format": "synthetic", "world": truth},
    )
