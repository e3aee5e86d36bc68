"""Fill one device store per device from a dataset or the synthetic world (``fedrec deploy local``)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from ..clients.store import EventStore, StoreError
from ..config import ConfigError, RunConfig
from ..data.events import KINDS
from ..data.source import load_stream


def fill_stores(cfg: RunConfig, devices: int, dir_: str | Path) -> list[Path]:
    """``dir_/device-<i>.sqlite`` for ``i < devices``, holding user ``i``'s events with their times.

    A store that already exists (a resumed run) is kept as it is, after checking it belongs to
    device ``i``; the events a device has recorded are never rewritten.
    """
    stream = load_stream(cfg)
    if devices > stream.n_devices:
        raise ConfigError(f"--devices {devices} is more than the {stream.n_devices} users in {cfg.data or 'the world'}.")
    d = Path(dir_)
    d.mkdir(parents=True, exist_ok=True)
    log = stream.log
    paths = []
    for i in range(devices):
        p = d / f"device-{i}.sqlite"
        if p.exists() and _half_created(p):
            p.unlink()
        if p.exists():
            with EventStore(p) as s:
                if s.device_id != i or s.n_items != log.n_items:
                    raise StoreError(f"{p} holds device {s.device_id} with {s.n_items} items, not device {i} with "
                                     f"{log.n_items}; use another --out.")
        else:
            _create(p, i, log.n_items, ((int(log.item[e]), float(log.timestamp[e]), KINDS[int(log.kind[e])],
                                         float(log.weight[e])) for e in stream.by_user[i]))
        paths.append(p)
    return paths


def _create(p: Path, device: int, n_items: int, events: Iterable[tuple[int, float | None, str, float]]) -> None:
    """Create and fill a store under a temporary name, then rename it into place.

    A store is thus whole or absent: a fill killed half-way leaves only ``*.part`` files, which the
    next fill removes and makes again (as it does a store of an older fedrec left empty by a kill).
    """
    part = p.with_name(p.name + ".part")
    for leftover in (part, *(part.with_name(part.name + x) for x in ("-wal", "-shm", "-journal"))):
        leftover.unlink(missing_ok=True)
    with EventStore(part, create=True, device_id=device, n_items=n_items) as s:
        s.record_many(events)
    os.replace(part, p)


def _half_created(p: Path) -> bool:
    """An empty file, or an SQLite file with no table yet: what a kill during creation leaves behind."""
    if p.stat().st_size == 0:
        return True
    try:
        with sqlite3.connect(f"file:{p}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
    except sqlite3.Error:
        return False  # not ours to remove: opening it says what is wrong
