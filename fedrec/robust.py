"""Robust aggregation: norm bounding, and a coordinate-wise trimmed mean or median of the deltas.

Both statistics are taken per coordinate of every item row over **all** the round's devices; a
device that did not touch a row (it did not send it, or its dense row is zero) counts as zero
there, which is what it proposed for that row. So a row moves only when enough devices push it:
the median needs more than half of the cohort, the trimmed mean (``trim`` from each end) trims a
push by fewer than ``trim * devices``. That is the defence against a few fake devices pushing one
item, and also the price: long-tail items that few real devices touch in a round move less.
Without trimming the trimmed mean is exactly the unweighted mean. Robust aggregators ignore the
event-count weights (a weight is what a poisoner would inflate).

Not under user-level DP: the noise there is calibrated to the sensitivity of the *sum* of
clipped deltas; a median has another sensitivity, so the config refuses the combination.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .server_aggregate import Delta


def bound_norm(delta: Delta, bound: float) -> tuple[dict, bool]:
    """Scale a delta (dense arrays or sparse ``(ids, rows)``) to L2 norm <= ``bound``; was it scaled?"""
    sq = 0.0
    for v in delta.values():
        rows = v[1] if isinstance(v, tuple) else v
        sq += float(np.square(np.asarray(rows, np.float64)).sum())
    norm = float(np.sqrt(sq))
    if norm <= bound:
        return dict(delta), False
    s = bound / norm
    return {k: (v[0], (np.asarray(v[1]) * s).astype(np.float32)) if isinstance(v, tuple)
            else (np.asarray(v) * s).astype(np.float32) for k, v in delta.items()}, True


def bound_rows(delta: Delta, bound: float) -> tuple[dict, int]:
    """Scale every row of every table (dense or sparse ``(ids, rows)``; 1-D tensors per entry) to
    L2 norm <= ``bound``; how many rows were scaled. One device can then move any single item's
    row by at most ``bound`` however it concentrates its update, while the many small rows of an
    ordinary update pass untouched."""
    out, scaled = {}, 0
    for k, v in delta.items():
        ids, rows = v if isinstance(v, tuple) else (None, v)
        rows = np.asarray(rows, np.float32)
        norms = np.abs(rows) if rows.ndim == 1 else np.sqrt(np.square(rows, dtype=np.float64).sum(axis=1))
        over = norms > bound
        if over.any():
            rows = rows.copy()
            f = (bound / norms[over]).astype(np.float32)
            rows[over] *= f if rows.ndim == 1 else f[:, None]
            scaled += int(over.sum())
        out[k] = (ids, rows) if ids is not None else rows
    return out, scaled


def _stack(like: torch.Tensor, deltas: Sequence[Delta], key: str) -> torch.Tensor:
    """``(devices, *shape)``: each device's delta as a dense tensor (untouched rows are zero)."""
    out = torch.zeros((len(deltas), *like.shape), dtype=torch.float32)
    for j, d in enumerate(deltas):
        v = d[key]
        if isinstance(v, tuple):
            ids, rows = v
            if len(ids):
                out[j, torch.from_numpy(np.asarray(ids, np.int64))] = torch.from_numpy(np.asarray(rows, np.float32))
        else:
            out[j] = torch.from_numpy(np.asarray(v, np.float32))
    return out


def robust_mean(like: Mapping[str, torch.Tensor], deltas: Sequence[Delta], *, method: str,
                trim: float = 0.1) -> tuple[dict[str, torch.Tensor], dict[str, float | None]]:
    """The coordinate-wise median or trimmed mean of the deltas, on ``like``'s device."""
    if method not in ("trimmed-mean", "median"):
        raise ValueError(f"Unknown robust aggregator {method!r}; expected trimmed-mean or median.")
    if not 0 <= trim < 0.5:
        raise ValueError("The trimmed share must lie in [0, 0.5).")
    n = len(deltas)
    out: dict[str, torch.Tensor] = {}
    for key, ref in like.items():
        if n == 0:
            out[key] = torch.zeros_like(ref)
            continue
        srt, _ = torch.sort(_stack(ref, deltas, key), dim=0)
        if method == "median":
            est = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
        else:
            t = int(np.floor(trim * n))
            est = srt[t:n - t].mean(0)
        out[key] = est.to(ref.device, ref.dtype)
    trimmed = 2 * int(np.floor(trim * n)) if method == "trimmed-mean" else max(n - 2 + n % 2, 0)
    return out, {"robust_trimmed_share": trimmed / n if n else None}
