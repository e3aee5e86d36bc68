"""Secure aggregation of one round's device deltas with Flower's SecAgg+ (user-level DP, or event noise
at the aggregate with distributed noise shares).

Flower ships SecAgg+ only for its legacy API: ``SecAggPlusWorkflow`` needs a ``LegacyContext``
whose ``strategy`` picks the nodes (``configure_fit``) and receives the unmasked result
(``aggregate_fit``). Our round loop keeps its own cohort sampling, noise and ledger; for the
aggregation step it hands the workflow a one-round :class:`_RoundStrategy` that returns exactly
the nodes and instructions of this round, and captures what the workflow unmasks.

What the server learns: the *sum* of the sampled devices' clipped deltas (as a weighted mean with
the device counts as weights, which are public here: each device weighs 1), never one device's
delta. On each node Flower's ``secaggplus_mod`` quantises (per coordinate, to
``[-clipping_range, clipping_range]``), masks and shares; the server needs at least the
reconstruction threshold of nodes to answer each stage. A node that hosts several devices (a
simulation shard) masks their mean: secure aggregation then hides nodes, not devices.
What it cannot check any more: each device's clip. Under secure aggregation the user-level DP
guarantee assumes the devices clip honestly (docs/privacy.md).

Event noise at the aggregate (``event-noise = "aggregate"``): each node masks its devices' releases (in
units of one event's bound), their positive-item counts as one more array after the global keys, and one
noise share per device (:mod:`fedrec.privacy.shares`). The reconstruction threshold is set so that any sum
the server can unmask holds at least ``m = ceil((1 - dropout-tolerance) x sampled devices)`` devices, whose
shares add up to the full noise; fewer, and the round releases nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedrec.config import RunConfig
from fedrec.federation.replies import SecureSum
from fedrec.itemgraph import PROFILES
from fedrec.itemgraph import split as split_version
from fedrec.messages import SECURE_METRICS, MessageError, UpdateReport
from fedrec.privacy.shares import SharePlan, node_threshold, quantisation_problem, share_plan


class _Polling:
    """The grid, with ``send_and_receive`` polling as :func:`fedrec.server.app.exchange` does (0.05 s at first,
    backing off to :data:`fedrec.server.app.MAX_POLL`) instead of Flower's fixed 3 s: each of SecAgg+'s four stages
    would otherwise wait up to 3 s after its last reply. A node silent at the deadline gets an error reply, which
    the workflow counts as a dropped node, as it does a missing one."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:  # noqa: ANN001 (Flower's)
        from .app import exchange  # noqa: PLC0415 - app imports this module lazily too

        return exchange(self._grid, list(messages), 86400.0 if timeout is None else timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class _Proxy:
    node_id: int
    cid: str = ""


@dataclass
class _RoundStrategy:
    """The one-round legacy strategy the SecAgg+ workflow asks; it only hands out and captures."""

    fitins: dict[int, FitIns]
    results: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    aggregate: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return [(_Proxy(n, str(n)), ins) for n, ins in sorted(self.fitins.items())]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        self.results, self.failures = results, failures
        if not results:
            return None, {}
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters)  # the workflow set the unmasked mean
        return results[0][1].parameters, {}


