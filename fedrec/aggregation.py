"""Aggregation as composable objects: a plain mean, robust means, and DP noise as a wrapper.

Each aggregator takes one round's checked deltas and their weights, forms its mean and hands it to
the server optimizer (:class:`fedrec.server_opt.ServerOptimizer`), updating the global state in
place; it returns the diagnostics of the step. They are picked once from the config
(:func:`from_config`, names in :data:`fedrec.registry.AGGREGATORS`):

* :class:`Mean`: FedAvg's weighted mean (weights: events; or 1 per device under user-level DP);
* :class:`TrimmedMean`, :class:`Median`: per item row, over the devices (:mod:`fedrec.robust`);
* :class:`GaussianMean` wraps a :class:`Mean` the way Flower's ``DifferentialPrivacyServerSideFixedClipping``
  wraps a strategy: the sum of clipped deltas plus ``N(0, (z C)^2)``, over the *expected* cohort
  (:func:`fedrec.privacy.user_level.noisy_mean`);

Asynchronous buffering (FedBuff) composes in front of any of them: :class:`fedrec.asynchrony.Buffer`
decides which updates reach the aggregator and with which staleness weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .config import RunConfig
from .privacy.user_level import noisy_mean
from .robust import robust_mean
from .server_aggregate import server_aggregate, weighted_sum
from .server_opt import ServerOptimizer

State = dict[str, torch.Tensor]


class Aggregator(Protocol):
    """Aggregates one round's deltas and applies the result through the server optimizer."""

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None) -> dict:
        """Update ``gstate`` in place; the diagnostics (``update_norm`` at least)."""
        ...


@dataclass(frozen=True)
class Mean:
    """FedAvg's weighted mean of the deltas; nothing to do without deltas."""

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None) -> dict:
        if not deltas:
            return {"update_norm": 0.0}
        if opt.name == "fedavg":  # x += lr * mean, fused: sparse rows are summed and applied compactly
            _, diag = server_aggregate(gstate, deltas, weights, server_lr=lr, inplace=True)
            return diag
        total = float(sum(weights))
        diag = {"weight": total, "update_norm": 0.0}
        if total > 0:
            diag["update_norm"] = opt.step(gstate, weighted_sum(gstate, deltas, [w / total for w in weights]), lr)
        return diag


@dataclass(frozen=True)
class TrimmedMean:
    """Per item row, the mean of the devices' values after trimming ``trim`` from each end."""

    trim: float = 0.1
    method: str = "trimmed-mean"

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None) -> dict:
        if not deltas:
            return {"update_norm": 0.0}
        mean, diag = robust_mean(gstate, deltas, method=self.method, trim=self.trim)
        diag["update_norm"] = opt.step(gstate, mean, lr)
        return diag


@dataclass(frozen=True)
class Median(TrimmedMean):
    """Per item row, the median of the devices' values."""

    method: str = "median"


@dataclass
class GaussianMean:
    """User-level DP around a :class:`Mean`: ``(sum of clipped deltas + N(0, (z clip)^2)) / expected devices``.

    It adds noise even when no device replied (the accountant counts the release either way). The
    step after it is post-processing of the DP release.
    """

    inner: Mean
    clip: float
    noise_multiplier: float
    expected_devices: float
    generator: torch.Generator

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None) -> dict:
        mean, diag = noisy_mean(gstate, list(deltas), clip=self.clip, noise_multiplier=self.noise_multiplier,
                                expected_devices=self.expected_devices, generator=self.generator,
                                presummed=presummed)
        diag["update_norm"] = opt.step(gstate, mean, lr)
        return diag


def from_config(cfg: RunConfig, *, noise_multiplier: float, expected_devices: float,
                generator: torch.Generator) -> Aggregator:
    """The aggregator a run config names, wrapped in DP noise under user-level DP."""
    if cfg.user_dp:
        return GaussianMean(Mean(), clip=cfg.clip, noise_multiplier=noise_multiplier,
                            expected_devices=expected_devices, generator=generator)
    from .registry import AGGREGATORS

    kind = AGGREGATORS.get(cfg.aggregator)
    return kind() if kind is Mean else kind(trim=cfg.trim)
