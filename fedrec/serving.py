"""What every device is served each round: the newest global version, personalised on the device.

In a deployment every device can download each published global version (it is public: under DP
it is a DP release), and it keeps fitting its own user vector to its own events as they happen;
only *training* is sampled. So the recommendations a user actually sees in round ``r`` come from
the global version published at the end of round ``r - 1`` and the device's own vector fitted to
its events before round ``r``. :func:`serve_round` measures exactly that, for every device that
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
from .models.mf import MF


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


def serve_round(item_table: np.ndarray, dim: int, devices: list[ServeInput], vectors: dict[int, np.ndarray], *,
                round_: int, seed: int, k: int, fit_steps: int, lr: float, init_scale: float,
                negatives: int = 1) -> list[ServeResult]:
    """Fit each device's serving vector to its history (warm start), then score its new events.

    ``item_table`` is the MF item table ``(n_items, dim + 1)`` (last column: bias), the newest
    published version. ``vectors[d]`` is device ``d``'s serving vector from its previous round
    (absent: a fresh one from its own seed). The fit is ``fit_steps`` steps of SGD at ``lr`` on the
    BPR loss of the device's own history against uniform negatives it has not had, the same rule
    as the on-device fit before training.
    """
    if not devices:
        return []
    V = item_table.shape[0]
    A = len(devices)
    items_t = torch.from_numpy(np.ascontiguousarray(item_table[:, :dim], dtype=np.float32))
    bias_t = torch.from_numpy(np.ascontiguousarray(item_table[:, dim], dtype=np.float32))
    L = max(1, max(len(s.history) for s in devices))
    pos = torch.zeros((A, L), dtype=torch.long)
    valid = torch.zeros((A, L))
    seen = np.zeros((A, V), bool)
    neg = torch.zeros((max(fit_steps, 1), A, L, negatives), dtype=torch.long)
    users = torch.zeros((A, dim))
    for a, s in enumerate(devices):
        g = torch.Generator().manual_seed(serve_seed(seed, s.device, round_))
        h = np.asarray(s.history, dtype=np.int64)
        pos[a, : len(h)] = torch.from_numpy(h)
        valid[a, : len(h)] = 1.0
        seen[a, h] = True
        v = vectors.get(s.device)
        users[a] = torch.from_numpy(v) if v is not None else torch.randn(dim, generator=g) * init_scale
        cand = np.flatnonzero(~seen[a])
        if len(cand) == 0:
            cand = np.arange(V)
        # drawn per device with its own length, so the draws do not depend on the batch
        draw = torch.randint(0, len(cand), (max(fit_steps, 1), len(h), negatives), generator=g)
        neg[:, a, : len(h)] = torch.from_numpy(cand)[draw]
    n_valid = valid.sum(1).clamp(min=1.0)
    fit = [a for a, s in enumerate(devices) if len(s.history)]
    if fit_steps and fit:
        users.requires_grad_(True)
        for t in range(fit_steps):
            # per-device mean BPR loss, summed over devices: each device's gradient is its own
            p = (users.unsqueeze(1) * items_t[pos]).sum(-1) + bias_t[pos]  # (A, L)
            q = (users.unsqueeze(1).unsqueeze(2) * items_t[neg[t]]).sum(-1) + bias_t[neg[t]]  # (A, L, m)
            loss = torch.nn.functional.softplus(-(p.unsqueeze(-1) - q)).mean(-1)
            total = ((loss * valid).sum(1) / n_valid).sum()
            (grad,) = torch.autograd.grad(total, users)
            with torch.no_grad():
                users -= lr * grad * (valid.sum(1, keepdim=True) > 0)
        users = users.detach()
    scores = (users @ items_t.T + bias_t).numpy()
    out = []
    for a, s in enumerate(devices):
        c = prequential_counts(scores[a], seen[a], s.new, k)
        hits = in_topk(scores[a], s.probe, seen[a], k) if s.probe is not None and len(s.probe) else None
        out.append(ServeResult(device=s.device, counts=c, probe_hits=hits, vector=users[a].numpy().copy()))
    return out


def serve(model: RecModel, global_state: dict[str, np.ndarray], devices: list[ServeInput],
          vectors: dict[int, np.ndarray], *, round_: int, seed: int, k: int, fit_steps: int, lr: float,
          negatives: int = 1) -> list[ServeResult]:
    """:func:`serve_round` for any model: the newest global version, each device's own state, its scores.

    ``mf`` takes the batched path above. Other models are served device by device with the reused
    ``model``: the global version is loaded once; a device's local parameters (``vectors[d]``, as
    :meth:`RecModel.local_flat`; absent: fresh ones from its own seed) are fitted to its history with
    ``fit_steps`` steps of the same BPR rule (nothing to fit for ``sasrec``, whose user state is the
    history itself), then every item is scored from the device's state and history. ``vector`` in
    each result is the device's local state after the fit (empty for ``sasrec``).
    """
    if isinstance(model, MF):
        return serve_round(np.asarray(global_state["item.weight"]), model.dim, devices, vectors, round_=round_,
                           seed=seed, k=k, fit_steps=fit_steps, lr=lr, init_scale=model.init_scale,
                           negatives=negatives)
    from .client_update import fit_local  # client_update does not import this module; no cycle

    model.load({n: torch.as_tensor(np.asarray(v)) for n, v in global_state.items()})
    V = model.n_items
    out = []
    for s in devices:
        g = torch.Generator().manual_seed(serve_seed(seed, s.device, round_))
        h = np.asarray(s.history, dtype=np.int64)
        seen = np.zeros(V, bool)
        seen[h] = True
        if model.local_names:
            v = vectors.get(s.device)
            if v is not None and len(v):
                model.load_local_flat(v)
            else:
                model.load(model.init_local(g))
            cand = torch.from_numpy(np.flatnonzero(~seen)) if (~seen).any() else torch.arange(V)
            fit_local(model, torch.from_numpy(h), cand, steps=fit_steps, negatives=negatives, lr=lr, generator=g)
        scores = model.score_all(h).numpy()
        c = prequential_counts(scores, seen, s.new, k)
        hits = in_topk(scores, s.probe, seen, k) if s.probe is not None and len(s.probe) else None
        out.append(ServeResult(device=s.device, counts=c, probe_hits=hits, vector=model.local_flat()))
    return out
