"""What every fedrec model declares: its global and its local (on-device) parameters."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class BPRLoss(nn.Module):
    """Pairwise logistic loss on (positive - negative) score differences.

    Input ``diff`` has shape ``(B, n_neg)`` (one target per sample) or ``(B, P, n_neg)`` (a
    sequence sample with P target positions); ``weight`` (optional, ``(B, P)``) masks the
    positions that hold a target. A sample's loss is the mean over its negatives and its target
    positions; with ``reduction="none"`` it is per sample, shape ``(B,)``, which is what Opacus's
    ghost clipping needs to bound each sample's contribution.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, diff: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        per = nn.functional.softplus(-diff).mean(dim=-1) if diff.dim() > 1 else nn.functional.softplus(-diff)
        if per.dim() > 1:
            if weight is None:
                per = per.mean(dim=tuple(range(1, per.dim())))
            else:
                w = weight.reshape(per.shape).to(per.dtype)
                per = (per * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


class RecModel(nn.Module):
    """A recommender split into global parameters (shared, aggregated) and local ones.

    Subclasses set ``global_names`` and ``local_names`` (parameter names, together covering every
    trainable parameter) and implement:

    * ``forward(*batch) -> scores``: ``batch`` is what :meth:`samples` built (tensors indexed by
      sample along dim 0); scores have shape ``(B, 1 + K)`` or ``(B, P, 1 + K)``, the positive
      first, then ``K`` negatives.
    * :meth:`samples`: the device's training samples (one per event for ``mf`` and ``neumf``).
    * :meth:`score_all`: scores of every item for this device (its local parameters loaded), given
      its history (``sasrec`` reads the history; the others ignore it).
    * :meth:`item_repr`: one vector per item, what explanations compare.

    Local parameters never leave the device: only :meth:`global_state` is ever sent. A model whose
    user state is its recent history (``uses_history``) may have no local parameters at all.
    """

    global_names: tuple[str, ...] = ()
    local_names: tuple[str, ...] = ()
    uses_history: bool = False
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

    def local_flat(self) -> np.ndarray:
        """The local parameters as one float32 vector (the serving state a node keeps per device)."""
        params = dict(self.named_parameters())
        if not self.local_names:
            return np.zeros(0, np.float32)
        return torch.cat([params[n].detach().reshape(-1) for n in self.local_names]).numpy().astype(np.float32)

    @torch.no_grad()
    def load_local_flat(self, vec: np.ndarray) -> None:
        params = dict(self.named_parameters())
        v = torch.as_tensor(np.asarray(vec, np.float32))
        need = sum(params[n].numel() for n in self.local_names)
        if v.numel() != need:
            raise ValueError(f"{type(self).__name__}: a local state of {v.numel()} values, expected {need}.")
        at = 0
        for n in self.local_names:
            p = params[n]
            p.copy_(v[at: at + p.numel()].reshape(p.shape))
            at += p.numel()

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A fresh local state for a new device (drawn from ``generator``)."""
        raise NotImplementedError

    def samples(self, items: np.ndarray, rounds: np.ndarray, train: np.ndarray, cand: torch.Tensor, *,
                negatives: int, generator: torch.Generator, sessions: bool = False
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The training samples of one update and each one's target-position weights.

        ``items``/``rounds``: the device's events in time order; ``train``: boolean mask of those
        trained on; ``cand``: the candidate negatives (items the device has not had). Default: one
        sample per training event, ``(user row 0, [positive, K negatives])``, weights ``(n,)`` ones.
        ``sessions`` only matters for models whose samples span several events (see SASRec).
        """
        pos = torch.from_numpy(items[train].astype(np.int64))
        n = len(pos)
        neg = cand[torch.randint(0, len(cand), (n, negatives), generator=generator)]
        return (torch.zeros(n, dtype=torch.long), torch.cat([pos.unsqueeze(1), neg], dim=1).contiguous()), \
            torch.ones(n)

    def score_all(self, history: np.ndarray | None = None) -> torch.Tensor:
        raise NotImplementedError

    def item_repr(self) -> torch.Tensor:
        """``(n_items, d)``: the model's representation of each item (explanations compare these)."""
        raise NotImplementedError


def seeded_linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """An ``nn.Linear`` initialised from ``generator`` (torch's default init draws from the global RNG,
    which would make two processes with the same seed build different models)."""
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        bound = 1.0 / np.sqrt(n_in)
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()
    return layer
