"""Pure accounting functions over Opacus's accountants (PRV by default, RDP selectable).

A history is a list of ``(noise_multiplier, sample_rate, steps)`` records, exactly as Opacus
keeps it. Identical consecutive records are merged first (composition does not care about
order), which keeps ε cheap to compute for long streams.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from ..registry import ACCOUNTANTS

if TYPE_CHECKING:
    from ..config import RunConfig

Record = tuple[float, float, int]

#: the accountant of a mechanism whose accounted unit is a *session* (one sample per session) reported for
#: single events by group privacy: an event's add/remove replaces one session, i.e. two add/remove steps
GROUP2 = "rdp-group2"


def event_accountant(model: str, accountant: str) -> str:
    """The accountant for event-level ε of ``model``.

    ``sasrec`` trains under event-level DP on one sample per session (a device's events of one round
    window), so what DP-SGD protects is the add/remove of a session; one event's add/remove turns a
    session into another, two add/remove steps, and its ε comes from RDP group privacy
    (:func:`group2_epsilon`). The other models have one sample per event and use ``accountant``.
    """
    return GROUP2 if model == "sasrec" else accountant


def group2_epsilon(h: Iterable[Record], delta: float) -> float:
    """ε at ``delta`` for neighbours two add/remove steps apart, from the RDP of the composition.

    Mironov (2017), Proposition 2 (group privacy): a mechanism that is (α, ε(α))-RDP for add/remove
    neighbours is (α/2, 3 ε(α))-RDP for neighbours two steps apart, for α >= 4. The RDP of each
    Poisson-subsampled Gaussian record is Opacus's (``compute_rdp``); orders β = α/2 >= 2.
    """
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    memoise_rdp()
    betas = [2 + x / 4 for x in range(40)] + list(range(12, 128))
    rdp = [0.0] * len(betas)
    for z, q, n in h:
        r = compute_rdp(q=q, noise_multiplier=z, steps=n, orders=[2 * b for b in betas])
        rdp = [a + 3 * float(b) for a, b in zip(rdp, r, strict=True)]
    eps, _ = get_privacy_spent(orders=betas, rdp=rdp, delta=delta)
    return float(eps)


def compress(history: Iterable[Record]) -> tuple[Record, ...]:
    """Merge records with the same (noise multiplier, sample rate), summing their steps."""
    merged: dict[tuple[float, float], int] = {}
    for z, q, n in history:
        if n <= 0:
            continue
        merged[(float(z), float(q))] = merged.get((float(z), float(q)), 0) + int(n)
    return tuple((z, q, n) for (z, q), n in sorted(merged.items()))


def epsilon(history: Iterable[Record], delta: float, accountant: str = "prv") -> float:
    """ε at ``delta`` for the composition of all records (0 for an empty history).

    A record with noise multiplier 0 releases without noise: ε is infinite.
    """
    h = compress(history)
    if not h:
        return 0.0
    if any(z <= 0 for z, _, _ in h):
        return math.inf
    return _epsilon_cached(h, float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon_cached(h: tuple[Record, ...], delta: float, accountant: str) -> float:
    memoise_rdp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if accountant == GROUP2:
            return group2_epsilon(h, delta)
        acc = ACCOUNTANTS.get(accountant)()  # Opacus imported on use: a device process without DP never needs it
        acc.history = [(z, q, n) for z, q, n in h]
        return float(acc.get_epsilon(delta=delta))


#: how many (sample rate, noise multiplier, order) RDP values :func:`memoise_rdp` keeps
RDP_MEMO = 1 << 16


def memoise_rdp() -> None:
    """Memoise Opacus's per-step RDP of the subsampled Gaussian, ``_compute_rdp(q, z, order)`` (a pure function of
    three numbers), where Opacus's modules call it: the same floats, computed once. The PRV accountant bounds its
    domain with two RDP sweeps over about 150 orders for every ε (``compute_safe_domain_size``: the composition,
    then each record alone), most of its time, and both sweep the same ``(q, z)``; so does every ε of a device's
    growing exposure, and each of a calibration's steps. ε at exposures 1, 2 and 3 took 0.33 s each, now 0.03 s
    after the first (``tests/test_privacy_compose.py`` holds the values to Opacus's own, unmemoised)."""
    from opacus.accountants.analysis import rdp
    from opacus.accountants.analysis.prv import prvs

    if getattr(rdp._compute_rdp, "cache_info", None) is None:
        rdp._compute_rdp = lru_cache(maxsize=RDP_MEMO)(rdp._compute_rdp)
    prvs._compute_rdp = rdp._compute_rdp


#: calibration stops once the budget is spent to within this share (ε in [target (1 - TOL), target])
CALIBRATION_TOL = 1e-3


def calibrate_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "prv", extra: tuple[Record, ...] = ()) -> float:
    """Smallest noise multiplier (to within ``CALIBRATION_TOL`` of the budget) whose composition over
    ``steps`` (with the records ``extra``, spent elsewhere on the same unit) stays within ``target_epsilon``.

    Each ε of a new noise multiplier costs the accountant 0.2-0.3 s, so the bracket's doubling is followed by
    regula falsi on ``log ε`` against ``log z`` (Illinois' variant), not bisection: about 4 evaluations instead of
    12.
    """
    if target_epsilon <= 0:
        raise ValueError("The target epsilon should be a positive value.")
    if extra and epsilon(extra, delta, accountant) >= target_epsilon:
        raise ValueError(f"The other releases already spend epsilon={target_epsilon}.")

    def gap(z: float) -> float:  # log of ε over the budget: > 0 spends too much
        return math.log(epsilon([(z, sample_rate, steps), *extra], delta, accountant) / target_epsilon)

    lo, hi, g_lo, g_hi = 0.05, 1.0, math.nan, gap(1.0)
    while g_hi > 0:
        lo, g_lo, hi = hi, g_hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"No noise multiplier up to 10000 keeps {steps} releases at sampling rate {sample_rate:g} "
                             f"within epsilon={target_epsilon:g}; raise epsilon or delta, or release less.")
        g_hi = gap(hi)
    # the line goes through (w_lo, w_hi): the ends' gaps, halved at an end kept twice in a row (Illinois); the
    # stopping rule reads the true gap g_hi of the feasible end
    aim, w_lo, w_hi, side = math.log(1 - CALIBRATION_TOL / 2), g_lo, g_hi, 0
    for _ in range(40):
        if g_hi >= math.log(1 - CALIBRATION_TOL) or hi - lo < 1e-3 * hi:
            break
        mid = _falsi(lo, w_lo, hi, w_hi, aim)
        g = gap(mid)
        if g > 0:
            lo, w_lo, w_hi, side = mid, g, w_hi / 2 if side > 0 else w_hi, 1
        else:
            hi, g_hi, w_hi, w_lo, side = mid, g, g, w_lo / 2 if side < 0 else w_lo, -1
    return hi


