"""Baselines measured in the same run, over exactly the events the federated model was scored on."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..data.stream import RoundStream
from ..itemgraph import PAIR_CAP, ItemGraph, contexts, prepare, session_scores
from .metrics import CELLS, EventRows, PrequentialCounts

CHUNK = 1024  #: events scored together (rows of ``(CHUNK, n_items)`` scores)
#: a block of a device's events: their contexts and weights, the items it had before them, their items
Piece = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def popularity_prequential(stream: RoundStream, schedule: Iterable[Sequence[int]], k: int,
                           window: int = 0) -> Iterator[PrequentialCounts]:
    """Score a popularity ranking the way devices score the model.

    ``schedule[r-1]`` lists the devices that completed round ``r``. Each such device's new
    events (since its previous completed round) are ranked by the counts of all events in
    rounds before ``r`` (a centralised, non-private popularity: a strong baseline), excluding
    what the device already had. With ``window`` > 0 only the last ``window`` rounds count
    (recent-window popularity: it follows trends, forgets the long tail). Yields each round's counts as the
    schedule gives the round (every baseline does: it may follow a run's rounds as they finish).
    """
    log = stream.log
    last: dict[int, int] = {}
    counts = np.zeros(log.n_items)
    for r, devices in enumerate(schedule, start=1):
        counts += np.bincount(log.item[stream.round_of == r - 1], minlength=log.n_items) if r > 1 else 0
        if window and r - 1 - window >= 1:
            counts -= np.bincount(log.item[stream.round_of == r - 1 - window], minlength=log.n_items)
        blocks = []
        for d in devices:
            blocks.append(_history_and_new(stream, d, last.get(d, 0), r))
            last[d] = r
        yield _ranked(blocks, counts, k)


def _ranked(blocks: list[tuple[np.ndarray, np.ndarray]], scores: np.ndarray, k: int) -> PrequentialCounts:
    """The summed counts of ``blocks`` (each ``(history, new)``, :class:`~fedrec.eval.metrics.EventRows`) when every
    event is ranked by the same ``scores``, in groups of about :data:`~fedrec.eval.metrics.CELLS` scores."""
    n_items = len(scores)
    c, at, most = PrequentialCounts(), 0, max(1, CELLS // max(n_items, 1))
    blocks = [(np.concatenate([h, n[:a]]), n[a:a + most]) for h, n in blocks for a in range(0, len(n), most)]
    while at < len(blocks):
        take, rows = [blocks[at]], len(blocks[at][1])
        at += 1
        while at < len(blocks) and rows + len(blocks[at][1]) <= most:
            take.append(blocks[at])
            rows += len(blocks[at][1])
            at += 1
        for x in EventRows(take, n_items).counts(np.broadcast_to(scores, (rows, n_items)), k):
            c.add(x)
    return c


def item_knn_prequential(stream: RoundStream, schedule: Iterable[Sequence[int]], k: int, *, window: int,
                         neighbours: int, context: int, features: np.ndarray | None = None
                         ) -> Iterator[PrequentialCounts]:
    """Score a centralised item-kNN per event, on the events the devices are scored on.

    Before round ``r`` an :class:`~fedrec.itemgraph.ItemGraph` holds the pairs of every event of rounds
    before ``r`` of every user (each with the ``window`` events before it in its user's sequence); each
    device of ``schedule[r-1]`` scores its events of round ``r`` (what serving scores) one by one from its
    table, as devices do: event ``j`` by the ``context`` items before it
    (:func:`~fedrec.itemgraph.contexts`, :func:`~fedrec.itemgraph.session_scores`), excluding what the
    user had before it. The federated graph hears only from sampled devices: this is its non-private
    ceiling. The graph grows by one round at a time. ``features``: the run's public item features (L2-normalised
    rows), scored as the devices score them. Yields each round's counts.
    """
    log = stream.log
    graph = ItemGraph(log.n_items, neighbours, features=features)
    for r, devices in enumerate(schedule, start=1):
        if r > 1:  # every event of the round before, each paired with its user's earlier events
            graph.add_sums(*round_sums(stream, r - 1, window))
        pieces = []
        for d in devices:
            pieces.append(_history_and_new(stream, d, r - 1, r))
        yield _knn_round(prepare(graph.table()), pieces, k, context) if pieces else PrequentialCounts()


def _knn_round(table: Mapping[str, Any], devices: list[tuple[np.ndarray, np.ndarray]], k: int, context: int
               ) -> PrequentialCounts:
    """One round's counts: each device's ``(history, new)`` items scored per event from the graph's table.

    The events go to :func:`~fedrec.itemgraph.session_scores` in batches of at most ``CHUNK`` rows (a
    device's events may span batches: those of earlier batches count as had), then back to their devices."""
    c = PrequentialCounts()
    batch: list[Piece] = []
    rows = 0
    for history, new in devices:
        ctx, weight = contexts(history, new, context)
        for a in range(0, len(new), CHUNK):
            b = min(a + CHUNK, len(new))
            if rows + b - a > CHUNK:
                c.add(_knn_batch(table, batch, k))
                batch, rows = [], 0
            batch.append((ctx[a:b], weight[a:b], np.concatenate([history, new[:a]]), new[a:b]))
            rows += b - a
    if batch:
        c.add(_knn_batch(table, batch, k))
    return c


def _knn_batch(table: Mapping[str, Any], batch: list[Piece], k: int) -> PrequentialCounts:
    scores = session_scores(table, np.concatenate([p[0] for p in batch]), np.concatenate([p[1] for p in batch]))
    c = PrequentialCounts()
    for x in EventRows([(had, new) for _, _, had, new in batch], len(table["graph.prior"])).counts(scores.numpy(), k):
        c.add(x)
    return c


def centralised_mf_prequential(stream: RoundStream, schedule: Iterable[Sequence[int]], k: int, *, dim: int,
                               seed: int, context: int, init_scale: float, replay: int = 2
                               ) -> Iterator[PrequentialCounts]:
    """Score a centrally trained BPR MF per event, on the events the devices are scored on.

    Before round ``r`` the model has trained on every event of rounds before ``r`` (after each round, on
    its events and those of the ``replay`` rounds before it, as :func:`fedrec.centralised.run_centralised`
    does, with its BPR loop). Each device of ``schedule[r-1]`` scores its events of round ``r`` as devices
    do: :meth:`fedrec.models.mf.MF.score_events` with the item table and
    the device's row of the user table, event ``j`` from the ``context`` items before it, excluding what
    the user had before it. The non-private ceiling of the federated model. Yields each round's counts.
    """
    from ..centralised import Adam, _train  # the centralised learner's own BPR loop (it imports the report)
    from ..models.mf import MF

    log = stream.log
    U, V = log.n_users, log.n_items
    g = torch.Generator().manual_seed(seed)
    item = torch.randn(V, dim + 1, generator=g) * init_scale
    item[:, dim] = 0.0  # biases start at zero, as in MF
    user = torch.randn(U, dim, generator=g) * init_scale
    item.requires_grad_(True)
    opt = Adam([item, user], lr=0.02)
    model = MF(V, dim, init_scale=init_scale)
    had = _Had(V)  # each user's items so far: BPR negatives are drawn among the others
    for r, devices in enumerate(schedule, start=1):
        if r > 1:  # learn round r-1, replaying the rounds before it
            done = stream.round_of == r - 1
            had.add(log.user[done], log.item[done])
            train = np.flatnonzero((stream.round_of <= r - 1) & (stream.round_of >= r - 1 - replay))
            _train(item, user, opt, log.user[train], log.item[train], had, dim, g)
        model.load({"item.weight": item.detach()})
        pieces = [_history_and_new(stream, d, r - 1, r) for d in devices]
        yield _mf_round(model, pieces, user.detach()[list(devices)], k, context)


def _mf_round(model: Any, pieces: list[tuple[np.ndarray, np.ndarray]], users: torch.Tensor, k: int, context: int
              ) -> PrequentialCounts:
    """One round's devices scored per event by the MF's instant state (:meth:`MF.score_contexts`): the rows
    of many devices go in one batch, in blocks of about ``ROWS`` rows; each device's events are ranked
    against its own history (as :meth:`MF.score_events` and devices do, one device at a time)."""
    from ..serving import ROWS

    c = PrequentialCounts()
    rows = [contexts(h, n, context) for h, n in pieces]
    at = 0
    while at < len(pieces):
        take = [at]
        while take[-1] + 1 < len(pieces) and sum(len(pieces[j][1]) for j in take) < ROWS:
            take.append(take[-1] + 1)
        ctx = np.concatenate([rows[j][0][:-1] for j in take])
        w = np.concatenate([rows[j][1][:-1] for j in take])
        u0 = torch.cat([users[j].expand(len(pieces[j][1]), -1) for j in take])
        scores = model.score_contexts(ctx, w, u0).numpy()
        for x in EventRows([pieces[j] for j in take], model.n_items).counts(scores, k):
            c.add(x)
        at = take[-1] + 1
    return c


class _Had:
    """Which items each user had, as sorted keys ``user * n_items + item`` (memory grows with the events, not
    with users x items); ``had[users, items]`` is a boolean array, as the dense matrix would give."""

    def __init__(self, n_items: int) -> None:
        self.V, self.keys = n_items, np.zeros(0, np.int64)

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        """Merged into the sorted keys where they are missing (a sort of every key each round, as ``np.union1d``
        does, took minutes a round at 25 million keys)."""
        new = np.unique(users.astype(np.int64) * self.V + items)
        fresh = new[~self._has(new)]
        self.keys = np.insert(self.keys, np.searchsorted(self.keys, fresh), fresh)

    def __getitem__(self, ui: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        key = (np.asarray(ui[0], np.int64) * self.V + np.asarray(ui[1], np.int64)).ravel()
        order = np.argsort(key)  # sorted queries search a large table several times faster
        out = np.empty(key.shape, bool)
        out[order] = self._has(key[order])
        return out.reshape(np.broadcast_shapes(np.shape(ui[0]), np.shape(ui[1])))

    def _has(self, key: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(key.shape, bool)
        return self.keys[np.minimum(np.searchsorted(self.keys, key), len(self.keys) - 1)] == key


def _history_and_new(stream: RoundStream, device: int, cur: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The items of ``device``'s events through round ``cur`` (what it had) and of rounds ``cur+1..r`` (new)."""
    idx = stream.device_events(device, r)
    old = stream.round_of[idx] <= cur
    return stream.log.item[idx[old]], stream.log.item[idx[~old]]


def round_sums(stream: RoundStream, r: int, window: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every user's contribution of round ``r`` to an exact item graph, summed (:meth:`ItemGraph.add_sums`): the
    pairs of each of its events of round ``r`` with the ``window`` events before it (self-pairs dropped), unordered
    and capped per user (:func:`~fedrec.itemgraph.capped_pairs`), the round's item counts, and each event of the
    round that has one before it with that one's item. What :func:`~fedrec.itemgraph.device_pairs` gives each
    user, computed for all users at once over the log in user order."""
    V = stream.log.n_items
    user, item, round_of = stream.by_user_columns
    pos = np.flatnonzero(round_of == r)
    lo, hi, who = [], [], []
    for lag in range(1, window + 1):
        back = pos - lag
        ok = back >= 0
        ok[ok] = (user[back[ok]] == user[pos[ok]]) & (item[back[ok]] != item[pos[ok]])
        a, b = item[pos[ok]], item[back[ok]]
        lo.append(np.minimum(a, b))
        hi.append(np.maximum(a, b))
        who.append(user[pos[ok]].astype(np.int64))
    a, b, n = _distinct(np.concatenate(who), np.concatenate(lo), np.concatenate(hi), V)
    prev = pos - 1
    after = pos[(prev >= 0) & (user[np.maximum(prev, 0)] == user[pos])]
    return (a, b, np.minimum(n, PAIR_CAP).astype(np.float64), np.bincount(item[pos], minlength=V),
            item[after], item[after - 1])


def _distinct(who: np.ndarray, lo: np.ndarray, hi: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ``(who, lo, hi)`` triples (items below ``V``) in sorted order: their ``lo``, their ``hi`` and how
    often each came. As one int64 key where it fits, else sorted as three columns (ten million users and a million
    items would pass int64 as one key; five times slower)."""
    if not len(who) or (int(who.max()) + 1) * V * V < 2**63:
        key, n = np.unique((who * V + lo) * V + hi, return_counts=True)
        return key // V % V, key % V, n
    o = np.lexsort((hi, lo, who))
    who, lo, hi = who[o], lo[o], hi[o]
    first = np.ones(len(o), bool)
    first[1:] = (who[1:] != who[:-1]) | (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    at = np.flatnonzero(first)
    return lo[at], hi[at], np.diff(np.append(at, len(o)))
