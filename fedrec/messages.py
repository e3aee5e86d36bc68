"""Every message a node sends or receives, encoded and decoded in this one module.

The server sends three kinds of request, each a Flower ``RecordDict``:

* ``query`` (which devices do you host?): record ``config``, the run config (``RunConfig.to_flat()``);
  the reply is a :class:`NodeInfo` in record ``info``.
* ``train`` (serve every hosted device, train the named ones): records ``arrays`` (the global
  parameters), ``config`` (the run config) and ``round`` (a :class:`RoundInstruction`: what changes
  from round to round, kept apart from the run config).
* ``query.serve`` (serving only, the plain half of a SecAgg+ round): as ``train``, with no devices.

A node replies with a :class:`NodeReply`: per device ``delta-<d>`` (the wire-encoded delta of
global parameters, :mod:`fedrec.wire`) and ``metrics-<d>`` (:class:`UpdateReport`), with the item graph
on also ``pairs-<d>`` (the item pairs of its new events, :meth:`fedrec.itemgraph.Pairs.arrays`), with event noise
at the aggregate also ``rows-<d>`` (``ids``, ``counts``: the positive items of the events its release took), or
``skip-<d>``, ``error-<d>`` or ``inflight-<d>``; per node ``serve`` and ``serve-probe`` (what every
hosted device with new events scored). Whatever a node sends is hostile until checked: a malformed
entry decodes to a :class:`DeviceFailure` of that device, or, when the node cannot be told apart,
raises :class:`MessageError`, which fails that reply alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .eval.metrics import BLENDS, PrequentialCounts, ServeCounts

#: record names of a request
ARRAYS, CONFIG, ROUND, INFO = "arrays", "config", "round", "info"
#: record names of a reply (per device ``<kind>-<device>``; per node ``serve``, ``serve-probe``)
DELTA, METRICS, PROBE, SKIP, ERROR, INFLIGHT = "delta", "metrics", "probe", "skip", "error", "inflight"
PAIRS, ROWS = "pairs", "rows"
SERVE, SERVE_PROBE = "serve", "serve-probe"
#: the metrics of one device's update, in the order they are sent
REPORT_KEYS = ("num-examples", "n-new", "eval-n", "eval-hits", "eval-ndcg", "epsilon", "steps", "max-exposure",
               "clipped", "preclip-norm", "skipped")
#: the part of a report a node sends beside the masked sum in a secure-aggregation round
#: (legacy FitRes metrics ``"<name>:<device>"``)
SECURE_METRICS = tuple(k for k in REPORT_KEYS if k not in ("epsilon", "skipped"))


#: which Flower record type carries each record (the adapters in ``fedrec.clients.records`` build them)
_RECORD_TYPE = {ARRAYS: "arrays", DELTA: "arrays", PAIRS: "arrays", ROWS: "arrays", METRICS: "metrics", PROBE: "metrics", SERVE: "metrics",
                SERVE_PROBE: "metrics"}


def record_type(name: str) -> str:
    """``arrays``, ``metrics`` or ``config``: the Flower record type of the record called ``name``."""
    kind = name if name in _RECORD_TYPE else name.rpartition("-")[0]
    return _RECORD_TYPE.get(kind, "config")


class MessageError(ValueError):
    """A message that cannot be decoded; the text says what is wrong with it."""


#: what converting a hostile value can raise (``int(inf)`` raises OverflowError)
_GARBLED = (KeyError, TypeError, ValueError, OverflowError, AttributeError)


#: the largest count a node may send (2^53: every whole number up to it is exact in a float, and sums of a million
#: of them stay finite): a claim of 1e308 events would overflow the round's totals
MOST_COUNT = 2**53
#: the longest failure reason or trace kept of a node's report (the rest is cut: they are kept in every checkpoint)
MOST_TEXT = 2000


def count(v: Any, what: str, *, most: float = MOST_COUNT) -> int:
    """A non-negative whole number a node sent (at most ``most``, :data:`MOST_COUNT` unless less), else
    :class:`MessageError`."""
    x = number(v, what)
    if x != int(x) or not 0 <= x <= most:
        raise MessageError(f"{what} must be a whole number in [0, {most:g}], got {v!r}")
    return int(x)


def number(v: Any, what: str, *, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high] that a node sent, else :class:`MessageError`."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise MessageError(f"{what} must be a number, got {type(v).__name__}")
    x = float(v)
    if not (math.isfinite(x) and low <= x <= high):
        raise MessageError(f"{what} must be finite and in [{low:g}, {high:g}], got {v!r}")
    return x


def record_name(kind: str, device: int | str) -> str:
    """The record of one device's ``kind`` in a reply: ``delta-7``, ``metrics-7``, ..."""
    return f"{kind}-{device}"


