"""What every device is served, event by event: the newest global version, personalised on the device.

In a deployment every device can download each published global version (it is public: under DP
it is a DP release), and it knows every one of its own events the moment it happens. So the
recommendations a user sees just before an event come from the newest global version the device
holds (published at the end of round ``r - 1``) and the device's own state through the event before.
:func:`serve` measures exactly that, for every device that has events in round ``r``, before any
training of that round (Vinagre et al. 2014, prequential test-then-train, per event):

* **per event** (the headline ``hr@K``): each new event is ranked by the device's instant scores
  through the event before it (:meth:`~fedrec.models.base.RecModel.score_events`: the model's own
  instant state, e.g. the user vector refit per event), beside the item graph's session scores
  (:func:`fedrec.itemgraph.session_scores`) where the run has one. How they combine is one of
  :data:`~fedrec.eval.metrics.BLENDS` (the model's round-start state among them); every blend is
  scored, and the server serves the one with the most hits in the rounds before (follow the leader:
  chosen on earlier rounds only, never on the events being scored);
* **at the round's start** (``start_hr@K``, the second, named metric): every new event ranked by the
  state the device had when the round began (its vector fitted to its events before the round);
* and (simulation only) which tracked items are already in the device's top-K at the round's start.

The devices are independent; they are computed together only as a batch (each has its own
events, its own vector and its own random negatives drawn from a per-device seed), so the result
does not depend on how devices are grouped into nodes, up to float rounding (a batch's rows go through one
matrix product). The same function serves the device SDK's
:meth:`~fedrec.clients.device.Device.recommend` (its last row: the state after every event).

Privacy: the serving state is fitted on the device and used only to rank items on the device; it
never shapes a released delta (the training update starts from the device's own training state).
The counts it produces are evaluation counts, sent in clear like the others.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .eval.metrics import BLENDS, CELLS, EventRows, PrequentialCounts, ServeCounts, in_topk, prequential_counts
from .itemgraph import contexts, graph_scores, prepare
from .models.base import EventBlock, RecModel

ROWS = 256  #: a device's events scored per block; blocks of many devices go together up to CELLS scores a group


def serve_seed(seed: int, device: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, device, round_, 29]).generate_state(1, np.uint64)[0] >> 1)


@functools.lru_cache(maxsize=4)
def serve_panel(n_devices: int, size: int, seed: int) -> np.ndarray:
    """Simulation: which devices are served and scored (bool per device), a panel of ``size`` drawn once from the
    run's seed, the same in every round and on every node; every device where ``size`` is 0 or covers them all.
    A device's serving reads only its own events and state, so each panel device's counts under every blend are
    exactly what serving every device would give it: the run's HR is an estimate over a uniform sample of devices.
    What the server decides from the served counts (the blend it serves next, the adaptive lr schedule) follows the
    panel's; the model is otherwise the one serving every device gives."""
    out = np.ones(n_devices, bool)
    if 0 < size < n_devices:
        out[:] = False
        out[np.random.default_rng([seed, 37]).choice(n_devices, size=size, replace=False)] = True
    out.flags.writeable = False  # cached: one array for every caller
    return out


@dataclass
class ServeInput:
    """One device's view this round."""

    device: int
    history: np.ndarray  #: item ids of its events before this round (time order)
    new: np.ndarray  #: item ids of its events in this round (time order)
    probe: np.ndarray | None = None  #: tracked items to check for top-K membership (simulation only)
    #: the kind of each event of ``history`` then ``new`` (:data:`fedrec.data.events.KINDS` codes; None: unknown)
    kinds: np.ndarray | None = None


@dataclass
class ServeResult:
    device: int
    counts: ServeCounts
    probe_hits: np.ndarray | None
    vector: np.ndarray  #: the device's serving vector after this round's fit (kept on the device)
    next_scores: np.ndarray | None = None  #: every item's score after the device's last event (served blend)


def _generators(devices: list[ServeInput], seed: int, round_: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(serve_seed(seed, s.device, round_)) for s in devices]


