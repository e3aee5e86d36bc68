"""Secure aggregation of one round's device deltas with Flower's SecAgg+ (user-level DP only).

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

from fedrec.federation.replies import SecureSum
from fedrec.messages import SECURE_METRICS, MessageError, UpdateReport


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
                 round_: int, *, timeout: float) -> SecureSum:
    """Run SecAgg+ over the nodes of ``by_node`` (node -> its sampled devices) for one round.

    Quantisation: each node sends the mean of its devices' clipped deltas, whose coordinates lie in
    ``[-clip, clip]``, weighted by its device count; so the clipping range is the user-level clip and
    the largest weight is the largest device count of a node (1 in a deployment). The resolution
    on the sum is then ``2 * clip * max_weight / 2**22`` per node.
    """
    keys = sorted(global_state)
    params = ndarrays_to_parameters([np.asarray(global_state[k], np.float32) for k in keys])
    fitins = {n: FitIns(params, {**config, "round": round_, "devices": ",".join(str(d) for d in ds),
                                 "global-keys": ",".join(keys)})
              for n, ds in by_node.items() if ds}
    strategy = _RoundStrategy(fitins)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: round_}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                        strategy=strategy)  # type: ignore[arg-type]
    failures: list[str] = []
    if len(fitins) < 2:
        return SecureSum(None, [], {}, [f"round {round_}: SecAgg+ needs at least 2 nodes with sampled devices, "
                                          f"got {len(fitins)}; no update this round"])
    clip = float(config["clip"])
    SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.66, max_weight=float(max(map(len, by_node.values()))),
                       clipping_range=clip, timeout=timeout)(grid, ctx)
    failures += [str(f) for f in strategy.failures]
    if strategy.aggregate is None:
        return SecureSum(None, [], {}, failures or [f"round {round_}: SecAgg+ halted (too few nodes answered)"])
    reports = _device_reports(strategy.results, by_node, failures)
    weight = sum(int(res.num_examples) for _, res in strategy.results)
    # the workflow returns the weighted mean with weights = devices per node: times the total = the sum
    total = {k: a.astype(np.float32) * weight for k, a in zip(keys, strategy.aggregate, strict=True)}
    return SecureSum(total, list(reports), reports, failures)


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
