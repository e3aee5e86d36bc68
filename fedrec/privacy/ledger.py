"""One append-only privacy ledger: every noisy release is a frozen record, on disk before it is used.

Records are JSON lines, each holding the hash of the line before (``prev``), so an edit shows.
``Ledger.append`` writes, flushes and fsyncs the line before it returns,
so a caller that appends *before* publishing the release it covers never publishes an
unaccounted release; a process that restarts reopens the file and continues the composition:
ε never resets. A torn last line (a crash mid-write) is the only damage tolerated, and it is
reported (and cut at the next write); any other malformed or unchained line stops with the file and line
number. A checkpoint records the ledger's length and hash (:meth:`Ledger.mark`), so a resume also refuses
a last line removed or edited, and a deleted file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .accounting import epsilon as compose_epsilon

#: the kinds of release (see :class:`Release`)
KINDS = ("server-gaussian", "device-dpsgd", "aggregate-gaussian", "graph-gaussian")
#: the event-level kinds: per device, composed over the steps its most-used event was exposed in
EVENT_KINDS = ("device-dpsgd", "aggregate-gaussian")


#: the ``prev`` hash of a ledger's first line
GENESIS = ""


def line_hash(line: bytes) -> str:
    """The hash the next line holds as ``prev``: SHA-256 of the line's bytes without its newline."""
    return hashlib.sha256(line).hexdigest()


class LedgerError(RuntimeError):
    """The ledger file is unusable; the message names the file and line."""


@dataclass(frozen=True)
class Release:
    """One noisy release.

    ``kind``: ``"server-gaussian"`` (user-level: Gaussian noise of std ``noise_multiplier * clip`` on
    the sum of clipped device deltas, devices Poisson-sampled with ``sample_rate``) or
    ``"device-dpsgd"`` (event-level: a device's DP-SGD update, ``steps`` steps at ``sample_rate``;
    ``max_steps_per_event`` is the most steps any of its events has now been used in) or
    ``"aggregate-gaussian"`` (event-level with the noise added once to the cohort's sum: the round's release
    as it covers device ``subject``'s events, one Poisson-subsampled Gaussian step at ``sample_rate`` per
    exposure, of multiplier ``noise_multiplier``, the gradient and count noises taken together) or
    ``"graph-gaussian"`` (event-level: the noisy item graph's releases of the whole run, one Gaussian
    mechanism of multiplier ``noise_multiplier`` on every event; written once, before its first release).
    """

    kind: str
    unit: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int = 1
    clip: float = 0.0
    period: int = 0
    subject: str = "server"  #: "server" or "device-<id>"
    max_steps_per_event: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown release kind {self.kind!r}.")
        if not self.noise_multiplier >= 0 or not 0 < self.sample_rate <= 1 or self.steps < 0:  # NaN fails too
            raise ValueError("A release needs noise_multiplier >= 0, 0 < sample_rate <= 1 and steps >= 0.")


