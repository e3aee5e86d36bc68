"""User-level DP (DP-FedAvg, McMahan et al. 2018): clip each device's whole delta, noise the sum.

Sensitivity argument: every device contributes at most one delta of norm <= ``clip`` per round,
so adding or removing one user changes the sum by at most ``clip``; Gaussian noise of std
``noise_multiplier * clip`` on the sum, with devices Poisson-sampled at rate ``q``, is the
subsampled Gaussian mechanism that Opacus's accountants compose. The sum is divided by the
*expected* cohort size ``q * population`` (a public constant), never by the realised count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedrec.server_aggregate import scaled, weighted_sum

#: a delta whose L2 norm is more than this many times the norm of the model it updates (floored at 1) is no step of
#: it: a device whose local steps diverged does not send it (:func:`fedrec.client_update.check_converged`), and the
#: server refuses one where nothing else bounds a delta (no DP; docs/robustness.md)
OUTSIZED = 100.0


def outsized_bound(model: dict) -> float:
    """The largest delta norm a step of ``model`` (arrays or tensors by name) may have: :data:`OUTSIZED` times its
    norm, floored at 1."""
    return OUTSIZED * max(delta_norm({k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                                      for k, v in model.items()}), 1.0)


def delta_norm(delta) -> float:
    """L2 norm of all arrays of a delta taken together (float64 accumulation).

    A sparse table ``(ids, rows)`` counts by its rows (ids are unique, so that is its norm).
    """
    return float(np.sqrt(sum(_squares(v[1] if isinstance(v, tuple) else v) for v in delta.values())))


def _squares(a) -> float:
    """The sum of squares of ``a``'s values, accumulated in float64 without a float64 copy of the array (every
    device's delta passes here: its clip under user-level DP, its own divergence check, the server's checks)."""
    r = np.ravel(np.asarray(a))
    return float(np.einsum("i,i->", r, r, dtype=np.float64))


def clip_delta(delta: dict, clip: float) -> tuple[dict, float, bool]:
    """Scale ``delta`` (all global parameters together; a table may be sparse rows ``(ids, rows)``) to L2 norm
    <= ``clip``.

    Returns the clipped delta, the norm before clipping and whether it was clipped.
    """
    if not clip > 0:  # NaN fails too
        raise ValueError("The clipping norm should be a positive value.")
    norm = delta_norm(delta)
    scale = 1.0 if norm <= clip else clip / norm
    return {k: scaled(v, scale) for k, v in delta.items()}, norm, not norm <= clip


def poisson_cohort(population: Sequence[int], rate: float, rng: np.random.Generator) -> list[int]:
    """Each device joins independently with probability ``rate`` (the accountant's assumption)."""
    take = rng.random(len(population)) < rate
    return [int(d) for d, t in zip(population, take, strict=True) if t]


def noisy_mean(
    global_state: dict[str, torch.Tensor],
    deltas: Sequence[dict[str, np.ndarray]],
    *,
    clip: float,
    noise_multiplier: float,
    expected_devices: float,
    generator: torch.Generator,
    presummed: int | None = None,
    check: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``(sum of deltas + N(0, (z*clip)^2 I)) / expected_devices`` on the device of ``global_state``.

    Every delta must already be clipped to ``clip`` (the server checks: a larger one raises).
    With ``presummed=n`` (secure aggregation) ``deltas`` is one sum of ``n`` clipped deltas that
    the server cannot see apart; only its norm can be checked against ``n * clip``.
    Noise is drawn on the CPU from ``generator`` (reproducible), then moved.
    Returns the mean update and diagnostics (noise std of the mean, signal norm, SNR). ``check = False``:
    the deltas are parts of deltas whose whole norm was checked already (:class:`fedrec.aggregation.UserRows`).
    """
    if expected_devices <= 0:
        raise ValueError("The expected number of devices should be a positive value.")
    for d in deltas if check else []:
        norm = delta_norm(d)
        bound = clip * (1 + 1e-4) if presummed is None else presummed * clip * (1 + 1e-3) + 1e-3
        if norm > bound:
            raise ValueError(f"A delta of norm {norm:.4g} exceeds the clip {clip}; user-level DP needs clipped deltas.")
    acc = weighted_sum(global_state, deltas, [1.0] * len(deltas))
    signal = math.sqrt(float(sum(a.double().pow(2).sum() for a in acc.values())))
    std = noise_multiplier * clip
    dim = 0
    for a in acc.values():
        noise = torch.randn(a.shape, generator=generator, dtype=torch.float64) * std
        a.add_(noise.to(a.device, a.dtype))
        a.div_(expected_devices)
        dim += a.numel()
    expected_noise_norm = std * float(np.sqrt(dim))
    return acc, {"noise_std": std / expected_devices, "signal_norm": signal / expected_devices,
                 "snr": signal / expected_noise_norm if expected_noise_norm > 0 else float("inf")}