def _falsi(lo: float, g_lo: float, hi: float, g_hi: float, aim: float) -> float:
    """Where the line through ``(log lo, g_lo)`` and ``(log hi, g_hi)`` meets ``aim``, kept inside the
    bracket's middle 98% (the middle itself while ``lo`` has no ε)."""
    if math.isnan(g_lo):
        return (lo + hi) / 2
    a, b = math.log(lo), math.log(hi)
    x = b + (aim - g_hi) * (a - b) / (g_lo - g_hi)
    return math.exp(min(max(x, a + 0.01 * (b - a)), b - 0.01 * (b - a)))


def graph_records(cfg: RunConfig) -> tuple[Record, ...]:
    """The noisy item graph's one record on the event unit: empty unless its sums are noised.

    One event's add/remove moves the graph's pair and item counts, over the whole run, by at most
    :func:`fedrec.itemgraph.sensitivity` in L2 (``sqrt(3 W w^2 + 1)``, ``w`` the pairs' weight, more with the item x feature
    affinities); with
    noise of std ``z_graph`` times that on every
    round's sums, the run's graph releases compose to one Gaussian mechanism of multiplier ``z_graph``:
    one record ``(z_graph, 1, 1)``, whatever the number of rounds.
    """
    if not (cfg.graph_noised and cfg.aggregate_noise):
        return ()
    return ((graph_multiplier(cfg), 1.0, 1),)


def graph_multiplier(cfg: RunConfig) -> float:
    """``z_graph`` of the event-level graph: calibrated so the graph alone spends ``graph-share`` of the event budget,
    else the given noise multiplier (0 when the graph is not noised at event level; user level:
    :func:`user_parts`)."""
    if not (cfg.graph_noised and cfg.aggregate_noise):
        return 0.0
    if cfg.epsilon > 0 and cfg.calibrate:
        return _graph_calibrated(cfg.graph_share * cfg.epsilon, cfg.delta, cfg.accountant)
    return cfg.noise_multiplier


@lru_cache(maxsize=64)
def _graph_calibrated(target: float, delta: float, accountant: str) -> float:
    return calibrate_noise(target, 1.0, 1, delta, accountant)


def user_parts(cfg: RunConfig, z_user: float) -> tuple[float, float]:
    """The noise multipliers ``(model, graph)`` of user-level DP's one Gaussian per round of multiplier ``z_user``.

    With the item graph (:attr:`RunConfig.user_graph`) every sampled device releases two clipped parts in the
    same round: its delta (L2 norm <= ``clip``, noise ``z_model * clip`` on the sum) and its graph counts (L2 norm
    <= 1 in the graph's noise units, noise ``z_graph``). Adding or removing one user moves the two sums by at
    most those norms, so the joint release is one Gaussian of ``1/z_user^2 = 1/z_model^2 + 1/z_graph^2``
    (:func:`fedrec.privacy.aggregate.split`, ``user-graph-share`` of ``1/z_user^2`` to the graph), subsampled at
    the rate the ledger records: the accounting of user-level DP is unchanged. Without the graph the model gets
    all of it (``graph`` is 0)."""
    if not cfg.user_graph or not z_user > 0:
        return z_user, 0.0
    from .aggregate import split

    parts = split(z_user, cfg.user_graph_share)
    return parts.grad, parts.count
