"""What every fedrec model declares: its global and its local (on-device) parameters."""

from __future__ import annotations

import torch
from torch import nn


class BPRLoss(nn.Module):
    """Pairwise logistic loss on (positive - negative) score differences.

    Input ``diff`` has shape ``(B,)`` or ``(B, n_neg)``; with ``reduction="none"`` the loss is
    per sample, shape ``(B,)`` (averaged over negatives), which is what Opacus's ghost
    clipping needs to bound each event's contribution.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, diff: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        per = nn.functional.softplus(-diff)
        if per.dim() > 1:
            per = per.mean(dim=tuple(range(1, per.dim())))
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


class RecModel(nn.Module):
    """A recommender split into global parameters (shared, aggregated) and local ones.

    Subclasses set ``global_names`` and ``local_names`` (parameter names, together covering every
    trainable parameter) and implement ``forward(user, items) -> scores`` with ``items`` of shape
    ``(B, 1 + n_neg)`` (first column the positive), and ``score_all() -> (n_items,)``.
    Local parameters never leave the device: only :meth:`global_state` is ever sent.
    """

    global_names: tuple[str, ...] = ()
    local_names: tuple[str, ...] = ()
    n_items: int

    def check_partition(self) -> None:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        if names != set(self.global_names) | set(self.local_names) or set(self.global_names) & set(self.local_names):
            raise TypeError(f"{type(self).__name__}: global {self.global_names} and local {self.local_names} "
                            f"must partition the trainable parameters {sorted(names)}.")

    def global_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n].detach().clone() for n in self.global_names}

    def local_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n].detach().clone() for n in self.local_names}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        for n, v in state.items():
            params[n].copy_(torch.as_tensor(v, dtype=params[n].dtype))

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A fresh local state for a new device (drawn from ``generator``)."""
        raise NotImplementedError

    def score_all(self) -> torch.Tensor:
        raise NotImplementedError
