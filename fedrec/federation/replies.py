"""What the devices of one round sent, checked: every number a node sends is hostile until checked.

:func:`collect` turns the decoded replies of a round (:class:`fedrec.messages.NodeReply`, each with the
round it was asked for) into one :class:`Replies`: validated deltas with their weights, counts and
ledger facts; a bad entry is recorded in ``failed`` and never fails the round. An update computed for
an earlier round (a straggler's) goes to ``late``. With the item graph on, an update's item pairs are
checked against the catalogue and its new events (:meth:`fedrec.itemgraph.Pairs.from_arrays`); bad pairs
fail that update. With event noise at the aggregate, an update's row counts and the norm of its release are
checked against what its events can produce (:class:`RowCheck`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..asynchrony import Update
from ..eval.metrics import PrequentialCounts, ServeCounts
from ..itemgraph import Pairs
from ..messages import DeviceUpdate, NodeReply, UpdateReport
from ..privacy.user_level import OUTSIZED, delta_norm, outsized_bound
from ..server_aggregate import ITEM_TABLES
from ..wire import decode_delta


@dataclass
class Reply:
    """One node's answer to the request of round ``asked``: decoded, or why it failed."""

    asked: int
    node: int
    body: NodeReply | None
    error: str = ""
    devices: frozenset[int] = frozenset()  #: the devices the request asked this node to train


@dataclass
class SecureSum:
    """What a SecAgg+ round produced: the sum of the devices' deltas and their reported metrics."""

    total: dict[str, np.ndarray] | None  #: sum of the clipped deltas (None: the protocol halted)
    devices: list[int]
    metrics: dict[int, UpdateReport]  #: each device's report, checked
    failures: list[str]
    #: event noise at the aggregate: the summed positive-item counts, noise shares included (dense, ``n_items``)
    counts: np.ndarray | None = None
    #: event noise at the aggregate: devices the sum must hold for its shares to make up the full noise
    #: (0: user-level DP, the server adds the noise itself)
    required: int = 0
    #: :attr:`fedrec.config.RunConfig.secure_graph`: the item graph's summed counts and affinities, shares included
    graph: list[np.ndarray] = field(default_factory=list)


@dataclass
class Served:
    """What every device with new events was served this round (serving evaluation)."""

    counts: ServeCounts = field(default_factory=ServeCounts)  #: per event under each blend, and at the start
    per_device: list = field(default_factory=list)
    probes: list = field(default_factory=list)


@dataclass
class Replies:
    """One round's checked replies."""

    done: list = field(default_factory=list)
    deltas: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    clipped: list = field(default_factory=list)
    preclip: list = field(default_factory=list)
    counts: PrequentialCounts = field(default_factory=PrequentialCounts)
    per_device: list = field(default_factory=list)  #: (device, PrequentialCounts) of each completed device
    probes: list = field(default_factory=list)  #: (items, hits) uptake probes (simulation measurement)
    served: Served | None = None  #: what every device with events this round was served (serve-eval)
    bytes_up: int = 0
    new_events: int = 0
    skipped: int = 0
    presummed: int | None = None  #: secure aggregation: ``deltas`` is one sum of this many devices' deltas
    bounded: int = 0  #: deltas the server scaled down to ``max-update-norm``
    rows_bounded: int = 0  #: item rows the server scaled down to ``max-row-norm``
    late: list = field(default_factory=list)  #: Update of devices asked in an earlier round (stragglers)
    late_metrics: list = field(default_factory=list)  #: their metrics (for the privacy ledger)
    n_new: list = field(default_factory=list)  #: new events of each on-time device
    inflight: dict = field(default_factory=dict)  #: device -> round its update is due (simulated slow devices)
    #: item graph: the checked pairs of every accepted update, on time or late (they are sums: a late device's
    #: events count as much as any, and it never sends them again)
    pairs: list[Pairs] = field(default_factory=list)
    #: event noise at the aggregate: the checked ``(ids, counts)`` of each on-time update, as ``deltas``
    row_counts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    #: SecAgg+ with the item graph: its summed counts and affinities (checked for shape; with event noise at the
    #: aggregate the devices' noise shares included, at user level each device's part clipped, the noise to come)
    graph: list[np.ndarray] = field(default_factory=list)

    def map_deltas(self, fn: Callable[[dict], tuple[dict, int]]) -> list[int]:
        """Replace every delta, on-time and late, by ``fn(delta)[0]``; the list of ``fn(delta)[1]``."""
        out = [fn(d) for d in self.deltas]
        self.deltas = [d for d, _ in out]
        for u in self.late:
            u.delta, n = fn(u.delta)
            out.append((u.delta, n))
        return [int(n) for _, n in out]


