"""The typed event schema and the columnar event log every loader and world produces."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Kinds of behaviour events, stored as small integer codes in :class:`EventLog`.
KINDS: tuple[str, ...] = ("rating", "click", "view", "purchase", "event")


class DataError(ValueError):
    """A user-supplied data file or row is malformed; the message names the place."""


@dataclass(frozen=True)
class Event:
    """One behaviour event of one user on one item.

    ``user`` and ``item`` are dense ids (``0..n-1``) once an :class:`EventLog` holds them.
    ``timestamp`` is in seconds (or abstract time steps for the synthetic world).
    """

    user: int
    item: int
    timestamp: float
    kind: str = "event"
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"Unknown event kind {self.kind!r}; expected one of {', '.join(KINDS)}.")


@dataclass(frozen=True)
class EventLog:
    """Events in columns, sorted by timestamp (stable), with dense user and item ids.

    Attributes
    ----------
    user, item : int64 arrays, shape (n,)
        Dense ids in ``[0, n_users)`` and ``[0, n_items)``.
    timestamp : float64 array, shape (n,)
    weight : float32 array, shape (n,)
    kind : int8 array, shape (n,)
        Index into :data:`KINDS`.
    n_users, n_items : int
    user_ids, item_ids : arrays of the original ids (``user_ids[dense] == original``).
    source : str
        Where the events came from (a path or ``"synthetic(...)"``).
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    weight: np.ndarray
    kind: np.ndarray
    n_users: int
    n_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def __post_init__(self) -> None:
        n = self.user.shape[0]
        for name in ("item", "timestamp", "weight", "kind"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"EventLog column {name!r} has shape {getattr(self, name).shape}, expected ({n},).")
        if n and (np.any(np.diff(self.timestamp) < 0)):
            raise ValueError("EventLog must be sorted by timestamp.")

    def events(self) -> list[Event]:
        """The events as :class:`Event` objects (for small logs and tests)."""
        return [
            Event(int(u), int(i), float(t), KINDS[int(k)], float(w))
            for u, i, t, k, w in zip(self.user, self.item, self.timestamp, self.kind, self.weight, strict=False)
        ]

    @classmethod
    def from_arrays(
        cls,
        user: np.ndarray,
        item: np.ndarray,
        timestamp: np.ndarray,
        weight: np.ndarray | None = None,
        kind: np.ndarray | None = None,
        *,
        n_items: int | None = None,
        source: str = "",
        meta: dict | None = None,
    ) -> EventLog:
        """Build a log from raw ids: remaps ids densely (in order of first appearance in time) and sorts.

        Items are remapped over the ids that occur; pass ``n_items`` only when ids are already
        dense (``0..n_items-1``) and must be kept as they are (the synthetic world does this).
        """
        user = np.asarray(user)
        item = np.asarray(item)
        ts = np.asarray(timestamp, dtype=np.float64)
        n = ts.shape[0]
        w = np.ones(n, np.float32) if weight is None else np.asarray(weight, np.float32)
        k = np.full(n, KINDS.index("event"), np.int8) if kind is None else np.asarray(kind, np.int8)
        order = np.argsort(ts, kind="stable")
        user, item, ts, w, k = user[order], item[order], ts[order], w[order], k[order]
        user_ids, u_first = np.unique(user, return_index=True)
        # dense ids in order of first appearance, so ids are stable under appending later events
        u_rank = np.empty(len(user_ids), np.int64)
        u_rank[np.argsort(u_first, kind="stable")] = np.arange(len(user_ids))
        u_dense = u_rank[np.searchsorted(user_ids, user)]
        u_orig = user_ids[np.argsort(u_first, kind="stable")]
        if n_items is None:
            item_ids, i_first = np.unique(item, return_index=True)
            i_rank = np.empty(len(item_ids), np.int64)
            i_rank[np.argsort(i_first, kind="stable")] = np.arange(len(item_ids))
            i_dense = i_rank[np.searchsorted(item_ids, item)]
            i_orig = item_ids[np.argsort(i_first, kind="stable")]
            n_items = len(item_ids)
        else:
            i_dense = item.astype(np.int64)
            i_orig = np.arange(n_items)
        return cls(
            user=u_dense.astype(np.int64),
            item=i_dense.astype(np.int64),
            timestamp=ts,
            weight=w,
            kind=k,
            n_users=len(user_ids),
            n_items=int(n_items),
            user_ids=u_orig,
            item_ids=i_orig,
            source=source,
            meta=dict(meta or {}),
        )
