"""Matrix factorisation with sampled negatives: the item table is global, the user vector local."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import RecModel


class MF(RecModel):
    """Score ``s(u, i) = <p_u, q_i> + b_i``.

    Parameters
    ----------
    n_items, dim : int
        The item table ``item.weight`` has shape ``(n_items, dim + 1)``; its last column is the
        item bias. It is the only global parameter.
    The device's own vector ``user.weight`` (shape ``(1, dim)``) is local. Each forward does one
    lookup per table (Opacus ghost clipping needs that).
    """

    global_names = ("item.weight",)
    local_names = ("user.weight",)

    def __init__(self, n_items: int, dim: int, *, generator: torch.Generator | None = None,
                 init_scale: float = 0.1) -> None:
        super().__init__()
        self.n_items, self.dim, self.init_scale = n_items, dim, init_scale
        self.item = nn.Embedding(n_items, dim + 1)
        self.user = nn.Embedding(1, dim)
        with torch.no_grad():
            self.item.weight.normal_(0.0, init_scale, generator=generator)
            self.item.weight[:, dim] = 0.0
            self.user.weight.normal_(0.0, init_scale, generator=generator)
        self.check_partition()

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"user.weight": torch.randn(1, self.dim, generator=generator) * self.init_scale}

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``user``: (B,) zeros (the device's own row); ``items``: (B, m) -> scores (B, m)."""
        e = self.item(items)  # (B, m, dim+1)
        p = self.user(user)  # (B, dim)
        return (e[..., : self.dim] * p.unsqueeze(1)).sum(-1) + e[..., self.dim]

    @torch.no_grad()
    def score_all(self, history: np.ndarray | None = None) -> torch.Tensor:
        w = self.item.weight
        return w[:, : self.dim] @ self.user.weight[0] + w[:, self.dim]

    def item_repr(self) -> torch.Tensor:
        return self.item.weight.detach()[:, : self.dim]


def bpr_event_grads(item: torch.Tensor, user: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each event's gradient of the BPR loss of MF, in closed form (no autograd).

    ``item`` (n_items, d+1), ``user`` (d,), ``idx`` (b, 1 + K): each event's positive item, then its
    K negatives. With the loss ``l = mean_k softplus(-(s_pos - s_neg_k))`` and ``c_k = dl/d(s_pos -
    s_neg_k) = -sigmoid(-(s_pos - s_neg_k)) / K``, the gradient on row ``idx[b, j]`` is
    ``a[b, j] * [user, 1]`` (``a = [sum_k c_k, -c_1, ..., -c_K]``; a row that appears twice in an
    event gets both terms) and on the user vector ``gu[b] = sum_k c_k (q_pos - q_neg_k)[:d]``.
    Returns ``(a, gu)`` of shapes (b, 1 + K) and (b, d).
    """
    d = user.shape[0]
    e = item[idx]  # (b, 1 + K, d + 1)
    s = e[..., :d] @ user + e[..., d]
    c = -torch.sigmoid(-(s[:, :1] - s[:, 1:])) / (idx.shape[1] - 1)
    a = torch.cat([c.sum(1, keepdim=True), -c], dim=1)
    gu = (c.unsqueeze(2) * (e[:, :1, :d] - e[:, 1:, :d])).sum(1)
    return a, gu


def row_grads(a: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
    """The item-row gradients ``a[b, j] * [user, 1]``, flattened to (b * (1 + K), d + 1)."""
    return a.reshape(-1, 1) * torch.cat([user, user.new_ones(1)]).unsqueeze(0)


@torch.no_grad()
def sgd_mf(item: torch.Tensor, user: torch.Tensor, items: torch.Tensor, *, steps: int, sample_rate: float,
           lr_item: float, lr_user: float, generator: torch.Generator) -> None:
    """Non-private local SGD on ``item`` and ``user`` (1, d) in place: each step takes every event of
    ``items`` (n, 1 + K) with probability ``sample_rate`` and descends the batch-mean BPR loss (what
    autograd with ``BPRLoss()`` and ``torch.optim.SGD`` computes; an empty step is skipped). Only the
    rows in the batch are touched, however large the table."""
    n = items.shape[0]
    for _ in range(steps):
        take = torch.rand(n, generator=generator) < sample_rate
        if not take.any():
            continue
        idx = items[take]
        u = user[0]
        a, gu = bpr_event_grads(item, u, idx)
        g_rows = row_grads(a, u)
        item.index_add_(0, idx.reshape(-1), g_rows, alpha=-lr_item / len(idx))
        u.add_(gu.sum(0), alpha=-lr_user / len(idx))


@torch.no_grad()
def fit_user_mf(item: torch.Tensor, user: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor, *, steps: int,
                negatives: int, lr: float, generator: torch.Generator) -> None:
    """Full-batch steps on the user vector alone (items frozen), fresh negatives from ``cand`` each step."""
    u = user[0]
    d = u.shape[0]
    e_pos = item[pos]  # (n, d+1): the table is frozen here, so the positives are looked up once
    for _ in range(steps):
        neg = cand[torch.randint(0, len(cand), (len(pos), negatives), generator=generator)]
        e_neg = item[neg]  # (n, K, d+1)
        diff = (e_pos[:, None, :d] - e_neg[..., :d])  # (n, K, d)
        c = -torch.sigmoid(-(diff @ u + (e_pos[:, None, d] - e_neg[..., d]))) / negatives  # (n, K)
        u.add_((c.unsqueeze(2) * diff).sum((0, 1)), alpha=-lr / len(pos))