@dataclass(frozen=True)
class RowCheck:
    """What an update's release is checked against under event noise at the aggregate: the catalogue size
    and one event's bound ``lr * event-clip`` (a release of ``n`` taken events has norm at most ``n`` times it)."""

    n_items: int
    per_event: float
    soft: bool = False  #: user level: counts of L2 norm at most 1 (not whole), whatever the release's norm


@dataclass(frozen=True)
class Limits:
    """What one node may claim in a reply, from the run config (:meth:`of`); the defaults are the config's."""

    max_weight: int = 10_000  #: ``max-weight``: an update weighs (and a device serves) at most this many events
    due_within: int = 8  #: an in-flight update is due at most this many rounds after it was asked for
    #: a delta above :func:`~fedrec.privacy.user_level.outsized_bound` of the model fails (without DP, where nothing
    #: else bounds it: user-level DP refuses one above the clip, a release at the aggregate is bounded by its counts)
    outsized: bool = True
    #: DP-SGD on each device: the largest norm its update can have (:func:`dpsgd_bound`; its noise is not clipped,
    #: so a device with one event may honestly send far more than the outsized bound); None: not that mode
    noisy_most: float | None = None
    #: event-level DP: the most DP steps an update takes (``local-steps``) and the most any one event can have been
    #: used in (``(replay-rounds + 1) x local-steps``): what the ledger records, and the accountant composes, of it
    steps: int | None = None
    exposure: int | None = None
    n_items: int | None = None  #: the catalogue: a probed item is one of it
    #: the devices the server has in flight (a straggler's update of an earlier round comes only from one of them)
    #: and the rounds that sent a version this run (an update computed on another round's has no base); None: any
    busy: frozenset[int] | None = None
    versions: frozenset[int] | None = None

    @classmethod
    def of(cls, cfg, n_items: int | None = None, busy: Sequence[int] | None = None,
           versions: Sequence[int] | None = None, *, z_event: float = 0.0, dims: int = 0) -> Limits:
        """``max-weight``; in-flight updates due within ``max(slow-rounds, max-staleness)`` rounds; outsized deltas
        checked without DP, and DP-SGD's on each device by :func:`dpsgd_bound` (``z_event``: its noise multiplier,
        ``dims``: the global parameters' count); event-level DP's steps and exposures."""
        steps = cfg.steps if cfg.event_dp else None
        noisy = dpsgd_bound(cfg, z_event, dims) if cfg.event_dp and not cfg.aggregate_noise and dims else None
        return cls(cfg.max_weight, max(cfg.slow_rounds, cfg.max_staleness, 1), cfg.privacy == "none", noisy,
                   steps, None if steps is None else (cfg.replay_rounds + 1) * steps, n_items,
                   None if busy is None else frozenset(busy), None if versions is None else frozenset(versions))


#: how many noise stds beyond its expected norm a DP-SGD update may reach (a Gaussian vector's norm exceeds its
#: expected one by t stds with probability below exp(-t^2 / 2): 10^-22 here)
NOISE_STDS = 10.0


def dpsgd_bound(cfg, z: float, dims: int) -> float:
    """The largest norm an honest update of DP-SGD on a device can have: each of its ``steps`` steps moves the
    parameters by ``lr / (q n)`` times at most ``n`` clipped gradients (``event-clip`` each) plus a Gaussian of std
    ``z x event-clip`` per coordinate; with ``n >= 1`` events, ``lr x clip / q x (steps + z (sqrt(steps x dims) +``
    :data:`NOISE_STDS` ``))``."""
    return cfg.lr * cfg.event_clip / cfg.sample_rate * (cfg.steps + z * (math.sqrt(cfg.steps * dims) + NOISE_STDS))


