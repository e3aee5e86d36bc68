"""Full-ranking top-K metrics (no sampled negatives; Krichene & Rendle, KDD 2020).

Ties are broken against the target: an item scored equal to the target counts as ranked
above it, so a model that scores everything alike earns nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: What devices score every event with, side by side (:func:`fedrec.serving.blend_scores`): the item
#: graph's session scores plus ``w`` times the model's instant scores standardised per row (``graph+w``;
#: ``graph``: the graph alone), the model's instant scores alone (``model``), the model with the state
#: at the round's start (``start``), and the item counts filtered by the public item features' match to the
#: device's context (``features``, :func:`fedrec.itemgraph.graph_scores`). Without an item graph the ``graph``
#: blends and ``features`` rank as ``model``; without features ``features`` ranks as ``graph``.
BLENDS = ("graph+0.01", "graph", "graph+0.1", "graph+1", "model", "start", "features")


def target_rank(scores: np.ndarray, target: int, exclude: np.ndarray | None = None) -> int:
    """0-based rank of ``target`` among all items not in ``exclude`` (a boolean mask)."""
    s = scores[target]
    above = scores >= s
    above[target] = False
    if exclude is not None:
        above &= ~exclude
    return int(above.sum())


def in_topk(scores: np.ndarray, items: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """For each of ``items``: is it in the top-``k`` of ``scores`` with ``exclude`` items removed?

    Ties count against the item (as in :func:`target_rank`); an excluded item is never in the top-K.
    """
    items = np.asarray(items, dtype=np.int64)
    live = np.sort(np.asarray(scores, np.float64)[~exclude])
    s = np.asarray(scores, np.float64)[items]
    # items scored >= s among the live ones, minus the item itself
    ranks = len(live) - np.searchsorted(live, s, side="left") - 1
    return (ranks < k) & ~exclude[items]


def ranking_metrics(
    scores: np.ndarray, targets: Sequence[Iterable[int]], k: int, exclude: Sequence[Iterable[int]] | None = None
) -> dict[str, np.ndarray]:
    """HR@K, NDCG@K and Recall@K for each row of ``scores`` (shape ``(B, n_items)``).

    ``targets[b]`` is the set of relevant items of row ``b``; ``exclude[b]`` items are removed
    from the ranking (items the user already has). Recall@K is hits / number of targets.
    Rows without targets get NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    B, V = scores.shape
    out = {"hr": np.full(B, np.nan), "ndcg": np.full(B, np.nan), "recall": np.full(B, np.nan)}
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    for b in range(B):
        tset = sorted(set(int(t) for t in targets[b]))
        if not tset:
            continue
        ex = np.zeros(V, bool)
        if exclude is not None:
            ex[list(set(int(e) for e in exclude[b]) - set(tset))] = True
        ranks = []
        ex_or_target = ex.copy()
        ex_or_target[tset] = True
        for t in tset:
            # rank among non-excluded non-target items, ties against the target
            r = target_rank(scores[b], t, ex_or_target)
            # other targets scoring higher take a slot above it; tied targets take consecutive slots (by id)
            r += int(sum(1 for t2 in tset if t2 != t and (scores[b, t2] > scores[b, t]
                                                          or (scores[b, t2] == scores[b, t] and t2 < t))))
            ranks.append(r)
        ranks_a = np.asarray(ranks)
        hits = ranks_a < k
        out["hr"][b] = float(hits.any())
        out["recall"][b] = hits.sum() / len(tset)
        dcg = disc[ranks_a[hits]].sum()
        idcg = disc[: min(len(tset), k)].sum()
        out["ndcg"][b] = dcg / idcg
    return out