# ---- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoundInstruction:
    """What the server asks of a node in one round, apart from the run config."""

    round: int
    devices: tuple[int, ...] = ()  #: the node's devices sampled to train (the others are only served)
    noise_multiplier: float = 0.0  #: the event-level DP-SGD noise the devices use (0 = none)
    clock: float = math.inf  #: deployment: a device takes in its events recorded up to this time
    blend: int = 0  #: the per-event blend devices serve (an index into :data:`fedrec.serving.BLENDS`)
    #: for each of ``devices``, the round its newest update kept by the server was trained in (-1: none); a
    #: device whose last update is not among them trains those events again (``Device.run_round``)
    acked: tuple[int, ...] = ()

    def to_flat(self) -> dict[str, Any]:
        return {"round": self.round, "devices": [int(d) for d in self.devices],
                "effective-noise-multiplier": float(self.noise_multiplier), "round-clock": float(self.clock),
                "blend": int(self.blend), "acked": [int(a) for a in self.acked]}

    @classmethod
    def from_flat(cls, d: Mapping[str, Any]) -> RoundInstruction:
        try:
            out = cls(round=int(d["round"]), devices=tuple(int(x) for x in d.get("devices", [])),
                      noise_multiplier=float(d["effective-noise-multiplier"]),
                      clock=float(d.get("round-clock", math.inf)),
                      blend=count(d.get("blend", 0), "blend", most=len(BLENDS) - 1),
                      acked=tuple(int(x) for x in d.get("acked", [])))
        except _GARBLED as e:
            raise MessageError(f"a round instruction lacks or garbles {e}") from None
        if out.acked and len(out.acked) != len(out.devices):
            raise MessageError(f"a round instruction acknowledges {len(out.acked)} updates for "
                               f"{len(out.devices)} devices")
        return out

    def acked_for(self, device: int) -> int | None:
        """The round of ``device``'s newest update that the server kept (-1: none); None when not told."""
        return self.acked[self.devices.index(device)] if self.acked and device in self.devices else None


@dataclass
class TrainRequest:
    """A decoded ``train`` (or ``query.serve``) request."""

    global_state: dict[str, np.ndarray]
    config: dict[str, Any]  #: the run config, kebab-case (``RunConfig.from_mapping`` builds it)
    instruction: RoundInstruction