@dataclass(frozen=True)
class GraphCheck:
    """What the server checks a device's item pairs against: the catalogue size and the run's window."""

    n_items: int
    window: int
    #: take the pairs of on-time updates only (user-level DP: a late reply's device was sampled for an earlier
    #: round's release, and a noisy sum must hold only the devices sampled for it)
    on_time_only: bool = False


def collect(replies: Sequence[Reply], gstate: dict[str, torch.Tensor], clip: float | None, round_: int,
            home: Mapping[int, int], graph: GraphCheck | None = None, rows: RowCheck | None = None,
            limits: Limits | None = None) -> Replies:
    """Validate and unpack the replies of round ``round_`` (see the module docstring).

    With ``clip`` (user-level DP) every device weighs the same and a delta above the clip is refused;
    else deltas are weighted by their events. ``home`` (device -> node) holds each reply to its own
    devices: an update counts only from the node hosting the device, once a round, and on time only
    when the request asked for it (a straggler's update, computed for an earlier round, is handed in
    with any later reply of its node). ``graph`` (the item graph is on) is what item pairs are checked
    against; without it, an update that carries pairs fails. ``rows`` (event noise at the aggregate): every
    update must carry its row counts, checked with its release; without it, one that carries them fails.
    ``limits`` (default :class:`Limits`): the weight cap, and how far ahead an in-flight update may be due.
    Serving counts count only for devices the node hosts, once a round each, of at most ``max_weight`` events.
    """
    out, seen, served = Replies(), set[int](), set[int]()
    limits = limits or Limits()
    # the norm bound where no clip holds a delta: the model's (without DP), or DP-SGD's (noise on each device)
    most = None if clip is not None else outsized_bound(gstate) if limits.outsized else limits.noisy_most
    for rep in replies:
        if rep.body is None:
            out.failed.append((rep.node, rep.error))
            continue
        node = rep.body
        if node.served is not None and rep.asked == round_:
            _take_served(out, rep.node, node, home, served, limits.max_weight, limits.n_items)
        out.failed += [(f.device, f.reason) for f in node.failures]
        _take_asked(out, rep, node, limits.due_within)
        for u in node.updates:
            base = u.report.base_round if u.report.base_round is not None else rep.asked
            problem = _foreign(u.device, rep, home, seen, late=base < rep.asked) or _claims(u, base, rep, limits)
            if problem:
                out.failed.append((u.device, problem))
                continue
            seen.add(u.device)
            try:
                _take(out, u, rep.asked, round_, gstate, clip, graph, rows, limits, most)
            except Exception as e:  # a hostile update fails alone, whatever it raises
                out.failed.append((u.device, f"its update cannot be taken in ({type(e).__name__}: {str(e)[:200]})"))
    return out


def _claims(u: DeviceUpdate, base: int, rep: Reply, limits: Limits) -> str:
    """Why device ``u.device``'s report claims what it cannot have (``base``: the round its update was asked for),
    or '': a round after the request, or before it from a device not in flight; a round that sent no version; more
    new events than an update weighs; more DP steps, or an event used in more, than event-level DP takes."""
    m, d = u.report, u.device
    if base > rep.asked or (base < rep.asked and limits.busy is not None and d not in limits.busy):
        return f"device {d} claims an update of round {base}, which node {rep.node} was not asked for in round {rep.asked}"
    if limits.versions is not None and base not in limits.versions:
        return f"device {d} claims an update of round {base}, which sent no version in this run"
    if m.n_new > limits.max_weight:
        return f"device {d} claims {m.n_new} new events, more than max-weight = {limits.max_weight}"
    if limits.steps is not None and limits.exposure is not None and \
            (m.steps > limits.steps or m.max_exposure > limits.exposure):
        return (f"device {d} claims {m.steps} DP steps and events used in {m.max_exposure}, more than an update takes "
                f"({limits.steps}) or the replay window allows ({limits.exposure})")
    return ""


