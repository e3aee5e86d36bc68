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
  and a prior: the item counts of the last rounds, the longest window unless a shorter one predicted the rounds
  just released better than their noise explains (:meth:`ItemGraph.prior_window`: few rounds where popularity
  moves fast and the counts are exact, many where noise dominates);
* **the device** scores every event the moment before it happens (:func:`session_scores`): the sum of
  its last ``context`` items' neighbour rows, the newest weighted most (``DECAY`` per step back),
  normalised to a maximum of 1, plus ``PRIOR`` times the normalised recent counts (which ranks the
  items no neighbour row reaches). This costs no privacy: nothing it reads leaves the device.
* with public item features (:mod:`fedrec.data.features`) the table also carries the features and every item's
  all-time count, and the device scores a second source, the ``features`` blend (:func:`graph_scores`): the
  counts filtered by how well each item's features match its context's. Under noise it holds up where the
  neighbour rows do not: a count is a sum over many devices, a pair over few (docs/online.md, "Public item
  features"). Which source a device serves is chosen on earlier rounds (:meth:`fedrec.report.RunRecorder.leader`).
  The features are what a catalogue says, and can be wrong; the server also sums, for each new event, the profile
  (as of the earlier releases; at first the listed features) of the event just before it into the event's item's
  row (the item x feature *affinities* ``A``), and publishes each item's profile (:meth:`ItemGraph.profiles`): its
  listed features beside what its users did before it. The ``features`` blend matches profiles, not lists.

Privacy: the pairs reveal which items a device had, in clear, to the server. Without DP they are collected
as they are. Under event-level DP with the noise at the aggregate (``event-noise = aggregate``: the server is
trusted) the server releases only noisy sums (``noise_std > 0``), and the run's graph is one Gaussian
mechanism, accounted once (``graph-gaussian``, :func:`fedrec.privacy.accounting.graph_records`):

* *sensitivity*: per device and round the pairs are unordered and capped at ``PAIR_CAP = 1`` (a cell of
  one device-round is 0 or 1), and a device hands in at most one update a round. Adding or removing one
  event ``e`` of a device, over the whole run, changes: its own at most ``W`` pairs (``W``: the window,
  ``private-graph-window``), in the round it is new; for each of the ``W`` events after it (in whatever
  rounds they are new) one lost pair (with ``e``) and one gained (the event a window further back); and
  its item's count by 1. Each change moves one (round, cell) by at most 1 (several changes in one cell of
  one device-round stay within the cap), so the L2 change of every round's sums together is at most
  ``sqrt(3 W + 1)`` (``sqrt(3 W w^2 + 1)`` as released: the pairs weigh ``w = PAIR_WEIGHT``, below). With features the affinities move too, whatever profiles (rows of norm at most 1, fixed by
  the earlier releases) each round reads: the event's own row by its before's profile, and the next event's row by
  the difference of two profile rows (at most sqrt(2) when no feature value is negative, so no profile value is
  either): 3 more under the root, 5 with negative values (:func:`sensitivity`). The rounds' profiles depend on
  earlier noisy releases only, as the candidates do: a fully adaptive composition of Gaussian releases whose
  squared sensitivities sum to at most the bound for every choice of them. This assumes the
  rounds an event is new in do not depend on other events: round boundaries by clock, and the device's cursor
  (an event is new in exactly one update).
* *noise*: every round, every item count and every unordered pair cell that can be released gets an
  independent draw of ``N(0, noise_std^2)``, ``noise_std = z_graph * sensitivity`` (so is every affinity cell,
  dense: items x features, drawn after the counts and pairs; with ``affinity_every`` > 1, once per that many
  releases, on their summed affinities: :meth:`ItemGraph._affinities`). Dense noise over
  ``n_items^2`` pairs would not fit, so the pairs are projected first onto the candidates: items whose
  *noisy* count, summed over the earlier releases, is ``ENTER`` noise stds or more (at most
  ``MAX_CANDIDATES``; they stay). Pairs of any other item are dropped in that round, before noise.
  The projection is chosen from earlier releases only, so it is post-processing: as if all ``n_items^2``
  cells had been noised and the others thrown away. Round 1 has no candidates and releases item counts (and,
  with features, the affinities where they are released every round: pure noise then, as no device sends any
  before a version carries features).
* *table*: built from the released (noisy) sums only. A pair is published when its noisy sum stands above
  ``t`` stds of its accumulated noise (``noise_std * sqrt(releases since both entered)``), ``t`` set so a
  candidate expects ``FALSE_NEIGHBOURS`` pure-noise neighbours; its score is the asymmetric cosine of the
  noisy counts. The prior reads the candidates' noisy recent counts, clamped at 0, over the longest window
  unless a shorter one predicted the later releases from the earlier ones better by more than the noise of the
  counts compared explains. The noise of release
  ``k`` is drawn from ``(seed, k)``: a resumed run, or a round run again after a crash, releases the same.

Under user-level DP (a trusted server; ``clip = 1``, ``pairs = False``) the graph is one part of each round's one
Gaussian (:func:`fedrec.privacy.accounting.user_parts`): devices send no pairs, each contribution's item counts and
affinity rows are scaled to L2 norm ``clip`` (:meth:`ItemGraph.scales`), and every item count and affinity cell of
every release gets ``N(0, noise_std^2)``, ``noise_std`` the graph's part of the round's multiplier. One user moves a
round's sums by at most ``clip`` whatever else the round holds, so no record of its own is needed.

The constants below were chosen on the first rounds of ml-latest-small and checked on other streams
(docs/online.md says where); they are properties of how people consume items, not of one catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import scipy.sparse as sp
import torch

