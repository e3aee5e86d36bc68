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
    """Rounds after ``drift_round`` until ``series`` is back within ``tolerance`` of ``reference``, to stay.

    Both are per-round windowed HR@K (the reference: the non-private, every-round run). A round is
    *within* when ``series[r] >= (1 - tolerance) * reference[r]``. The lag is ``t - drift_round`` for
    the first round ``t >= drift_round`` from which every later round is within: a model that never
    falls behind has lag 0, and one that looks level only because the reference dipped too, then
    falls behind as the reference recovers, has not adapted. Rounds where either value is missing
    are skipped. None (right-censored) if it is not within at the last round.
    """
    if len(series) != len(reference):
        raise ValueError("series and reference need one value per round each.")
    if not 1 <= drift_round <= len(series):
        raise ValueError(f"The drift round {drift_round} lies outside the run's rounds 1..{len(series)}.")
    lag = None
    for r in range(drift_round, len(series) + 1):
        s, ref = series[r - 1], reference[r - 1]
        if s is None or ref is None:
            continue
        if s >= (1.0 - tolerance) * ref:
            if lag is None:
                lag = r - drift_round
        else:
            lag = None
    return lag


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


_TRACKED: dict[int, tuple[object, np.ndarray, dict[str, list[int]]]] = {}


def tracked_items(stream, min_users: int = 5) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Items whose uptake a run measures, with the round each one starts to matter.

    Returns ``(start, groups)``: ``start[i]`` is item ``i``'s start round (0 = not tracked) and
    ``groups`` names them: ``"new"`` items first seen after round 1 (the round of the first event
    is the launch round; at least ``min_users`` events in all), and ``"burst"``, the synthetic
    world's trending items, which start two widths before the burst's peak. Where the world records
    which items launch mid-stream, ``"new"`` holds those only, and ``"late"`` the items there from the
    start that nobody happened to use in round 1 (tail items, not new ones).
    """
    hit = _TRACKED.get(id(stream))
    if hit is not None and hit[0] is stream:
        return hit[1], hit[2]
    launch = stream.launch_round
    counts = np.bincount(stream.log.item, minlength=stream.log.n_items)
    start = np.where((launch >= 2) & (counts >= min_users), launch, 0)
    groups = {"new": np.flatnonzero(start).tolist(), "burst": []}
    truth = stream.log.meta.get("world") or {}
    if "new_items" in truth:
        launched = set(int(i) for i in truth["new_items"])
        groups["late"] = [i for i in groups["new"] if i not in launched]
        groups["new"] = [i for i in groups["new"] if i in launched]
    if truth.get("burst_items"):
        b = stream.round_at(truth["burst_time"] - 2 * truth["burst_width"])
        start[truth["burst_items"]] = b
        groups["burst"] = sorted(int(i) for i in truth["burst_items"])
        burst = set(groups["burst"])
        for name in [n for n in ("new", "late") if n in groups]:
            groups[name] = [i for i in groups[name] if i not in burst]
    _TRACKED[id(stream)] = (stream, start, groups)
    return start, groups


def uptake_summary(start: dict[int, int], shares: dict[int, list[float | None]], threshold: float = 0.5) -> dict:
    """Per-item uptake (see :func:`uptake_rounds`) and its summary over a group of items.

    ``shares[i]`` is item ``i``'s per-round share of probed future users with it in their top-K
    (None where no such user was probed). The median counts never-taken-up items as infinitely
    late, so it is None when half or more never get there (right-censored).
    """
    per = {i: uptake_rounds(start[i], shares.get(i, []), threshold) for i in start}
    got = [v for v in per.values() if v is not None]
    n = len(per)
    ranked = sorted(got) + [None] * (n - len(got))
    median = None
    if n and len(got) > n / 2:
        median = float(np.median([float("inf") if v is None else v for v in ranked]))
    peak = [max((x for x in shares.get(i, []) if x is not None), default=0.0) for i in start]
    return {"items": n, "taken_up": len(got), "rate": len(got) / n if n else None, "median_rounds": median,
            "mean_rounds_taken_up": float(np.mean(got)) if got else None, "threshold": threshold,
            "peak_share_median": float(np.median(peak)) if peak else None,
            "per_item": {str(i): v for i, v in sorted(per.items())}}
