"""Pure accounting functions over Opacus's accountants (PRV by default, RDP selectable).

A history is a list of ``(noise_multiplier, sample_rate, steps)`` records, exactly as Opacus
keeps it. Identical consecutive records are merged first (composition does not care about
order), which keeps ε cheap to compute for long streams.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from functools import lru_cache

Record = tuple[float, float, int]


def compress(history: Iterable[Record]) -> tuple[Record, ...]:
    """Merge records with the same (noise multiplier, sample rate), summing their steps."""
    merged: dict[tuple[float, float], int] = {}
    for z, q, n in history:
        if n <= 0:
            continue
        merged[(float(z), float(q))] = merged.get((float(z), float(q)), 0) + int(n)
    return tuple((z, q, n) for (z, q), n in sorted(merged.items()))


def epsilon(history: Iterable[Record], delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` for the composition of all records (0 for an empty history).

    A record with noise multiplier 0 releases without noise: ε is infinite.
    """
    h = compress(history)
    if not h:
        return 0.0
    if any(z <= 0 for z, _, _ in h):
        return math.inf
    return _epsilon_cached(h, float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon_cached(h: tuple[Record, ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant  # imported on use: a device process without DP never needs it

    acc = create_accountant(accountant)
    acc.history = [(z, q, n) for z, q, n in h]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "prv") -> float:
    """Smallest noise multiplier whose composition over ``steps`` stays within ``target_epsilon``."""
    if target_epsilon <= 0:
        raise ValueError("The target epsilon should be a positive value.")
    lo, hi = 0.05, 1.0
    while epsilon([(hi, sample_rate, steps)], delta, accountant) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"No noise multiplier reaches epsilon={target_epsilon} in {steps} steps.")
    for _ in range(40):
        mid = (lo + hi) / 2
        if epsilon([(mid, sample_rate, steps)], delta, accountant) > target_epsilon:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3 * hi:
            break
    return hi