def _take_served(out: Replies, node: int, body: NodeReply, home: Mapping[int, int], served: set[int],
                 most: int, n_items: int | None = None) -> None:
    """A node's serving report: the devices it hosts, each once a round, with at most ``most`` events each."""
    assert body.served is not None
    out.served = out.served or Served()
    refused = []
    for d, c in body.served.per_device:
        if home.get(d) != node or d in served or c.start.n > most or any(b.n > most for b in c.blends):
            refused.append(d)
            continue
        served.add(d)
        out.served.counts.add(c)
        out.served.per_device.append((d, c))
    if refused:
        out.failed.append((node, f"node {node} reported serving {len(refused)} devices it does not host, twice, or "
                                 f"with more than {most} events (e.g. {refused[:5]}); they are not counted"))
    elif _in_catalogue(body.served.probe_items, n_items):  # a node that misreports its serving adds no probes
        out.served.probes.append((body.served.probe_items, body.served.probe_hits))
    else:
        out.failed.append((node, f"node {node} reported probe items outside the catalogue; they are not counted"))


def _in_catalogue(items: Sequence[int], n_items: int | None) -> bool:
    return n_items is None or all(0 <= i < n_items for i in items)


def _take_asked(out: Replies, rep: Reply, node: NodeReply, due_within: int) -> None:
    """In-flight notices (due within ``due_within`` rounds) and budget skips, of the devices the request asked for only."""
    for i in node.inflight:
        if i.device in rep.devices and rep.asked < i.due <= rep.asked + due_within:
            out.inflight[i.device] = i.due
        else:
            out.failed.append((i.device, f"node {rep.node} reports device {i.device} in flight, which it was "
                                         f"not asked to train in round {rep.asked} (or due {i.due} is not within "
                                         f"{due_within} rounds)"))
    for s in node.skips:
        if s.device in rep.devices:
            out.skipped += 1
        else:
            out.failed.append((s.device, f"node {rep.node} reports a skip of device {s.device}, which it was not asked"))


def _foreign(d: int, rep: Reply, home: Mapping[int, int], seen: set[int], *, late: bool) -> str:
    """Why node ``rep.node`` may not hand in device ``d``'s update in this reply, or ''."""
    if home.get(d) != rep.node:
        return f"node {rep.node} sent an update for device {d}, which it does not host"
    if d in seen:
        return f"device {d} sent a second update in one round"
    if not late and d not in rep.devices:
        return f"node {rep.node} sent an update for device {d}, which it was not asked to train in round {rep.asked}"
    return ""


def _take(out: Replies, u: DeviceUpdate, asked: int, round_: int, gstate: dict[str, torch.Tensor],
          clip: float | None, graph: GraphCheck | None, rows: RowCheck | None, limits: Limits,
          most: float | None = None) -> None:
    d, m, max_weight = u.device, u.report, limits.max_weight
    try:
        problem = _wire_shapes(u.arrays, gstate)
        if problem:
            raise ValueError(problem)
        delta = decode_delta(u.arrays)
    except ValueError as e:
        out.failed.append((d, str(e)))
        return
    problem = validate(delta, gstate, clip, most, beyond=None if limits.outsized or most is None else
                       f"{most:.4g}, the most an update of DP-SGD can move it")
    pairs, why = _pairs(u, graph) if problem is None else (None, "")
    counts, why = _rows(u, delta, rows, max_weight) if not (problem or why) else (None, why)
    if not (problem or why) and u.probe is not None and not _in_catalogue(u.probe[0], limits.n_items):
        why = f"device {d} sent probe items outside the catalogue"
    if problem or why:
        out.failed.append((d, problem or why))
        return
    base = m.base_round if m.base_round is not None else asked
    if pairs is not None:
        out.bytes_up += sum(v.nbytes for v in (u.pairs or {}).values())
        if not (graph is not None and graph.on_time_only and base < round_):
            out.pairs.append(pairs)
    out.bytes_up += sum(v.nbytes for v in u.arrays.values())
    weight = 1.0 if clip is not None else float(min(m.num_examples, max_weight))  # a claim beyond it is cut
    ledger = {"steps": m.steps, "max-exposure": m.max_exposure}
    if base < round_:
        out.late.append(Update(d, delta, weight, base_version=base, new_events=m.n_new, base_round=base))
        out.late_metrics.append(ledger)
        return
    out.done.append(d)
    if counts is not None:
        out.row_counts.append(counts)
        out.bytes_up += sum(v.nbytes for v in (u.rows or {}).values())
    out.deltas.append(delta)
    out.weights.append(weight)
    out.metrics.append(ledger)
    out.counts.add(m.counts)
    out.per_device.append((d, m.counts))
    if u.probe is not None:
        out.probes.append(u.probe)
    out.new_events += m.n_new
    out.n_new.append(m.n_new)
    out.clipped.append(m.clipped)
    out.preclip.append(m.preclip_norm)


