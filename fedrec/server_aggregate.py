"""Server-side aggregation of device deltas, on the torch device (CUDA when present).

A delta maps each global parameter name to either a dense array of the parameter's shape or,
for tables sent sparsely, a pair ``(ids, rows)``: the touched row ids (int64, unique) and their
delta rows. Sparse rows are summed with one ``index_add_`` per table on the torch device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Dense = np.ndarray
Sparse = tuple[np.ndarray, np.ndarray]
Delta = Mapping[str, "Dense | Sparse"]

#: The item tables of every model in :mod:`fedrec.models`: the ``item`` embedding, one row per item
#: (SASRec adds its start and padding rows). Recognised by name, not by shape: a hidden layer or a
#: position table can have as many rows as the catalogue, and its rows are not items. Per-row
#: averaging (:func:`fedrec.aggregation.per_row_mean`, and the noisy-count form under DP) applies to these tables only.
ITEM_TABLES: tuple[str, ...] = ("item.weight",)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"Config key 'device' asks for {name!r} but CUDA is not available on this machine.")
    return torch.device(name)


def node_device(name: str = "auto") -> torch.device:
    """Where a node runs its devices' batched arithmetic: on CUDA only when ``device`` names it and the node sees a
    GPU (a Ray actor given none sees none); ``auto`` keeps it on the CPU, where it ran as fast as on an H200, the
    node's per-device work being on the CPU either way (docs/performance.md, ``benchmarks/bench_cuda.py``)."""
    if not (name.startswith("cuda") and torch.cuda.is_available()):
        return torch.device("cpu")
    dev = torch.device(name)  # a Ray actor sees its share of the GPUs renumbered from 0: an index past them is its own
    return dev if dev.index is None or dev.index < torch.cuda.device_count() else torch.device("cuda")


def scaled(v: Dense | Sparse, scale: float) -> Dense | Sparse:
    """One table of a delta (dense, or sparse rows) times ``scale``, in new float32 arrays."""
    if isinstance(v, tuple):
        return v[0], np.asarray(scaled(v[1], scale))
    return v.astype(np.float32, copy=True) if scale == 1.0 else (v * scale).astype(np.float32)


def delta_nbytes(delta: Delta) -> int:
    """Bytes a delta carries (ids and rows for sparse tables)."""
    return sum(v[0].nbytes + v[1].nbytes if isinstance(v, tuple) else v.nbytes for v in delta.values())


def _sparse_keys(deltas: Sequence[Delta], coefs: Sequence[float]) -> set[str]:
    """Parameters that every contributing delta sends sparsely (they can be summed compactly)."""
    live = [d for d, c in zip(deltas, coefs, strict=True) if c != 0]
    if not live:
        return set()
    return {k for k in live[0] if all(isinstance(d.get(k), tuple) for d in live)}


def _compact_sum(deltas: Sequence[Delta], coefs: Sequence[float], key: str,
                 like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the sparse ``key`` rows of every delta: (unique row ids, their summed rows) on ``like``'s device."""
    live = [(d[key], c) for d, c in zip(deltas, coefs, strict=True) if c != 0]
    idx = torch.from_numpy(np.concatenate([np.asarray(i, dtype=np.int64) for (i, _), _ in live]))
    val = torch.from_numpy(np.concatenate([np.asarray(v, dtype=np.float32) for (_, v), _ in live]))
    scale = torch.from_numpy(np.repeat(np.asarray([c for _, c in live], dtype=np.float32), [len(i) for (i, _), _ in live]))
    val.mul_(scale.view(-1, *([1] * (val.dim() - 1))))
    idx = idx.to(like.device, non_blocking=True)
    val = val.to(like.device, like.dtype, non_blocking=True)
    uids, inv = torch.unique(idx, return_inverse=True)
    out = torch.zeros((len(uids), *like.shape[1:]), dtype=like.dtype, device=like.device)
    return uids, out.index_add_(0, inv, val)


def weighted_sum(
    like: Mapping[str, torch.Tensor], deltas: Sequence[Delta], coefs: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``sum_k coefs[k] * deltas[k]`` as dense tensors on the device of ``like``.

    Dense arrays are moved once each and accumulated in place (a running sum: memory stays at one
    extra model copy); sparse rows are summed compactly and scattered once. Entries with
    coefficient 0 are skipped.
    """
    acc = {k: torch.zeros_like(v) for k, v in like.items()}
    compact = _sparse_keys(deltas, coefs)
    for k in compact:
        uids, rows = _compact_sum(deltas, coefs, k, acc[k])
        acc[k].index_add_(0, uids, rows)
    for d, c in zip(deltas, coefs, strict=True):
        if c == 0:
            continue
        for k, v in d.items():
            if k in compact:
                continue
            a = acc[k]
            if isinstance(v, tuple):
                a.index_add_(0, torch.as_tensor(v[0], dtype=torch.int64).to(a.device),
                             torch.as_tensor(v[1]).to(a.device, a.dtype).mul(float(c)))
            else:
                a.add_(torch.as_tensor(v).to(a.device, non_blocking=True), alpha=float(c))
    return acc


def server_aggregate(
    global_state: dict[str, torch.Tensor],
    deltas: Sequence[Delta],
    weights: Sequence[float],
    *,
    server_lr: float = 1.0,
    inplace: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Weighted average of the deltas, applied with a server learning rate.

    ``global_state`` tensors live on the aggregation device; deltas (dense or sparse, see the
    module docstring) are moved there once. A parameter that every delta sends sparsely is summed
    over the touched rows only, so its cost follows the bytes received, not the table size.
    With ``inplace`` the global tensors are updated where they are (the server owns them);
    otherwise new tensors are returned and the inputs are left untouched.
    Returns the next global state and diagnostics (``weight``, ``update_norm``). Devices with
    weight 0 are ignored; with no weight at all the model is unchanged.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(deltas) != len(w):
        raise ValueError("server_aggregate needs one weight per delta.")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError("Aggregation weights must be finite and non-negative.")
    total = float(w.sum())
    if total <= 0:
        same = global_state if inplace else {k: v.clone() for k, v in global_state.items()}
        return same, {"weight": 0.0, "update_norm": 0.0}
    coefs = (w / total).tolist()
    compact = _sparse_keys(deltas, coefs)
    sq = 0.0
    nxt = {}
    for k, g in global_state.items():
        out = g if inplace else g.clone()
        if k in compact:
            uids, rows = _compact_sum(deltas, coefs, k, g)
        else:
            rows = weighted_sum({k: g}, [{k: d[k]} for d in deltas], coefs)[k]
            uids = None
        sq += float(rows.double().pow(2).sum().item())
        if uids is None:
            out.add_(rows, alpha=server_lr)
        else:
            out.index_add_(0, uids, rows.mul_(server_lr))  # index_add_'s alpha= path is ~8x slower
        nxt[k] = out
    return nxt, {"weight": total, "update_norm": float(np.sqrt(sq)) * abs(server_lr)}
