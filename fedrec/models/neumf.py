"""Neural matrix factorisation (He et al., WWW 2017): a GMF tower and an MLP tower, user parts local."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..itemgraph import contexts
from .base import RecModel, ridge_users, seeded_linear


class NeuMF(RecModel):
    """Score ``s(u, i) = w^T [p_u^G * q_i^G ; MLP([p_u^M ; q_i^M])] + b + b_i``.

    Parameters
    ----------
    n_items, dim : int
        The item table ``item.weight`` has shape ``(n_items, 2 * dim + 1)``: the GMF half ``[:dim]``,
        the MLP half ``[dim:2 dim]`` and the item bias ``b_i`` (last column; it carries popularity). The MLP is ``2 dim -> dim -> dim // 2`` (ReLU), the output layer
        ``dim + dim // 2 -> 1``. Item table, MLP and output layer are global.
    The device's own embedding ``user.weight`` (shape ``(1, 2 * dim)``, same halves) is local. Each
    forward looks up each table once (Opacus ghost clipping needs that).
    """

    global_names = ("item.weight", "mlp1.weight", "mlp1.bias", "mlp2.weight", "mlp2.bias", "out.weight", "out.bias")
    local_names = ("user.weight",)
    max_grad_norm = 10.0  #: chosen on the held-out world seed 3 (docs/robustness.md)

    def __init__(self, n_items: int, dim: int, *, generator: torch.Generator | None = None,
                 init_scale: float = 0.1) -> None:
        super().__init__()
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.n_items, self.dim, self.init_scale = n_items, dim, init_scale
        h = max(dim // 2, 1)
        self.item = nn.Embedding(n_items, 2 * dim + 1)
        self.user = nn.Embedding(1, 2 * dim)
        self.mlp1 = seeded_linear(2 * dim, dim, g)
        self.mlp2 = seeded_linear(dim, h, g)
        self.out = seeded_linear(dim + h, 1, g)
        with torch.no_grad():
            self.item.weight.normal_(0.0, init_scale, generator=g)
            self.item.weight[:, 2 * dim] = 0.0
            self.user.weight.normal_(0.0, init_scale, generator=g)
        self.check_partition()

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"user.weight": torch.randn(1, 2 * self.dim, generator=generator) * self.init_scale}

    def _score(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``p``: user embeddings (..., 2 dim) broadcastable to the item rows ``q`` (..., 2 dim + 1) -> scores (...)."""
        d = self.dim
        bias = q[..., 2 * d]
        q = q[..., : 2 * d]
        p = p.expand_as(q)
        gmf = p[..., :d] * q[..., :d]
        z = torch.relu(self.mlp1(torch.cat([p[..., d:], q[..., d:]], dim=-1)))
        z = torch.relu(self.mlp2(z))
        return self.out(torch.cat([gmf, z], dim=-1)).squeeze(-1) + bias

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``user``: (B,) zeros (the device's own row); ``items``: (B, m) -> scores (B, m)."""
        return self._score(self.user(user).unsqueeze(1), self.item(items))

    @torch.no_grad()
    def score_all(self, history: np.ndarray | None = None, kinds: np.ndarray | None = None) -> torch.Tensor:
        return self._score(self.user.weight[0].unsqueeze(0), self.item.weight)

    def item_repr(self) -> torch.Tensor:
        return self.item.weight.detach()[:, : 2 * self.dim]

    @torch.no_grad()
    def score_events(self, history: np.ndarray, new: np.ndarray, vector: np.ndarray | None, *,
                     context: int, kinds: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`RecModel.score_events` with the GMF half of the user embedding refit per event in closed
        form: the GMF tower is linear in it, with features ``w_out[:dim] * q^G``
        (:func:`~fedrec.models.base.ridge_users` over the ``context`` newest items, anchored at ``vector``);
        the MLP half stays at the round-start state."""
        d = self.dim
        ctx, w = contexts(history, new, context)
        u0 = torch.as_tensor(vector) if vector is not None and len(vector) else self.user.weight[0]
        feats = self.item.weight[:, :d] * self.out.weight[0, :d]
        users = torch.cat([ridge_users(feats, ctx, w, u0[:d]), u0[d:].expand(len(ctx), d)], dim=1)
        table = self.item.weight.unsqueeze(0)
        rows = [self._score(users[a:a + 32].unsqueeze(1), table.expand(len(users[a:a + 32]), -1, -1))
                for a in range(0, len(users), 32)]
        return torch.cat(rows)
