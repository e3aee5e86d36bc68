"""The plan step of a server round: may this round release, and which devices does it ask?

Pure functions of the federation (who is where), the server's privacy ledger and an explicit RNG:
the user-level budget check, then the cohort (Poisson sampling at rate ``q`` under user-level DP, as
the accountant assumes; else ``cohort`` devices uniformly), grouped by the node that hosts them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from ..config import RunConfig
from ..privacy.ledger import Ledger
from ..privacy.user_level import poisson_cohort


@dataclass(frozen=True)
class Federation:
    """What the server knows about the federation for the whole run."""

    cfg: RunConfig
    home: dict[int, int]  #: device -> the node hosting it
    n_items: int
    durable: bool  #: every node keeps its devices' state durably (device stores), not in memory
    z_event: float  #: the devices' DP-SGD noise multiplier (0: no event-level DP)
    z_user: float  #: the server's Gaussian noise multiplier (0: no user-level DP)
    q_user: float  #: the user-level sampling rate
    population: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    #: some node keeps its devices in stores (a deployment): the server's noise then comes from a secret of its own,
    #: whatever other nodes report (one node reporting memory state must not make the noise follow the public seed)
    stores: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "population", sorted(self.home))
        object.__setattr__(self, "nodes", sorted(set(self.home.values())))


@dataclass
class RoundPlan:
    """What round ``round`` asks: the sampled devices, grouped by node (nodes asked only to serve: [])."""

    round: int
    period: int  #: the user-level budget period the round belongs to
    cohort: list[int]
    by_node: dict[int, list[int]]


def period_of(cfg: RunConfig, r: int) -> int:
    return (r - 1) // cfg.budget_period if cfg.budget_period else 0


def budget_spent(fed: Federation, ledger: Ledger, r: int) -> str:
    """Why round ``r`` may not make a user-level release (its budget period is spent), else ''."""
    cfg = fed.cfg
    if not (cfg.user_dp and cfg.epsilon > 0):
        return ""
    period = period_of(cfg, r)
    eps_next = ledger.user_epsilon(cfg.delta, cfg.accountant, period=period, extra=(fed.z_user, fed.q_user, 1))
    if eps_next <= cfg.epsilon * (1 + 1e-9):
        return ""
    return (f"user-level budget spent: round {r} would bring epsilon to {eps_next:.3f} > "
            f"budget {cfg.epsilon} (period {period}); no further user-level releases")


def plan_round(fed: Federation, r: int, rng: np.random.Generator, *, busy: Collection[int] = (),
               busy_nodes: Collection[int] = (), due: Collection[int] = ()) -> RoundPlan:
    """Sample round ``r``'s cohort among the free devices and address each node.

    A device whose update is still in flight (``busy``, or hosted on a node still working on an
    earlier message, ``busy_nodes``) is not asked again; under user-level DP this only lowers its
    chance of being in a round below q, so the accounting stays an upper bound. A node hosting
    ``due`` devices (slow devices whose held update is due) gets a message to hand it in; with
    serving evaluation every node gets one. A busy node gets none.
    """
    cfg = fed.cfg
    free = [d for d in fed.population if d not in busy and fed.home[d] not in busy_nodes] if busy or busy_nodes \
        else fed.population
    if cfg.user_dp:
        cohort = poisson_cohort(free, fed.q_user, rng)
    else:
        size = min(cfg.cohort_for(len(fed.population)), len(free))
        cohort = sorted(int(d) for d in rng.choice(free, size=size, replace=False))
    by_node: dict[int, list[int]] = {}
    for d in cohort:
        by_node.setdefault(fed.home[d], []).append(d)
    for d in due:
        by_node.setdefault(fed.home[d], [])
    if cfg.serve_eval:  # every node serves its devices the new version, sampled for training or not
        for n in fed.nodes:
            by_node.setdefault(n, [])
    for n in busy_nodes:  # a node still working on an earlier round's message gets no new one
        by_node.pop(n, None)
    return RoundPlan(r, period_of(cfg, r), cohort, dict(sorted(by_node.items())))