ALPHA = 0.75  #: the neighbour score's weight on the context item's count (1 - ALPHA on the candidate's)
DECAY = 0.7  #: weight of a context item one step further back
PRIOR = 0.02  #: weight of the recent item counts beside the normalised neighbour scores
RECENT_ROUNDS = 3  #: rounds whose item counts make the prior until there are rounds to choose its window on
#: the prior's window, in rounds, is one of these (:meth:`ItemGraph.prior_window`): the longest, unless a shorter one's
#: top PRIOR_TOP items caught more of the last PRIOR_EVAL released rounds than the longest one's did, by more than
#: their noise explains (a one-sided test at PRIOR_FALSE over all the shorter windows together). PRIOR_TOP: the items
#: a device's features can lift into its top 10 lie well beyond the prior's first 10 (300 and 100 tried on the
#: synthetic world, seed 3, held out, event-level epsilon 8: the graph blend 0.2008 and 0.1972)
PRIOR_WINDOWS = (1, 2, 3, 5, 8, 13, 21)
PRIOR_EVAL = 5
PRIOR_TOP = 300
PRIOR_FALSE = 0.05
PAIR_CAP = 1.0  #: most one device's update adds to one pair's count
KEYS = ("graph.ids", "graph.sim", "graph.prior")  #: what a global version carries of the graph
FEATURES = "graph.features"  #: and, where the run has public item features, their rows (L2-normalised)
COUNTS = "graph.counts"  #: with features: every item's all-time count (noised: the noisy sums, clamped at 0), max 1
#: with features: every item's profile, learned from behaviour (:meth:`ItemGraph.profiles`), rows L2-normalised
PROFILES = "graph.profiles"
TABLE_KEYS = (*KEYS, FEATURES, COUNTS, PROFILES)
#: not the graph's: the item features a model that reads them gets with each version (:mod:`fedrec.models`)
MODEL_FEATURES = "model.features"
#: with features: the prior of item c is scaled by exp(FEATURE_BETA * (m_c - 1)), m_c in [0, 1] the match of c's
#: features to the context's (chosen on rounds 2-5 of ml-latest-small, graph noised at event-level epsilon 8)
FEATURE_BETA = 2.0
#: the features blend (:func:`graph_scores`): the all-time counts scaled by exp(FEATURE_SHARP * (m_c - 1)), a
#: near filter on the context's features (chosen on rounds 1-5 of the synthetic world, counts noised at event-level
#: epsilon 8: 2, 5, 10, 20, 40 gave 0.245, 0.249, 0.248, 0.248, 0.248)
FEATURE_SHARP = 5.0
#: an item's profile (:meth:`ItemGraph.profiles`): its public features weighted as this many noise stds of an
#: affinity cell (plus one event) beside its affinities, which count only above PROFILE_THRESHOLD of those stds
#: (both chosen on rounds 1-8 of the synthetic world, seed 0, at event-level epsilon 8 and 1; docs/online.md)
PROFILE_PRIOR = 1.0
PROFILE_THRESHOLD = 2.0
#: noised: an item becomes a candidate once its noisy count is this many noise stds of that count
ENTER = 3.0
#: noised: expected pure-noise neighbours of a candidate (sets the pair threshold from the candidates' number)
FALSE_NEIGHBOURS = 0.1
MAX_CANDIDATES = 2000  #: noised: most candidates (their noisy pair sums are a dense candidates^2 table)
NOISE_STREAM = 0x67726170  #: noised: the noise of release k is drawn from (seed, NOISE_STREAM, k)
#: noised: the pairs' weight in the graph's one Gaussian: the pair sums are released as if scaled by it (noise std
#: ``noise_std / PAIR_WEIGHT`` on the unscaled sums), so they take ``3 W PAIR_WEIGHT^2`` of the squared sensitivity
#: and the counts and affinities, the sums over many devices, get less noise. Chosen on held-out world seeds 3 and 4
#: (not the sweep's), event-level epsilon 8: windowed HR@10 at the end 0.457 -> 0.497 and 0.447 -> 0.474 for 1 -> 0.5
#: (epsilon 1: 0.235 -> 0.246, 0.262 -> 0.260; 0.25 gave 0.488 / 0.247 on seed 3); docs/online.md
PAIR_WEIGHT = 0.5


def _none() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass(frozen=True)
class Pairs:
    """One device's contribution: item pairs ``(a, b)`` with counts ``w`` (``a != b``; the server makes
    them symmetric), the items of its contributed events with their counts, and each new event that has one
    before it (``follow``) with the item of that one (``before``): the item x feature affinities' input."""

    a: np.ndarray
    b: np.ndarray
    w: np.ndarray
    items: np.ndarray
    counts: np.ndarray
    follow: np.ndarray = field(default_factory=_none)
    before: np.ndarray = field(default_factory=_none)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"pairs.a": self.a.astype(np.int32), "pairs.b": self.b.astype(np.int32),
                "pairs.w": self.w.astype(np.float32), "pairs.items": self.items.astype(np.int32),
                "pairs.counts": self.counts.astype(np.float32), "pairs.follow": self.follow.astype(np.int32),
                "pairs.before": self.before.astype(np.int32)}

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray], n_items: int, *, events: int, window: int) -> Pairs:
        """Decode and check a device's pairs: ids within the catalogue, whole non-negative counts, no
        self-pairs, item counts summing to its ``events`` new events, each pair ``(a, b)`` starting at an
        item ``a`` of its new events, at most ``window`` pair counts per event of ``a``, and at most one
        ``follow``/``before`` per new event, each ``follow`` an item of its new events and, with a window, each
        ``(follow, before)`` one of its pairs. A device can still
        say it had events it did not have (nothing can check that): the server bounds ``events`` by the
        update's own count, and :meth:`ItemGraph.add` counts a device at most once per pair. ValueError if
        not."""
        a, b, items = (np.asarray(d[k]).reshape(-1) for k in ("pairs.a", "pairs.b", "pairs.items"))
        follow, before = (np.asarray(d.get(k, _none())).reshape(-1) for k in ("pairs.follow", "pairs.before"))
        w, c = (np.asarray(d[k], np.float64).reshape(-1) for k in ("pairs.w", "pairs.counts"))
        if not (len(a) == len(b) == len(w) and len(items) == len(c) and len(follow) == len(before)):
            raise ValueError("pair arrays of different lengths")
        for name, ids in (("pair item", a), ("pair item", b), ("item", items), ("follow item", follow),
                          ("before item", before)):
            if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= n_items):
                raise ValueError(f"a {name} id outside 0..{n_items - 1}")
        for name, x in (("pair count", w), ("item count", c)):
            if x.size and (not np.isfinite(x).all() or (x < 0).any() or (x != np.round(x)).any()):
                raise ValueError(f"a {name} that is not a whole non-negative number")
        a, b, items, follow, before = (x.astype(np.int64) for x in (a, b, items, follow, before))
        if (a == b).any():
            raise ValueError("a pair of an item with itself")
        if c.sum() != events or len(a) > window * events:
            raise ValueError(f"{c.sum():.0f} item counts and {len(a)} pairs for {events} new events")
        # each pair starts at one of its new events, which pairs with at most `window` events before it
        have = np.zeros(n_items)
        np.add.at(have, items, c)
        per_item = np.zeros(n_items)
        np.add.at(per_item, a, w)
        if (per_item > window * have).any():
            raise ValueError("pairs of items it had no new event of, or more pairs than its events of an item allow")
        if (np.bincount(follow, minlength=n_items) > have).any():
            raise ValueError("more follow items than its new events of that item")
        if window:  # without pairs (user-level DP: window 0, each device's release clipped) there is none to match
            _check_follows(a, b, w, follow, before, n_items)
        return cls(a, b, w, items, c, follow, before)