class Ledger:
    """Append-only ledger in a JSONL file (or in memory when ``path`` is None).

    Each line is a :class:`Release` as JSON with one more field, ``prev``: the SHA-256 (hex) of the line
    before it (:data:`GENESIS` for the first), so a line edited, removed or reordered before the last one
    breaks the chain and the file is refused. :meth:`mark` is what a checkpoint records of the ledger;
    :meth:`check_mark` refuses a ledger that no longer starts with those bytes (a last line removed or
    edited, or the file deleted). Lines without ``prev`` (ledgers of earlier versions) are read, but only
    before the first chained line: after it, a line without its hash is refused.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[Release] = []
        self.torn_tail = False
        self._size = 0  # bytes of the file's whole lines (what the records cover)
        self._sha = hashlib.sha256()  # of those bytes
        self._last = GENESIS  # hash of the last line: the next line's ``prev``
        self._chained = False  # a line with ``prev`` was read: every later one must have it
        self._fix: tuple[int, bytes] | None = None  # the next write first cuts the file here and adds these bytes
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        """Read every record; the file itself is left as it is until the next :meth:`append`."""
        assert self.path is not None
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: empty unless the last write was cut short
        for no, raw in enumerate(lines, start=1):
            if raw.strip():
                self._take(raw, no)
        whole = len(data) - len(tail)
        self._size = whole
        self._sha.update(data[:whole])
        if not tail.strip():
            if tail:
                self._fix = (whole, b"")
            return
        try:  # a complete record whose newline never made it: keep it, finish the line on the next write
            self._take(tail, len(lines) + 1)
        except LedgerError:
            if self._parse(tail, len(lines) + 1, strict=False) is not None:
                raise  # a whole record that breaks the chain is damage, not a torn write
            self.torn_tail = True  # a torn record: the write never finished, it covered nothing
            self._fix = (whole, b"")
            return
        self._fix = (len(data), b"\n")
        self._size = len(data) + 1
        self._sha.update(tail + b"\n")

    def _parse(self, raw: bytes, no: int, *, strict: bool = True) -> tuple[Release, str | None] | None:
        """The record of line ``no`` and its ``prev`` hash (None: an unchained line of an earlier version)."""
        try:
            d = json.loads(raw)
            prev = d.pop("prev", None) if isinstance(d, dict) else None
            if prev is not None and not isinstance(prev, str):
                raise ValueError("its prev hash is not a string")
            return Release(**d), prev
        except (ValueError, TypeError) as e:
            if not strict:
                return None
            raise LedgerError(f"{self.path}:{no}: not a valid ledger record ({e}).") from None

    def _take(self, raw: bytes, no: int) -> None:
        """Read line ``no`` and check it chains to the line before."""
        parsed = self._parse(raw, no)
        assert parsed is not None
        rec, prev = parsed
        if prev is None and self._chained:
            raise LedgerError(f"{self.path}:{no}: this record lacks the hash of the record before it, which every "
                              "record after the first chained one has; the ledger was edited.")
        if prev is not None and prev != self._last:
            raise LedgerError(f"{self.path}:{no}: the hash of the record before does not match; a record before "
                              f"line {no} was edited, removed or reordered, so the privacy spent cannot be trusted.")
        self._chained = self._chained or prev is not None
        self._last = line_hash(raw)
        self.records.append(rec)

    def _repair(self) -> None:
        """Finish what a crash left (cut a torn record, add a lost newline) before the file grows."""
        if self._fix is None or self.path is None:
            return
        at, add = self._fix
        with open(self.path, "r+b") as f:
            f.truncate(at)
            f.seek(at)
            f.write(add)
            f.flush()
            os.fsync(f.fileno())
        self._fix = None

    def append(self, *recs: Release) -> None:
        """Persist ``recs`` (one write, flush + fsync), and only then add them to the composition."""
        if not recs:
            return
        last, blob = self._last, b""
        for r in recs:
            line = json.dumps({**asdict(r), "prev": last}).encode()
            blob += line + b"\n"
            last = line_hash(line)
        if self.path is not None:
            self._repair()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        self._size += len(blob)
        self._sha.update(blob)
        self._last, self._chained = last, True
        self.records.extend(recs)

    # ---- the checkpoint's hold on the ledger -----------------------------------------------------
    def mark(self) -> dict:
        """What a checkpoint records of the ledger: its ``records``, ``bytes`` and their ``sha256``."""
        self._repair()
        return {"records": len(self.records), "bytes": self._size, "sha256": self._sha.hexdigest()}

    def check_mark(self, mark: dict, checkpoint: str | Path) -> None:
        """Refuse (:class:`LedgerError`) a ledger that does not start with the bytes ``checkpoint`` recorded:
        one cut short, edited or deleted since; releases written after the checkpoint are allowed (a version
        is written to the ledger before it is published, and so before it is checkpointed)."""
        n, size = int(mark.get("records", 0)), int(mark.get("bytes", 0))
        if self.path is None or not size:
            return
        if not self.path.exists():
            raise LedgerError(f"The privacy ledger {self.path} is missing, but the checkpoint {checkpoint} records "
                              f"{n} releases in it; restore it, or start anew in another --out.")
        data = self.path.read_bytes()[:size]
        if len(data) < size or len(self.records) < n:
            raise LedgerError(f"The privacy ledger {self.path} is shorter than the checkpoint {checkpoint} records "
                              f"({len(data)} of {size} bytes, {len(self.records)} of {n} releases); releases were "
                              "removed, and resuming would under-count the privacy spent.")
        if hashlib.sha256(data).hexdigest() != mark.get("sha256"):
            raise LedgerError(f"The privacy ledger {self.path} does not match the checkpoint {checkpoint}: its "
                              f"first {n} releases were edited after they were written, so the privacy spent "
                              "cannot be trusted.")

    # ---- composition ---------------------------------------------------------------------------
    def server_history(self, period: int | None = None) -> list[tuple[float, float, int]]:
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.records
                if r.kind == "server-gaussian" and (period is None or r.period == period)]

    def user_epsilon(self, delta: float, accountant: str = "prv", period: int | None = None,
                     extra: tuple[float, float, int] | None = None) -> float:
        """User-level ε of the server's releases (of one period, or all), optionally with one more."""
        h = self.server_history(period) + ([extra] if extra else [])
        return compose_epsilon(h, delta, accountant)

    def event_epsilons(self, delta: float, accountant: str = "prv") -> dict[str, float]:
        """Per device, the per-event ε bound of its latest reported release (with the noisy item graph's, if any)."""
        latest: dict[str, Release] = {}
        for r in self.records:
            if r.kind in EVENT_KINDS:
                latest[r.subject] = r
        graph = [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.records if r.kind == "graph-gaussian"]
        return {s: compose_epsilon([(r.noise_multiplier, r.sample_rate, r.max_steps_per_event), *graph], delta,
                                   accountant)
                if r.max_steps_per_event else 0.0 for s, r in latest.items()}

    def last_round(self) -> int:
        return max((r.round for r in self.records), default=0)


def finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