def _wire_shapes(arrays: Mapping[str, np.ndarray], gstate: dict[str, torch.Tensor]) -> str | None:
    """Why the wire arrays of a delta cannot be one of ``gstate``'s shape, checked before any is converted."""
    for k, v in arrays.items():
        if not isinstance(v, np.ndarray):
            return f"delta entry {k!r} is not an array"
        name, _, part = k.rpartition(".") if k.endswith((".ids", ".rows")) else (k, "", "")
        if name not in gstate:
            return f"delta has an array {k!r}, which names no global parameter"
        shape = tuple(gstate[name].shape)
        ok = (v.shape == shape if not part else v.ndim == 1 and len(v) <= shape[0] if part == "ids"
              else v.ndim == len(shape) and v.shape[0] <= shape[0] and v.shape[1:] == shape[1:])
        if not ok:
            return f"delta array {k!r} has shape {v.shape}, which does not fit {name} of shape {shape}"
    return None


def _pairs(u: DeviceUpdate, graph: GraphCheck | None) -> tuple[Pairs | None, str]:
    """Device ``u.device``'s item pairs, checked (None when it sent none), or why they are refused."""
    if u.pairs is None:
        return None, ""
    if graph is None:
        return None, f"device {u.device} sent item pairs, but the item graph is off"
    if u.report.n_new > u.report.num_examples:
        return None, f"device {u.device} sent pairs of {u.report.n_new} new events but trained on fewer"
    try:
        return Pairs.from_arrays(u.pairs, graph.n_items, events=u.report.n_new, window=graph.window), ""
    except KeyError as e:
        return None, f"device {u.device} sent item pairs without the array {e}"
    except ValueError as e:
        return None, f"device {u.device} sent bad item pairs: {e}"


def _rows(u: DeviceUpdate, delta: dict, check: RowCheck | None, max_weight: int = 10_000
          ) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """Device ``u.device``'s row counts, checked with its release, or why they are refused.

    The counts are whole, at least 1 per listed row, on unique rows of the catalogue, and sum to at most
    the events it trained on, and at most ``max_weight`` (what an update weighs: a larger claim would shrink every
    other device's rows in the per-row average); its release has norm at most ``sum(counts) * per_event``.
    """
    d = u.device
    if check is None:
        return None, f"device {d} sent row counts, which this run does not ask for" if u.rows else ""
    if u.rows is None or "ids" not in u.rows or "counts" not in u.rows:
        return None, f"device {d} sent no row counts, which event noise at the aggregate needs"
    ids, counts = u.rows["ids"], u.rows["counts"]
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or counts.shape != ids.shape:
        return None, f"device {d} sent row counts of shapes {ids.shape} and {counts.shape}"
    if len(ids) and (ids.min() < 0 or ids.max() >= check.n_items or len(np.unique(ids)) != len(ids)):
        return None, f"device {d} sent row counts on rows out of range [0, {check.n_items}) or repeated"
    total = float(np.sum(counts, dtype=np.float64))
    if check.soft:
        ok = bool(np.all(np.isfinite(counts)) and np.all(counts >= 0)) and \
            float(np.sqrt(np.sum(np.square(counts, dtype=np.float64)))) <= 1 + 1e-6
        return ((ids.astype(np.int64), counts.astype(np.float64)), "") if ok else \
            (None, f"device {d} sent row counts that are not non-negative with L2 norm at most 1")
    if not (np.all(np.isfinite(counts)) and np.all(counts >= 1) and np.all(counts == np.round(counts))) \
            or total > min(u.report.num_examples, max_weight):
        return None, (f"device {d} sent row counts that are not whole, positive and within its {u.report.num_examples} "
                      f"events and max-weight = {max_weight}")
    norm = delta_norm(delta)
    if norm > total * check.per_event * (1 + 1e-3) + 1e-6:
        return None, f"device {d} sent a release of norm {norm:.4g} > {total:g} events x {check.per_event:g}"
    return (ids.astype(np.int64), counts.astype(np.float64)), ""


