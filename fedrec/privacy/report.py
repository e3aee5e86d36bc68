"""The privacy block of ``summary.json``: every ε with its unit, δ, accountant and assumptions."""

from __future__ import annotations

import math
import statistics

import numpy as np

from ..config import RunConfig
from ..itemgraph import PAIR_WEIGHT, sensitivity
from .accounting import GROUP2, event_accountant, graph_multiplier, user_parts
from .aggregate import split
from .ledger import Ledger


def _f(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _aggregate_block(cfg: RunConfig, z_event: float, graph_features: np.ndarray | None) -> dict:
    """What differs in the event block when the noise is added once to the cohort's sum (``graph_features``: the
    item graph also releases item x feature affinities)."""
    parts = split(z_event, cfg.count_share)
    return {
        "noise": "aggregate-secagg" if cfg.secure_aggregation else "aggregate-server",
        "noise_multiplier_gradient": parts.grad, "noise_multiplier_counts": parts.count,
        "local_steps": 1, "max_steps_per_event": cfg.replay_rounds + 1,
        **({"graph_noise_multiplier": graph_multiplier(cfg), "graph_window": cfg.pair_window,
            "graph_pair_weight": PAIR_WEIGHT,
            **({"graph_affinity_rounds": cfg.affinity_every} if graph_features is not None else {}),
            "graph_sensitivity": round(sensitivity(cfg.pair_window, graph_features), 6),
            "graph": ("the item graph's item counts" if cfg.secure_graph else "the item graph's pair and item counts") + (
                " and item x feature affinities (each event's item with the profile of the event before it, "
                "from earlier releases; the affinities of graph_affinity_rounds rounds noised together)" if graph_features
                is not None else "") + ", noised on every round's sum; one event moves them "
                "by at most graph_sensitivity (sqrt(3 x window x graph_pair_weight^2 + 1): the pairs' noise is the graph's over "
                "graph_pair_weight; and with the affinities 3 more under the root, 5 "
                "where a feature value is negative) over the whole run: one Gaussian of graph_noise_multiplier, "
                "composed with the model's steps"}
           if cfg.graph_noised else {}),
        **({"graph_noise": "SecAgg+ shares: the devices add the graph's noise to their counts and affinities (no "
                           "pairs) in the masked vector, as they do the model's; the server sees only the noisy sums"}
           if cfg.secure_graph else {}),
        "sampling": "Poisson sampling of each event in the device's one clipped step per round; the joint release "
                    "(gradient sum and positive-item counts, noised separately) is one subsampled Gaussian step of "
                    "noise_multiplier per exposure; device sampling is not counted as amplification",
        "trust": ("SecAgg+ with distributed noise: each of the n sampled devices adds 1/m of the noise variance, "
                  f"m = ceil((1 - {cfg.dropout_tolerance:g}) n), and the server can unmask only a sum of at least m "
                  "devices, which carries at least the full noise; it sees only that noisy sum, and trusts the devices "
                  "to add their shares" if cfg.secure_aggregation else
                  "trusted aggregator: the server sees each device's clipped sums and which item rows they touch, "
                  "and adds the noise once to their sum; the released model is event-level DP, a device's own "
                  "message to the server is not"),
    }


def _event_block(cfg: RunConfig, ledger: Ledger, z_event: float, graph_features: np.ndarray | None) -> dict:
    """The event block: per-device ε (max, median) and the mechanism's assumptions."""
    acc = cfg.accountant.upper()
    ev_acc = event_accountant(cfg.model, cfg.accountant)
    eps = list(ledger.event_epsilons(cfg.delta, ev_acc).values())
    ev = {
        "unit": "event", "epsilon": _f(max(eps)) if eps else 0.0,
        "epsilon_median_device": _f(statistics.median(eps)) if eps else 0.0,
        "delta": cfg.delta, "accountant": acc, "noise_multiplier": z_event, "clip": cfg.event_clip,
        "sample_rate": cfg.sample_rate, "local_steps": cfg.steps,
        "max_steps_per_event": cfg.steps * (cfg.replay_rounds + 1), "devices": len(eps),
        "noise": "device",
        "sampling": "Poisson sampling of each event in every local DP-SGD step (Opacus, ghost clipping)",
        "trust": "each device's own DP-SGD: the server and anyone who sees a delta learn at most this "
                 "about any single event",
    }
    if cfg.aggregate_noise:
        ev.update(_aggregate_block(cfg, z_event, graph_features))
    if ev_acc == GROUP2:
        sess = list(ledger.event_epsilons(cfg.delta, cfg.accountant).values())
        ev.update({
            "accountant": "RDP, group privacy of 2 (Mironov 2017, Prop. 2)",
            "sampling": f"Poisson sampling of each session (one device's events of one round window, its newest "
                        f"{cfg.seq_len}) in every local DP-SGD step (Opacus, ghost clipping); a sample reads no "
                        "event outside its session, and one event's add/remove changes one session",
            "session_epsilon": _f(max(sess)) if sess else 0.0, "session_accountant": acc,
        })
    return ev


def _user_graph_block(cfg: RunConfig, z_user: float, graph_features: np.ndarray | None) -> dict:
    """What the user block adds when the item graph is part of user-level DP's Gaussian."""
    model, graph = user_parts(cfg, z_user)
    return {
        "noise_multiplier_model": model, "graph_noise_multiplier": graph, "graph_share": cfg.user_graph_share,
        "graph_clip": 1.0,
        "graph": "each on-time sampled device's item counts of the round" + (
                 " and item x feature affinities (its events' items' rows gain the profiles, from earlier releases, "
                 "of the events before them)" if graph_features is not None else "")
                 + " are scaled to L2 norm graph_clip and noised on the sum with std graph_noise_multiplier (no item "
                 "pairs are sent); with the clipped delta (noise noise_multiplier_model x clip) one Gaussian of "
                 "noise_multiplier (1/z^2 = 1/z_model^2 + 1/z_graph^2) per round, as the ledger records; " + (
                 "under SecAgg+ the devices sum them masked with their deltas and the server sees only the sum"
                 if cfg.secure_aggregation else "the server sees each device's item counts, as it sees its delta"),
    }


def privacy_report(cfg: RunConfig, ledger: Ledger, *, z_event: float, z_user: float, q_user: float,
                   population: int, stopped: str = "", graph_features: np.ndarray | None = None) -> dict:
    """Summarise what the ledger composes to, unit by unit (``graph_features``: the public item features of the
    run's item graph, which then also releases their affinities)."""
    acc = cfg.accountant.upper()
    out: dict = {"mode": cfg.privacy, "delta": cfg.delta if cfg.privacy != "none" else None,
                 "accountant": acc if cfg.privacy != "none" else None,
                 "budget": cfg.epsilon or None, "ledger": "privacy_ledger.jsonl", "ledger_records": len(ledger.records)}
    if stopped:
        out["stopped"] = stopped
    units = []
    if cfg.user_dp:
        periods = sorted({r.period for r in ledger.records if r.kind == "server-gaussian"})
        per_period = {p: ledger.user_epsilon(cfg.delta, cfg.accountant, period=p) for p in periods}
        out["user"] = {
            "unit": "user", "epsilon": _f(ledger.user_epsilon(cfg.delta, cfg.accountant)),
            "epsilon_max_period": _f(max(per_period.values())) if per_period else 0.0,
            "budget_period_rounds": cfg.budget_period or None,
            "delta": cfg.delta, "accountant": acc, "noise_multiplier": z_user, "clip": cfg.clip,
            "sample_rate": q_user, "population": population,
            "releases": len(ledger.server_history()),
            "sampling": f"Poisson: each of {population} devices joins a round independently with q={q_user:.4g}",
            "noise": "aggregate-server",  # the server noises the sum of clipped deltas (unmasked, under SecAgg+)
            "trust": ("secure aggregation (Flower SecAgg+): the server sees only the sum of the sampled devices' "
                      "deltas, and trusts each device to clip its own (it cannot check one delta's norm); "
                      "the released model is user-level DP" if cfg.secure_aggregation else
                      "the server sees each device's clipped delta (no secure aggregation); the released "
                      "model is user-level DP"),
        }
        if cfg.user_graph:
            out["user"].update(_user_graph_block(cfg, z_user, graph_features))
        if cfg.select_rows:
            parts = split(user_parts(cfg, z_user)[0], cfg.count_share)
            out["user"].update({
                "noise_multiplier_gradient": parts.grad, "noise_multiplier_counts": parts.count,
                "rows": "each device also sends an indicator of its positive items of L2 norm 1; noisy counts select "
                        f"the item rows a round updates (above {cfg.row_threshold:g} count-noise stds); the joint "
                        "release (clipped deltas and counts" + (", and the item graph's counts" if cfg.user_graph
                                                                 else "") + ") is one Gaussian of noise_multiplier"})
        units.append("user")
    if cfg.event_dp:
        out["event"] = _event_block(cfg, ledger, z_event, graph_features)
        units.append("event")
    if not units:
        out.update({"unit": "none", "epsilon": None, "what": "no differential privacy"})
        return out
    main = out[units[0]]
    out.update({"unit": "+".join(units), "epsilon": main["epsilon"], "noise_multiplier": main["noise_multiplier"],
                "clip": main["clip"], "sample_rate": main["sample_rate"], "population": population,
                "not_covered": "event counts and evaluation counts (and, under user-level, the pre-clip norm) "
                               "are sent in the clear for measurement; they are outside these guarantees"})
    return out