def _check_follows(a: np.ndarray, b: np.ndarray, w: np.ndarray, follow: np.ndarray, before: np.ndarray,
                   n_items: int) -> None:
    """Each ``(follow, before)`` of two different items is also one of the device's pairs: at most as many of them
    as that pair's count (the event before is within the window). ValueError if not."""
    diff = follow != before
    if not diff.any():
        return
    key, n = np.unique(follow[diff] * n_items + before[diff], return_counts=True)
    have = dict(zip((a * n_items + b).tolist(), w.tolist(), strict=True))
    if any(c > have.get(k, 0.0) for k, c in zip(key.tolist(), n.tolist(), strict=True)):
        raise ValueError("a follow item whose item before is not among its pairs")


def device_pairs(items: np.ndarray, new: np.ndarray, window: int, *, affinities: bool = True) -> Pairs:
    """The pairs of the events ``new`` (a boolean mask over ``items``, the device's sequence in time order)
    with the ``window`` events before each; repeated pairs are counted, self-pairs dropped; and, with
    ``affinities`` (the run has public item features), each new event after the first of the sequence with the
    item just before it (``follow``/``before``)."""
    items = np.asarray(items, np.int64)
    pos = np.flatnonzero(new)
    if not len(pos):
        z = _none()
        return Pairs(z, z, np.zeros(0), z, np.zeros(0))
    lag = np.arange(1, window + 1)
    back = pos[:, None] - lag[None, :]
    ok = back >= 0
    a = np.broadcast_to(items[pos][:, None], back.shape)[ok]
    b = items[back[ok]]
    keep = a != b
    key, w = np.unique(a[keep] * (int(items.max()) + 1) + b[keep], return_counts=True)
    it, c = np.unique(items[pos], return_counts=True)
    after = pos[pos > 0] if affinities else _none()
    return Pairs(key // (int(items.max()) + 1), key % (int(items.max()) + 1), w.astype(np.float64), it,
                 c.astype(np.float64), items[after], items[after - 1])


