"""Matrix factorisation with sampled negatives: the item table is global, the user vector local."""

from __future__ import annotations

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
    def score_all(self) -> torch.Tensor:
        w = self.item.weight
        return w[:, : self.dim] @ self.user.weight[0] + w[:, self.dim]


def build_model(name: str, n_items: int, dim: int, *, seed: int = 0, init_scale: float = 0.1) -> RecModel:
    """Construct a model by name with a seeded initialisation."""
    g = torch.Generator().manual_seed(seed)
    if name == "mf":
        return MF(n_items, dim, generator=g, init_scale=init_scale)
    raise ValueError(f"Unknown model {name!r}; expected one of: mf.")
