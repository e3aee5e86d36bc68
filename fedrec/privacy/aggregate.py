"""Event-level DP with the noise added once, on the server, to the cohort's sparse item-row sum.

Mechanism (in the style of DP-AdaFEST, Ghazi et al., NeurIPS 2023, "Sparsity-Preserving
Differentially Private Training of Large Embedding Models", with FedSubAvg's per-row averaging,
Ding et al., 2021, "Federated Submodel Averaging"). In one round every device Poisson-samples
each of its events with rate ``q``, clips each event's gradient (item-table and own user-vector
coordinates together) to L2 norm ``C`` and releases

* the item rows of ``-lr * sum of clipped gradients`` (sparse ``(ids, rows)``; the model's other global
  parameters, if any, dense: :class:`fedrec.aggregation.AggregateGaussian` noises them alike), and
* per-row event counts: +1 on the row of each sampled event's *positive* item only.

The server (:func:`noisy_rows`) sums both over the cohort, draws noisy counts
``c~ = c + N(0, z_c^2)`` for *every* item row, selects the rows with ``c~ > threshold * z_c``,
adds ``N(0, (z_g * lr * C)^2)`` to each coordinate of the selected rows' summed update and divides
each selected row by a normaliser: its own noisy count clamped to >= 1 (``row_average``) or
``max(sum of the selected rows' noisy counts, 1)``. Rows not selected are left unchanged.

Sensitivity. Adding or removing one event changes the gradient sum by at most ``lr * C`` in L2
(one clipped gradient; its user-vector part is noised on the device and is not released here)
and the count vector by at most 1 in L2 (one +1). Scale the joint vector as
``(grad_sum / (z_g lr C), counts / z_c) * z_eff``: the noise becomes ``N(0, z_eff^2 I)`` and one
event moves it by at most ``z_eff * sqrt(1/z_g^2 + 1/z_c^2) = 1``. So the release is ONE Gaussian
mechanism with noise multiplier ``z_eff`` (``1/z_eff^2 = 1/z_g^2 + 1/z_c^2``), accounted as one
Poisson-subsampled Gaussian step at rate ``q`` for every exposure of an event.
:func:`split` divides a budget ``z_eff`` between the two parts.

Selection is post-processing: it reads only the noisy counts. Drawing gradient noise only for the
selected rows has the same distribution as noising every row and then dropping the others (the
noise is independent per coordinate), so the sparse release is a post-processing of the dense
joint Gaussian release; so is every normaliser, built from noisy counts only, never from a
realised count in the clear. With no device replying, the release is still made: noisy counts
still select some rows, which carry pure noise, as the accountant assumes.

Trust model. The server sees each device's clipped sums and counts: it is a *trusted aggregator*
and only its output is protected. Under SecAgg+ (``noised=True``) the devices add the noise
themselves as distributed shares, the server sees only the noisy sum, and this function only
selects and normalises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

Sparse = tuple[np.ndarray, np.ndarray]

#: a Gaussian vector's norm exceeds ``std * (sqrt(dims) + NORM_SIGMAS)`` with probability at most
#: ``exp(-NORM_SIGMAS^2 / 2)`` (about 1.5e-8): the margin :func:`events_floor` leaves the noise
NORM_SIGMAS = 6.0


@dataclass(frozen=True)
class Split:
    """Noise multipliers of the two parts of the joint release.

    ``grad``: of the item-row gradient sum (std ``grad * lr * C``); ``count``: of the per-row event
    counts (std ``count``, the counts' sensitivity being 1).
    """

    grad: float
    count: float

    def __post_init__(self) -> None:
        if not (0 < self.grad < math.inf and 0 < self.count < math.inf):  # NaN fails too
            raise ValueError("Both noise multipliers of a split should be positive, finite values.")


def split(z_eff: float, count_share: float) -> Split:
    """Divide the budget of one Gaussian mechanism with multiplier ``z_eff`` between the two parts.

    ``1/z_c^2 = s / z_eff^2`` and ``1/z_g^2 = (1 - s) / z_eff^2`` with ``s = count_share``, so that
    ``1/z_g^2 + 1/z_c^2 = 1/z_eff^2`` (:func:`effective` is the inverse).
    """
    if not 0 < z_eff < math.inf:
        raise ValueError("The effective noise multiplier should be a positive, finite value.")
    if not 0 < count_share < 1:
        raise ValueError("The count share should lie strictly between 0 and 1.")
    return Split(grad=z_eff / math.sqrt(1 - count_share), count=z_eff / math.sqrt(count_share))


def effective(split: Split) -> float:
    """The noise multiplier ``z_eff`` of the joint mechanism: ``1/z_eff^2 = 1/z_g^2 + 1/z_c^2``."""
    return 1.0 / math.sqrt(1.0 / split.grad**2 + 1.0 / split.count**2)


def _check(n_items: int, width: int, sums: Sequence[Sparse], counts: Sequence[Sparse], sensitivity: float,
           noised: bool) -> None:
    """Reject malformed replies at the edge, naming the device (its index in ``sums``)."""
    if n_items < 1 or width < 1:
        raise ValueError("The number of items and the row width should be positive.")
    if not 0 < sensitivity < math.inf:
        raise ValueError("The sensitivity (lr * clip) should be a positive, finite value.")
    if len(sums) != len(counts):
        raise ValueError(f"Got {len(sums)} row sums but {len(counts)} count vectors; one pair per device.")
    for d, ((ids, rows), (cids, cnt)) in enumerate(zip(sums, counts, strict=True)):
        for name, i, v, shape in (("rows", ids, rows, (len(ids), width)), ("counts", cids, cnt, (len(cids),))):
            if i.ndim != 1 or not np.issubdtype(i.dtype, np.integer) or v.shape != shape:
                raise ValueError(f"Device {d}: {name} should have 1-d integer ids and values of shape {shape}.")
            if len(i) and (i.min() < 0 or i.max() >= n_items):
                raise ValueError(f"Device {d}: a {name} id lies outside [0, {n_items}).")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"Device {d}: {name} hold a non-finite value.")
        if noised:
            continue  # noise shares break both bounds below; SecAgg+ checks its inputs itself
        if np.any(cnt < 0):
            raise ValueError(f"Device {d}: an event count is negative.")
        # m sampled events add m to the counts and at most m clipped gradients (lr*C each) to the rows
        norm = float(np.sqrt(np.sum(np.square(rows, dtype=np.float64))))
        if norm > sensitivity * float(np.sum(cnt, dtype=np.float64)) * (1 + 1e-3) + 1e-6:  # fp16 on the wire
            raise ValueError(f"Device {d}: its row sum (norm {norm:.4g}) exceeds its event count times lr*clip.")


def events_floor(norm: torch.Tensor | float, dims: int, sensitivity: float, noise_std: float) -> torch.Tensor:
    """The fewest events a noisy sum of clipped gradients of L2 ``norm`` (over ``dims`` coordinates) can hold.

    Each event adds at most ``sensitivity`` to the sum's norm and the noise, ``N(0, noise_std^2)`` on each
    coordinate, at most ``noise_std * (sqrt(dims) + NORM_SIGMAS)`` but with probability about 1.5e-8. A count
    below this floor is a lie (or that rare noise): under SecAgg+ no device's counts could be checked, and
    dividing a sum by a count too small for it would multiply one device's lie by the events of every other.
    Post-processing of the noisy sum: it costs no privacy.
    """
    margin = noise_std * (math.sqrt(dims) + NORM_SIGMAS)
    return (torch.as_tensor(norm, dtype=torch.float64) - margin) / sensitivity


def noisy_counts(n_items: int, counts: Sequence[Sparse], *, std: float, generator: torch.Generator,
                 noised: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The devices' counts summed into a dense vector, and that vector plus ``N(0, std^2)`` per row.

    Returns ``(summed, noisy)``, float64 of shape ``(n_items,)`` on the CPU. ``summed`` holds the
    true counts unless ``noised``: a server-side value, never to be published. With ``noised`` the
    sum already carries the noise and ``noisy`` is ``summed``; nothing is drawn.
    """
    summed = torch.zeros(n_items, dtype=torch.float64)
    for ids, cnt in counts:
        # copies: a reply decoded from the wire may be a read-only buffer, which torch warns about
        summed.index_add_(0, torch.from_numpy(np.array(ids, np.int64)), torch.from_numpy(np.array(cnt, np.float64)))
    if noised:
        return summed, summed
    return summed, summed + torch.randn(n_items, generator=generator, dtype=torch.float64) * std


def _floored(counts: torch.Tensor, rows: torch.Tensor, sensitivity: float, noise_std: float) -> tuple[torch.Tensor, int]:
    """Each selected row's noisy count raised to :func:`events_floor` of its noisy row sum, and how many were."""
    floor = events_floor(rows.norm(dim=1), rows.shape[1], sensitivity, noise_std)
    return torch.maximum(counts, floor), int((floor > counts).sum())


def _selected_sum(n_items: int, width: int, sums: Sequence[Sparse], selected: torch.Tensor) -> torch.Tensor:
    """The cohort's summed rows at ``selected`` only, float64 ``(len(selected), width)``.

    A dense position map (O(n_items)) drops unselected rows as each device is added, so no
    ``n_items x width`` table is ever built.
    """
    pos = np.full(n_items, -1, dtype=np.int64)
    pos[selected.numpy()] = np.arange(len(selected))
    out = torch.zeros((len(selected), width), dtype=torch.float64)
    for ids, rows in sums:
        p = pos[np.asarray(ids, np.int64)]
        keep = p >= 0
        out.index_add_(0, torch.from_numpy(p[keep]), torch.from_numpy(np.asarray(rows, np.float64)[keep]))
    return out


def noisy_rows(n_items: int, width: int, sums: Sequence[Sparse], counts: Sequence[Sparse], *, sensitivity: float,
               split: Split, threshold: float, row_average: bool, generator: torch.Generator,
               device: torch.device | str = "cpu", noised: bool = False,
               total: float | None = None, bound_by_counts: bool = True,
               share_excess: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sum the devices' sparse rows and counts, noise both, select rows by noisy count, normalise.

    ``total``: a public normaliser used instead of the selected rows' noisy total when rows are not averaged on
    their own (user level: the expected cohort size). ``bound_by_counts = False``: a device's rows are not
    bounded by its counts (user level: its whole delta's clip was checked on arrival).

    ``noised`` (SecAgg+): the counts were summed unseen, so each selected row's noisy count is raised to at
    least :func:`events_floor` of its row (``share_excess``: the most the shares' variance can exceed the
    full noise's, ``1 / (1 - dropout tolerance)``); a lying count then cannot inflate its row.

    ``sums[d] = (ids int64 (k,), rows float32 (k, width))`` and ``counts[d] = (ids int64 (j,),
    counts (j,))`` come from device ``d``; ``sensitivity = lr * C``. Noise is drawn on the CPU from
    ``generator`` in float64 (counts first, then rows; same seed, same result), then moved.

    Returns
    -------
    ids : torch.Tensor
        int64 ``(m,)``, the selected rows (``c~ > threshold * split.count``), ascending, on ``device``.
    rows : torch.Tensor
        float32 ``(m, width)`` on ``device``: (summed rows + noise) / normaliser.
    diagnostics : dict
        ``rows_selected``; ``normaliser`` (the global one, or the median of the selected rows' own;
        NaN when none is selected); ``noisy_total`` (the selected rows' noisy counts summed, at least 1: the
        events the round heard of, what a parameter that is no item row is divided by); ``noise_std`` (gradient noise std / that normaliser);
        ``grad_noise_std``; ``count_noise_std``; and, unless ``noised``,
        ``rows_true_positive_server_only``: selected rows whose TRUE count is > 0. It depends on
        true counts, so it is not DP: keep it on the server, never publish it.
    """
    _check(n_items, width, sums, counts, sensitivity, noised or not bound_by_counts)
    if not math.isfinite(threshold):
        raise ValueError("The selection threshold should be a finite value.")
    summed, noisy = noisy_counts(n_items, counts, std=split.count, generator=generator, noised=noised)
    selected = torch.nonzero(noisy > threshold * split.count).flatten()
    rows = _selected_sum(n_items, width, sums, selected)
    grad_std = split.grad * sensitivity
    if not noised:
        rows += torch.randn(rows.shape, generator=generator, dtype=torch.float64) * grad_std
    chosen, floored = noisy[selected], 0
    if noised:
        chosen, floored = _floored(chosen, rows, sensitivity, grad_std * math.sqrt(share_excess))
    # the selected rows' noisy counts: their sum over all n_items rows would carry n_items count noises
    noisy_total = max(float(chosen.sum()), 1.0)
    if row_average:
        norm = chosen.clamp(min=1.0)
        rows /= norm[:, None]
        normaliser = float(norm.median()) if len(norm) else math.nan
    else:
        normaliser = total if total is not None else noisy_total
        rows /= normaliser
    diag: dict = {"rows_selected": len(selected), "normaliser": normaliser, "noise_std": grad_std / normaliser,
                  "grad_noise_std": grad_std, "count_noise_std": split.count, "noisy_total": noisy_total,
                  "rows_floored": floored}
    if not noised:
        diag["rows_true_positive_server_only"] = int((summed[selected] > 0).sum())
    return selected.to(device), rows.to(device=device, dtype=torch.float32), diag