@dataclass
class PrequentialCounts:
    """Sums over evaluated events: ``n`` events, ``hits`` at K, ``ndcg`` sum at K."""

    n: int = 0
    hits: float = 0.0
    ndcg: float = 0.0

    def add(self, other: PrequentialCounts) -> None:
        self.n += other.n
        self.hits += other.hits
        self.ndcg += other.ndcg

    @property
    def hr(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def ndcg_mean(self) -> float:
        return self.ndcg / self.n if self.n else float("nan")


@dataclass
class ServeCounts:
    """One device's (or a sum of devices') serving counts: per event under each of :data:`BLENDS`
    (:mod:`fedrec.serving`), and at the round's start. All score the same events (``n``)."""

    start: PrequentialCounts = field(default_factory=PrequentialCounts)
    blends: list[PrequentialCounts] = field(default_factory=lambda: [PrequentialCounts() for _ in BLENDS])

    @property
    def n(self) -> int:
        return self.start.n

    def add(self, other: ServeCounts) -> None:
        self.start.add(other.start)
        for mine, theirs in zip(self.blends, other.blends, strict=True):
            mine.add(theirs)



def prequential_counts(
    scores: np.ndarray, seen: np.ndarray, new_items: Sequence[int] | np.ndarray, k: int
) -> PrequentialCounts:
    """Test-then-train scoring of a device's new events with one model (Vinagre et al. 2014).

    Each new event's item is ranked over all items, excluding those the user already had
    *before that event* (``seen``, a boolean mask, plus the earlier new events). Events whose
    item the user already had are not scored (re-consumption). ``seen`` is not modified.
    """
    scores = np.asarray(scores, dtype=np.float64)
    items = np.asarray(new_items, dtype=np.int64).reshape(-1)
    if len(items) == 0:
        return PrequentialCounts()
    first = np.zeros(len(items), bool)
    first[np.unique(items, return_index=True)[1]] = True  # a repeat within the new events is re-consumption
    items = items[first & ~seen[items]]
    s = scores[items]
    live = scores[~seen]
    live = live[~np.isnan(live)]  # a score that is not a number ranks above nothing (as in event_counts)
    # items scoring >= the target among those not seen before (the target itself among them) ...
    ranks = _at_least(live, s, k + len(items)) - 1
    # ... less the earlier new events, which the user already had by then
    earlier = np.tri(len(items), k=-1, dtype=bool)
    ranks -= (earlier & (s[None, :] >= s[:, None])).sum(axis=1)
    hit = (ranks < k) & np.isfinite(s)
    return PrequentialCounts(int(len(items)), float(hit.sum()), float((1.0 / np.log2(ranks[hit] + 2)).sum()))


def _at_least(live: np.ndarray, s: np.ndarray, m: int) -> np.ndarray:
    """For each of ``s``, how many of ``live`` are >= it, exactly while fewer than ``m`` are (else ``m`` or more:
    at least ``m``). Only the ``m`` largest of ``live`` are compared, found by one partition of the catalogue."""
    if 0 < m < len(live):
        live = np.partition(live, len(live) - m)[len(live) - m:]
    return (live[None, :] >= s[:, None]).sum(axis=1)


def event_counts(scores: np.ndarray, seen: np.ndarray, new_items: Sequence[int] | np.ndarray, k: int
                 ) -> PrequentialCounts:
    """Per-event prequential scoring: event ``j`` of ``new_items`` is ranked by its own row ``scores[j]``.

    ``scores`` has one row per new event (more rows are ignored): row ``j`` is what the device would have
    shown just before event ``j``, from its state through event ``j - 1``. Each event is ranked over all
    items, excluding those the user had before it (``seen``, a boolean mask of the items before the new
    events, plus the earlier new events); events whose item the user already had are not scored, as in
    :func:`prequential_counts`, so both score exactly the same events. Ties count against the target.
    """
    items = np.asarray(new_items, dtype=np.int64).reshape(-1)
    n = len(items)
    if n == 0:
        return PrequentialCounts()
    S = np.asarray(scores[:n])
    first = np.zeros(n, bool)
    first[np.unique(items, return_index=True)[1]] = True
    scored = first & ~seen[items]
    s = S[np.arange(n), items]
    above = S >= s[:, None]  # among items not had before the round: all, less the had ones (few), less itself
    ranks = np.count_nonzero(above, axis=1) - np.count_nonzero(above[:, np.flatnonzero(seen)], axis=1) - 1
    # less the earlier new events (had by then): those scoring >= the target in the event's own row
    fresh = first & ~seen[items]  # an earlier new event counts once, if it was not had before the round
    earlier = np.tri(n, k=-1, dtype=bool) & fresh[None, :]
    ranks -= (earlier & (S[:, items] >= s[:, None])).sum(axis=1)
    hit = scored & (ranks < k) & np.isfinite(s)  # a score that is not a number ranks nothing
    return PrequentialCounts(int(scored.sum()), float(hit.sum()),
                             float((1.0 / np.log2(ranks[hit] + 2)).sum()))


def _mark_earlier(had: np.ndarray, new: np.ndarray) -> None:
    """Row ``j`` of ``had`` also marks ``new[:j]``: by index pairs for the short blocks of most devices (made once per
    length: ``np.tril_indices`` costs more than the rest of a short block), by first occurrences for longer ones."""
    if len(new) <= SHORT:
        later, earlier = _pairs(len(new))
        had[later, new[earlier]] = True
    else:
        items, first = np.unique(new, return_index=True)
        had[:, items] |= np.arange(len(had))[:, None] > first[None, :]


SHORT = 64  #: blocks up to this many events mark their earlier events by cached index pairs (about 0.7 MB for all)


@functools.lru_cache(maxsize=SHORT + 1)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(j, i)`` with ``i < j < n`` (``np.tril_indices(n, -1)``), read only."""
    out = np.tril_indices(n, -1)
    for a in out:
        a.setflags(write=False)
    return out


#: scores held at once when many devices' events are ranked together (rows x n_items; 16 MB of float32)
CELLS = 1 << 22


class EventRows:
    """The events of many blocks, one row each, ranked together (:func:`event_counts` for many devices at once).

    Block ``b`` is ``(history, new)``: row ``j`` of it ranks ``new[j]`` over the items not had before it (its
    ``history``, then ``new[:j]``); an item had already is not scored; ties count against the target. With
    ``trailing`` each block has one more row (what follows its last event), which ranks nothing. The rows of
    block ``b`` come after those of every block before it.
    """

    def __init__(self, blocks: Sequence[tuple[np.ndarray, np.ndarray]], n_items: int, *, trailing: bool = False):
        self.lens = np.array([len(n) + trailing for _, n in blocks], dtype=np.int64)
        self.ends = np.cumsum(self.lens)
        self.had = np.zeros((int(self.lens.sum()), n_items), bool)
        targets = []
        for (history, new), end, m in zip(blocks, self.ends, self.lens, strict=True):
            new = np.asarray(new, np.int64)
            r = end - m
            self.had[r:end, np.asarray(history, np.int64)] = True
            _mark_earlier(self.had[r:end], new)
            targets.append(np.append(new, -1) if trailing else new)
        self.targets = np.concatenate(targets) if targets else np.zeros(0, np.int64)
        self.open = ~self.had  # what each row ranks its target among (made once for every blend scored)

    def counts(self, scores: np.ndarray, k: int, *, per_block: bool = False) -> list[PrequentialCounts]:
        """Each block's counts from ``scores`` (one row per row of the blocks, ``(rows, n_items)``; with
        ``per_block`` one row per block, ``(blocks, n_items)``, that ranks every event of its block)."""
        if scores.shape[0] != (len(self.lens) if per_block else len(self.targets)):
            raise ValueError(f"{scores.shape[0]} score rows for {len(self.lens)} blocks of {len(self.targets)} rows.")
        at = np.arange(len(self.targets))
        t = np.maximum(self.targets, 0)
        s = scores[np.repeat(np.arange(len(self.lens)), self.lens) if per_block else at, t]
        scored = (self.targets >= 0) & ~self.had[at, t]
        ranks = self._above(scores, s, per_block) - 1
        hit = scored & (ranks < k) & np.isfinite(s)
        ndcg = np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2), 0.0)
        sums = np.zeros((3, len(self.lens)))
        some = self.lens > 0  # (np.add.reduceat would give an empty block its next row)
        if some.any():
            sums[:, some] = [np.add.reduceat(x.astype(np.float64), (self.ends - self.lens)[some])
                             for x in (scored, hit, ndcg)]
        return [PrequentialCounts(int(a), float(b), float(c)) for a, b, c in sums.T]

    def _above(self, scores: np.ndarray, s: np.ndarray, per_block: bool) -> np.ndarray:
        """Each row's open items scored at least its target's ``s``: the mask made in place and counted as bytes
        (twice as fast as ``count_nonzero`` of a new mask); ``per_block``: each block's row against its rows' targets,
        without a copy of the row for each."""
        if not per_block:
            above = scores >= s[:, None]
            above &= self.open
            return np.asarray(np.sum(above.view(np.uint8), axis=1, dtype=np.int32), np.int64)
        out = np.zeros(len(s), np.int64)
        for b, (end, m) in enumerate(zip(self.ends, self.lens, strict=True)):
            if m:
                above = scores[b] >= s[end - m:end, None]
                above &= self.open[end - m:end]
                out[end - m:end] = np.sum(above.view(np.uint8), axis=1, dtype=np.int32)
        return out

