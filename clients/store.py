"""The on-device event store: one SQLite file per device (WAL, schema versioned).

What lives here never leaves the device: the behaviour events it records, its private state
(user vector, cursors, privacy history), its own privacy ledger, the newest global version it
received and its serving vector. A restart of the device or of its SuperNode loses nothing,
because every ClientApp call opens the file, works inside one transaction and commits before
it replies (Flower's ``context.state`` is in memory only).

Durability: the database runs in WAL mode with ``synchronous=FULL``, so :meth:`EventStore.record`
has made the event durable when it returns; a process killed at any moment leaves every
committed event in place and no half-written one.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``PRAGMA application_id`` =
:data:`APPLICATION_ID`):

* ``meta(key, value)``: ``device-id``, ``n-items``, ``max-events``, ``created``, ``dropped``.
* ``events(seq, item, ts, kind, weight, round)``: ``round`` is NULL until a server round takes
  the event in (the first round whose clock is at or after its time); it never changes after.
* ``state(key, value)``: the device's :class:`~fedrec.client_update.DeviceState` as JSON, and
  its local arrays as ``.npy`` bytes.
* ``privacy(seq, round, noise_multiplier, sample_rate, steps, max_exposure, epsilon, delta,
  accountant)``: one row per DP-SGD update this device released (event level).
* ``model(key, round, value)``: the newest global parameters received and the serving vector.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np

from fedrec.data.events import KINDS

SCHEMA_VERSION = 1
APPLICATION_ID = 0x66726563  # "frec"
DEFAULT_MAX_EVENTS = 50_000
_F = TypeVar("_F", bound=Callable[..., Any])

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    item INTEGER NOT NULL CHECK (item >= 0),
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    weight REAL NOT NULL,
    round INTEGER
);
CREATE INDEX events_round ON events (round);
CREATE TABLE state (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE privacy (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    steps INTEGER NOT NULL,
    max_exposure INTEGER NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL
);
CREATE TABLE model (key TEXT PRIMARY KEY, round INTEGER NOT NULL, value BLOB NOT NULL);
"""


class StoreError(RuntimeError):
    """The device store is missing, corrupt, of another schema version, or was given bad input."""


def store_error(path: Path, e: sqlite3.Error, otherwise: str = "") -> StoreError:
    """An SQLite failure as one sentence naming the store and what the user can do."""
    text = str(e).lower()
    if "locked" in text or "busy" in text:
        why = "is locked by another process (a long round?) for more than 30 s; retry when it is done"
    elif "readonly" in text or "read-only" in text:
        why = "is read-only; the device needs to write to it"
    elif "disk is full" in text or "disk i/o" in text:
        why = f"cannot be written (SQLite: {e}); check the disk"
    else:
        why = otherwise or f"is damaged (SQLite: {e}); restore it from a backup or remove it to start the device anew"
    return StoreError(f"The device store {path} {why}." if not why.startswith("is not") else f"{path} {why}.")


