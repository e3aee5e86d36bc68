"""The apply step of a server round: validate -> bound -> ledger -> aggregate -> optimizer -> publish.

:func:`apply_round` takes the round's checked replies (:func:`.replies.collect`) and the server state
and returns the next state with the step's diagnostics; :func:`round_metrics` turns them into the
round's metrics line. Under user-level DP the server's release is written to the privacy ledger
before the version it produces is published.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch

from ..aggregation import Aggregator
from ..asynchrony import Update, discounted
from ..config import RunConfig
from ..itemgraph import ItemGraph
from ..privacy.accounting import event_accountant, graph_records
from ..privacy.ledger import Ledger, Release
from ..robust import bound_norm, bound_rows
from .plan import Federation, RoundPlan
from .replies import Replies
from .state import FederationError, ServerState


@dataclass
class Step:
    """What the apply step did (the diagnostics of one round)."""

    diag: dict
    lr: float
    applied: list[int] = field(default_factory=list)  #: devices whose updates were applied
    dropped: int = 0  #: updates dropped (late in synchronous rounds; too stale in the buffer)
    staleness: list[int] = field(default_factory=list)
    #: (device, round trained in) of each update the server keeps from this round: applied, or held in the buffer
    kept: list[tuple[int, int]] = field(default_factory=list)


def bound(fed: Federation, got: Replies) -> None:
    """Norm bounding of whole deltas (not under user-level DP: the clip is enforced) and of item rows."""
    cfg = fed.cfg
    if cfg.max_update_norm > 0 and not cfg.user_dp and got.presummed is None:  # a secure sum is no one delta
        got.bounded = sum(got.map_deltas(lambda d: bound_norm(d, cfg.max_update_norm)))
    if cfg.max_row_norm > 0 and got.presummed is None:
        got.rows_bounded = sum(got.map_deltas(lambda d: bound_rows(d, cfg.max_row_norm)))


def record_device_releases(fed: Federation, ledger: Ledger, got: Replies, r: int) -> None:
    """Event level: every DP-SGD release a device reports, on time or late, as reported; with the noise at
    the aggregate, the round's one noisy sum as it covers each on-time device's events (late ones are dropped)."""
    if not fed.z_event:
        return
    cfg = fed.cfg
    if cfg.aggregate_noise:
        ledger.append(*[Release(kind="aggregate-gaussian", unit="event", round=r, noise_multiplier=fed.z_event,
                                sample_rate=cfg.sample_rate, steps=m["steps"], clip=cfg.event_clip,
                                subject=f"device-{d}", max_steps_per_event=m["max-exposure"])
                        for d, m in zip(got.done, got.metrics, strict=True) if m["steps"]])
        return
    ledger.append(*[Release(kind="device-dpsgd", unit="event", round=r, noise_multiplier=fed.z_event,
                            sample_rate=cfg.sample_rate, steps=m["steps"], clip=cfg.event_clip,
                            subject=f"device-{d}", max_steps_per_event=m["max-exposure"])
                    for d, m in zip(got.done + [u.device for u in got.late], got.metrics + got.late_metrics,
                                    strict=True) if m["steps"]])


def record_graph(fed: Federation, ledger: Ledger, state: ServerState, r: int) -> None:
    """The noisy item graph's one record, before its first release: it covers all of this graph's releases
    (a graph started anew, in a new run on the same ledger, is another mechanism and gets its own)."""
    if graph_records(fed.cfg) and state.graph is not None and state.graph.releases == 0:
        (z, q, n), = graph_records(fed.cfg)
        ledger.append(Release(kind="graph-gaussian", unit="event", round=r, noise_multiplier=z, sample_rate=q,
                              steps=n, extra={"window": fed.cfg.pair_window}))


def select(state: ServerState, got: Replies, r: int) -> tuple[list, list, Step, list[int]]:
    """Which updates this round applies: the deltas, their weights, the step so far and the fresh rounds.

    Synchronous rounds take the on-time updates and drop late ones; the async buffered mode (FedBuff)
    buffers every update and applies the whole buffer once it is full, each scaled by its staleness.
    """
    step = Step(diag={}, lr=0.0, applied=list(got.done), dropped=len(got.late), kept=[(d, r) for d in got.done])
    buf = state.buffer
    if buf is None:
        return got.deltas, got.weights, step, [r] if got.new_events else []
    ontime = [Update(d, x, w, state.version, new_events=1 if n else 0, base_round=r)
              for d, x, w, n in zip(got.done, got.deltas, got.weights, got.n_new, strict=True)]
    step.kept = [(u.device, u.base_round) for u in ontime + got.late if buf.add(u, state.version)]
    step.dropped = len(ontime) + len(got.late) - len(step.kept)
    step.applied = []
    if not buf.ready():
        return [], [], step, []
    ups, step.staleness = buf.take(state.version)
    deltas, weights = discounted(ups, step.staleness)
    step.applied = [u.device for u in ups]
    return deltas, weights, step, [u.base_round for u in ups if u.new_events]


def _add_graph(graph: ItemGraph, cfg: RunConfig, got: Replies) -> None:
    """The round's item graph sums into the graph: the devices' pairs, or under SecAgg+ the unmasked sums (with
    their noise shares: as they are; user level: the clipped parts, noised here)."""
    if not cfg.secure_graph:
        graph.add(got.pairs)
        return
    if not cfg.user_dp:
        graph.add_released(got.graph[0], got.graph[1] if len(got.graph) > 1 else None)
        return
    # user level releases every round: the noise alone where no sum came
    counts, *aff = got.graph or [np.zeros(shape) for shape in graph.sum_shapes]
    graph.add_clipped_sums(counts, aff[0] if aff else None)


def apply_round(state: ServerState, fed: Federation, got: Replies, ledger: Ledger, aggregator: Aggregator,
                plan: RoundPlan, *, late_now: int = 0) -> tuple[ServerState, Step]:
    """One round's update of the global model from its checked replies; the state is updated in place."""
    cfg, r = fed.cfg, plan.round
    if not got.deltas and not got.late and not late_now and got.failed and not cfg.user_dp \
            and got.presummed is None:  # a refused secure sum is a round without update, not a run error
        first = str(got.failed[0][1]).strip().splitlines() or [""]  # a node's error may carry its traceback
        raise FederationError(f"Every device failed in round {r}; first reason: {first[0]}")
    bound(fed, got)
    record_device_releases(fed, ledger, got, r)
    deltas, weights, step, fresh = select(state, got, r)
    # the static baseline freezes the served model after `freeze_after` rounds (devices still
    # personalise their own vectors); the adaptive schedule reads only the aggregated counts
    served = got.served if cfg.serve_eval else None
    step.lr = 0.0 if cfg.freeze_after and r > cfg.freeze_after else state.lr.step(served.counts.start if served
                                                                                  else got.counts)
    if cfg.user_dp:  # written before the version it produces is published
        ledger.append(Release(kind="server-gaussian", unit="user", round=r, noise_multiplier=fed.z_user,
                              sample_rate=fed.q_user, steps=1, clip=cfg.clip, period=plan.period))
    counts = got.row_counts if state.buffer is None else ()  # row counts hold for one round's replies
    step.diag = aggregator.step(state.global_state, state.optimizer, deltas, weights, step.lr, got.presummed,
                                counts=counts)
    check_finite(state, r)
    frozen = bool(cfg.freeze_after and r > cfg.freeze_after)  # the static baseline freezes its graph too
    # sums: summed in as they come, buffered or not; a refused secure sum with noise shares released nothing (nor
    # its graph's); user level releases every round, as its ledger records (the noise alone where no sum came)
    if state.graph is not None and not frozen and (not cfg.secure_graph or cfg.user_dp or got.presummed):
        record_graph(fed, ledger, state, r)
        _add_graph(state.graph, cfg, got)
    if state.buffer is None or deltas:  # a new version is published (async: only when the buffer is applied)
        state.version += 1
        if state.graph is not None and not frozen:
            state.graph_table = state.graph.table()
    if fresh and step.lr > 0:  # a frozen (static) or skipped update reflects nothing new
        state.last_fresh = max(state.last_fresh, *fresh)
    state.round = r
    for d, trained_in in step.kept:
        state.acked[d] = max(state.acked.get(d, -1), trained_in)
    return state, step