def standardised(x: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean, over its standard deviation (one pass each; ``torch.std`` costs more)."""
    mean = x.mean(dim=-1, keepdim=True)
    return (x - mean) * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) - mean * mean).clamp(max=1e12)


def blend_scores(name: str, session: torch.Tensor | None, model: torch.Tensor, start: torch.Tensor | None,
                 zmodel: torch.Tensor | None = None, content: torch.Tensor | None = None) -> torch.Tensor:
    """The per-event scores under the blend ``name`` (see :data:`~fedrec.eval.metrics.BLENDS`): ``session``
    (the graph's rows, or None), ``model`` (the model's instant rows), ``start`` (its round-start row; None: the
    caller ranks ``start`` itself),
    ``content`` (the features blend's rows, or None: it then ranks as the graph alone); ``zmodel``:
    ``standardised(model)`` when the caller has it. A row's ranking is all that matters, so a blend of one
    source ranks by that source as it is."""
    if name == "start":
        if start is None:
            raise ValueError("The blend 'start' needs the round-start row.")
        return start.expand_as(model)
    if session is None or name == "model":
        return model
    if name == "features":
        return content if content is not None else session
    weight = float(name.partition("+")[2] or 0.0)
    if not weight:
        return session
    return torch.add(session, zmodel if zmodel is not None else standardised(model), alpha=weight)  # one pass


def event_rows(model: RecModel, blocks: list[EventBlock], graph: Mapping[str, torch.Tensor] | None,
               context: int, kinds: list[np.ndarray | None] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The model's instant scores, the graph's session scores and its features blend's (None where the run has
    no graph, or no features) before each new event of each block (``(history, new, vector)``; ``kinds``: each
    block's events' kinds, history then new) and after its last, the blocks' rows stacked."""
    rows = model.score_event_blocks(blocks, context=context, kinds=kinds)
    if graph is None:
        return rows, None, None
    parts = [contexts(h, n, context) for h, n, _ in blocks]
    return (rows, *graph_scores(graph, np.concatenate([c for c, _ in parts]), np.concatenate([w for _, w in parts])))


START = BLENDS.index("start")


@dataclass
class _Piece:
    """A block of one device's new events, scored as one (at most :data:`ROWS` events, so at most ROWS + 1 rows)."""

    index: int  #: the device's place in the batch
    history: np.ndarray  #: its history and its new events before this block
    new: np.ndarray
    last: bool  #: the device's final block: its last row is the row after every new event
    kinds: np.ndarray | None = None  #: the kinds of ``history`` then ``new`` (None: unknown)


def _pieces(devices: list[ServeInput]) -> list[_Piece]:
    out = []
    for i, s in enumerate(devices):
        new = np.asarray(s.new, np.int64)
        for a in range(0, len(new) + 1, ROWS):  # the last block holds the row after all the new events
            kinds = None if s.kinds is None else np.asarray(s.kinds)[: len(s.history) + len(new[a:a + ROWS]) + a]
            out.append(_Piece(i, np.concatenate([np.asarray(s.history, np.int64), new[:a]]), new[a:a + ROWS],
                              a + ROWS > len(new), kinds))
    return out


def _chunks(pieces: list[_Piece], n_items: int) -> list[list[_Piece]]:
    """Consecutive pieces grouped so that a group's rows fit :data:`CELLS` scores (a piece alone may exceed it)."""
    most, rows = max(ROWS + 1, CELLS // max(n_items, 1)), 0
    out: list[list[_Piece]] = [[]]
    for p in pieces:
        if out[-1] and rows + len(p.new) + 1 > most:
            out.append([])
            rows = 0
        out[-1].append(p)
        rows += len(p.new) + 1
    return out if out[-1] else []


def _per_event(model: RecModel, devices: list[ServeInput], vectors: list[np.ndarray | None], starts: list[np.ndarray],
               graph: Mapping[str, torch.Tensor] | None, k: int, context: int, blend: int
               ) -> list[tuple[list[PrequentialCounts], np.ndarray]]:
    """Each device's per-event counts under every blend, and its served blend's last row; the batch's events are
    scored together, in groups of rows (each row reads only its own device's events and vector)."""
    out = [([PrequentialCounts() for _ in BLENDS], starts[i]) for i in range(len(devices))]
    for chunk in _chunks(_pieces(devices), model.n_items):
        rows, session, content = event_rows(model, [(p.history, p.new, vectors[p.index]) for p in chunk], graph,
                                            context, [p.kinds for p in chunk])
        ranked = EventRows([(p.history, p.new) for p in chunk], model.n_items, trailing=True)
        start_rows = np.stack([np.asarray(starts[p.index], np.float32) for p in chunk])  # a row per piece, not per event
        zmodel = standardised(rows) if session is not None else None
        for j, name in enumerate(BLENDS):
            if j == START:
                scores, last = start_rows, np.arange(len(chunk))
            else:
                scores, last = blend_scores(name, session, rows, None, zmodel, content).numpy(), ranked.ends - 1
            for i, (p, c) in enumerate(zip(chunk, ranked.counts(scores, k, per_block=j == START), strict=True)):
                out[p.index][0][j].add(c)
                if j == blend and p.last:
                    out[p.index] = (out[p.index][0], scores[last[i]].copy())
    return out


def _start(scores: np.ndarray, s: ServeInput, n_items: int, k: int, scored: PrequentialCounts | None
           ) -> tuple[PrequentialCounts, np.ndarray | None]:
    """The round-start counts of the device's new events (and probe hits) from its scores at the round's start;
    ``scored``: those counts where the per-event scoring has them already (its ``start`` blend ranks every event
    by the same row, with the same items excluded)."""
    seen = np.zeros(n_items, bool)
    seen[np.asarray(s.history, dtype=np.int64)] = True
    hits = in_topk(scores, s.probe, seen, k) if s.probe is not None and len(s.probe) else None
    if scored is not None:
        return PrequentialCounts(scored.n, scored.hits, scored.ndcg), hits
    return prequential_counts(scores, seen, s.new, k), hits


def serve(model: RecModel, global_state: Mapping[str, np.ndarray], devices: list[ServeInput],
          vectors: dict[int, np.ndarray], *, round_: int, seed: int, k: int, fit_steps: int, lr: float,
          negatives: int = 1, graph: Mapping[str, np.ndarray] | None = None, context: int = 10,
          blend: int = 0, per_event: bool = True, device: torch.device | None = None) -> list[ServeResult]:
    """The newest global version, each device's own state, its scores: for any model.

    First the round's start, for the batch (:meth:`RecModel.fit_and_score`: ``mf`` fits every device's
    vector at once; other models go device by device with the reused ``model``): a device's local
    parameters (``vectors[d]``, as :meth:`RecModel.local_flat`; absent: fresh ones from its own seed) are
    fitted to its history with ``fit_steps`` steps of the BPR rule (nothing to fit for ``sasrec``, whose
    user state is the history itself), then every item is scored: the round-start counts. Then each new
    event, from that vector and the events before it (:meth:`RecModel.score_events`, and ``graph``'s
    session scores when given): the per-event counts under every blend, and the row after the last event
    under blend ``blend`` (``next_scores``). ``vector`` in each result is the device's local state after
    the round-start fit (empty for ``sasrec``). Without ``per_event`` only the round's start is scored
    (its per-event counts stay empty and ``next_scores`` is the round-start row).
    """
    if not devices:
        return []
    fitted = model.fit_and_score(global_state, [s.history for s in devices], [vectors.get(s.device) for s in devices],
                                 _generators(devices, seed, round_), fit_steps=fit_steps, negatives=negatives, lr=lr,
                                 device=device, kinds=[None if s.kinds is None else np.asarray(s.kinds)[: len(s.history)]
                                                       for s in devices])
    model.load({n: torch.as_tensor(np.asarray(v)) for n, v in global_state.items()})
    table = prepare(graph) if graph is not None else None  # once for the batch, not per device
    events = _per_event(model, devices, [v if v.size else None for _, v in fitted], [x for x, _ in fitted], table, k,
                        context, blend) if per_event else [([PrequentialCounts() for _ in BLENDS], x) for x, _ in fitted]
    out = []
    for s, (scores, vector), (blends, last) in zip(devices, fitted, events, strict=True):
        start, hits = _start(scores, s, model.n_items, k, blends[START] if per_event else None)
        out.append(ServeResult(device=s.device, counts=ServeCounts(start, blends), probe_hits=hits, vector=vector,
                               next_scores=last))
    return out
