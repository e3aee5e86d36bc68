"""A poisoning attack for robustness experiments (simulation only): fake devices push one item.

A share ``attackers`` of the devices is fake. Each fake device trains on its own events with
every item replaced by the *target* (as if its user clicked the target over and over) and
scales its delta by ``attack-boost`` (model-replacement boosting; 1 = plain data poisoning). Its
deltas are otherwise well formed, so validation passes them: only aggregation can resist them.
Fake devices are not served (they are not users). The metric is the target's **exposure**: the
share of benign served devices whose top-10 holds the target, per round.
"""

from __future__ import annotations

import numpy as np

from .server_aggregate import scaled


def device_subset(n_devices: int, share: float, seed: int, salt: int) -> frozenset[int]:
    """``round(share * n_devices)`` devices drawn from the run's seed (``salt`` names the purpose)."""
    k = int(round(share * n_devices))
    if k <= 0:
        return frozenset()
    rng = np.random.default_rng([seed, salt])
    return frozenset(int(d) for d in rng.choice(n_devices, size=min(k, n_devices), replace=False))


def attacker_set(n_devices: int, share: float, seed: int) -> frozenset[int]:
    """The fake devices: ``round(share * n_devices)`` of them, drawn from the run's seed."""
    return device_subset(n_devices, share, seed, 4242)


def attack_target(items: np.ndarray, rounds: np.ndarray, n_items: int) -> int:
    """The target: among items with events in round 1, the least used one over the whole stream
    (a real campaign pushes an item nobody wants; ties go to the lower id)."""
    counts = np.bincount(items, minlength=n_items)
    early = np.zeros(n_items, bool)
    early[items[rounds == 1]] = True
    cand = np.flatnonzero(early & (counts > 0))
    if len(cand) == 0:
        cand = np.arange(n_items)
    return int(cand[np.argmin(counts[cand])])


def poisoned(items: np.ndarray, target: int) -> np.ndarray:
    """A fake device's events: every item replaced by the target (its user "clicked" it over and over)."""
    return np.full(len(items), target, dtype=items.dtype)


def boosted(delta: dict, boost: float) -> dict:
    """A fake device's delta (dense tables, or sparse rows) scaled by ``boost`` (model-replacement boosting; 1
    leaves it as it is)."""
    if boost == 1.0:
        return delta
    return {k: scaled(v, boost) for k, v in delta.items()}
