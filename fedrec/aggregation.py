"""Aggregation as composable objects: a plain mean, robust means, and DP noise as a wrapper.

Each aggregator takes one round's checked deltas and their weights, forms its mean and hands it to
the server optimizer (:class:`fedrec.server_opt.ServerOptimizer`), updating the global state in
place; it returns the diagnostics of the step. They are picked once from the config
(:func:`from_config`, names in :data:`fedrec.registry.AGGREGATORS`):

* :class:`Mean`: FedAvg's weighted mean (weights: events; or 1 per device under user-level DP), or
  with ``row_average`` each item row's step scaled up while the run has heard of it less than of the average row;
* :class:`TrimmedMean`, :class:`Median`: per item row, over the devices (:mod:`fedrec.robust`);
* :class:`GaussianMean` wraps a :class:`Mean` the way Flower's ``DifferentialPrivacyServerSideFixedClipping``
  wraps a strategy: the sum of clipped deltas plus ``N(0, (z C)^2)``, over the *expected* cohort
  (:func:`fedrec.privacy.user_level.noisy_mean`);

Asynchronous buffering (FedBuff) composes in front of any of them: :class:`fedrec.asynchrony.Buffer`
decides which updates reach the aggregator and with which staleness weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .config import RunConfig
from .privacy.aggregate import Split, events_floor, noisy_rows, split
from .privacy.user_level import noisy_mean
from .robust import robust_mean
from .server_aggregate import ITEM_TABLES, server_aggregate, weighted_sum
from .server_opt import ServerOptimizer

State = dict[str, torch.Tensor]


class Aggregator(Protocol):
    """Aggregates one round's deltas and applies the result through the server optimizer."""

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None, counts: Sequence[tuple] = ()) -> dict:
        """Update ``gstate`` in place; the diagnostics (``update_norm`` at least). ``counts``: each delta's
        positive-item counts ``(ids, counts)`` where the round carries them (row averaging, event noise at the
        aggregate)."""
        ...


ROW_BOOST_MAX = 10.0  #: the most a row's step is scaled up by :func:`per_row_mean` (what one fresh row can gain)


@dataclass(frozen=True)
class Mean:
    """FedAvg's weighted mean of the deltas; nothing to do without deltas.

    With ``row_average`` and the devices' positive-item ``counts``, each row of the item tables (``tables``, by
    name: :data:`fedrec.server_aggregate.ITEM_TABLES`) steps in proportion to how little the run has heard of it
    so far (:func:`per_row_mean`); other parameters keep the plain mean.
    A presummed delta (secure aggregation) hides who touched which row: it takes the plain mean.
    Wrapped by :class:`GaussianMean` the inner mean is not used, so ``row_average`` has no effect there.
    """

    row_average: bool = False
    tables: tuple[str, ...] = ITEM_TABLES

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None, counts: Sequence[tuple] = ()) -> dict:
        if not deltas:
            return {"update_norm": 0.0}
        if self.row_average and counts and presummed is None:
            return {"update_norm": opt.step(gstate, per_row_mean(gstate, opt, deltas, weights, counts, self.tables),
                                            lr)}
        if opt.name == "fedavg":  # x += lr * mean, fused: sparse rows are summed and applied compactly
            _, diag = server_aggregate(gstate, deltas, weights, server_lr=lr, inplace=True)
            return diag
        total = float(sum(weights))
        diag = {"weight": total, "update_norm": 0.0}
        if total > 0:
            diag["update_norm"] = opt.step(gstate, weighted_sum(gstate, deltas, [w / total for w in weights]), lr)
        return diag


def per_row_mean(gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
                 counts: Sequence[tuple], tables: Sequence[str]) -> State:
    """Per-row averaging over the run: the plain weighted mean of the deltas, each item row's then scaled by
    ``clamp(mean_j h_j / h_i, 1, ROW_BOOST_MAX)``, where ``h_i`` is the weight of the devices that have had item
    ``i`` among their trained events (``counts[k] = (ids, counts)``: device ``k``'s positive items) summed over
    the run's rounds so far, this one included (the server optimizer keeps it: :meth:`ServerOptimizer.row_tally`),
    and the mean is over the rows heard of (``h_j > 0``). A row heard of less than the average row steps as if it
    had been heard of as often, so a new item's row catches up with the rows that have had the whole run; rows
    never heard of, and those heard of more than the average, step as in FedAvg.

    Why not FedSubAvg's per-round form (each row's pushes from the devices that had the item divided by their
    weight instead of the cohort's): with sampled negatives it lets every row grow by one device's push in each
    round it has a holder, while the negatives that would hold it back stay divided by the cohort, so rows end
    up ordered by age. On the freshness sweep's world (seed 3, not one of the sweep's) that form took up 3 of 40
    launched items against FedAvg's 10; this one 29.
    """
    total = float(sum(weights))
    if total <= 0:  # no device weighs anything: no update
        return {k: torch.zeros_like(v) for k, v in gstate.items()}
    acc = weighted_sum(gstate, deltas, [w / total for w in weights])
    for k in tables:
        if k not in acc:
            continue
        cover = torch.zeros(len(acc[k]), dtype=torch.float64)  # this round's weight of the devices that had each item
        for (ids, _), w in zip(counts, weights, strict=True):
            ids = torch.as_tensor(np.asarray(ids, np.int64))
            cover.index_add_(0, ids, torch.full((len(ids),), float(w), dtype=torch.float64))
        heard = opt.row_tally(k, cover)
        factor = torch.ones_like(heard)
        had = heard > 0
        if had.any():
            factor[had] = (heard[had].mean() / heard[had]).clamp(1.0, ROW_BOOST_MAX)
        acc[k] *= factor.to(acc[k].device, acc[k].dtype).unsqueeze(1)
    return acc