def check_finite(state: ServerState, r: int) -> None:
    """The server checks its own new version before it is published: a non-finite one stops the run (the last
    checkpoint keeps the version before it)."""
    bad = [k for k, v in state.global_state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise FederationError(f"Round {r} produced a global model with non-finite values in {', '.join(bad)}, so it "
                              "was not published and the run stops; lower clip, server-lr or lr.")


def round_metrics(fed: Federation, state: ServerState, got: Replies, step: Step, ledger: Ledger, plan: RoundPlan,
                  *, down: int, down_serving: int, late_now: int) -> dict:
    """The algorithm's part of the round's metrics line (privacy, traffic, aggregation, stragglers); ``down`` and
    ``down_serving``: the bytes of arrays a train and a serve-only message carry to one device."""
    cfg, r = fed.cfg, plan.round
    served = got.served if cfg.serve_eval else None
    diag = step.diag
    return {"cohort_hr@10": _num(got.counts.hr), "cohort_events_scored": got.counts.n,
            **_epsilons(fed, ledger, plan.period),
            "staleness": r + 1 - state.last_fresh, "new_events": got.new_events, "bytes_up": got.bytes_up,
            "bytes_down": down * len(plan.cohort), "sampled": len(plan.cohort),
            "bytes_down_serving": down_serving * len(served.per_device) if served else 0, "skipped_budget": got.skipped,
            "frac_clipped": (sum(got.clipped) / len(got.clipped)) if cfg.user_dp and got.clipped else None,
            "mean_preclip_norm": float(np.mean(got.preclip)) if cfg.user_dp and got.preclip else None,
            "noise_std": _num(diag.get("noise_std")), "snr": _num(diag.get("snr")),
            "update_norm": diag.get("update_norm", 0.0), "server_lr": step.lr, "bounded": got.bounded,
            "rows_bounded": got.rows_bounded,
            "robust_trimmed_share": diag.get("robust_trimmed_share"), "late": late_now,
            "late_arrived": len(got.late), "late_dropped": step.dropped, "applied": len(step.applied),
            "version": state.version, "buffered": len(state.buffer.items) if state.buffer is not None else None,
            "mean_staleness": float(np.mean(step.staleness)) if step.staleness else None,
            **({"rows_selected": diag.get("rows_selected")} if cfg.aggregate_noise or cfg.select_rows else {}),
            **({"rows_floored": diag.get("rows_floored")} if cfg.aggregate_noise and cfg.secure_aggregation else {}),
            **({"prior_rounds": state.graph.prior_rounds} if state.graph is not None else {})}


def _epsilons(fed: Federation, ledger: Ledger, period: int) -> dict:
    cfg = fed.cfg
    ev = list(ledger.event_epsilons(cfg.delta, event_accountant(cfg.model, cfg.accountant)).values()) \
        if fed.z_event else []
    user = _num(ledger.user_epsilon(cfg.delta, cfg.accountant)) if cfg.user_dp else None
    return {"epsilon": _num(max(ev)) if ev else (user if cfg.user_dp else 0.0),
            "epsilon_median": _num(statistics.median(ev)) if ev else 0.0, "epsilon_user": user,
            "epsilon_user_period": _num(ledger.user_epsilon(cfg.delta, cfg.accountant, period=period))
            if cfg.user_dp else None}


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
