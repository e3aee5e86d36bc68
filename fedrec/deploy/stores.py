"""Fill one device store per device from a dataset or the synthetic world (``fedrec deploy local``)."""

from __future__ import annotations

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
        if p.exists():
            with EventStore(p) as s:
                if s.device_id != i or s.n_items != log.n_items:
                    raise StoreError(f"{p} holds device {s.device_id} with {s.n_items} items, not device {i} with "
                                     f"{log.n_items}; use another --out.")
        else:
            idx = stream.by_user[i]
            with EventStore(p, create=True, device_id=i, n_items=log.n_items) as s:
                s.record_many((int(log.item[e]), float(log.timestamp[e]), KINDS[int(log.kind[e])],
                               float(log.weight[e])) for e in idx)
        paths.append(p)
    return paths
