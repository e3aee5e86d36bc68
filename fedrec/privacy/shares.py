"""Distributed noise shares: event noise at the aggregate under SecAgg+ (pure numpy/torch, no Flower).

With ``event-noise = "aggregate"`` the noise of :func:`fedrec.privacy.aggregate.noisy_rows` is added once to
the cohort's sum. Under secure aggregation the server never sees that sum in the clear, so the devices add
the noise themselves: each device of a round adds a *share*, ``N(0, sigma^2 / m)`` on every coordinate, where
``sigma`` is the noise the sum needs (``z_g * lr * C`` on the item table, ``z_c`` on the counts) and
``m = ceil((1 - dropout_tolerance) * n)`` for the ``n`` devices sampled in the round. Gaussians add up: a
sum of ``k`` shares is ``N(0, k sigma^2 / m)``, at least the full noise whenever ``k >= m``. The server
unmasks only such sums (:func:`node_threshold` sets SecAgg+'s reconstruction threshold so that every sum
it can unmask holds at least ``m`` devices; :func:`fedrec.federation.replies.add_secure_sum` re-checks).
A simulated node that hosts ``k`` devices adds their ``k`` shares as one draw (:func:`add_shares`,
:func:`node_share_seed`); a deployed device is alone on its node and draws its own.

Units. A device sends its release divided by one event's bound ``lr * C`` (the table), and its counts, so
that one event moves the masked vector by at most 1 in L2 in each part, whatever ``lr`` and ``C``. It clamps
each coordinate of that *signal* (before the share is added) to ``[-SIGNAL_BOUND, SIGNAL_BOUND]``: more
than 64 of one device's events on one item row in one step is not an honest pattern here, and a clamp
per coordinate never raises the sensitivity (it is 1-Lipschitz in every coordinate).

Quantisation. Flower's ``secaggplus_mod`` clamps every coordinate of ``node sum / max_weight`` to
``[-R, R]`` and rounds it stochastically to ``2**22`` levels. Honest signal is at most ``SIGNAL_BOUND``
there, and a node's noise has std at most one share's (``sqrt(w) s / max_weight <= s`` for ``w <=
max_weight`` devices), so with ``R = SIGNAL_BOUND + SIGMAS * s`` (``SIGMAS = 10``) a coordinate clamps
with probability below ``2e-23``: a clamp would cut the tail of that node's noise and bias the sum, so it
must not happen in practice, and it is counted against no ε (a run of 1e9 coordinates x 1e4 rounds still
has probability < 1e-9 of one clamp, far below any δ used here). The resolution on the sum is
``max_weight * 2R / 2**22`` per node (:meth:`SharePlan.resolution`), zero-mean (stochastic rounding) and
kept below 1% of the smallest noise std, or the round is refused (:func:`quantisation_problem`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..client_update import device_seed
from ..server_aggregate import ITEM_TABLES
from .aggregate import Split, split

#: per-coordinate bound on one device's signal, in units of one event's bound (``lr * C``; counts: events)
SIGNAL_BOUND = 64.0
#: the clipping range covers this many share stds beyond the signal bound
SIGMAS = 10.0
#: SecAgg+ quantisation levels and modulus (Flower's defaults)
LEVELS, MODULUS = 2**22, 2**32
#: :func:`fedrec.client_update.device_seed` stream of the noise shares (stream 0 trains)
SHARE_STREAM = 17
#: quantisation noise must stay below this share of the smallest noise std of the sum
MAX_RESOLUTION = 0.01


@dataclass(frozen=True)
class SharePlan:
    """One round's noise shares: how many devices were sampled and how much noise each adds."""

    devices: int  #: devices sampled in the round, over all nodes
    tolerance: float  #: share of them that may drop while the sum keeps its full noise
    noise: Split  #: noise multipliers of the sum: table (``grad``) and counts (``count``)
    #: the item graph's noise std on the sum of its counts and affinities (raw units; 0: no graph in the vector)
    graph: float = 0.0

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("A round with noise shares needs at least one sampled device.")
        if not 0 <= self.tolerance < 1:
            raise ValueError("The dropout tolerance should lie in [0, 1).")

    @property
    def required(self) -> int:
        """``m``: devices whose shares add up to the full noise."""
        return max(1, math.ceil((1 - self.tolerance) * self.devices - 1e-9))

    @property
    def grad_std(self) -> float:
        """Std of one device's table share, in units of ``lr * C``."""
        return self.noise.grad / math.sqrt(self.required)

    @property
    def count_std(self) -> float:
        """Std of one device's count share."""
        return self.noise.count / math.sqrt(self.required)

    @property
    def graph_std(self) -> float:
        """Std of one device's share on each of the item graph's counts and affinities."""
        return self.graph / math.sqrt(self.required)

    @property
    def clipping_range(self) -> float:
        """SecAgg+'s ``clipping_range``: the signal bound plus ``SIGMAS`` share stds."""
        return SIGNAL_BOUND + SIGMAS * max(self.grad_std, self.count_std, self.graph_std)

    def resolution(self, max_weight: float) -> float:
        """One quantisation step on the unmasked sum, per node, in the units of the masked vector."""
        return max_weight * 2 * self.clipping_range / LEVELS


def share_plan(z_event: float, count_share: float, tolerance: float, devices: int, graph: float = 0.0) -> SharePlan:
    """The plan of a round of ``devices`` sampled devices (the same on the server and on every node); ``graph``: the
    item graph's noise std (0: none)."""
    return SharePlan(devices, tolerance, split(z_event, count_share), graph)


