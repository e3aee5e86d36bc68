"""Item-to-item structure learned by the federation: co-occurrence counts that are sums over devices.

What one user just did says most about what they do next (people act in sessions), but only many
devices together know which items go with which. This module splits that work along the two clocks
of DESIGN.md:

* **the device** contributes, when it trains, the item pairs of its new events: each new event with
  each of the ``window`` events before it in its own sequence (:func:`device_pairs`), and one count
  per new event for its item;
* **the server** sums them (:class:`ItemGraph`: a sparse symmetric count matrix ``C`` and item counts
  ``n``) and publishes, with every global version, a neighbour table: for each item ``h`` its
  ``neighbours`` items ``c`` of highest ``s(h, c) = C[h, c] / (n_h^α n_c^(1-α))`` (an asymmetric
  cosine, Aiolli 2013; ``α = 1`` is the conditional probability ``P(c | h)``, ``α = 0.5`` the cosine),
  and a prior: the item counts of the last ``RECENT_ROUNDS`` rounds;
* **the device** scores every event the moment before it happens (:func:`session_scores`): the sum of
  its last ``context`` items' neighbour rows, the newest weighted most (``DECAY`` per step back),
  normalised to a maximum of 1, plus ``PRIOR`` times the normalised recent counts (which ranks the
  items no neighbour row reaches). This costs no privacy: nothing it reads leaves the device.

Privacy: the pairs reveal which items a device had, in clear. They are collected only without DP
(``item-graph = auto`` turns them off under any DP mode and ``on`` refuses one); noise on the sum of
clipped pair counts is the next step (issue 17), not here.

The constants below were chosen on the first rounds of ml-latest-small and checked on other streams
(docs/online.md says where); they are properties of how people consume items, not of one catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

ALPHA = 0.75  #: the neighbour score's weight on the context item's count (1 - ALPHA on the candidate's)
DECAY = 0.7  #: weight of a context item one step further back
PRIOR = 0.02  #: weight of the recent item counts beside the normalised neighbour scores
RECENT_ROUNDS = 3  #: rounds whose item counts make the prior
PAIR_CAP = 1.0  #: most one device's update adds to one pair's count
KEYS = ("graph.ids", "graph.sim", "graph.prior")  #: what a global version carries of the graph


@dataclass(frozen=True)
class Pairs:
    """One device's contribution: item pairs ``(a, b)`` with counts ``w`` (``a != b``; the server makes
    them symmetric), and the items of its contributed events with their counts."""

    a: np.ndarray
    b: np.ndarray
    w: np.ndarray
    items: np.ndarray
    counts: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pairs.a": self.a.astype(np.int32), "pairs.b": self.b.astype(np.int32),
                "pairs.w": self.w.astype(np.float32), "pairs.items": self.items.astype(np.int32),
                "pairs.counts": self.counts.astype(np.float32)}

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray], n_items: int, *, events: int, window: int) -> Pairs:
        """Decode and check a device's pairs: ids within the catalogue, whole non-negative counts, no
        self-pairs, item counts summing to its ``events`` new events, and each pair ``(a, b)`` starting at an
        item ``a`` of its new events, at most ``window`` pair counts per event of ``a``. A device can still
        say it had events it did not have (nothing can check that): the server bounds ``events`` by the
        update's own count, and :meth:`ItemGraph.add` counts a device at most once per pair. ValueError if
        not."""
        a, b, items = (np.asarray(d[k]).reshape(-1) for k in ("pairs.a", "pairs.b", "pairs.items"))
        w, c = (np.asarray(d[k], np.float64).reshape(-1) for k in ("pairs.w", "pairs.counts"))
        if not (len(a) == len(b) == len(w) and len(items) == len(c)):
            raise ValueError("pair arrays of different lengths")
        for name, ids in (("pair item", a), ("pair item", b), ("item", items)):
            if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= n_items):
                raise ValueError(f"a {name} id outside 0..{n_items - 1}")
        for name, x in (("pair count", w), ("item count", c)):
            if x.size and (not np.isfinite(x).all() or (x < 0).any() or (x != np.round(x)).any()):
                raise ValueError(f"a {name} that is not a whole non-negative number")
        if (a == b).any():
            raise ValueError("a pair of an item with itself")
        if c.sum() != events or len(a) > window * events:
            raise ValueError(f"{c.sum():.0f} item counts and {len(a)} pairs for {events} new events")
        # each pair starts at one of its new events, which pairs with at most `window` events before it
        have = np.zeros(n_items)
        np.add.at(have, items.astype(np.int64), c)
        per_item = np.zeros(n_items)
        np.add.at(per_item, a.astype(np.int64), w)
        if (per_item > window * have).any():
            raise ValueError("pairs of items it had no new event of, or more pairs than its events of an item allow")
        return cls(a.astype(np.int64), b.astype(np.int64), w, items.astype(np.int64), c)


def device_pairs(items: np.ndarray, new: np.ndarray, window: int) -> Pairs:
    """The pairs of the events ``new`` (a boolean mask over ``items``, the device's sequence in time order)
    with the ``window`` events before each; repeated pairs are counted, self-pairs dropped."""
    items = np.asarray(items, np.int64)
    pos = np.flatnonzero(new)
    if not len(pos):
        z = np.zeros(0, np.int64)
        return Pairs(z, z, np.zeros(0), z, np.zeros(0))
    lag = np.arange(1, window + 1)
    back = pos[:, None] - lag[None, :]
    ok = back >= 0
    a = np.broadcast_to(items[pos][:, None], back.shape)[ok]
    b = items[back[ok]]
    keep = a != b
    key, w = np.unique(a[keep] * (int(items.max()) + 1) + b[keep], return_counts=True)
    it, c = np.unique(items[pos], return_counts=True)
    return Pairs(key // (int(items.max()) + 1), key % (int(items.max()) + 1), w.astype(np.float64), it,
                 c.astype(np.float64))


@dataclass
class ItemGraph:
    """The server's sums: symmetric pair counts ``C`` and item counts ``n`` (all rounds; ``recent``: the
    last rounds' item counts, newest last)."""

    n_items: int
    neighbours: int = 100
    C: sp.csr_matrix = field(init=False)
    n: np.ndarray = field(init=False)
    recent: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.C = sp.csr_matrix((self.n_items, self.n_items))
        self.n = np.zeros(self.n_items)

    def add(self, contributions: Sequence[Pairs]) -> None:
        """One round's contributions (every accepted update's pairs), summed in."""
        V = self.n_items
        # a device counts at most PAIR_CAP per unordered pair and round: one device (or one liar) cannot make
        # a pair; (a, b) and (b, a) are one pair
        keys = [np.unique(np.minimum(p.a, p.b) * V + np.maximum(p.a, p.b), return_inverse=True) for p in contributions]
        a = np.concatenate([k // V for k, _ in keys] or [np.zeros(0, np.int64)])
        b = np.concatenate([k % V for k, _ in keys] or [np.zeros(0, np.int64)])
        w = np.concatenate([np.minimum(np.bincount(inv, weights=p.w, minlength=len(k)), PAIR_CAP)
                            for (k, inv), p in zip(keys, contributions, strict=True)] or [np.zeros(0)])
        inc = sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(V, V))
        self.C = (self.C + inc.tocsr()).tocsr()
        now = np.zeros(V)
        for p in contributions:
            np.add.at(now, p.items, p.counts)
        self.n += now
        self.recent = (self.recent + [now])[-RECENT_ROUNDS:]

    def table(self) -> dict[str, np.ndarray]:
        """The published neighbour table (``graph.ids``/``graph.sim``: ``(n_items, neighbours)``, unused
        slots with score 0) and prior (``graph.prior``: recent counts, all-time counts breaking ties)."""
        V, N = self.n_items, self.neighbours
        C = self.C.tocoo()
        n = np.maximum(self.n, 1.0)
        s = np.nan_to_num(C.data / (n[C.row] ** ALPHA * n[C.col] ** (1 - ALPHA)), posinf=0.0, neginf=0.0)
        S = sp.csr_matrix((s, (C.row, C.col)), shape=(V, V))
        ids, sim = np.zeros((V, N), np.int32), np.zeros((V, N), np.float32)
        for i in range(V):
            lo, hi = S.indptr[i], S.indptr[i + 1]
            cols, vals = S.indices[lo:hi], S.data[lo:hi]
            if hi - lo > N:
                top = np.argpartition(-vals, N - 1)[:N]
                cols, vals = cols[top], vals[top]
            ids[i, : len(cols)], sim[i, : len(cols)] = cols, vals
        recent = np.sum(self.recent, axis=0) if self.recent else np.zeros(V)
        prior = recent + 1e-3 * self.n
        return {"graph.ids": ids, "graph.sim": sim, "graph.prior": (prior / max(prior.max(), 1e-12)).astype(np.float32)}

    def state(self) -> dict[str, np.ndarray]:
        """For the checkpoint: ``C``'s upper triangle (it is symmetric, its diagonal empty) in 32 bits (whole
        counts below 2^24 are exact in float32)."""
        C = sp.triu(self.C, k=1).tocoo()
        return {"row": C.row.astype(np.int32), "col": C.col.astype(np.int32), "val": C.data.astype(np.float32),
                "n": self.n,
                "recent": np.stack(self.recent) if self.recent else np.zeros((0, self.n_items))}

    def load(self, d: Mapping[str, np.ndarray]) -> None:
        V = self.n_items
        upper = sp.coo_matrix((np.asarray(d["val"], np.float64), (d["row"], d["col"])), shape=(V, V))
        self.C = (upper + upper.T).tocsr()
        self.n = np.asarray(d["n"], np.float64)
        self.recent = [np.asarray(x) for x in d["recent"]]


def split(host: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """A global version as sent: the model's parameters, and the graph's table (None when it has none)."""
    model = {k: v for k, v in host.items() if k not in KEYS}
    graph = {k: np.asarray(host[k]) for k in KEYS if k in host}
    return model, (graph if len(graph) == len(KEYS) else None)


def contexts(history: np.ndarray, new: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of the ``new`` events (and one more: what follows the last), the ``length`` items before it
    in ``history`` + ``new``, newest first, padded with -1: ``(len(new) + 1, length)``; and each slot's weight."""
    seq = np.concatenate([np.asarray(history, np.int64), np.asarray(new, np.int64)])
    end = len(history) + np.arange(len(new) + 1)  # event j is seq[end[j]]; its context is seq[:end[j]]
    back = end[:, None] - 1 - np.arange(length)[None, :]
    ctx = np.where(back >= 0, seq[np.maximum(back, 0)], -1)
    w = np.where(ctx >= 0, DECAY ** np.arange(length)[None, :], 0.0)
    return ctx, w


def prepare(graph: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    """The table as the tensors :func:`session_scores` reads (ids as int64): convert once per batch of devices,
    not once per call; a prepared table passes through without a copy."""
    return {"graph.ids": torch.as_tensor(graph["graph.ids"]).long(), "graph.sim": torch.as_tensor(graph["graph.sim"]).float(),
            "graph.prior": torch.as_tensor(graph["graph.prior"]).float()}


def session_scores(graph: Mapping[str, np.ndarray | torch.Tensor], ctx: np.ndarray, weight: np.ndarray) -> torch.Tensor:
    """Every item's session score for each context row (``ctx``/``weight`` as :func:`contexts` gives):
    ``(rows, n_items)``, each row's neighbour part normalised to a maximum of 1, plus the prior."""
    g = prepare(graph)  # free when the caller prepared it once for many calls
    ids, sim, prior = g["graph.ids"], g["graph.sim"], g["graph.prior"]
    rows, L = ctx.shape
    c = torch.from_numpy(np.maximum(ctx, 0))
    vals = (sim[c] * torch.from_numpy(weight).float().unsqueeze(-1)).reshape(rows, -1)
    out = torch.zeros(rows, len(prior)).scatter_add_(1, ids[c].reshape(rows, -1), vals)
    out /= out.max(dim=1, keepdim=True).values.clamp(min=1e-12)
    return out + PRIOR * prior