def add_secure_sum(out: Replies, sec: SecureSum, gstate: dict[str, torch.Tensor], clip: float, nodes: int,
                   graph: Sequence[tuple[int, ...]] = (), limits: Limits | None = None) -> None:
    """Take in a SecAgg+ round's sum: checked for shape and for the norm ``len(devices) x clip`` it can have (``graph``:
    the shapes the item graph's sums must have; user level: each device's part of norm at most 1).

    Under event noise at the aggregate (``sec.required``) :func:`add_secure_rows` takes it in instead.
    """
    limits = limits or Limits()
    if sec.required:
        add_secure_rows(out, sec, gstate, nodes, graph, limits)
        return
    out.failed += [("secure aggregation", f) for f in sec.failures]
    if sec.total is not None:
        problem = validate(sec.total, gstate) or _graph_problem(sec.graph, graph)
        norm, parts = delta_norm(sec.total), float(np.sqrt(sum(np.sum(np.square(g)) for g in sec.graph)))
        if problem is None and norm > len(sec.devices) * clip * (1 + 1e-3) + 1e-3:
            problem = f"the sum of {len(sec.devices)} clipped deltas has norm {norm:.4g} > {len(sec.devices)} x clip"
        if problem is None and parts > len(sec.devices) * (1 + 1e-3) + 1e-3:
            problem = f"the item graph's sum of {len(sec.devices)} clipped parts has norm {parts:.4g} > {len(sec.devices)}"
        if problem:
            out.failed.append(("secure aggregation", problem))
        else:
            out.deltas, out.presummed, out.graph = [sec.total], len(sec.devices), list(sec.graph)
            # masked vectors: about the dense size, from each node with sampled devices
            out.bytes_up = (sum(v.nbytes for v in sec.total.values()) + sum(g.nbytes for g in sec.graph)) * nodes
    _take_secure_devices(out, sec, limits)


def _graph_problem(got: Sequence[np.ndarray], want: Sequence[tuple[int, ...]]) -> str | None:
    """Why the item graph's unmasked sums are refused (not the shapes expected, or not finite), or None."""
    if [np.shape(g) for g in got] != list(want) or not all(np.all(np.isfinite(g)) for g in got):
        return f"the item graph's sums have shapes {[np.shape(g) for g in got]} (expected {list(want)}) or non-finite values"
    return None


