"""Freshness metrics (DESIGN.md, "Freshness, defined"), as pure functions over per-round series.

Rounds are 1-based positions in the series. A value that never happens within the run is
``None`` (right-censored), never a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def windowed_rate(hits: Sequence[float], n: Sequence[float], window: int) -> list[float | None]:
    """Sliding-window HR: ``sum(hits[r-w+1..r]) / sum(n[r-w+1..r])`` for each round (None if no events)."""
    if window < 1:
        raise ValueError("The window should be at least one round.")
    if len(hits) != len(n):
        raise ValueError("hits and n need one value per round each.")
    h = np.concatenate([[0.0], np.cumsum(np.asarray(hits, float))])
    c = np.concatenate([[0.0], np.cumsum(np.asarray(n, float))])
    out: list[float | None] = []
    for r in range(1, len(hits) + 1):
        lo = max(0, r - window)
        den = c[r] - c[lo]
        out.append(float((h[r] - h[lo]) / den) if den > 0 else None)
    return out


def adaptation_lag(series: Sequence[float | None], reference: Sequence[float | None], drift_round: int,
                   tolerance: float = 0.1) -> int | None:
    """Rounds after ``drift_round`` until ``series`` is back within ``tolerance`` of ``reference``.

    Both are per-round windowed HR@K (the reference: the non-private, every-round run). The lag is
    the smallest ``t >= 0`` with ``series[d+t] >= (1 - tolerance) * reference[d+t]``; rounds where
    either value is missing are skipped. None if it never recovers within the run.
    """
    if len(series) != len(reference):
        raise ValueError("series and reference need one value per round each.")
    if not 1 <= drift_round <= len(series):
        raise ValueError(f"The drift round {drift_round} lies outside the run's rounds 1..{len(series)}.")
    for r in range(drift_round, len(series) + 1):
        s, ref = series[r - 1], reference[r - 1]
        if s is None or ref is None:
            continue
        if s >= (1.0 - tolerance) * ref:
            return r - drift_round
    return None


def uptake_rounds(launch_round: int, share_in_topk: Sequence[float | None], threshold: float = 0.5) -> int | None:
    """Rounds from an item's launch until it is in the top-K of its future users.

    ``share_in_topk[r-1]`` is, at round ``r``, the share of the users who go on to interact with the
    item whose top-K (from the served model) contains it. Uptake is the first ``r >= launch_round``
    with share ``>= threshold``, as ``r - launch_round``; None if it never gets there.
    """
    if not 0 < threshold <= 1:
        raise ValueError("The uptake threshold should lie in (0, 1].")
    for r in range(max(1, launch_round), len(share_in_topk) + 1):
        s = share_in_topk[r - 1]
        if s is not None and s >= threshold:
            return r - launch_round
    return None


def staleness(reflected: Sequence[bool]) -> list[int | None]:
    """Age in rounds of the newest event window reflected in the model served at each round.

    ``reflected[r-1]`` says whether round ``r``'s update included events of its own window. The
    model served in round ``r`` is the one published at the end of round ``r - 1``; its staleness is
    ``r - w`` where ``w`` is the newest window it reflects (None before any).
    """
    out: list[int | None] = []
    newest = None
    for r in range(1, len(reflected) + 1):
        out.append(None if newest is None else r - newest)
        if reflected[r - 1]:
            newest = r
    return out
