"""One append-only privacy ledger: every noisy release is a frozen record, on disk before it is used.

Records are JSON lines. ``Ledger.append`` writes, flushes and fsyncs the line before it returns,
so a caller that appends *before* publishing the release it covers never publishes an
unaccounted release; a process that restarts reopens the file and continues the composition:
ε never resets. A torn last line (a crash mid-write) is the only damage tolerated, and it is
reported; any other malformed line stops with the file and line number.
"""

from __future__ import annotations

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
    """Append-only ledger in a JSONL file (or in memory when ``path`` is None)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[Release] = []
        self.torn_tail = False
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # bytes after the last newline: empty unless the last write was cut short
        for no, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                self.records.append(Release(**json.loads(raw)))
            except (ValueError, TypeError) as e:
                raise LedgerError(f"{self.path}:{no}: not a valid ledger record ({e}).") from None
        if tail.strip():
            try:  # a complete record whose newline never made it: keep it, finish the line
                self.records.append(Release(**json.loads(tail)))
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            except (ValueError, TypeError):  # a torn record: the write never finished, it covered nothing
                self.torn_tail = True
                self.path.write_bytes(data[: len(data) - len(tail)])

    def append(self, *recs: Release) -> None:
        """Persist ``recs`` (one write, flush + fsync), and only then add them to the composition."""
        if not recs:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(asdict(r)) + "\n" for r in recs))
                f.flush()
                os.fsync(f.fileno())
        self.records.extend(recs)

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
