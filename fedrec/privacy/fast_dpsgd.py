"""DP-SGD for the MF model in closed form, with lazily drawn noise: the same mechanism as Opacus's.

For ``s(u, i) = <p_u, q_i[:d]> + q_i[d]`` and the BPR loss ``l = mean_k softplus(-(s_pos - s_neg_k))``
an event's gradient is known in closed form: with ``c_k = -sigmoid(-(s_pos - s_neg_k)) / K`` the
positive row gets ``sum_k c_k [p_u, 1]``, negative row k gets ``-c_k [p_u, 1]`` and the user vector
``sum_k c_k (q_pos - q_neg_k)[:d]``. So each event's gradient norm, its clip factor
``min(1, C / (norm + 1e-6))`` and the clipped sum cost a few multiply-adds per event, exactly as
Opacus computes them (its ghost clipping only obtains the norms in a general way).

Each step adds ``N(0, (z C)^2)`` to every coordinate of the summed gradient of every trained
parameter, divides by the expected batch size ``q n`` and takes an SGD step, as Opacus's
``DPOptimizer`` does. The noise on an item row that no event of the step touched changes nothing
the step computes: the row is only *read* when a later step's batch holds it, or at the end,
when the delta is released. So each row keeps a count of the steps whose noise it has not yet
received, and gets their sum, one Gaussian of variance ``count * (z C)^2`` (the sum of that many
independent draws), just before it is read and at the end. The released delta has exactly the
distribution of the dense step-by-step mechanism, which the accountant analyses, at the cost of
one dense draw per update instead of one per step. The user vector (small) gets its noise every
step.

``tests/test_fast_dpsgd.py`` holds this against Opacus: with the noise off both give the same
parameters after several Poisson-sampled steps, and the noise has the variance the mechanism
prescribes, row by row.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.mf import bpr_event_grads, bpr_event_grads_np, row_grads


@torch.no_grad()
def dpsgd_mf(item: torch.Tensor, user: torch.Tensor, items: torch.Tensor, *, steps: int, sample_rate: float,
             lr_item: float, lr_user: float, clip: float, noise_multiplier: float,
             generator: torch.Generator) -> None:
    """``steps`` DP-SGD steps on ``item`` (n_items, d+1) and ``user`` (1, d), in place.

    ``items`` is (n, 1 + K): each event's positive item, then its K negatives. Each step takes every
    event independently with probability ``sample_rate`` (drawn as ``torch.rand(n) < q`` from
    ``generator``, the draws Opacus's path makes too); an empty step still adds its noise.
    """
    n, m = items.shape
    d = user.shape[1]
    eb = max(sample_rate * n, 1e-6)
    sigma = noise_multiplier * clip
    owed = torch.zeros(item.shape[0], dtype=torch.int64)  # steps of noise a row has not yet received
    done = 0  # steps taken so far
    for _ in range(steps):
        take = torch.rand(n, generator=generator) < sample_rate
        idx = items[take]
        if len(idx):
            rows = torch.unique(idx)
            if sigma > 0:
                _pay(item, rows, done - owed[rows], sigma * lr_item / eb, generator)
            owed[rows] = done
            u = user[0]
            a, gu = bpr_event_grads(item, u, idx)  # closed-form per-event gradients (models.mf)
            same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(a.dtype)  # a row twice in one event adds up
            item_sq = (u.dot(u) + 1.0) * torch.bmm(torch.bmm(a.unsqueeze(1), same), a.unsqueeze(2)).view(-1)
            f = (clip / (torch.sqrt(item_sq + (gu * gu).sum(1)) + 1e-6)).clamp(max=1.0)
            grad_rows = row_grads(f.unsqueeze(1) * a, u)  # the clipped events' row gradients, (b*m, d+1)
            gsum_u = (f.unsqueeze(1) * gu).sum(0)
            item.index_add_(0, idx.reshape(-1), grad_rows, alpha=-lr_item / eb)
        else:
            gsum_u = torch.zeros(d, dtype=user.dtype)
        if sigma > 0:
            gsum_u = gsum_u + sigma * torch.randn(d, generator=generator, dtype=user.dtype)
        user[0].add_(gsum_u, alpha=-lr_user / eb)
        done += 1
    if sigma > 0:  # the release: every row gets the noise it is still owed (one dense draw)
        _pay(item, None, done - owed, sigma * lr_item / eb, generator)


def _pay(item: torch.Tensor, rows: torch.Tensor | None, count: torch.Tensor, scale: float,
         generator: torch.Generator) -> None:
    """Add to ``item[rows]`` (all rows when None) the sum of ``count`` steps' noise, times ``-scale``."""
    if rows is not None:
        owed = count > 0
        rows, count = rows[owed], count[owed]
    n = item.shape[0] if rows is None else len(rows)
    if n == 0:
        return
    z = torch.empty(n, item.shape[1], dtype=item.dtype).normal_(generator=generator)
    z.mul_(count.to(item.dtype).sqrt_().mul_(-scale).unsqueeze(1))
    if rows is None:
        item.add_(z)
    else:
        item.index_add_(0, rows, z)



@torch.no_grad()
def clipped_step_mf(item: torch.Tensor, user: torch.Tensor, items: torch.Tensor, *, sample_rate: float,
                    lr_item: float, lr_user: float, clip: float, noise_multiplier: float,
                    generator: torch.Generator) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One step of event-level DP with the item noise left to the aggregate (:mod:`fedrec.privacy.aggregate`).

    Each event of ``items`` (n, 1 + K) is taken with probability ``sample_rate``; each taken event's
    gradient (its item rows and the user vector together, as in :func:`dpsgd_mf`) is clipped to ``clip``.
    The user vector steps at once, with its own noise ``N(0, (noise_multiplier * clip)^2)`` added here (it
    stays on the device but shapes later releases, so it must come from a DP step). The item table is not
    changed: the release is ``-lr_item`` times the sum of the clipped events' row gradients, as
    ``(row ids, rows)``, and the per-row counts of the taken events' positive items ``(ids, counts)``;
    the server adds the item noise once to the cohort's sum.
    """
    n, m = items.shape
    d = user.shape[1]
    take = (torch.rand(n, generator=generator) < sample_rate).numpy()
    idx = items.numpy()[take]
    u = user.numpy()[0]  # CPU tensors' memory: the step's arrays are small, so numpy's per-call cost is what counts
    if len(idx):
        a, gu = bpr_event_grads_np(item.numpy(), u, idx)
        # every row gradient is a scalar times [u, 1]: an event's item part has squared norm
        # (|u|^2 + 1) sum_jk a_j a_k [idx_j == idx_k] (a row twice in one event adds up)
        aa = np.where(idx[:, :, None] == idx[:, None, :], a[:, :, None] * a[:, None, :], 0.0).sum((1, 2))
        f = np.minimum(clip / (np.sqrt(aa * (u @ u + 1.0) + (gu * gu).sum(1)) + 1e-6), 1.0).astype(u.dtype)
        uniq, inv = np.unique(idx.reshape(-1), return_inverse=True)
        coef = np.bincount(inv.reshape(-1), weights=(f[:, None] * a).reshape(-1), minlength=len(uniq))
        ids = torch.from_numpy(uniq)
        rows = torch.from_numpy(np.outer(coef * -lr_item, np.append(u, np.ones(1, u.dtype))).astype(u.dtype))
        gsum_u = torch.from_numpy((f @ gu).astype(u.dtype))
        per_id = np.bincount(inv.reshape(len(idx), m)[:, 0], minlength=len(uniq))  # the positives, by row
        pos_ids, pos_counts = torch.from_numpy(uniq[per_id > 0]), torch.from_numpy(per_id[per_id > 0].astype(np.int64))
    else:
        gsum_u = torch.zeros(d, dtype=user.dtype)
        ids, rows = torch.zeros(0, dtype=torch.int64), torch.zeros(0, item.shape[1], dtype=item.dtype)
        pos_ids, pos_counts = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    if noise_multiplier > 0:
        gsum_u = gsum_u + noise_multiplier * clip * torch.randn(d, generator=generator, dtype=user.dtype)
    user[0].add_(gsum_u, alpha=-lr_user / max(sample_rate * n, 1e-6))
    return (ids, rows), (pos_ids, pos_counts)