@dataclass(frozen=True)
class TrimmedMean:
    """Per item row, the mean of the devices' values after trimming ``trim`` from each end."""

    trim: float = 0.1
    method: str = "trimmed-mean"

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None, counts: Sequence[tuple] = ()) -> dict:
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
             lr: float, presummed: int | None = None, counts: Sequence[tuple] = ()) -> dict:
        mean, diag = noisy_mean(gstate, list(deltas), clip=self.clip, noise_multiplier=self.noise_multiplier,
                                expected_devices=self.expected_devices, generator=self.generator,
                                presummed=presummed)
        diag["update_norm"] = opt.step(gstate, mean, lr)
        return diag


@dataclass
class AggregateGaussian:
    """Event-level DP with the noise added once to the cohort's sum (:func:`fedrec.privacy.aggregate.noisy_rows`).

    The deltas are the devices' releases (sums of clipped event gradients times ``-lr``: sparse rows of the
    item table, every other global parameter dense), ``counts`` their positive-item counts. Noisy counts select
    the rows that change; those rows get the gradient noise and are divided by their noisy count
    (``row_average``) or by the selected rows' noisy total; every other parameter gets the same gradient noise
    on each coordinate and is divided by that noisy total.
    With ``presummed`` (SecAgg+) the sum already carries the noise, as the devices' shares; ``presummed = 0``
    (no sum with the full noise could be unmasked) releases nothing. Otherwise it releases even when no
    device replied (the accountant counts the release either way). A presummed sum's counts were never checked
    device by device, so every divisor is at least the events its sum's norm needs
    (:func:`~fedrec.privacy.aggregate.events_floor`): one lying device cannot blow up a row or the dense parts.
    """

    table: str
    sensitivity: float  #: one event's bound on the release: lr x event-clip
    noise: Split
    threshold: float
    row_average: bool
    generator: torch.Generator
    #: SecAgg+: the most the noise shares' variance can exceed the full noise's (``1 / (1 - dropout tolerance)``)
    share_excess: float = 1.0

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None, counts: Sequence[tuple] = ()) -> dict:
        if presummed == 0:  # SecAgg+ unmasked no sum that carries the full noise: nothing is released
            return {"update_norm": 0.0, "rows_selected": 0}
        mean = {k: torch.zeros_like(v) for k, v in gstate.items()}
        mean[self.table], diag = _selected_rows(gstate[self.table], self.table, deltas, counts,
                                                sensitivity=self.sensitivity, split=self.noise,
                                                threshold=self.threshold, row_average=self.row_average,
                                                generator=self.generator, noised=presummed is not None,
                                                share_excess=self.share_excess)
        # the events behind the dense sums: the selected rows' noisy total misses the events of rows not selected (in
        # a small round, every one), so it is floored at the round's devices (public: an idle device replies too)
        events = max(diag["noisy_total"], float(presummed if presummed is not None else len(deltas)))
        dense = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in gstate.items() if k != self.table}
        sums = weighted_sum(dense, [{k: d[k] for k in dense if k in d} for d in deltas], [1.0] * len(deltas))
        if presummed is not None and sums:  # summed unseen: at least the events the dense sums' norm needs
            events = max(events, float(events_floor(
                math.sqrt(sum(float(a.square().sum()) for a in sums.values())), sum(a.numel() for a in sums.values()),
                self.sensitivity, self.noise.grad * self.sensitivity * math.sqrt(self.share_excess))))
        for k, acc in sums.items():
            mean[k] = self._dense_mean(gstate[k], acc, events, noised=presummed is not None)
        diag["update_norm"] = opt.step(gstate, mean, lr)
        return diag

    def _dense_mean(self, like: torch.Tensor, acc: torch.Tensor, total: float, *, noised: bool) -> torch.Tensor:
        """A parameter that is no item row (``deepfm``'s feature table and deep part, ``neumf``'s MLP): the
        devices' summed release ``acc`` (float64) plus ``N(0, (z_g * sensitivity)^2)`` on every coordinate (part of the same joint
        Gaussian as the rows: one event's clipped gradient covers every parameter together), over ``total``: the
        round's noisy event total (post-processing of the noisy counts), at least its number of devices.
        ``noised``: the sum carries the noise already (SecAgg+ shares)."""
        if not noised:
            acc += torch.randn(acc.shape, generator=self.generator, dtype=torch.float64) * \
                (self.noise.grad * self.sensitivity)
        return (acc / total).to(like.device, like.dtype)


