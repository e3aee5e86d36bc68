"""Item features: public facts about items (genres, topics), beside the events.

Features are public: a catalogue's genres are published with it, and nothing in them is about a user.
So they cost no privacy wherever they are used (docs/privacy.md says what is public and what is
protected). The key ``item-features`` says where they come from:

``auto`` (default)
    MovieLens ``movies.csv`` when it sits beside the events file (its ``genres`` column, ``|``-separated;
    ``(no genres listed)`` is none); the synthetic world's item topics (``world-feature-noise`` of the
    items list a random topic instead of their own: how informative the features are); else none.
``none``
    no features.
a path
    MovieLens ``movies.csv`` (header ``movieId,title,genres``), or a generic CSV with the header
    ``item,feature`` or ``item,feature,value`` (one row per item and feature; value a number, 1 if absent).

Items are matched to the events' item ids (as written in the events file); feature rows of items the
events never name are skipped and counted. ``tags.csv`` is not read: MovieLens tags carry the id of
the user who wrote them, so they are behaviour data, not public item facts.
"""

from __future__ import annotations

import calendar
import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .events import DataError, EventLog

MAX_FEATURES = 4096  #: distinct features at most (the table is dense: items x features)
MAX_CELLS = 50_000_000  #: items x features at most
ML_HEADER = ("movieid", "title", "genres")
NO_GENRES = "(no genres listed)"
YEAR = re.compile(r"\((\d{4})\)\s*$")  #: a MovieLens title ends with its release year: its launch date (1 January)
LAUNCH = "\x00launch"  #: the name a parsed row gives its launch time among its features (never a feature)


