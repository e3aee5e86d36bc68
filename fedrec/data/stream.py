"""Cut an event log into rounds by event time, and give each device its own events."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .events import EventLog


@dataclass(frozen=True)
class RoundStream:
    """Events cut into ``rounds`` windows by event time; one device per user.

    ``split="count"`` puts boundaries at timestamp quantiles (about equal events per round;
    ties never straddle a boundary); ``split="time"`` uses equal time windows.
    ``round_of[e]`` is the 1-based round whose window holds event ``e``.
    """

    log: EventLog
    rounds: int
    round_of: np.ndarray
    by_user: tuple[np.ndarray, ...]  #: event indices of each user, in time order

    @classmethod
    def build(cls, log: EventLog, rounds: int, split: str = "count") -> RoundStream:
        n = len(log)
        ts = log.timestamp
        if n == 0:
            round_of = np.zeros(0, np.int64)
        elif split == "count":
            cuts = ts[np.minimum((np.arange(1, rounds) * n) // rounds, n - 1)]
            round_of = 1 + np.searchsorted(cuts, ts, side="right")
        elif split == "time":
            lo, hi = float(ts[0]), float(ts[-1])
            width = (hi - lo) / rounds or 1.0
            round_of = 1 + np.minimum(((ts - lo) / width).astype(np.int64), rounds - 1)
        else:
            raise ValueError(f"Unknown round split {split!r}; expected 'count' or 'time'.")
        order = np.argsort(log.user, kind="stable")  # stable: time order kept inside a user
        starts = np.searchsorted(log.user[order], np.arange(log.n_users + 1))
        return cls._of(log, rounds, round_of.astype(np.int64), order, np.diff(starts))

    @classmethod
    def _of(cls, log: EventLog, rounds: int, round_of: np.ndarray, order: np.ndarray, sizes: np.ndarray
            ) -> RoundStream:
        """The stream whose users' events are ``order`` cut into runs of ``sizes`` (user by user)."""
        starts = np.concatenate([[0], np.cumsum(sizes)])
        by_user = tuple(order[starts[u]:starts[u + 1]] for u in range(len(sizes)))
        return cls(log=log, rounds=rounds, round_of=round_of, by_user=by_user)

    def __reduce__(self) -> tuple:
        """Pickled as a few arrays (the run's baselines get it in a process of their own), not one per user."""
        sizes = np.fromiter((len(b) for b in self.by_user), np.int64, len(self.by_user))
        return RoundStream._of, (self.log, self.rounds, self.round_of, self.user_order, sizes)

    @property
    def n_devices(self) -> int:
        return self.log.n_users

    def device_events(self, device: int, upto_round: int) -> np.ndarray:
        """Indices of the device's events in rounds ``<= upto_round``, in time order."""
        idx = self.by_user[device]
        return idx[self.round_of[idx] <= upto_round]

    @cached_property
    def user_order(self) -> np.ndarray:
        """Every event's index, by user, each user's in time order (``by_user`` end to end)."""
        return np.concatenate(self.by_user) if self.by_user else np.zeros(0, np.int64)

    @cached_property
    def by_user_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The user, item and round of every event in :attr:`user_order` (made once: a baseline reads them every
        round)."""
        o = self.user_order
        return self.log.user[o], self.log.item[o].astype(np.int64), self.round_of[o]

    @cached_property
    def launch_round(self) -> np.ndarray:
        """Per item, the round that holds its first event (0 for items never seen)."""
        first = np.zeros(self.log.n_items, np.int64)
        order = np.argsort(self.round_of, kind="stable")[::-1]  # later rounds first: earliest written last
        first[self.log.item[order]] = self.round_of[order]
        return first

    def round_at(self, t: float) -> int:
        """The round whose window holds event time ``t`` (clamped to 1..rounds)."""
        ts = self.log.timestamp
        if len(ts) == 0:
            return 1
        i = int(np.searchsorted(ts, t, side="left"))
        return int(self.round_of[min(i, len(ts) - 1)])

    def round_end_time(self, r: int) -> float:
        """Timestamp of the last event in rounds ``<= r`` (for staleness in event time)."""
        m = self.round_of <= r
        return float(self.log.timestamp[m][-1]) if m.any() else float("nan")
