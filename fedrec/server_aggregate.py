"""Server-side aggregation of device deltas, on the torch device (CUDA when present)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"Config key 'device' asks for {name!r} but CUDA is not available on this machine.")
    return torch.device(name)


def server_aggregate(
    global_state: dict[str, torch.Tensor],
    deltas: Sequence[dict[str, np.ndarray]],
    weights: Sequence[float],
    *,
    server_lr: float = 1.0,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Weighted average of the deltas, applied with a server learning rate.

    ``global_state`` tensors live on the aggregation device; each delta is moved there once and
    accumulated in place (a running sum, no stacking), so memory stays at two model copies.
    Returns the next global state and diagnostics (``weight``, ``update_norm``).
    Devices with weight 0 are ignored; with no weight at all the model is unchanged.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(deltas) != len(w):
        raise ValueError("server_aggregate needs one weight per delta.")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("Aggregation weights must be finite and non-negative.")
    total = float(w.sum())
    if total <= 0:
        return {k: v.clone() for k, v in global_state.items()}, {"weight": 0.0, "update_norm": 0.0}
    acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
    for d, wk in zip(deltas, w, strict=False):
        if wk == 0:
            continue
        for k, v in d.items():
            acc[k].add_(torch.as_tensor(v).to(acc[k].device, non_blocking=True), alpha=float(wk / total))
    nxt = {k: global_state[k] + server_lr * acc[k] for k in global_state}
    norm = float(torch.sqrt(sum((server_lr * a).pow(2).sum() for a in acc.values())).item())
    return nxt, {"weight": total, "update_norm": norm}