def secure_round(grid: Grid, by_node: dict[int, list[int]], global_state: dict[str, np.ndarray], config: dict,
                 round_: int, *, timeout: float, acked: dict[int, tuple[int, ...]] | None = None) -> SecureSum:
    """Run SecAgg+ over the nodes of ``by_node`` (node -> its sampled devices) for one round (``acked``: node ->
    :attr:`fedrec.messages.RoundInstruction.acked` of its devices).

    User-level DP: each node sends the mean of its devices' clipped deltas, whose coordinates lie in
    ``[-clip, clip]``, weighted by its device count; so the clipping range is the user-level clip and the
    largest weight is the largest device count of a node (1 in a deployment). The resolution on the sum is
    then ``2 * clip * max_weight / 2**22`` per node. Event noise at the aggregate: the nodes add noise
    shares (:mod:`fedrec.privacy.shares`, which sets the range and the reconstruction threshold), and a sum
    is returned only when it holds at least the ``m`` devices whose shares make up the full noise.
    """
    sent = sorted(global_state)  # the whole version: parameters, and what the devices read beside them
    keys = sorted(split_version(global_state)[0])  # what the masked vector sums: the parameters alone
    by_node = {n: list(ds) for n, ds in by_node.items() if ds}
    if len(by_node) < 2:
        return SecureSum(None, [], {}, [f"round {round_}: SecAgg+ needs at least 2 nodes with sampled devices, "
                                          f"got {len(by_node)}; no update this round"])
    plan = _share_plan(config, by_node)
    setting, problem = _setting(config, by_node, plan)
    required = plan.required if plan is not None else 0
    if problem:
        return SecureSum(None, [], {}, [f"round {round_}: {problem}; no update this round"], required=required)
    params = ndarrays_to_parameters([np.asarray(global_state[k], np.float32) for k in sent])
    extra = {"share-devices": plan.devices} if plan is not None else {}
    fitins = {n: FitIns(params, {**config, **extra, "round": round_, "devices": ",".join(str(d) for d in ds),
                                 "acked": ",".join(str(a) for a in (acked or {}).get(n, ())),
                                 "global-keys": ",".join(sent), "delta-keys": ",".join(keys)})
              for n, ds in by_node.items()}
    strategy = _RoundStrategy(fitins)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: round_}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                        strategy=strategy)  # type: ignore[arg-type]
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=setting.threshold, max_weight=setting.max_weight,
                       clipping_range=setting.clipping_range, timeout=timeout)(_Polling(grid), ctx)  # type: ignore[arg-type]
    failures = [str(f) for f in strategy.failures]
    if strategy.aggregate is None:
        why = (f"fewer than {setting.threshold} of {len(by_node)} nodes answered every stage (the noise shares "
               f"need {required} of the {plan.devices} sampled devices)" if plan is not None
               else "too few nodes answered")
        return SecureSum(None, [], {}, failures + [f"round {round_}: SecAgg+ halted: {why}; no update this round"],
                         required=required)
    reports = _device_reports(strategy.results, by_node, failures)
    weight = sum(int(res.num_examples) for _, res in strategy.results)
    # the workflow returns the weighted mean with weights = devices per node: times the total = the sum
    graph = (1 + (PROFILES in global_state)) if _run_config(config).secure_graph else 0
    if plan is None:
        return _clipped_sum(strategy.aggregate, weight, keys, graph, float(config["clip"]), reports, failures, round_)
    arrays = [a.astype(np.float64) * weight for a in strategy.aggregate]
    return _noisy_sum(arrays, keys, strategy.results, reports, failures, plan, _sensitivity(config), round_, graph)


def _clipped_sum(aggregate: list[np.ndarray], weight: int, keys: list[str], graph: int, clip: float,
                 reports: dict[int, UpdateReport], failures: list[str], round_: int) -> SecureSum:
    """User level: the unmasked sum of the clipped deltas, and the last ``graph`` arrays, the item graph's clipped
    counts and affinities (sent in the delta's range, ``clip`` times their graph units: back in those units)."""
    problem = ""
    if len(aggregate) != len(keys) + graph:
        problem = f"the unmasked sum has {len(aggregate)} arrays, expected {len(keys) + graph}"
    elif weight != len(reports):
        problem = f"the sum holds {weight} devices but {len(reports)} of them reported soundly"
    if problem:
        return SecureSum(None, [], {}, failures + [f"round {round_}: {problem}; no update this round"])
    total = {k: a.astype(np.float32) * weight for k, a in zip(keys, aggregate, strict=False)}
    return SecureSum(total, list(reports), reports, failures,
                     graph=[a.astype(np.float64) * weight / clip for a in aggregate[len(keys):]])


