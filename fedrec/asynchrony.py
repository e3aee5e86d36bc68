"""Stragglers and the async buffered mode (FedBuff), as small pure pieces.

A round *closes* once ``min-reply-share`` of the sampled devices has replied or its deadline
(``round-timeout``) passes. A reply that comes after its round closed is **late**:

* in synchronous rounds (``async-buffer = 0``) it is dropped, as a device that dropped out;
* in the async buffered mode (``async-buffer = K``, FedBuff, Nguyen et al., AISTATS 2022) every
  update, on time or late, enters a buffer tagged with the global *version* it was computed
  from; once at least K updates wait, the server applies them all to the newest version, each
  weighted by its event count times ``1 / sqrt(1 + staleness)`` (staleness = versions published
  since its base), normalised by the plain event counts (a stale update counts for less, it is
  not renormalised away). An update more than ``max-staleness`` versions old is dropped.

A device with an update in flight is *busy*: it is not sampled again until the update arrived.

In simulation, ``slow-devices`` makes a seeded share of the devices slow: each update of a slow
device arrives 1..``slow-rounds`` rounds after it was asked for (the node holds the finished
update and hands it in with a later reply), so late arrivals are reproducible and do not depend
on the machine's speed. Real stragglers (a deployed device that answers after the deadline) go
through the same server path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .attack import device_subset


def staleness_weight(staleness: int) -> float:
    """FedBuff's discount of an update computed ``staleness`` versions ago: ``1 / sqrt(1 + s)``."""
    if staleness < 0:
        raise ValueError(f"staleness must be 0 or more, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def slow_set(n_devices: int, share: float, seed: int) -> frozenset[int]:
    """The slow devices of a simulation: ``round(share * n_devices)`` of them, drawn from the seed."""
    return device_subset(n_devices, share, seed, 5151)


def lateness(device: int, round_: int, slow_rounds: int, seed: int) -> int:
    """Rounds after round ``round_`` at which a slow device's update arrives: 1..``slow_rounds``."""
    return int(np.random.default_rng([seed, 5152, device, round_]).integers(1, slow_rounds + 1))


def scale_delta(delta: dict, factor: float) -> dict:
    """``factor * delta`` for dense arrays and sparse ``(ids, rows)`` tables alike."""
    if factor == 1.0:
        return delta
    return {k: (v[0], (v[1] * factor).astype(np.float32)) if isinstance(v, tuple) else (v * factor).astype(np.float32)
            for k, v in delta.items()}


@dataclass
class Update:
    """One device's validated update waiting in the buffer."""

    device: int
    delta: dict
    weight: float  #: event count (the FedAvg weight)
    base_version: int  #: the global version the device trained from
    new_events: int = 0
    base_round: int = 0


@dataclass
class Buffer:
    """FedBuff's server buffer: updates wait until at least ``size`` are there."""

    size: int
    max_staleness: int
    items: list[Update] = field(default_factory=list)

    def add(self, update: Update, version: int) -> bool:
        """Buffer ``update``; False (and not buffered) when it is already too stale at ``version``."""
        if version - update.base_version > self.max_staleness:
            return False
        self.items.append(update)
        return True

    def ready(self) -> bool:
        return len(self.items) >= self.size

    def state(self) -> tuple[list[dict], dict[str, np.ndarray]]:
        """What a checkpoint keeps: each update's fields (JSON) and its delta's arrays."""
        meta, arrays = [], {}
        for j, u in enumerate(self.items):
            meta.append({"device": u.device, "weight": u.weight, "base_version": u.base_version,
                         "new_events": u.new_events, "base_round": u.base_round, "keys": sorted(u.delta)})
            for k, v in u.delta.items():
                if isinstance(v, tuple):
                    arrays[f"{j}:{k}:ids"], arrays[f"{j}:{k}:rows"] = np.asarray(v[0]), np.asarray(v[1])
                else:
                    arrays[f"{j}:{k}"] = np.asarray(v)
        return meta, arrays

    def load(self, meta: list[dict], arrays: dict[str, np.ndarray]) -> None:
        """Refill the buffer from :meth:`state`'s output (a resumed server loses no buffered update)."""
        self.items = []
        for j, m in enumerate(meta):
            delta = {k: (arrays[f"{j}:{k}:ids"], arrays[f"{j}:{k}:rows"]) if f"{j}:{k}:ids" in arrays
                     else arrays[f"{j}:{k}"] for k in m["keys"]}
            self.items.append(Update(int(m["device"]), delta, float(m["weight"]), int(m["base_version"]),
                                     int(m["new_events"]), int(m["base_round"])))

    def take(self, version: int) -> tuple[list[Update], list[int]]:
        """Empty the buffer: its updates and their stalenesses at ``version`` (all within the bound,
        since the version only moves when the buffer is emptied)."""
        keep, self.items = self.items, []
        return keep, [version - u.base_version for u in keep]


def discounted(updates: Sequence[Update], stalenesses: Sequence[int]) -> tuple[list[dict], list[float]]:
    """Deltas scaled by their staleness weight and the plain event-count weights to normalise them by."""
    return ([scale_delta(u.delta, staleness_weight(s)) for u, s in zip(updates, stalenesses, strict=True)],
            [u.weight for u in updates])
