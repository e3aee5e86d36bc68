"""Baselines measured in the same run, over exactly the events the federated model was scored on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.stream import RoundStream
from .metrics import PrequentialCounts, prequential_counts


def popularity_prequential(stream: RoundStream, schedule: Sequence[Sequence[int]], k: int,
                           window: int = 0) -> list[PrequentialCounts]:
    """Score a popularity ranking the way devices score the model.

    ``schedule[r-1]`` lists the devices that completed round ``r``. Each such device's new
    events (since its previous completed round) are ranked by the counts of all events in
    rounds before ``r`` (a centralised, non-private popularity: a strong baseline), excluding
    what the device already had. With ``window`` > 0 only the last ``window`` rounds count
    (recent-window popularity: it follows trends, forgets the long tail). Returns per-round counts.
    """
    log = stream.log
    last: dict[int, int] = {}
    out = []
    counts = np.zeros(log.n_items)
    for r, devices in enumerate(schedule, start=1):
        counts += np.bincount(log.item[stream.round_of == r - 1], minlength=log.n_items) if r > 1 else 0
        if window and r - 1 - window >= 1:
            counts -= np.bincount(log.item[stream.round_of == r - 1 - window], minlength=log.n_items)
        c = PrequentialCounts()
        for d in devices:
            idx = stream.device_events(d, r)
            rounds = stream.round_of[idx]
            cur = last.get(d, 0)
            seen = np.zeros(log.n_items, bool)
            seen[log.item[idx[rounds <= cur]]] = True
            c.add(prequential_counts(counts, seen, log.item[idx[rounds > cur]], k))
            last[d] = r
        out.append(c)
    return out
