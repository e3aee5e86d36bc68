"""Robust aggregation: norm bounding, and a coordinate-wise trimmed mean or median per item row.

A device "contributes" to an item row when it sent that row (sparse delta) or the row is not
all zero (dense delta). For each row the robust statistic is taken over the contributors only,
then scaled by ``contributors / devices``: without trimming, the trimmed mean is then exactly the
unweighted mean of the deltas (rows a device did not touch count as zero), so the server
learning rate keeps its meaning. Robust aggregators ignore the event-count weights (a weight is
what a poisoner would inflate).

Not under user-level DP: the noise there is calibrated to the sensitivity of the *sum* of
clipped deltas; a median has another sensitivity, so the config refuses the combination.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .server_aggregate import Delta

METHODS = ("mean", "trimmed-mean", "median")


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


def _stack(like: torch.Tensor, deltas: Sequence[Delta], key: str) -> torch.Tensor:
    """``(devices, *shape)`` with NaN in every row a device did not contribute."""
    out = torch.full((len(deltas), *like.shape), float("nan"), dtype=torch.float32)
    for j, d in enumerate(deltas):
        v = d[key]
        if isinstance(v, tuple):
            ids, rows = v
            if len(ids):
                out[j, torch.from_numpy(np.asarray(ids, np.int64))] = torch.from_numpy(np.asarray(rows, np.float32))
        else:
            t = torch.from_numpy(np.asarray(v, np.float32))
            touched = t.reshape(t.shape[0], -1).ne(0).any(1) if t.dim() > 1 else t.ne(0)
            out[j, touched] = t[touched]
    return out


def robust_mean(like: Mapping[str, torch.Tensor], deltas: Sequence[Delta], *, method: str,
                trim: float = 0.1) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The per-row robust estimate of the mean update (see the module docstring), on ``like``'s device."""
    if method not in ("trimmed-mean", "median"):
        raise ValueError(f"Unknown robust aggregator {method!r}; expected trimmed-mean or median.")
    if not 0 <= trim < 0.5:
        raise ValueError("The trimmed share must lie in [0, 0.5).")
    n = len(deltas)
    out: dict[str, torch.Tensor] = {}
    trimmed_share = []
    for key, ref in like.items():
        if n == 0:
            out[key] = torch.zeros_like(ref)
            continue
        x = _stack(ref, deltas, key)
        k = (~torch.isnan(x)).sum(0)  # contributors per coordinate
        if method == "median":
            est = torch.nanmedian(x, dim=0).values
        else:
            srt, _ = torch.sort(x, dim=0)  # NaN sort last
            t = torch.floor(trim * k.to(torch.float32)).to(torch.long)
            pos = torch.arange(n).view(-1, *([1] * (x.dim() - 1)))
            keep = (pos >= t) & (pos < k - t)
            kept = keep.sum(0)
            est = torch.where(keep, srt.nan_to_num(0.0), torch.zeros(())).sum(0) / kept.clamp(min=1)
            trimmed_share.append(float((1 - kept.sum() / k.sum().clamp(min=1)).item()))
        est = torch.nan_to_num(est, nan=0.0) * (k.to(torch.float32) / n)
        out[key] = est.to(ref.device, ref.dtype)
    diag = {"robust_trimmed_share": float(np.mean(trimmed_share)) if trimmed_share else None}
    return out, diag
