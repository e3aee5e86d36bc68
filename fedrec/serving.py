"""What every device is served each round: the newest global version, personalised on the device.

In a deployment every device can download each published global version (it is public: under DP
it is a DP release), and it keeps fitting its own user vector to its own events as they happen;
only *training* is sampled. So the recommendations a user actually sees in round ``r`` come from
the global version published at the end of round ``r - 1`` and the device's own vector fitted to
its events before round ``r``. :func:`serve` measures exactly that, for every device that
has events in round ``r``, before any training of that round: prequential HR/NDCG over the
round's events, and (simulation only) which tracked items are already in the device's top-K.

The devices are independent; they are computed together only as a batch (each has its own
events, its own vector and its own random negatives drawn from a per-device seed), so the result
does not depend on how devices are grouped into nodes.

Privacy: the serving vector is fitted with plain SGD on the device and used only to rank items on
the device; it never shapes a released delta (the training update starts from the device's own
training state). The counts it produces are evaluation counts, sent in clear like the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .eval.metrics import PrequentialCounts, in_topk, prequential_counts
from .models.base import RecModel


def serve_seed(seed: int, device: int, round_: int) -> int:
    return int(np.random.SeedSequence([seed, device, round_, 29]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class ServeInput:
    """One device's view this round."""

    device: int
    history: np.ndarray  #: item ids of its events before this round (time order)
    new: np.ndarray  #: item ids of its events in this round (time order)
    probe: np.ndarray | None = None  #: tracked items to check for top-K membership (simulation only)


@dataclass
class ServeResult:
    device: int
    counts: PrequentialCounts
    probe_hits: np.ndarray | None
    vector: np.ndarray  #: the device's serving vector after this round's fit (kept on the device)


def _generators(devices: list[ServeInput], seed: int, round_: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(serve_seed(seed, s.device, round_)) for s in devices]


def _results(devices: list[ServeInput], fitted: list[tuple[np.ndarray, np.ndarray]], n_items: int,
             k: int) -> list[ServeResult]:
    """Each device's prequential counts of its new events (and probe hits) from its scores of every item."""
    out = []
    for s, (scores, vector) in zip(devices, fitted, strict=True):
        seen = np.zeros(n_items, bool)
        seen[np.asarray(s.history, dtype=np.int64)] = True
        c = prequential_counts(scores, seen, s.new, k)
        hits = in_topk(scores, s.probe, seen, k) if s.probe is not None and len(s.probe) else None
        out.append(ServeResult(device=s.device, counts=c, probe_hits=hits, vector=vector))
    return out


def serve(model: RecModel, global_state: dict[str, np.ndarray], devices: list[ServeInput],
          vectors: dict[int, np.ndarray], *, round_: int, seed: int, k: int, fit_steps: int, lr: float,
          negatives: int = 1) -> list[ServeResult]:
    """The newest global version, each device's own state, its scores: for any model.

    The model serves the batch (:meth:`RecModel.fit_and_score`: ``mf`` fits every device's vector at
    once; other models go device by device with the reused ``model``): a device's local parameters
    (``vectors[d]``, as :meth:`RecModel.local_flat`; absent: fresh ones from its own seed) are fitted
    to its history with ``fit_steps`` steps of the BPR rule (nothing to fit for ``sasrec``, whose user
    state is the history itself), then every item is scored. ``vector`` in each result is the device's
    local state after the fit (empty for ``sasrec``).
    """
    if not devices:
        return []
    fitted = model.fit_and_score(global_state, [s.history for s in devices], [vectors.get(s.device) for s in devices],
                                 _generators(devices, seed, round_), fit_steps=fit_steps, negatives=negatives, lr=lr)
    return _results(devices, fitted, model.n_items, k)