@dataclass
class UserRows:
    """User-level DP with private sparse rows (DP-AdaFEST, Ghazi et al. 2023) around the clipped deltas.

    Each device's delta is clipped to ``clip`` (checked on arrival) and its ``counts`` are an indicator of its
    positive items of L2 norm at most 1. Noisy counts select the item rows that change; those rows get
    ``N(0, (z_g clip)^2)``, every other parameter (not an item table) too, all over the *expected* cohort.
    One Gaussian of the joint vector, of multiplier ``effective(noise)``: the user-level record the ledger holds.
    """

    table: str
    clip: float
    noise: Split
    threshold: float
    expected_devices: float
    generator: torch.Generator

    def step(self, gstate: State, opt: ServerOptimizer, deltas: Sequence[dict], weights: Sequence[float],
             lr: float, presummed: int | None = None, counts: Sequence[tuple] = ()) -> dict:
        table, diag = _selected_rows(gstate[self.table], self.table, deltas, counts, sensitivity=self.clip,
                                     split=self.noise, threshold=self.threshold, row_average=False,
                                     generator=self.generator, total=self.expected_devices, bound_by_counts=False)
        rest = {k: v for k, v in gstate.items() if k != self.table}
        mean, _ = noisy_mean(rest, [{k: d[k] for k in rest} for d in deltas], clip=self.clip,
                             noise_multiplier=self.noise.grad, expected_devices=self.expected_devices,
                             generator=self.generator, check=False) if rest else ({}, {})
        mean[self.table] = table
        diag["update_norm"] = opt.step(gstate, mean, lr)
        return diag


def _selected_rows(like: torch.Tensor, table: str, deltas: Sequence[dict], counts: Sequence[tuple],
                   **kw) -> tuple[torch.Tensor, dict]:
    """The item table's update from :func:`~fedrec.privacy.aggregate.noisy_rows` (its ``kw``), as a dense tensor
    shaped and placed like ``like``: the selected rows' noisy mean, zero elsewhere; and the diagnostics."""
    ids, rows, diag = noisy_rows(like.shape[0], like.shape[1], [_sparse(d[table]) for d in deltas], list(counts),
                                 device=like.device, **kw)
    return torch.zeros_like(like).index_copy_(0, ids.to(like.device), rows.to(like.device, like.dtype)), diag


def _sparse(v) -> tuple[np.ndarray, np.ndarray]:
    """A table's delta as ``(ids, rows)``: as sent, or the nonzero rows of a dense one."""
    if isinstance(v, tuple):
        return np.asarray(v[0], np.int64), np.asarray(v[1], np.float32)
    v = np.asarray(v, np.float32)
    ids = np.flatnonzero(np.any(v != 0, axis=1))
    return ids, v[ids]


def from_config(cfg: RunConfig, *, noise_multiplier: float, expected_devices: float,
                generator: torch.Generator) -> Aggregator:
    """The aggregator a run config names, wrapped in DP noise under user-level DP (or event noise at the
    aggregate: ``noise_multiplier`` is then the event-level one)."""
    if cfg.aggregate_noise:
        return AggregateGaussian(ITEM_TABLES[0], sensitivity=cfg.lr * cfg.event_clip,
                                 noise=split(noise_multiplier, cfg.count_share), threshold=cfg.row_threshold,
                                 row_average=cfg.row_average, generator=generator,
                                 share_excess=1 / (1 - cfg.dropout_tolerance) if cfg.secure_aggregation else 1.0)
    if cfg.select_rows:
        return UserRows(ITEM_TABLES[0], clip=cfg.clip, noise=split(noise_multiplier, cfg.count_share),
                        threshold=cfg.row_threshold, expected_devices=expected_devices, generator=generator)
    if cfg.user_dp:
        return GaussianMean(Mean(), clip=cfg.clip, noise_multiplier=noise_multiplier,
                            expected_devices=expected_devices, generator=generator)
    from .registry import AGGREGATORS

    kind = AGGREGATORS.get(cfg.aggregator)
    return kind(row_average=cfg.row_average) if kind is Mean else kind(trim=cfg.trim)