@dataclass
class ItemGraph:
    """The server's sums: symmetric pair counts ``C`` and item counts ``n`` (all rounds; ``recent``: the
    last rounds' item counts, newest last, as many as the prior's longest window and its evaluation need).

    With ``noise_std > 0`` (event-level DP, noise at the aggregate) every round's sums are released with
    Gaussian noise of that std (see the module docstring): all item counts, and the pair counts among the
    candidates ``cand`` only, kept in the dense ``P`` (``P[i, j]`` is the pair of ``cand[i]`` and ``cand[j]``);
    ``C`` then stays empty and ``n`` and ``recent`` hold noisy counts. Release ``k`` draws its noise from
    ``(seed, k)``, so a resumed run draws what the uninterrupted one would.
    """

    n_items: int
    neighbours: int = 100
    noise_std: float = 0.0  #: std of the Gaussian noise on every round's sums (0: exact sums, no DP)
    seed: int = 0  #: the run's seed (noised: with the release's number, it seeds that release's noise)
    max_candidates: int = MAX_CANDIDATES
    C: sp.csr_matrix = field(init=False)
    n: np.ndarray = field(init=False)
    recent: list[np.ndarray] = field(default_factory=list)
    releases: int = 0  #: rounds summed in
    cand: np.ndarray = field(init=False)  #: noised: candidate items, in order of entry
    since: np.ndarray = field(init=False)  #: noised: each candidate's pairs are noised from this release on
    P: np.ndarray = field(init=False)  #: noised: the noisy pair sums among the candidates
    features: np.ndarray | None = None  #: public item features, rows L2-normalised (published with the table)
    #: with features: the item x feature affinities, ``A[i] = sum of before's profile over events of i`` (noised:
    #: every cell of every affinity release gets a draw; zeros added between), created at the first release
    A: np.ndarray | None = None
    #: user-level DP: each contribution of a round is scaled to at most this L2 norm (:meth:`scales`; 0: not scaled)
    clip: float = 0.0
    #: the pairs are summed and released (False under user-level DP: a pair is a sum over few devices, each device's
    #: share of its clipped norm is small, and the neighbours that then pass the noise threshold are mostly false
    #: ones, which outrank everything else in a row: measured on ml-latest-small, see docs/privacy.md)
    pairs: bool = True
    #: noised, event level, the server drawing the noise: the affinities of this many releases are summed before
    #: one noisy release of them (:attr:`fedrec.config.RunConfig.affinity_every`); ``pending`` holds the sums not yet
    #: released (the trusted server's, as it holds every clipped sum), ``aff_releases`` counts the noisy ones
    affinity_every: int = 1
    pending: np.ndarray | None = field(default=None, init=False)
    aff_releases: int = field(default=0, init=False)
    window: int = field(default=RECENT_ROUNDS, init=False)  #: the rounds the prior sums (:meth:`prior_window`)

    def __post_init__(self) -> None:
        if self.noise_std < 0 or not np.isfinite(self.noise_std):
            raise ValueError("The item graph's noise std should be a finite non-negative value.")
        if self.clip and self.pairs:
            raise ValueError("A clipped item graph (user-level DP) releases no pairs: pass pairs=False.")
        if self.affinity_every < 1 or (self.affinity_every > 1 and not (self.noised and not self.clip)):
            raise ValueError("The affinities are released every affinity_every >= 1 rounds, more than 1 only for an "
                             "event-level noised graph (user-level DP releases each round's clipped sums).")
        self.C = sp.csr_matrix((self.n_items, self.n_items))
        self.n = np.zeros(self.n_items)
        self.cand, self.since = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.P = np.zeros((0, 0))

    @property
    def noised(self) -> bool:
        return self.noise_std > 0

    @property
    def sum_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of a round's summed counts and, where the graph has features, affinities (what SecAgg+ sums
        masked for it)."""
        return [(self.n_items,)] + ([tuple(self.features.shape)] if self.features is not None else [])

    @property
    def pair_std(self) -> float:
        """The noise std of a pair cell's draw (:data:`PAIR_WEIGHT`)."""
        return self.noise_std / PAIR_WEIGHT

    def add(self, contributions: Sequence[Pairs]) -> None:
        """One round's contributions (every accepted update's pairs), summed in (noised: released with noise;
        with ``clip``: each contribution first scaled to that L2 norm, :meth:`scales`). With features, each new
        event's item also gets the profile ``G`` of the item before it: a row of norm at most 1, computed from the
        earlier releases only, so the round's query is fixed before its data (at the first release: the lists).
        Profiles instead of lists: the context is named by what is known of it, so the evidence gets sharper as
        the profiles do."""
        G = self.profiles().astype(np.float64) if self.features is not None else None  # before this round's data
        scale = self.scales(contributions, G)
        now = np.zeros(self.n_items)
        for p, s in zip(contributions, scale, strict=True):
            np.add.at(now, p.items, p.counts * s)
        aff = None
        if G is not None:
            aff = np.zeros_like(G)
            for p, s in zip(contributions, scale, strict=True):
                np.add.at(aff, p.follow, G[p.before] * s)
        self._release(*capped_pairs(contributions, self.n_items), now, aff)  # unscaled: a clipped graph has no pairs

    def add_sums(self, a: np.ndarray, b: np.ndarray, w: np.ndarray, counts: np.ndarray, follow: np.ndarray,
                 before: np.ndarray) -> None:
        """One round of many devices' contributions already summed, as :meth:`add` would sum them: the pairs capped
        per device (:func:`capped_pairs`; a pair may repeat, once per device), the item counts (``n_items``), each
        new event's item with the item before it (the affinities' input). Exact sums only (no noise, no clip)."""
        if self.noised or self.clip:
            raise ValueError("add_sums takes exact sums: a noised or clipped graph adds devices' contributions.")
        aff = None
        if self.features is not None:
            aff = np.zeros((self.n_items, self.features.shape[1]))
            np.add.at(aff, follow, self.profiles().astype(np.float64)[before])
        self._release(a, b, w, np.asarray(counts, np.float64), aff)

    def add_released(self, counts: np.ndarray, aff: np.ndarray | None) -> None:
        """One round's item counts and affinities summed and noised elsewhere, summed in as they are: no draw
        (SecAgg+: the unmasked sum of the devices' contributions and noise shares,
        :attr:`fedrec.config.RunConfig.secure_graph`). No pairs; ``aff`` ``(n_items, features)`` exactly where the
        graph has features (None without)."""
        if not self.noised or self.pairs or self.clip or self.affinity_every > 1:
            raise ValueError("Only a noised graph without pairs, whose affinities are released every round, takes "
                             "sums released elsewhere.")
        self._release_sums(counts, aff, drawn=True)

    def add_clipped_sums(self, counts: np.ndarray, aff: np.ndarray | None) -> None:
        """One round of user-level contributions already clipped and summed (SecAgg+: the unmasked sum of each device's
        :func:`dense_contribution` scaled by :func:`clip_scale`), released with this graph's noise as :meth:`add`
        releases a round (``aff`` as :meth:`add_released` takes it)."""
        if not (self.noised and self.clip) or self.pairs:
            raise ValueError("Only a clipped, noised graph without pairs takes clipped sums.")
        self._release_sums(counts, aff, drawn=False)

    def _release_sums(self, counts: np.ndarray, aff: np.ndarray | None, *, drawn: bool) -> None:
        """:meth:`_release` of a round's summed counts and affinities (no pairs), checked: ``(n_items,)`` finite
        counts, and affinities of the features' shape exactly where the graph has features."""
        counts = np.asarray(counts, np.float64)
        if [counts.shape] + ([np.shape(aff)] if aff is not None else []) != self.sum_shapes or \
                not (np.all(np.isfinite(counts)) and (aff is None or np.all(np.isfinite(aff)))):
            raise ValueError(f"Released sums should be {self.n_items} finite counts and finite affinities of shape "
                             f"{self.sum_shapes[1] if self.features is not None else None}.")
        none = np.zeros(0, np.int64)
        self._release(none, none, np.zeros(0), counts, None if aff is None else np.asarray(aff, np.float64),
                      drawn=drawn)

    def _release(self, a: np.ndarray, b: np.ndarray, w: np.ndarray, now: np.ndarray, aff: np.ndarray | None, *,
                 drawn: bool = False) -> None:
        """Sum one round in: pairs ``(a, b, w)``, item counts ``now`` and affinities ``aff`` (None: no features);
        noised, each released with its Gaussian, in this order, from the release's own generator (``drawn``: the
        counts carry their noise already). The affinities are noised in every cell after the counts' and pairs'
        draws (which stay as without features)."""
        V = self.n_items
        rng = np.random.default_rng([self.seed, NOISE_STREAM, self.releases])
        if self.noised and not drawn:
            now = now + rng.normal(0.0, self.noise_std, V)  # every item, every round: absent ones too
            if self.pairs:
                self.P += self._noisy_pairs(a, b, w, rng)
        else:
            inc = sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([a, b]), np.concatenate([b, a]))),
                                shape=(V, V))
            self.C = (self.C + inc.tocsr()).tocsr()
        self.n += now
        self.recent = (self.recent + [now])[-(max(PRIOR_WINDOWS) + PRIOR_EVAL):]
        if aff is not None:
            aff = self._affinities(aff, rng, drawn)
            self.A = aff if self.A is None else self.A + aff
        self.releases += 1
        if self.noised:
            self._enter()
        self.window = self._choose_window()  # of the released sums and the candidates they chose

    def _affinities(self, aff: np.ndarray, rng: np.random.Generator, drawn: bool) -> np.ndarray:
        """What this release adds to ``A`` of the round's affinity sums ``aff``: noised, one draw on every cell (none
        where ``drawn``); with ``affinity_every`` > 1, the sums wait in ``pending`` and every ``affinity_every``-th
        release adds them all with one draw (zeros between). One event moves two rows (its item's, and the next
        event's) in at most two releases, as when every round releases them, and where both rows are one row in one
        release the two moves cancel down to one profile: the sensitivity, and the one Gaussian it is accounted as,
        stay the same; the sum of the run's releases carries ``affinity_every`` times fewer draws. What still waits
        when the run ends is never released (:meth:`drop_pending`)."""
        if self.affinity_every > 1 and not drawn:
            self.pending = aff if self.pending is None else self.pending + aff
            if (self.releases + 1) % self.affinity_every:
                return np.zeros_like(aff)
            aff, self.pending = self.pending, None
        if self.noised:
            self.aff_releases += 1
            if not drawn:
                aff = aff + rng.normal(0.0, self.noise_std, aff.shape)
        return aff

    def drop_pending(self) -> None:
        """Forget the affinity sums no release has carried yet (a finished run: its checkpoint keeps released sums
        only)."""
        self.pending = None

    def scales(self, contributions: Sequence[Pairs], G: np.ndarray | None) -> np.ndarray:
        """Each contribution's factor: 1, or with ``clip`` (user-level DP, no pairs) ``min(1, clip / norm)``,
        ``norm`` the L2 norm of what this round releases of it, in the units its noise is drawn in: its item counts
        (summed by item) and its affinity rows (the profiles ``G`` of its events before, summed into its events'
        items' rows)."""
        one = np.ones(len(contributions))
        if not self.clip:
            return one
        for i, p in enumerate(contributions):
            sq = float(np.sum(np.bincount(p.items, p.counts) ** 2))  # an item listed twice counts as its sum
            if G is not None and len(p.follow):
                rows, inv = np.unique(p.follow, return_inverse=True)
                A = np.zeros((len(rows), G.shape[1]))
                np.add.at(A, inv, G[p.before])
                sq += float(np.sum(A**2))
            one[i] = min(1.0, self.clip / np.sqrt(sq)) if sq > 0 else 1.0
        return one

    def profiles(self) -> np.ndarray:
        """Every item's profile (rows L2-normalised, float32): its public features, weighted as ``PROFILE_PRIOR``
        times (the accumulated noise std of an affinity cell plus one event), beside its affinities, each counted
        only by how far it stands above ``PROFILE_THRESHOLD`` of those stds (pure noise mostly counts 0, so a
        profile without evidence stays its list). What the items' users did before them corrects a public
        feature list that is wrong, and a new item starts from its list. An item with no features listed gets a
        profile only once its excess outweighs a list's weight (else none: all zeros)."""
        if self.features is None:
            raise ValueError("Item profiles need item features.")
        F = np.asarray(self.features, np.float64)
        A = self.A if self.A is not None else np.zeros_like(F)
        std = self.noise_std * np.sqrt(self.aff_releases)  # of every cell of A (0 without noise)
        prior, excess = PROFILE_PRIOR * (std + 1.0), np.maximum(A - PROFILE_THRESHOLD * std, 0.0)
        # an item with no features listed has no list to hold noise back: its excess counts only where it outweighs
        # what a list would weigh (else the largest of many pure-noise cells would become its profile)
        excess[~F.any(axis=1) & (excess.sum(axis=1) <= prior)] = 0.0
        G = prior * F + excess
        return (G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def _noisy_pairs(self, a: np.ndarray, b: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """This round's pair sums among the candidates plus noise, one draw per unordered pair (mirrored);
        pairs with an item outside the candidates are dropped."""
        K = len(self.cand)
        slot = np.full(self.n_items, -1, np.int64)
        slot[self.cand] = np.arange(K)
        sa, sb = slot[a], slot[b]
        keep = (sa >= 0) & (sb >= 0)
        up = np.zeros((K, K))
        np.add.at(up, (np.minimum(sa, sb)[keep], np.maximum(sa, sb)[keep]), w[keep])
        iu = np.triu_indices(K, 1)
        up[iu] += rng.normal(0.0, self.pair_std, len(iu[0]))
        return up + up.T

    def _enter(self) -> None:
        """New candidates, chosen from the noisy counts released so far only (post-processing): the items whose
        noisy count is ``ENTER`` noise stds or more, largest first, up to ``max_candidates``. They enter for good;
        their pairs are summed (and noised) from the next release on."""
        out = np.ones(self.n_items, bool)
        out[self.cand] = False
        new = np.flatnonzero(out & (self.n >= ENTER * self.noise_std * np.sqrt(self.releases)))
        new = new[np.argsort(-self.n[new], kind="stable")][: self.max_candidates - len(self.cand)]
        if not len(new):
            return
        self.cand = np.concatenate([self.cand, new])
        self.since = np.concatenate([self.since, np.full(len(new), self.releases, np.int64)])
        if self.pairs:
            self.P = np.pad(self.P, (0, len(new)))

    def table(self) -> dict[str, np.ndarray]:
        """The published neighbour table (``graph.ids``/``graph.sim``: ``(n_items, neighbours)``, unused
        slots with score 0) and prior (``graph.prior``: recent counts, all-time counts breaking ties; noisy
        counts below 0 count 0)."""
        V = self.n_items
        n = np.maximum(self.n, 1.0)
        if self.noised:
            rows, cols, s = self._noisy_scores(n)
            S = sp.csr_matrix((s, (rows, cols)), shape=(V, V))
        else:  # C's own layout: each pair's score in place of its count (no round trip through coordinates)
            C = self.C
            rows = np.repeat(np.arange(V), np.diff(C.indptr))
            s = np.nan_to_num(C.data / _cosine_norms(n, rows, C.indices), posinf=0.0, neginf=0.0)
            S = sp.csr_matrix((s, C.indices, C.indptr), shape=(V, V))
        ids, sim = top_neighbours(S, self.neighbours)
        prior = self._prior()
        out = {"graph.ids": ids, "graph.sim": sim, "graph.prior": _unit(prior)}
        if self.features is None:
            return out
        return out | {FEATURES: self.features.astype(np.float16), COUNTS: _unit(np.maximum(self.n, 0.0)),
                      PROFILES: self.profiles().astype(np.float16)}

    def _prior(self) -> np.ndarray:
        """Recent counts, all-time counts breaking ties. Noised: of the candidates only, negative counts as 0 (the
        largest of many pure-noise counts would outrank most real ones)."""
        recent = np.sum(self.recent[-self.window:], axis=0) if self.recent else np.zeros(self.n_items)
        prior = recent + 1e-3 * self.n
        if not self.noised:
            return prior
        out = np.zeros(self.n_items)
        out[self.cand] = np.maximum(prior[self.cand], 0.0)
        return out

    def prior_window(self) -> int:
        """The rounds of counts the prior sums, of :data:`PRIOR_WINDOWS`: the longest (the least noise), unless a
        shorter one would have predicted the last :data:`PRIOR_EVAL` released rounds better, each from the rounds
        before it: its top :data:`PRIOR_TOP` items (of the candidates when noised) caught more of those rounds'
        counts than the longest window's did, by more than the noise of the counts they differ in explains (a round's
        noise is independent of the rounds before it, which chose the items). Without noise any gain counts: the
        window then follows how fast popularity moves. Released sums only: post-processing. :data:`RECENT_ROUNDS`
        until a round has rounds before it. Chosen as each release is summed in (and as a saved graph loads)."""
        return self.window

    @property
    def prior_rounds(self) -> int:
        """The rounds of counts the published prior sums (its window, or every round kept where that is fewer)."""
        return len(self.recent[-self.window:])

    def _choose_window(self) -> int:
        if len(self.recent) < 2:
            return RECENT_ROUNDS
        H = np.stack(self.recent)
        H = H[:, self.cand] if self.noised else H[:, H.any(axis=0)]  # an item no kept round counted catches nothing
        if not H.shape[1]:
            return RECENT_ROUNDS
        tops = _tops(H, min(PRIOR_TOP, H.shape[1]), known_only=not self.noised)
        longest = PRIOR_WINDOWS[-1]
        z = NormalDist().inv_cdf(1 - PRIOR_FALSE / (len(PRIOR_WINDOWS) - 1))
        best, lead = longest, 0.0
        for w in PRIOR_WINDOWS[-2::-1]:  # longest first: of equal gains, the longer window's noise is less
            gain, moved = _gain(H, tops[w], tops[longest])
            if gain > max(lead, z * self.noise_std * np.sqrt(moved)):
                best, lead = w, gain
        return best

    def _noisy_scores(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The asymmetric cosine of the candidates' noisy pair sums that stand above the threshold: ``t`` stds of
        each sum's accumulated noise, ``t`` such that a candidate expects ``FALSE_NEIGHBOURS`` pure-noise
        neighbours. Only noisy sums (and the candidates, chosen from them) reach it."""
        K = len(self.cand)
        if K < 2 or not self.pairs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        rounds = self.releases - np.maximum.outer(self.since, self.since)  # releases that noised each pair
        t = NormalDist().inv_cdf(1 - FALSE_NEIGHBOURS / (K - 1))
        i, j = np.nonzero((self.P > t * self.pair_std * np.sqrt(np.maximum(rounds, 0))) & (rounds > 0))
        c = self.cand
        s = self.P[i, j] / _cosine_norms(n, c[i], c[j])
        return c[i], c[j], s

    def state(self) -> dict[str, np.ndarray]:
        """For the checkpoint: ``C``'s upper triangle (it is symmetric, its diagonal empty) in 32 bits (whole
        counts below 2^24 are exact in float32), and the noise seed; noised: also the candidates and their noisy pair sums' upper
        triangle in 64 bits (a resumed run continues the same sums)."""
        C = sp.triu(self.C, k=1).tocoo()
        out = {"row": C.row.astype(np.int32), "col": C.col.astype(np.int32), "val": C.data.astype(np.float32),
               "n": self.n, "releases": np.asarray(self.releases, np.int64), "seed": np.asarray(self.seed, np.int64),
               "recent": np.stack(self.recent) if self.recent else np.zeros((0, self.n_items))}
        if self.noised:
            out |= {"cand": self.cand, "since": self.since,
                    "pairs": self.P[np.triu_indices(len(self.cand), 1)] if self.pairs else np.zeros(0)}
        if self.A is not None:
            out |= {"affinity": self.A, "aff_releases": np.asarray(self.aff_releases, np.int64)}
        if self.pending is not None:
            out["pending"] = self.pending
        return out

    def load(self, d: Mapping[str, np.ndarray]) -> None:
        V = self.n_items
        upper = sp.coo_matrix((np.asarray(d["val"], np.float64), (d["row"], d["col"])), shape=(V, V))
        self.C = (upper + upper.T).tocsr()
        self.n = np.asarray(d["n"], np.float64)
        self.recent = [np.asarray(x) for x in d["recent"]]
        self.releases = int(d.get("releases", 0))
        if "seed" in d:  # the noise seed the run drew its releases from (a resumed release draws the same)
            self.seed = int(d["seed"])
        self.A = np.asarray(d["affinity"], np.float64) if "affinity" in d else None
        # before affinity_every, every release of a noised graph drew on its affinities
        self.aff_releases = int(d.get("aff_releases", self.releases if self.noised else 0))
        self.pending = np.asarray(d["pending"], np.float64) if "pending" in d else None
        if self.features is not None and self.releases and (self.A is None or self.A.shape != self.features.shape):
            raise ValueError("its item graph was saved without item x feature affinities for these item features "
                             "(an earlier version, or other features), so its noise was calibrated for another "
                             "sensitivity; start a new --out")
        if self.noised:
            self.cand, self.since = np.asarray(d["cand"], np.int64), np.asarray(d["since"], np.int64)
            K = len(self.cand)
            if self.pairs:
                self.P = np.zeros((K, K))
                self.P[np.triu_indices(K, 1)] = d["pairs"]
                self.P += self.P.T
        self.window = self._choose_window()


def clip_scale(parts: Sequence[np.ndarray], clip: float) -> float:
    """A device's factor under user-level DP: ``min(1, clip / norm)``, ``norm`` the L2 norm of its graph parts
    (:func:`dense_contribution`) together, as :meth:`ItemGraph.scales` computes it from the pairs."""
    sq = float(sum(np.sum(np.square(p, dtype=np.float64)) for p in parts))
    return min(1.0, clip / np.sqrt(sq)) if sq > 0 else 1.0


def secure_noise_std(z_graph: float, features: np.ndarray | None) -> float:
    """The noise std of the item graph's sums under SecAgg+ (counts and affinities, no pairs): ``z_graph`` times
    their :func:`sensitivity`; what the server's graph holds and each device checks the round's std against."""
    return z_graph * sensitivity(0, features)


def sensitivity(window: int, features: np.ndarray | None) -> float:
    """How far one event's add/remove moves the graph's released sums over the whole run, in L2: ``sqrt(3 W w^2 + 1)``
    for the pairs (weighted ``w = PAIR_WEIGHT``: their noise is ``noise_std / w``) and counts (module docstring), and with ``features`` more under the root for the affinities (each
    round reads profile rows of norm at most 1, non-negative where the features are): the event's own row gains its
    before's profile (norm at most 1), and the event after it swaps the event's profile for its before's (norm at
    most sqrt(2) for non-negative rows, else 2): 3 more, or 5 where a feature value is negative."""
    extra = 0 if features is None else (3 if (np.asarray(features) >= 0).all() else 5)
    return float(np.sqrt(3 * window * PAIR_WEIGHT**2 + 1 + extra))


def bounded_profiles(profiles: np.ndarray | None, *, nonnegative: bool) -> np.ndarray | None:
    """A version's profiles as a device sums affinities from them (once per node, for all its devices): rows scaled
    to norm at most 1 and, with ``nonnegative`` features, clamped at 0: the bounds the graph's :func:`sensitivity`
    assumes, which float16 rounding or a faulty server could pass (None: the version has none)."""
    if profiles is None:
        return None
    G = np.asarray(profiles, np.float64)
    G = np.maximum(G, 0.0) if nonnegative else G
    return G / np.maximum(np.linalg.norm(G, axis=1, keepdims=True), 1.0)


def dense_contribution(p: Pairs, n_items: int, profiles: np.ndarray | None) -> list[np.ndarray]:
    """One device's item graph contribution as :meth:`ItemGraph.add` sums it, dense (SecAgg+ sums it masked): its
    new events' item counts and, where the version it was sent has ``profiles`` (:func:`bounded_profiles`), each new
    event's item row gaining the profile of the item before it."""
    counts = np.bincount(np.asarray(p.items, np.int64), np.asarray(p.counts, np.float64), minlength=n_items)
    if profiles is None:
        return [counts]
    G = profiles
    aff = np.zeros(G.shape)
    np.add.at(aff, np.asarray(p.follow, np.int64), G[np.asarray(p.before, np.int64)])
    return [counts, aff]


def _unit(x: np.ndarray) -> np.ndarray:
    """``x`` over its maximum (float32; all zeros stay 0)."""
    return (x / max(float(x.max()), 1e-12)).astype(np.float32)


def capped_pairs(contributions: Sequence[Pairs], n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The round's unordered pairs ``(a < b)`` and counts, each contribution counting at most ``PAIR_CAP`` per
    pair: one device (or one liar) cannot make a pair, and one event moves one pair's sum by at most 1."""
    V = n_items
    keys = [np.unique(np.minimum(p.a, p.b) * V + np.maximum(p.a, p.b), return_inverse=True) for p in contributions]
    a = np.concatenate([k // V for k, _ in keys] or [np.zeros(0, np.int64)])
    b = np.concatenate([k % V for k, _ in keys] or [np.zeros(0, np.int64)])
    w = np.concatenate([np.minimum(np.bincount(inv, weights=p.w, minlength=len(k)), PAIR_CAP)
                        for (k, inv), p in zip(keys, contributions, strict=True)] or [np.zeros(0)])
    return a, b, w


def _tops(H: np.ndarray, k: int, known_only: bool = False) -> dict[int, list[np.ndarray]]:
    """For each window of :data:`PRIOR_WINDOWS` and each of the last :data:`PRIOR_EVAL` rows ``t`` of ``H`` (rounds x
    items), the ``k`` columns ranked first by the sum of the ``window`` rows before ``t`` (a tie: the lower column);
    with ``known_only`` (exact counts) only of the columns some row before ``t`` counted, so an item the scored round
    alone knows never fills a top (under noise every column is a candidate, known from the releases)."""
    cum = np.vstack([np.zeros(H.shape[1]), np.cumsum(H, axis=0)])  # cum[t]: the sum of the rounds before t
    targets = range(max(1, len(H) - PRIOR_EVAL), len(H))

    def top(t: int, w: int) -> np.ndarray:
        order = np.argsort(cum[max(0, t - w)] - cum[t], kind="stable")
        return order[cum[t][order] > 0][:k] if known_only else order[:k]

    return {w: [top(t, w) for t in targets] for w in PRIOR_WINDOWS}


def _gain(H: np.ndarray, mine: list[np.ndarray], theirs: list[np.ndarray]) -> tuple[float, int]:
    """How much more of the last rows of ``H`` the columns ``mine`` caught than ``theirs`` (one set per row, as
    :func:`_tops`), and in how many (row, column) cells the two sets differ: the gain's noise is that many draws."""
    gain, moved = 0.0, 0
    for t, a, b in zip(range(len(H) - len(mine), len(H)), mine, theirs, strict=True):
        only_a, only_b = np.setdiff1d(a, b), np.setdiff1d(b, a)  # the cells both caught cancel exactly
        gain += float(H[t, only_a].sum() - H[t, only_b].sum())
        moved += len(only_a) + len(only_b)
    return gain, moved


def _cosine_norms(n: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The asymmetric cosine's denominator ``n_h^ALPHA n_c^(1-ALPHA)`` of each pair: the powers taken once per item,
    not once per pair (millions of pairs without DP)."""
    return (n**ALPHA)[rows] * (n ** (1 - ALPHA))[cols]


def top_neighbours(S: sp.csr_matrix, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``neighbours`` highest scores of ``S`` and their columns (unused slots: item 0, score 0)."""
    V, N = S.shape[0], neighbours
    ids, sim = np.zeros((V, N), np.int32), np.zeros((V, N), np.float32)
    size = np.diff(S.indptr)
    light = np.repeat(size <= N, size)  # the entries of rows that keep all they have: placed at once
    row = np.repeat(np.arange(V), size)[light]
    slot = (np.arange(S.indptr[-1]) - np.repeat(S.indptr[:-1], size))[light]
    ids[row, slot], sim[row, slot] = S.indices[: S.indptr[-1]][light], S.data[: S.indptr[-1]][light]
    for i in np.flatnonzero(size > N):
        lo, hi = S.indptr[i], S.indptr[i + 1]
        top = np.argpartition(-S.data[lo:hi], N - 1)[:N]
        ids[i], sim[i] = S.indices[lo:hi][top], S.data[lo:hi][top]
    return ids, sim


def split(host: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """A global version as sent: the model's parameters, and the graph's table (None when it has none); the model's
    item features, if any, in neither (:func:`fedrec.models.version_features`)."""
    model = {k: v for k, v in host.items() if k not in TABLE_KEYS and k != MODEL_FEATURES}
    graph = {k: np.asarray(host[k]) for k in TABLE_KEYS if k in host}
    return model, (graph if all(k in graph for k in KEYS) else None)


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
    out = {"graph.ids": torch.as_tensor(graph["graph.ids"]).long(), "graph.sim": torch.as_tensor(graph["graph.sim"]).float(),
           "graph.prior": torch.as_tensor(graph["graph.prior"]).float()}
    out |= {k: torch.as_tensor(graph[k]).float() for k in (FEATURES, COUNTS, PROFILES) if k in graph}
    for k in (FEATURES, PROFILES):
        if k in out:
            out |= _distinct(graph, k, out[k])
    return out


DISTINCT, OF = ".distinct", ".of"  #: a feature table's distinct rows, and each item's place among them


def _distinct(graph: Mapping[str, np.ndarray | torch.Tensor], key: str, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """``key``'s distinct rows and each item's index among them (taken from ``graph`` where it was prepared already).
    Many items share one genre list or topic; where the distinct rows are at most half the items, a match to the
    context is computed once per row (:func:`_sharpened_match`)."""
    if key + DISTINCT in graph and graph[key] is table:  # prepared with this very table
        return {key + DISTINCT: torch.as_tensor(graph[key + DISTINCT]), key + OF: torch.as_tensor(graph[key + OF])}
    a = np.ascontiguousarray(table.numpy())
    if not a.size:
        return {key + DISTINCT: table, key + OF: torch.arange(len(a))}
    _, first, of = np.unique(a.view(np.dtype((np.void, a.itemsize * a.shape[1]))).ravel(), return_index=True,
                             return_inverse=True)  # rows as bytes: a tenth of torch.unique's time
    return {key + DISTINCT: torch.from_numpy(a[first]), key + OF: torch.from_numpy(of.reshape(-1).astype(np.int64))}


def session_scores(graph: Mapping[str, np.ndarray | torch.Tensor], ctx: np.ndarray, weight: np.ndarray) -> torch.Tensor:
    """Every item's session score for each context row (``ctx``/``weight`` as :func:`contexts` gives):
    ``(rows, n_items)``, each row's neighbour part normalised to a maximum of 1, plus the prior; with features,
    the prior personalised by them (:func:`feature_match`)."""
    return graph_scores(graph, ctx, weight, content=False)[0]


def graph_scores(graph: Mapping[str, np.ndarray | torch.Tensor], ctx: np.ndarray, weight: np.ndarray, *,
                 content: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`session_scores`, and where the table has features the features blend's scores (else None): every
    item's all-time count times ``exp(FEATURE_SHARP * (m - 1))``, ``m`` its features' match to the context's.
    Under noise that is the source that holds up: a few hundred counts, each a sum over many devices, against
    the neighbour table's pairs, each a sum over few. ``content = False`` skips the features blend (None).
    Each row is ``rows x n_items``: the sources are built in place, a few passes over it each."""
    g = prepare(graph)  # free when the caller prepared it once for many calls
    ids, sim, prior = g["graph.ids"], g["graph.sim"], g["graph.prior"]
    rows, L = ctx.shape
    c = torch.from_numpy(np.maximum(ctx, 0))
    w = torch.from_numpy(weight).float()
    vals = (sim[c] * w.unsqueeze(-1)).reshape(rows, -1)
    out = torch.zeros(rows, len(prior)).scatter_add_(1, ids[c].reshape(rows, -1), vals)
    out /= out.amax(dim=1, keepdim=True).clamp_(min=1e-12)
    if FEATURES not in g:
        return out.add_(prior, alpha=PRIOR), None
    blend = None
    if content and COUNTS in g:  # counts * exp(FEATURE_SHARP * (m - 1)), m the profiles' match (else the lists')
        blend = _sharpened_match(g, PROFILES if PROFILES in g else FEATURES, c, w, FEATURE_SHARP).mul_(g[COUNTS])
    return out.add_(_sharpened_match(g, FEATURES, c, w, FEATURE_BETA).mul_(prior), alpha=PRIOR), blend


def _sharpened_match(g: Mapping[str, torch.Tensor], key: str, ctx: torch.Tensor, weight: torch.Tensor,
                     sharp: float) -> torch.Tensor:
    """``exp(sharp * (m - 1))`` for every item, ``m`` its :func:`feature_match` under the table ``key``: computed
    for each distinct row where :func:`prepare` found few (``(rows, distinct)``), then spread to the items."""
    if key + DISTINCT not in g or 2 * len(g[key + DISTINCT]) > len(g[key]):
        return _sharpened(feature_match(g[key], ctx, weight), sharp)
    m = _match(_context(g[key], ctx, weight), g[key + DISTINCT])  # every distinct row is some item's: same maximum
    return _sharpened(m, sharp).index_select(1, g[key + OF])


def _sharpened(m: torch.Tensor, sharp: float) -> torch.Tensor:
    """``exp(sharp * (m - 1))`` of a :func:`feature_match` result ``m``, in place."""
    return m.sub_(1.0).mul_(sharp).exp_()


def feature_match(features: torch.Tensor, ctx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """How well each item's features match each context row's: the cosine of the item's (L2-normalised)
    features with the context items' weighted sum, over the row's largest (``(rows, n_items)``, in [0, 1];
    a row whose context has no features matches nothing: 0)."""
    return _match(_context(features, ctx, weight), features)


def _context(features: torch.Tensor, ctx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each context row's weighted sum of its items' features."""
    return (features[ctx] * weight.unsqueeze(-1)).sum(dim=1)


def _match(profile: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The cosine of each row of ``features`` with each ``profile``, over the profile's largest, clamped at 0."""
    m = (profile @ features.T).clamp_(min=0.0)
    return m.div_(m.amax(dim=1, keepdim=True).clamp_(min=1e-12))