def add_secure_rows(out: Replies, sec: SecureSum, gstate: dict[str, torch.Tensor], nodes: int,
                    graph: Sequence[tuple[int, ...]] = (), limits: Limits | None = None) -> None:
    """Take in a SecAgg+ round's noisy sum under event noise at the aggregate (noise shares included).

    The table sum becomes one presummed delta ``(all rows, dense sum)`` and the counts one ``(all rows,
    counts)`` entry of ``row_counts``, as :class:`fedrec.aggregation.AggregateGaussian` takes them with
    ``presummed``. A sum of fewer than ``sec.required`` devices (too little noise), of the wrong shape or
    not finite is refused; then ``presummed = 0``: the round releases nothing (its failure line says why).
    """
    out.failed += [("secure aggregation", f) for f in sec.failures]
    out.presummed = 0
    if sec.total is None or sec.counts is None:
        return
    n_items = gstate[ITEM_TABLES[0]].shape[0]
    problem = validate(sec.total, gstate)
    if problem is None and (sec.counts.shape != (n_items,) or not np.all(np.isfinite(sec.counts))):
        problem = f"the summed counts have shape {sec.counts.shape} (expected ({n_items},)) or non-finite values"
    problem = problem or _graph_problem(sec.graph, graph)
    if problem is None and len(sec.devices) < sec.required:
        problem = (f"the sum holds {len(sec.devices)} devices, fewer than the {sec.required} whose noise shares "
                   "make up the full noise; nothing is released")
    if problem:
        out.failed.append(("secure aggregation", problem))
        return
    rows = np.arange(n_items, dtype=np.int64)
    out.deltas = [{k: (rows, v) if k in ITEM_TABLES else v for k, v in sec.total.items()}]
    out.row_counts = [(rows, np.asarray(sec.counts, np.float64))]
    out.graph = list(sec.graph)
    out.presummed = len(sec.devices)
    out.bytes_up = (sum(v.nbytes for v in sec.total.values()) + sec.counts.nbytes + sum(g.nbytes for g in sec.graph)) \
        * nodes
    _take_secure_devices(out, sec, limits)


def _take_secure_devices(out: Replies, sec: SecureSum, limits: Limits | None = None) -> None:
    """The reports of the devices in an accepted secure sum (for metrics and the privacy ledger): their claims are
    cut to ``limits`` (the sum holds their data already; a claim beyond what an update takes is a lie)."""
    limits = limits or Limits()
    for d in sec.devices if out.presummed else []:
        m = sec.metrics[d]
        out.done.append(d)
        out.weights.append(1.0)
        out.metrics.append({"steps": min(m.steps, limits.steps if limits.steps is not None else m.steps),
                            "max-exposure": min(m.max_exposure, limits.exposure if limits.exposure is not None
                                                else m.max_exposure)})
        out.counts.add(m.counts)
        out.per_device.append((d, m.counts))
        out.new_events += min(m.n_new, limits.max_weight)
        out.clipped.append(m.clipped)
        out.preclip.append(m.preclip_norm)


def validate(delta: dict, gstate: dict[str, torch.Tensor], clip: float | None = None,
             most: float | None = None, beyond: str | None = None) -> str | None:
    """Why a decoded delta (dense arrays or sparse ``(ids, rows)``) cannot be aggregated, or None: ``clip`` (user-level
    DP) and ``most`` bound its norm (:func:`~fedrec.privacy.user_level.outsized_bound`, or ``beyond`` says which
    bound it is)."""
    if set(delta) != set(gstate):
        return f"delta has keys {sorted(delta)}, expected {sorted(gstate)}"
    for k, v in delta.items():
        problem = _check_array(k, v, tuple(gstate[k].shape))
        if problem:
            return problem
    norm = delta_norm(delta) if clip is not None or most is not None else 0.0
    if clip is not None and norm > clip * (1 + 1e-4):
        return f"delta norm {norm:.4g} exceeds the clip {clip}"
    if most is not None and not norm <= most:
        return f"delta norm {norm:.4g} is more than " + (beyond or f"{OUTSIZED:g} times the model's: no step of it")
    return None


def _check_array(k: str, v, shape: tuple[int, ...]) -> str | None:
    if isinstance(v, tuple):
        ids, rows = v
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or tuple(rows.shape) != (len(ids), *shape[1:]):
            return f"sparse delta {k} has ids {ids.shape} and rows {rows.shape}, expected rows of shape {shape[1:]}"
        if len(ids) and (ids.min() < 0 or ids.max() >= shape[0] or len(np.unique(ids)) != len(ids)):
            return f"sparse delta {k} has row ids out of range [0, {shape[0]}) or repeated"
        v = rows
    elif tuple(v.shape) != shape:
        return f"delta {k} has shape {tuple(v.shape)}, expected {shape}"
    if not np.all(np.isfinite(v)):
        return f"delta {k} has non-finite values"
    return None