@dataclass(frozen=True)
class _Setting:
    """SecAgg+'s parameters for one round."""

    threshold: int | float
    max_weight: float
    clipping_range: float


def _run_config(config: dict) -> RunConfig:
    return RunConfig.of_message(config, "secure round")


def _sensitivity(config: dict) -> float:
    cfg = _run_config(config)
    return cfg.lr * cfg.event_clip


def _share_plan(config: dict, by_node: dict[int, list[int]]) -> SharePlan | None:
    """The round's noise shares under event noise at the aggregate (None under user-level DP)."""
    cfg = _run_config(config)
    if not cfg.aggregate_noise:
        return None
    graph = float(config.get("graph-noise-std", 0.0)) if cfg.secure_graph else 0.0
    return share_plan(float(config["effective-noise-multiplier"]), cfg.count_share, cfg.dropout_tolerance,
                      sum(map(len, by_node.values())), graph)


def _setting(config: dict, by_node: dict[int, list[int]], plan: SharePlan | None) -> tuple[_Setting, str]:
    """The workflow's threshold, weight and range, or why the round cannot run securely."""
    max_weight = float(max(map(len, by_node.values())))
    if plan is None:  # user level: a clipped delta never leaves [-clip, clip]
        return _Setting(0.66, max_weight, float(config["clip"])), ""
    counts = [len(ds) for ds in by_node.values()]
    setting = _Setting(node_threshold(counts, plan.required, plan.tolerance), max_weight, plan.clipping_range)
    return setting, quantisation_problem(plan, len(by_node), max_weight)


def _noisy_sum(arrays: list[np.ndarray], keys: list[str], results: list, reports: dict[int, UpdateReport],
               failures: list[str], plan: SharePlan, sensitivity: float, round_: int, graph: int = 0) -> SecureSum:
    """The unmasked sum split into the table sum (back in parameter units), the counts and the last ``graph``
    arrays (the item graph's counts and, where the devices read profiles, affinities), if it is whole.

    The sum is refused when a device in it cannot be accounted for (a garbled or missing report, a node
    whose weight is not its number of devices) or when it holds fewer than ``plan.required`` devices.
    """
    listed = sum(int(res.num_examples) for _, res in results)
    problem = ""
    if len(arrays) != len(keys) + 1 + graph:
        problem = (f"the unmasked sum has {len(arrays)} arrays, expected {len(keys) + 1 + graph} (the keys, the counts"
                   f"{' and the item graph' if graph else ''})")
    elif listed != len(reports):
        problem = f"the sum holds {listed} devices but {len(reports)} of them reported soundly"
    elif len(reports) < plan.required:
        problem = (f"the sum holds {len(reports)} devices, fewer than the {plan.required} whose noise shares "
                   f"make up the full noise")
    if problem:
        return SecureSum(None, [], {}, failures + [f"round {round_}: {problem}; no update this round"],
                         required=plan.required)
    total = {k: (a * sensitivity).astype(np.float32) for k, a in zip(keys, arrays, strict=False)}
    return SecureSum(total, list(reports), reports, failures, counts=arrays[len(keys)], required=plan.required,
                     graph=arrays[len(keys) + 1:])


def _device_reports(results: list, by_node: dict[int, list[int]], failures: list[str]) -> dict[int, UpdateReport]:
    """Each node's per-device reports, checked (:class:`UpdateReport`); a device the node was not asked to
    train, named twice, or with a garbled report is a failure, never counted."""
    out: dict[int, UpdateReport] = {}
    for proxy, res in results:
        for name in str(res.metrics.get("devices", "")).split(","):
            if not name:
                continue
            try:
                d = int(name)
                if d not in by_node.get(proxy.node_id, []) or d in out:
                    raise MessageError(f"node {proxy.node_id} reports device {d}, which it was not asked to train")
                out[d] = UpdateReport.from_flat({m: res.metrics[f"{m}:{d}"] for m in SECURE_METRICS})
            except (MessageError, KeyError, ValueError) as e:
                failures.append(f"secure aggregation: {e}")
    return out