def node_threshold(device_counts: Sequence[int], required: int, tolerance: float) -> int:
    """SecAgg+'s reconstruction threshold (nodes) for nodes hosting ``device_counts`` sampled devices.

    The smallest ``t`` such that ANY ``t`` of the nodes hold at least ``required`` devices (the ``t`` nodes
    with the fewest devices do), and at least ``ceil((1 - tolerance) * nodes)``, a strict majority of the
    nodes (a server that tells nodes different stories cannot then collect both kinds of share of one node)
    and 2 (Flower's minimum). SecAgg+ halts when fewer than ``t`` nodes have sent their masked vectors, so
    every sum it unmasks holds at least ``required`` devices' shares.
    """
    n = len(device_counts)
    if n < 2 or required > sum(device_counts):
        raise ValueError(f"{n} nodes with {sum(device_counts)} devices cannot hold the {required} required.")
    t = int(np.searchsorted(np.cumsum(sorted(device_counts)), required)) + 1  # first prefix holding enough
    return min(n, max(t, math.ceil((1 - tolerance) * n - 1e-9), n // 2 + 1, 2))


def quantisation_problem(plan: SharePlan, nodes: int, max_weight: float) -> str:
    """Why SecAgg+'s integers cannot carry this round's noisy sum exactly enough, or ''."""
    if nodes * (LEVELS + 1) >= MODULUS:
        return f"{nodes} nodes overflow SecAgg+'s modulus 2^32 at 2^22 levels each (at most 1023)"
    res, least = plan.resolution(max_weight), min(plan.noise.grad, plan.noise.count, plan.graph or math.inf)
    if res > MAX_RESOLUTION * least:
        return (f"the quantisation step {res:.3g} (a node speaks for up to {max_weight:g} devices) is not below "
                f"{MAX_RESOLUTION:.0%} of the noise std {least:.3g}")
    return ""


def share_generator(seed: int, secret: int = 0) -> torch.Generator:
    """The generator of one device's shares: ``seed`` (the device's and round's) mixed with ``secret``.

    ``secret`` is what the server does not know (deployment: fresh OS entropy): without it the server,
    which knows the run's seed, could draw the same shares and subtract them.
    """
    state = np.random.SeedSequence([int(seed), int(secret)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


def device_signal(release: Mapping, counts: tuple[np.ndarray, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                  sensitivity: float, graph: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """One device's signal in the masked vector, float64, before its noise share (:func:`add_shares`).

    ``release`` maps global keys (``shapes``, in order) to a dense array or sparse ``(ids, rows)``; a key it
    lacks contributes zero signal. Returns one array per key (the release over ``sensitivity``, clamped to
    ``SIGNAL_BOUND``), then the dense counts over the item table's rows (clamped likewise), then each of ``graph``,
    the device's item graph contribution (:func:`fedrec.itemgraph.dense_contribution`), clamped likewise.
    """
    out = []
    for k, shape in shapes.items():
        v = np.zeros(shape, np.float64)
        got = release.get(k)
        if isinstance(got, tuple):
            np.add.at(v, np.asarray(got[0], np.int64), np.asarray(got[1], np.float64))
        elif got is not None:
            v += np.asarray(got, np.float64)
        out.append(np.clip(v / sensitivity, -SIGNAL_BOUND, SIGNAL_BOUND))
    n_items = shapes[ITEM_TABLES[0]][0]
    c = np.zeros(n_items, np.float64)
    np.add.at(c, np.asarray(counts[0], np.int64), np.asarray(counts[1], np.float64))
    out.append(np.clip(c, -SIGNAL_BOUND, SIGNAL_BOUND))
    return out + [np.clip(np.asarray(g, np.float64), -SIGNAL_BOUND, SIGNAL_BOUND) for g in graph]


def node_share_seed(seed: int, devices: Sequence[int], round_: int) -> int:
    """The seed of a node's noise shares in a round: a device alone on its node (deployment) draws from its own
    seed and round (:func:`fedrec.client_update.device_seed`, stream :data:`SHARE_STREAM`), as it always has; a
    simulated node with several devices from the round and all of them, so the draws depend on how ``--nodes``
    shards the devices (the same config gives the same run)."""
    if len(devices) == 1:
        return device_seed(seed, devices[0], round_, SHARE_STREAM)
    return int(np.random.SeedSequence([seed, round_, SHARE_STREAM, *devices]).generate_state(1, np.uint64)[0] >> 1)


def add_shares(signal: list[np.ndarray], keys: int, plan: SharePlan, generator: torch.Generator,
               devices: int = 1) -> list[np.ndarray]:
    """``signal`` (:func:`device_signal`, or the sum of ``devices`` devices' signals) plus the noise shares of
    ``devices`` devices: ``N(0, devices * std^2)`` on every coordinate, ``std`` the plan's share std of each part
    (the first ``keys`` parts: the table's, ``plan.grad_std``; then the counts', ``plan.count_std``; then the item
    graph's, ``plan.graph_std``), drawn from ``generator`` in that order. The sum of ``devices`` independent shares
    has exactly that distribution, so a node that hosts several devices draws them at once."""
    scale = math.sqrt(devices)
    stds = [plan.grad_std] * keys + [plan.count_std] + [plan.graph_std] * (len(signal) - keys - 1)
    return [v + torch.randn(v.shape, generator=generator, dtype=torch.float64).numpy() * (s * scale)
            for v, s in zip(signal, stds, strict=True)]