def encode_query(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``query`` request: the run config only."""
    return {CONFIG: dict(config)}


def encode_train(global_state: Mapping[str, np.ndarray], config: Mapping[str, Any],
                 instruction: RoundInstruction) -> dict[str, Any]:
    """The records of a ``train`` request: global arrays (the item graph's neighbour table as its used slots where
    that is smaller, :func:`wire_arrays`), run config, round instruction."""
    return {ARRAYS: wire_arrays(global_state), CONFIG: dict(config), ROUND: instruction.to_flat()}


def decode_train(records: Mapping[str, Any]) -> TrainRequest:
    """The request a node received (records as plain mappings: arrays as numpy, configs as dicts)."""
    if ARRAYS not in records or CONFIG not in records or ROUND not in records:
        raise MessageError(f"a train request needs records {ARRAYS}, {CONFIG} and {ROUND}; got {sorted(records)}")
    return TrainRequest(unpack_neighbours(dict(records[ARRAYS])), dict(records[CONFIG]),
                        RoundInstruction.from_flat(records[ROUND]))


#: the item graph's neighbour table (``(n_items, neighbours)`` ids and scores, an unused slot item 0 with score 0) ...
NEIGHBOURS = ("graph.ids", "graph.sim")
#: ... as it travels where few of its slots are used (under DP almost none pass the noise): their flat positions,
#: ids and scores, and the table's shape
SLOTS = ("graph.slots", "graph.slot_ids", "graph.slot_sims", "graph.table_shape")


#: the neighbour table travels as its used slots where at most this share of them is used (at least 5x fewer bytes)
SLOTS_MOST = 0.1


def wire_arrays(global_state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The global arrays as a ``train`` request carries them: as they are, but the neighbour table as its used
    slots (:data:`SLOTS`, in increasing order) where at most :data:`SLOTS_MOST` of them are used (the node rebuilds
    the same table, :func:`unpack_neighbours`). ``bytes_down`` counts these."""
    out = {k: np.ascontiguousarray(v) for k, v in global_state.items()}
    if not all(k in out for k in NEIGHBOURS):
        return out
    ids, sim = out["graph.ids"], out["graph.sim"]
    used = np.flatnonzero((ids != 0) | (sim != 0))
    if len(used) > SLOTS_MOST * ids.size:
        return out
    del out["graph.ids"], out["graph.sim"]
    return out | {"graph.slots": used.astype(np.int64), "graph.slot_ids": ids.reshape(-1)[used],
                  "graph.slot_sims": sim.reshape(-1)[used], "graph.table_shape": np.asarray(ids.shape, np.int64)}


def unpack_neighbours(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` (taken over) with a neighbour table sent as its used slots (:func:`wire_arrays`) rebuilt whole; a
    :class:`MessageError` for slots that do not make one: one row per item of the version's prior (``graph.prior``,
    sent whole, so a short message cannot ask for a larger table than the catalogue's), at most ``graph-neighbours``'
    largest value of columns and 2^31 slots; slots in range and strictly increasing, so each once; ids and scores one
    per slot."""
    if not any(k in arrays for k in SLOTS):
        return arrays
    try:
        slots, ids, sims, shape = (np.asarray(arrays.pop(k)) for k in SLOTS)
        rows, width = (count(x, "the neighbour table's shape", most=2**31) for x in shape.reshape(-1))
        items = len(arrays["graph.prior"])
    except (KeyError, ValueError, TypeError) as e:
        raise MessageError(f"a neighbour table sent as slots needs {', '.join(SLOTS)} with a shape of two sizes, "
                           f"and graph.prior ({e})") from None
    if not (slots.ndim == ids.ndim == sims.ndim == 1 and len(slots) == len(ids) == len(sims)) or rows != items or \
            width > 10**6 or rows * width > 2**31 or slots.dtype.kind != "i" or ids.dtype.kind != "i" or \
            sims.dtype.kind != "f" or \
            (len(slots) and not (0 <= slots[0] and slots[-1] < rows * width)) or np.any(np.diff(slots) <= 0):
        raise MessageError(f"the neighbour table's slots do not make a {rows} x {width} table for {items} items: "
                           f"{len(slots)} slots, {len(ids)} ids and {len(sims)} scores")
    table_ids, table_sim = np.zeros(rows * width, ids.dtype), np.zeros(rows * width, sims.dtype)
    table_ids[slots], table_sim[slots] = ids, sims
    return arrays | {"graph.ids": table_ids.reshape(rows, width), "graph.sim": table_sim.reshape(rows, width)}


@dataclass(frozen=True)
class NodeInfo:
    """A node's answer to ``query``: the devices it hosts, the catalogue size, durable state or not."""

    devices: tuple[int, ...]
    n_items: int
    durable: bool

    def to_flat(self) -> dict[str, Any]:
        return {"devices": [int(d) for d in self.devices], "n-items": int(self.n_items), "durable": self.durable}

    @classmethod
    def from_flat(cls, d: Mapping[str, Any]) -> NodeInfo:
        try:
            return cls(tuple(count(x, "device id") for x in d["devices"]), count(d["n-items"], "n-items", most=2**31 - 1),
                       bool(d.get("durable", False)))
        except (MessageError, *_GARBLED) as e:
            raise MessageError(f"the node's device report lacks or garbles {e}") from None


# ---- replies --------------------------------------------------------------------------------------


@dataclass
class UpdateReport:
    """The numbers a device sends with its delta: counts only, never its local state."""

    num_examples: int  #: events in the local update (new + replay): the FedAvg weight
    n_new: int  #: events new this round
    counts: PrequentialCounts  #: prequential scores of the new events, before training
    epsilon: float  #: the device's event-level ε so far (-1: not finite)
    steps: int  #: DP-SGD steps taken (the ledger's record)
    max_exposure: int  #: most DP steps any one of its events has been used in
    clipped: bool  #: user-level: the whole delta was clipped
    preclip_norm: float
    base_round: int | None = None  #: a straggler's update: the round it was asked for

    def to_flat(self) -> dict[str, Any]:
        d = {"num-examples": self.num_examples, "n-new": self.n_new, "eval-n": self.counts.n,
             "eval-hits": float(self.counts.hits), "eval-ndcg": float(self.counts.ndcg),
             "epsilon": float(self.epsilon) if np.isfinite(self.epsilon) else -1.0, "steps": self.steps,
             "max-exposure": self.max_exposure, "clipped": int(self.clipped), "preclip-norm": float(self.preclip_norm),
             "skipped": 0}
        if self.base_round is not None:
            d["base-round"] = self.base_round
        return d

    @classmethod
    def from_flat(cls, m: Mapping[str, Any]) -> UpdateReport:
        """Every number checked: counts whole and non-negative, scores within their counts, all finite, and
        ``eval-n <= n-new <= num-examples`` (a device scores its new events, and trains on them and its replay)."""
        try:
            total = count(m["num-examples"], "num-examples")
            fresh = count(m["n-new"], "n-new", most=total)
            n = count(m["eval-n"], "eval-n", most=fresh)
            base = m.get("base-round")
            return cls(num_examples=total, n_new=fresh,
                       counts=PrequentialCounts(n, number(m["eval-hits"], "eval-hits", low=0, high=n),
                                                number(m["eval-ndcg"], "eval-ndcg", low=0, high=n)),
                       epsilon=number(m.get("epsilon", -1.0), "epsilon", low=-1.0), steps=count(m["steps"], "steps"),
                       max_exposure=count(m["max-exposure"], "max-exposure"),
                       clipped=bool(count(m["clipped"], "clipped", most=1)),
                       preclip_norm=number(m["preclip-norm"], "preclip-norm", low=0, high=MOST_COUNT),
                       base_round=count(base, "base-round") if base is not None else None)
        except _GARBLED as e:
            raise MessageError(f"its metrics lack or garble {e}") from None


@dataclass
class DeviceUpdate:
    """One device's update as sent: its wire-encoded delta and its report."""

    device: int
    arrays: dict[str, np.ndarray]  #: :func:`fedrec.wire.encode_delta` output
    report: UpdateReport
    probe: tuple[list[int], list[int]] | None = None  #: simulation only: (items, in top-K before training)
    #: item graph on: the item pairs of its new events (:meth:`fedrec.itemgraph.Pairs.arrays`; numeric arrays
    #: here, their values are checked by the server against the catalogue and the report's ``n_new``)
    pairs: dict[str, np.ndarray] | None = None
    #: event noise at the aggregate: ``ids`` and ``counts`` of the positive items its release took (checked by
    #: the server, :func:`fedrec.privacy.aggregate.check_counts`)
    rows: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class DeviceSkip:
    """A device that did not train (its budget guard said no); not an error."""

    device: int
    epsilon: float
    reason: str


@dataclass(frozen=True)
class DeviceFailure:
    """A device whose round failed on its node, or whose reply entry could not be decoded."""

    device: int
    reason: str
    trace: str = ""


@dataclass(frozen=True)
class InFlight:
    """A device whose finished update the node holds back until round ``due`` (simulated slow device)."""

    device: int
    base_round: int
    due: int


@dataclass
class ServeReport:
    """What every hosted device with new events scored this round with the newest version."""

    per_device: list[tuple[int, ServeCounts]] = field(default_factory=list)
    probe_items: list[int] = field(default_factory=list)
    probe_hits: list[int] = field(default_factory=list)


@dataclass
class NodeReply:
    """Everything one node answered to one ``train`` request, in the order it was written."""

    updates: list[DeviceUpdate] = field(default_factory=list)
    skips: list[DeviceSkip] = field(default_factory=list)
    failures: list[DeviceFailure] = field(default_factory=list)
    inflight: list[InFlight] = field(default_factory=list)
    served: ServeReport | None = None

    def add(self, reply: DeviceUpdate | DeviceSkip) -> None:
        """One device's outcome: its update, or why it skipped."""
        if isinstance(reply, DeviceSkip):
            self.skips.append(reply)
        else:
            self.updates.append(reply)


def encode_update(u: DeviceUpdate) -> dict[str, Any]:
    """The records of one device's update (also what a node holds back for a slow device)."""
    out: dict[str, Any] = {record_name(DELTA, u.device): {k: np.ascontiguousarray(v) for k, v in u.arrays.items()},
                           record_name(METRICS, u.device): u.report.to_flat()}
    if u.probe is not None:
        out[record_name(PROBE, u.device)] = {"items": [int(i) for i in u.probe[0]],
                                             "hits": [int(h) for h in u.probe[1]]}
    if u.pairs is not None:
        out[record_name(PAIRS, u.device)] = {k: np.ascontiguousarray(v) for k, v in u.pairs.items()}
    if u.rows is not None:
        out[record_name(ROWS, u.device)] = {k: np.ascontiguousarray(v) for k, v in u.rows.items()}
    return out


def encode_reply(reply: NodeReply) -> dict[str, Any]:
    """The records of a node's reply (record name -> arrays dict or flat values)."""
    out: dict[str, Any] = {}
    for f in reply.failures:
        out[record_name(ERROR, f.device)] = {"reason": f.reason, "trace": f.trace}
    for s in reply.skips:
        out[record_name(METRICS, s.device)] = {"skipped": 1,
                                               "epsilon": float(s.epsilon) if np.isfinite(s.epsilon) else -1.0}
        out[record_name(SKIP, s.device)] = {"reason": s.reason}
    for u in reply.updates:
        out.update(encode_update(u))
    for i in reply.inflight:
        out[record_name(INFLIGHT, i.device)] = {"base-round": i.base_round, "due": i.due}
    if reply.served is not None:
        sv = reply.served
        out[SERVE] = {"devices": [d for d, _ in sv.per_device], "n": [c.n for _, c in sv.per_device],
                      "start-hits": [float(c.start.hits) for _, c in sv.per_device],
                      "start-ndcg": [float(c.start.ndcg) for _, c in sv.per_device],
                      "per-event-n": [int(b.n) for _, c in sv.per_device for b in c.blends],
                      "hits": [float(b.hits) for _, c in sv.per_device for b in c.blends],
                      "ndcg": [float(b.ndcg) for _, c in sv.per_device for b in c.blends]}
        out[SERVE_PROBE] = {"items": [int(i) for i in sv.probe_items], "hits": [int(h) for h in sv.probe_hits]}
    return out


def decode_reply(records: Mapping[str, Any]) -> NodeReply:
    """A node's reply (records as plain mappings, in the order the node wrote them).

    A device entry that cannot be decoded becomes a :class:`DeviceFailure`; a record name that
    names no device, or a garbled ``serve`` report, raises :class:`MessageError` (the whole reply
    fails: the server cannot tell which device it belongs to).
    """
    out = NodeReply()
    for name, rec in records.items():
        kind, _, dev = str(name).rpartition("-")
        if name in (SERVE, SERVE_PROBE):
            continue
        if kind not in (DELTA, METRICS, PROBE, PAIRS, ROWS, SKIP, ERROR, INFLIGHT) or not (dev.isascii() and dev.isdigit()) \
                or dev != str(int(dev)):  # one name per device: "metrics-01" would be a second record of device 1
            raise MessageError(f"the reply holds a record {name!r} that names no device")
        _decode_entry(out, kind, int(dev), rec, records)
    if SERVE in records:
        out.served = _decode_serve(records[SERVE], records.get(SERVE_PROBE, {}))
    return out


def _decode_entry(out: NodeReply, kind: str, d: int, rec: Mapping[str, Any], records: Mapping[str, Any]) -> None:
    try:
        if kind == ERROR:
            out.failures.append(DeviceFailure(d, str(rec["reason"])[:MOST_TEXT], str(rec.get("trace", ""))[-MOST_TEXT:]))
        elif kind == INFLIGHT:
            out.inflight.append(InFlight(d, count(rec["base-round"], "base-round"), count(rec["due"], "due")))
        elif kind == METRICS and rec.get("skipped", 0):
            skip = records.get(record_name(SKIP, d), {})
            out.skips.append(DeviceSkip(d, number(rec.get("epsilon", 0.0), "epsilon", low=-1.0),
                                        str(skip.get("reason", ""))[:MOST_TEXT]))
        elif kind == METRICS:
            arrays = records.get(record_name(DELTA, d))
            if not isinstance(arrays, Mapping):
                raise MessageError(f"device {d} sent metrics without a delta")
            probe, pairs = records.get(record_name(PROBE, d)), records.get(record_name(PAIRS, d))
            rows = records.get(record_name(ROWS, d))
            out.updates.append(DeviceUpdate(d, dict(arrays), UpdateReport.from_flat(rec),
                                            _probe(probe) if probe else None,
                                            _pairs(pairs) if pairs is not None else None,
                                            _pairs(rows, "row counts") if rows is not None else None))
        elif kind in (PAIRS, ROWS) and record_name(ERROR, d) not in records:
            m = records.get(record_name(METRICS, d))  # an update reads its pairs and rows above
            if not isinstance(m, Mapping) or m.get("skipped", 0):
                raise MessageError(f"device {d} sent {'item pairs' if kind == PAIRS else 'row counts'} "
                                   "without an update")
    except (MessageError, *_GARBLED) as e:
        out.failures.append(DeviceFailure(d, f"device {d}: malformed {kind} entry ({e})"))


def _probe(p: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Uptake probe lists: as many item ids as 0/1 hits."""
    items, hits = [count(i, "probe item") for i in p["items"]], [count(h, "probe hit", most=1) for h in p["hits"]]
    if len(items) != len(hits):
        raise MessageError(f"a probe holds {len(items)} items but {len(hits)} hits")
    return items, hits


def _pairs(p: Any, what: str = "item pairs") -> dict[str, np.ndarray]:
    """A pairs (or rows) record's arrays: numeric numpy arrays by name (their values are the server's to check)."""
    if not isinstance(p, Mapping):
        raise MessageError(f"{what} must be a record of arrays, got {type(p).__name__}")
    out = {}
    for k, v in p.items():
        a = np.asarray(v) if isinstance(v, np.ndarray) else None
        if a is None or a.dtype.kind not in "biuf":
            raise MessageError(f"{what} array {k!r} is not a numeric array")
        out[str(k)] = a
    return out


def _counts(k: int, hits: Any, ndcg: Any, what: str) -> PrequentialCounts:
    """Scores of ``k`` events: hits and NDCG sums within [0, k]."""
    return PrequentialCounts(k, number(hits, f"{what} hits", low=0, high=k),
                             number(ndcg, f"{what} ndcg", low=0, high=k))


def _blend_n(n: Any, k: int) -> int:
    """A blend's event count: all of the device's scored events, or none (per-event scoring off)."""
    m = count(n, "per-event n")
    if m not in (0, k):
        raise MessageError(f"a blend scored {m} of {k} events")
    return m


def _decode_serve(sv: Mapping[str, Any], probe: Mapping[str, Any]) -> ServeReport:
    try:
        items, hits = _probe(probe) if probe else ([], [])
        rep = ServeReport(probe_items=items, probe_hits=hits)
        B = len(BLENDS)
        hits, ndcg, ns = list(sv["hits"]), list(sv["ndcg"]), list(sv["per-event-n"])
        if not len(hits) == len(ndcg) == len(ns) == B * len(sv["devices"]):
            raise MessageError(f"{len(hits)} per-event hits for {len(sv['devices'])} devices x {B} blends")
        for j, (d, n, h, g) in enumerate(zip(sv["devices"], sv["n"], sv["start-hits"], sv["start-ndcg"], strict=True)):
            k = count(n, "serve n")
            rep.per_device.append((count(d, "serve device"), ServeCounts(
                _counts(k, h, g, "serve start"),
                [_counts(_blend_n(ns[j * B + b], k), hits[j * B + b], ndcg[j * B + b], "serve") for b in range(B)])))
        return rep
    except (MessageError, *_GARBLED) as e:
        raise MessageError(f"the serving report is malformed ({e})") from None