def _guarded(method: _F) -> _F:
    """A store method whose SQLite failures come out as :class:`StoreError` naming the store."""
    @functools.wraps(method)
    def call(self: EventStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
    return cast(_F, call)


class EventStore:
    """One device's SQLite store. Open an existing one, or ``create=True`` a new one.

    Parameters
    ----------
    path : the SQLite file.
    create : make a new store (the file must not exist yet, or be empty).
    device_id, n_items : required with ``create``: the device's id in the federation and the
        size of the item catalogue (item ids are ``0..n_items-1``).
    max_events : retention bound. Unconsumed events and those in the replay window are always
        kept; beyond them at most ``max_events`` older events are kept as history.
    """

    def __init__(self, path: str | Path, *, create: bool = False, device_id: int | None = None,
                 n_items: int | None = None, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.path = Path(path)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not create and fresh:
            raise StoreError(f"No device store at {self.path}; create one first (fedrec deploy local fills them).")
        if create and not fresh:
            raise StoreError(f"A file already exists at {self.path}; open it instead of creating a store there.")
        if create and (device_id is None or n_items is None or n_items < 1 or device_id < 0):
            raise StoreError("A new device store needs device_id >= 0 and n_items >= 1.")
        if max_events < 1:
            raise StoreError("max_events must be at least 1.")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if create:  # a person's raw events: readable by its owner only, from the first byte
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
                os.chmod(self.path, 0o600)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"Cannot open the device store {self.path}: {e}.") from None
        try:
            self._db.execute("PRAGMA busy_timeout = 30000")
            if create:
                self._create(device_id, n_items, max_events)  # type: ignore[arg-type]
            else:
                self._check()
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as e:
            self._db.close()
            raise store_error(self.path, e, f"is not a usable fedrec device store (SQLite: {e})") from None
        except StoreError:
            self._db.close()
            raise
        self.device_id = int(self.meta("device-id"))
        self.n_items = int(self.meta("n-items"))
        self.max_events = int(self.meta("max-events"))

    # ---- opening ------------------------------------------------------------------------------
    def _create(self, device_id: int, n_items: int, max_events: int) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._db.execute(stmt)
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("device-id", str(int(device_id))), ("n-items", str(int(n_items))),
                ("max-events", str(int(max_events))), ("created", repr(time.time())), ("dropped", "0")])
            self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _check(self) -> None:
        app = self._db.execute("PRAGMA application_id").fetchone()[0]
        if app != APPLICATION_ID:
            raise StoreError(f"{self.path} is an SQLite database but not a fedrec device store "
                             f"(application_id {app:#x}, expected {APPLICATION_ID:#x}).")
        ver = self._db.execute("PRAGMA user_version").fetchone()[0]
        if ver != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has device-store schema version {ver}; this fedrec reads version "
                             f"{SCHEMA_VERSION}. Open it with the fedrec version that wrote it.")
        bad = [r[0] for r in self._db.execute("PRAGMA quick_check").fetchall()]
        if bad != ["ok"]:
            raise StoreError(f"{self.path} is corrupt (SQLite quick_check: {'; '.join(bad[:3])}).")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        if self._db.in_transaction:
            yield self._db
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None
        try:
            yield self._db
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise store_error(self.path, e) from None

    # ---- meta -----------------------------------------------------------------------------------
    @_guarded
    def meta(self, key: str) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"{self.path} lacks the meta key {key!r}; the store is damaged.")
        return row[0]

    @_guarded
    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ---- events ---------------------------------------------------------------------------------
    def _row(self, item: int, timestamp: float | None, kind: str, weight: float) -> tuple:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or not 0 <= int(item) < self.n_items:
            raise StoreError(f"Event item {item!r} is not an item id in [0, {self.n_items}) ({self.path}).")
        ts = time.time() if timestamp is None else float(timestamp)
        if not math.isfinite(ts):
            raise StoreError(f"Event timestamp {timestamp!r} is not a finite number ({self.path}).")
        if kind not in KINDS:
            raise StoreError(f"Event kind {kind!r} is not one of {', '.join(KINDS)} ({self.path}).")
        if not math.isfinite(float(weight)):
            raise StoreError(f"Event weight {weight!r} is not a finite number ({self.path}).")
        return int(item), ts, kind, float(weight)

    @_guarded
    def record(self, item: int, *, timestamp: float | None = None, kind: str = "event", weight: float = 1.0) -> int:
        """Append one event durably (committed and synced when this returns); its sequence number."""
        row = self._row(item, timestamp, kind, weight)
        with self.transaction() as db:
            cur = db.execute("INSERT INTO events (item, ts, kind, weight) VALUES (?, ?, ?, ?)", row)
        return int(cur.lastrowid)  # type: ignore[arg-type]

    @_guarded
    def record_many(self, events: Iterable[tuple[int, float | None, str, float]]) -> int:
        """Append ``(item, timestamp, kind, weight)`` rows in one transaction (all or none)."""
        rows = [self._row(*e) for e in events]
        with self.transaction() as db:
            db.executemany("INSERT INTO events (item, ts, kind, weight) VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    @_guarded
    def take(self, round_: int, clock: float) -> int:
        """Assign every not-yet-taken event with time ``<= clock`` to ``round_``; how many."""
        with self.transaction() as db:
            cur = db.execute("UPDATE events SET round = ? WHERE round IS NULL AND ts <= ?", (int(round_), clock))
        return cur.rowcount

    @_guarded
    def events(self) -> tuple[np.ndarray, np.ndarray]:
        """Item ids and rounds of the events taken by a round so far, in time order."""
        rows = self._db.execute("SELECT item, round FROM events WHERE round IS NOT NULL ORDER BY ts, seq").fetchall()
        a = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        return a[:, 0].copy(), a[:, 1].copy()

    @_guarded
    def all_items(self) -> np.ndarray:
        """Item ids of every stored event (taken or not), in time order."""
        rows = self._db.execute("SELECT item FROM events ORDER BY ts, seq").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64)

    @_guarded
    def history(self) -> tuple[np.ndarray, np.ndarray]:
        """Item ids and kinds (:meth:`kinds` codes) of every stored event, taken or not, in time order, read
        together."""
        rows = self._db.execute("SELECT item, kind FROM events ORDER BY ts, seq").fetchall()
        return np.asarray([r[0] for r in rows], dtype=np.int64), self._codes([r[1] for r in rows])

    @_guarded
    def kinds(self, *, taken: bool = True) -> np.ndarray:
        """The kind of each event of :meth:`events` (``taken``) or of :meth:`all_items`, in the same order, as
        :data:`~fedrec.data.events.KINDS` codes (int8)."""
        where = " WHERE round IS NOT NULL" if taken else ""
        return self._codes([r[0] for r in self._db.execute(f"SELECT kind FROM events{where} ORDER BY ts, seq")])

    def _codes(self, kinds: list[str]) -> np.ndarray:
        """Stored kinds as :data:`~fedrec.data.events.KINDS` codes; a kind outside them is a damaged store."""
        code = {k: i for i, k in enumerate(KINDS)}
        bad = next((k for k in kinds if k not in code), None)
        if bad is not None:
            raise StoreError(f"The device store {self.path} holds an event of unknown kind {bad!r}.")
        return np.asarray([code[k] for k in kinds], dtype=np.int8)

    @_guarded
    def count(self, *, pending: bool | None = None) -> int:
        where = "" if pending is None else (" WHERE round IS NULL" if pending else " WHERE round IS NOT NULL")
        return int(self._db.execute(f"SELECT COUNT(*) FROM events{where}").fetchone()[0])

    @_guarded
    def retain(self, oldest_replay_round: int) -> int:
        """Drop the oldest history beyond ``max_events``; unconsumed and replayable events stay."""
        with self.transaction() as db:
            cur = db.execute(
                "DELETE FROM events WHERE round IS NOT NULL AND round <= ?1 AND seq NOT IN ("
                " SELECT seq FROM events WHERE round IS NOT NULL AND round <= ?1 ORDER BY seq DESC LIMIT ?2)",
                (int(oldest_replay_round), self.max_events))
            if cur.rowcount:
                db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = 'dropped'", (cur.rowcount,))
        return cur.rowcount

    # ---- private state, ledger, model -----------------------------------------------------------
    @_guarded
    def load_state(self) -> dict | None:
        """The device state as :meth:`DeviceState.to_config` gives it, or None for a new device."""
        rows = dict(self._db.execute("SELECT key, value FROM state").fetchall())
        if "device" not in rows:
            return None
        d = json.loads(rows["device"])
        for k, v in rows.items():
            if k.startswith("local:"):
                arr = _load_npy(v)
                d[k] = arr.astype(np.float32).tobytes()
                d[f"shape:{k[6:]}"] = list(arr.shape)
        return d

    @_guarded
    def save_state(self, config: dict) -> None:
        plain = {k: v for k, v in config.items() if not k.startswith(("local:", "shape:"))}
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO state VALUES ('device', ?)", (json.dumps(plain),))
            for k, v in config.items():
                if k.startswith("local:"):
                    arr = np.frombuffer(v, np.float32).reshape(config[f"shape:{k[6:]}"])
                    db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (k, _npy(arr)))

    # ---- the last update, until the server says it kept it ---------------------------------------
    @_guarded
    def set_pending(self, round_: int, before: dict | None) -> None:
        """Keep ``before``, the state (a ``DeviceState.to_config``; None for a new device) that the update of
        ``round_`` was trained from, until the server says whether it kept that update (:meth:`pending`)."""
        plain = None if before is None else {k: v for k, v in before.items() if not k.startswith(("local:", "shape:"))}
        local = {} if before is None else {k[6:]: np.frombuffer(v, np.float32).reshape(before[f"shape:{k[6:]}"])
                                           for k, v in before.items() if k.startswith("local:")}
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('pending', ?)",
                       (json.dumps({"round": int(round_), "state": plain}),))
            self.put_arrays("pending-local", round_, local)

    @_guarded
    def pending(self) -> tuple[int, dict | None] | None:
        """``(round, state before it)`` of the update not yet acknowledged (:meth:`set_pending`), or None."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'pending'").fetchone()
        if row is None or not row[0]:
            return None
        try:
            p = json.loads(row[0])
            round_, plain = int(p["round"]), p["state"]
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"The device store {self.path} has a damaged record of its last update.") from None
        if plain is None:
            return round_, None
        arrays = self.get_arrays("pending-local")
        for k, v in (arrays[1] if arrays else {}).items():
            plain[f"local:{k}"] = v.astype(np.float32).tobytes()
            plain[f"shape:{k}"] = list(v.shape)
        return round_, plain

    @_guarded
    def clear_pending(self) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM meta WHERE key = 'pending'")

    @_guarded
    def append_privacy(self, *, round_: int, noise_multiplier: float, sample_rate: float, steps: int,
                       max_exposure: int, epsilon: float, delta: float, accountant: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO privacy (round, noise_multiplier, sample_rate, steps, max_exposure, epsilon, "
                       "delta, accountant) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (round_, noise_multiplier, sample_rate, steps, max_exposure, epsilon, delta, accountant))

    @_guarded
    def privacy_ledger(self) -> list[dict]:
        cur = self._db.execute("SELECT * FROM privacy ORDER BY seq")
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    @_guarded
    def put_arrays(self, key: str, round_: int, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # mypy reads a key of **arrays as filling allow_pickle
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO model VALUES (?, ?, ?)", (key, int(round_), buf.getvalue()))

    @_guarded
    def get_arrays(self, key: str) -> tuple[int, dict[str, np.ndarray]] | None:
        row = self._db.execute("SELECT round, value FROM model WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        with np.load(io.BytesIO(row[1]), allow_pickle=False) as z:
            return int(row[0]), {k: z[k] for k in z.files}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _load_npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)