@dataclass(frozen=True)
class ItemFeatures:
    """A dense ``(n_items, n_features)`` table (float32; rows of items without features are 0)."""

    matrix: np.ndarray
    names: tuple[str, ...]
    source: str  #: the file, or ``synthetic world topics (noise ...)``
    skipped: int = 0  #: feature rows of items the events never name
    #: per item, when it launched, in the events' time (NaN: not known): the catalogue's release dates (MovieLens:
    #: the year in the title; the world: its launch times). None: the source has none.
    launch: np.ndarray | None = None

    def info(self) -> dict:
        """What the summary reports of them."""
        covered = int((self.matrix != 0).any(axis=1).sum())
        return {"source": self.source, "features": len(self.names), "items_with_features": covered,
                "items": int(self.matrix.shape[0]), "rows_of_unknown_items": self.skipped,
                "items_with_launch_dates": 0 if self.launch is None else int(np.isfinite(self.launch).sum()),
                "what": "public item features (no privacy cost of their own): they personalise the session scores' "
                        "prior, and the item graph's affinities (noised with its counts) correct them into item "
                        "profiles, which rank the features blend; model = deepfm reads them as an input"}

    def normalised(self) -> np.ndarray:
        """Each item's row over its L2 norm (rows of zeros stay 0)."""
        norm = np.linalg.norm(self.matrix, axis=1, keepdims=True)
        return (self.matrix / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def beside(data: str) -> Path | None:
    """MovieLens ``movies.csv`` in the folder of the events file ``data`` (or in ``data``, a folder)."""
    if not data:
        return None
    p = Path(data)
    folder = p if p.is_dir() else p.parent
    f = folder / "movies.csv"
    return f if f.is_file() else None


def item_features(setting: str, data: str, log: EventLog, world_noise: float = 0.0,
                  seed: int = 0) -> ItemFeatures | None:
    """The run's item features (see the module docstring), or None. :class:`DataError` on a bad file."""
    if setting == "none":
        return None
    if setting == "auto":
        if log.meta.get("format") == "synthetic":
            return world_features(log, world_noise, seed)
        found = beside(data)
        return load_item_features(found, log) if found is not None else None
    return load_item_features(Path(setting), log)


def world_features(log: EventLog, noise: float, seed: int) -> ItemFeatures:
    """The synthetic world's item topics, one-hot; a share ``noise`` of the items list a random topic."""
    truth = log.meta["world"]
    topic = np.asarray(truth["item_topic"], np.int64)
    T = int(truth["spec"]["topics"])
    rng = np.random.default_rng([seed, 0x66656174])
    wrong = rng.random(len(topic)) < noise
    listed = np.where(wrong, rng.integers(0, T, len(topic)), topic)
    m = np.zeros((log.n_items, T), np.float32)
    m[np.arange(len(topic)), listed] = 1.0
    return ItemFeatures(m, tuple(f"topic-{t}" for t in range(T)), f"synthetic world topics (noise {noise:g})",
                        launch=np.asarray(truth["launch_time"], np.float64))


def load_item_features(path: Path, log: EventLog) -> ItemFeatures:
    """Read ``path`` (MovieLens ``movies.csv`` or generic ``item,feature[,value]``) against the events' items."""
    if not path.is_file():
        raise DataError(f"{path}: no such item-features file.")
    index = {str(x): i for i, x in enumerate(log.item_ids)}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = csv.reader(fh)
            header = [h.strip().lower() for h in next(rows, [])]
            pairs, skipped = _rows(rows, header, index, str(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a CSV file ({e}).") from None
    return _table(pairs, log.n_items, str(path), skipped)


def _rows(rows, header: list[str], index: dict[str, int], src: str) -> tuple[list[tuple[int, str, float]], int]:
    if tuple(header[:3]) == ML_HEADER:
        parse = _movielens
    elif header in (["item", "feature"], ["item", "feature", "value"]):
        parse = _generic
    else:
        raise DataError(f"{src}:1: expected the header movieId,title,genres (MovieLens movies.csv) or "
                        f"item,feature[,value], got {','.join(header)[:80]!r}.")
    pairs, skipped = [], 0
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        item, feats = parse(row, len(header), f"{src}:{line}")
        if item not in index:
            skipped += 1
            continue
        pairs += [(index[item], name, value) for name, value in feats]
    return pairs, skipped


def _movielens(row: list[str], width: int, where: str) -> tuple[str, list[tuple[str, float]]]:
    if len(row) != width:
        raise DataError(f"{where}: expected {width} fields (movieId,title,genres), got {len(row)}.")
    item, genres = row[0].strip(), row[2].strip()
    if not item.isdigit():
        raise DataError(f"{where}: movieId {item[:40]!r} is not a whole number.")
    year = YEAR.search(row[1])
    launch = [(LAUNCH, float(calendar.timegm((int(year.group(1)), 1, 1, 0, 0, 0))))] if year else []
    if genres == NO_GENRES:
        return item, launch
    names = [g.strip() for g in genres.split("|")]
    if not all(names):
        raise DataError(f"{where}: an empty genre in {genres[:80]!r}.")
    return item, [(g, 1.0) for g in names] + launch


def _generic(row: list[str], width: int, where: str) -> tuple[str, list[tuple[str, float]]]:
    if len(row) != width:
        raise DataError(f"{where}: expected {width} fields (item,feature{',value' if width == 3 else ''}), "
                        f"got {len(row)}.")
    item, name = row[0].strip(), row[1].strip()
    if not item or not name:
        raise DataError(f"{where}: an empty item or feature.")
    if width == 2:
        return item, [(name, 1.0)]
    try:
        value = float(row[2])
    except ValueError:
        raise DataError(f"{where}: value {row[2][:40]!r} is not a number.") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: value {row[2][:40]!r} is not finite.")
    if abs(value) > MOST_VALUE:
        raise DataError(f"{where}: value {row[2][:40]!r} is beyond ±{MOST_VALUE:g} (each item's row is normalised in "
                        "float32, whose squares overflow past it).")
    return item, [(name, value)]


#: the largest magnitude of a feature value (its square still fits a float32)
MOST_VALUE = 1e15


def _table(pairs: list[tuple[int, str, float]], n_items: int, src: str, skipped: int) -> ItemFeatures:
    launch = np.full(n_items, np.nan)
    for i, _, t in (p for p in pairs if p[1] == LAUNCH):
        launch[i] = t
    pairs = [p for p in pairs if p[1] != LAUNCH]
    names = sorted({name for _, name, _ in pairs})
    if len(names) > MAX_FEATURES or n_items * len(names) > MAX_CELLS:
        raise DataError(f"{src}: {len(names)} distinct features for {n_items} items is more than fedrec keeps "
                        f"(at most {MAX_FEATURES}, and items x features at most {MAX_CELLS}).")
    col = {n: j for j, n in enumerate(names)}
    m = np.zeros((n_items, len(names)), np.float32)
    for i, name, value in pairs:
        m[i, col[name]] = value
    return ItemFeatures(m, tuple(names), src, skipped, launch if np.isfinite(launch).any() else None)


def published_features(features: np.ndarray) -> np.ndarray:
    """Item feature rows as a global version carries them (float16): the server's model reads these exact values,
    so a device's model, built from the version, equals it."""
    return np.asarray(features).astype(np.float16)


#: an item's age in rounds when it is scored (the round minus its launch round), bucketed: below 0 (not launched
#: yet), 0, 1, 2, 3-4, 5-8, 9-16 and 17 or more. A catalogue publishes its release dates, so the age is public.
AGE_EDGES = (0, 1, 2, 3, 5, 9, 17)


@dataclass(frozen=True)
class ModelFeatures:
    """What a model that reads item features gets in each round (:meth:`at`, one per version): each item's
    static rows (L2-normalised) and, where launch dates are known, a one-hot of its age bucket then
    (:data:`AGE_EDGES`); each row L2-normalised again. A new item is "new" from these alone."""

    static: np.ndarray  #: (n_items, F) float32
    launch_round: np.ndarray | None  #: per item, the round its launch falls in (NaN: unknown); None: no dates

    @classmethod
    def of(cls, features: ItemFeatures, round_at) -> ModelFeatures:
        """``round_at(t)``: the round whose window holds time ``t`` (:meth:`fedrec.data.stream.RoundStream.round_at`)."""
        launch = None
        if features.launch is not None:
            launch = np.array([round_at(t) if np.isfinite(t) else np.nan for t in features.launch], np.float64)
        return cls(features.normalised(), launch)

    def at(self, round_: int, static: np.ndarray | None = None) -> np.ndarray:
        """The rows a version for ``round_`` carries (float16: as sent, and as the server's model reads them);
        ``static`` in place of the listed rows: the item graph's profiles, learned from behaviour
        (:meth:`fedrec.itemgraph.ItemGraph.profiles`, the same columns), where the run has them."""
        static = self.static if static is None else np.asarray(static, np.float32)
        if static.shape != self.static.shape:
            raise ValueError(f"item rows of shape {static.shape} in place of the listed {self.static.shape}")
        if self.launch_round is None:
            return published_features(static)
        known = np.isfinite(self.launch_round)
        bucket = np.searchsorted(AGE_EDGES, round_ - self.launch_round[known], side="right")
        ages = np.zeros((len(self.launch_round), len(AGE_EDGES) + 1), np.float32)
        ages[np.flatnonzero(known), bucket] = 1.0
        x = np.concatenate([static, ages], axis=1)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return published_features(x / np.where(norm > 0, norm, 1.0))
