"""Matrix factorisation with sampled negatives: the item table is global, the user vector local."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..itemgraph import contexts
from .base import EventBlock, RecModel, block_contexts, length_groups, ridge_users


class MF(RecModel):
    """Score ``s(u, i) = <p_u, q_i> + b_i``.

    Parameters
    ----------
    n_items, dim : int
        The item table ``item.weight`` has shape ``(n_items, dim + 1)``; its last column is the
        item bias. It is the only global parameter.
    The device's own vector ``user.weight`` (shape ``(1, dim)``) is local. Each forward does one
    lookup per table (Opacus ghost clipping needs that).
    """

    global_names = ("item.weight",)
    local_names = ("user.weight",)

    def __init__(self, n_items: int, dim: int, *, generator: torch.Generator | None = None,
                 init_scale: float = 0.1) -> None:
        super().__init__()
        self.n_items, self.dim, self.init_scale = n_items, dim, init_scale
        self.item = nn.Embedding(n_items, dim + 1)
        self.user = nn.Embedding(1, dim)
        with torch.no_grad():
            self.item.weight.normal_(0.0, init_scale, generator=generator)
            self.item.weight[:, dim] = 0.0
            self.user.weight.normal_(0.0, init_scale, generator=generator)
        self.check_partition()

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"user.weight": torch.randn(1, self.dim, generator=generator) * self.init_scale}

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``user``: (B,) zeros (the device's own row); ``items``: (B, m) -> scores (B, m)."""
        e = self.item(items)  # (B, m, dim+1)
        p = self.user(user)  # (B, dim)
        return (e[..., : self.dim] * p.unsqueeze(1)).sum(-1) + e[..., self.dim]

    @torch.no_grad()
    def score_all(self, history: np.ndarray | None = None, kinds: np.ndarray | None = None) -> torch.Tensor:
        w = self.item.weight
        return w[:, : self.dim] @ self.user.weight[0] + w[:, self.dim]

    def item_repr(self) -> torch.Tensor:
        return self.item.weight.detach()[:, : self.dim]

    @torch.no_grad()
    def score_events(self, history: np.ndarray, new: np.ndarray, vector: np.ndarray | None, *,
                     context: int, kinds: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`RecModel.score_events` with the user vector refit per event in closed form
        (:func:`~fedrec.models.base.ridge_users` over the ``context`` newest items, anchored at ``vector``)."""
        ctx, w = contexts(history, new, context)
        u0 = torch.as_tensor(vector) if vector is not None and len(vector) else self.user.weight[0]
        return self.score_contexts(ctx, w, u0)

    @torch.no_grad()
    def score_event_blocks(self, blocks: Sequence[EventBlock], *, context: int,
                           kinds: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
        """:meth:`score_events` of every block in one refit and one product (rows of many devices at once)."""
        ctx, w, starts, lens = block_contexts(blocks, context, self.user.weight[0])
        return self.score_contexts(ctx, w, starts.repeat_interleave(lens, dim=0))

    @torch.no_grad()
    def score_contexts(self, ctx: np.ndarray, weight: np.ndarray, u0: torch.Tensor) -> torch.Tensor:
        """Every item's score for each context row (:func:`~fedrec.itemgraph.contexts`), the user vector refit
        to it from ``u0`` (``(d,)``, or ``(rows, d)``: one per row, so rows of many devices go in one batch)."""
        q, b = self.item.weight[:, : self.dim], self.item.weight[:, self.dim]
        return ridge_users(q, ctx, weight, u0) @ q.T + b

    def train_local(self, batch: tuple[torch.Tensor, ...], weight: torch.Tensor, *, steps: int, sample_rate: float,
                    lr_global: float, lr_local: float, generator: torch.Generator, backend: str = "auto",
                    private: bool = False, clip: float = 1.0, noise_multiplier: float = 0.0) -> None:
        """:meth:`RecModel.train_local` in closed form (:func:`sgd_mf`; under DP
        :func:`fedrec.privacy.fast_dpsgd.dpsgd_mf`, the same mechanism as Opacus's with its noise drawn
        lazily); ``backend = "autograd"`` takes the generic autograd / Opacus path instead."""
        if backend != "auto":
            super().train_local(batch, weight, steps=steps, sample_rate=sample_rate, lr_global=lr_global,
                                lr_local=lr_local, generator=generator, backend=backend, private=private, clip=clip,
                                noise_multiplier=noise_multiplier)
            return
        items = batch[1]
        if private:
            from ..privacy.fast_dpsgd import dpsgd_mf  # it builds on this module's closed-form gradients

            dpsgd_mf(self.item.weight.data, self.user.weight.data, items, steps=steps, sample_rate=sample_rate,
                     lr_item=lr_global, lr_user=lr_local, clip=clip, noise_multiplier=noise_multiplier,
                     generator=generator)
        else:
            sgd_mf(self.item.weight.data, self.user.weight.data, items, steps=steps, sample_rate=sample_rate,
                   lr_item=lr_global, lr_user=lr_local, generator=generator)

    def clipped_release(self, batch: tuple[torch.Tensor, ...], *, sample_rate: float, lr_global: float,
                        lr_local: float, clip: float, noise_multiplier: float, generator: torch.Generator,
                        backend: str = "auto") -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        """:meth:`RecModel.clipped_release` in closed form (:func:`fedrec.privacy.fast_dpsgd.clipped_step_mf`)
        unless ``backend = "autograd"`` (Opacus's clipping, the same release up to float rounding)."""
        from ..privacy.fast_dpsgd import clipped_step_mf  # it builds on this module's closed-form gradients

        if backend != "auto":
            return super().clipped_release(batch, sample_rate=sample_rate, lr_global=lr_global, lr_local=lr_local,
                                           clip=clip, noise_multiplier=noise_multiplier, generator=generator)
        (ids, rows), (cids, counts) = clipped_step_mf(
            self.item.weight.data, self.user.weight.data, batch[1], sample_rate=sample_rate, lr_item=lr_global,
            lr_user=lr_local, clip=clip, noise_multiplier=noise_multiplier, generator=generator)
        return {"item.weight": (ids.numpy(), rows.numpy().astype(np.float32))}, (cids.numpy(), counts.numpy())

    def fit_local(self, pos: torch.Tensor, cand: torch.Tensor, *, steps: int, negatives: int, lr: float,
                  generator: torch.Generator, backend: str = "auto", kinds: np.ndarray | None = None) -> None:
        """:meth:`RecModel.fit_local` in closed form (:func:`fit_user_mf`) unless ``backend = "autograd"``."""
        if backend != "auto":
            super().fit_local(pos, cand, steps=steps, negatives=negatives, lr=lr, generator=generator, backend=backend)
            return
        if not steps or not len(pos):
            return
        fit_user_mf(self.item.weight.data, self.user.weight.data, pos, cand, steps=steps, negatives=negatives, lr=lr,
                    generator=generator)

    def fit_and_score(self, global_state: Mapping[str, np.ndarray], histories: Sequence[np.ndarray],
                      vectors: Sequence[np.ndarray | None], generators: Sequence[torch.Generator], *,
                      fit_steps: int, negatives: int, lr: float, device: torch.device | None = None,
                      kinds: Sequence[np.ndarray | None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`RecModel.fit_and_score` batched over the devices (:func:`fit_users`, on ``device``); the model is
        untouched."""
        scores, users = fit_users(np.asarray(global_state["item.weight"]), self.dim, histories, vectors, generators,
                                  fit_steps=fit_steps, lr=lr, init_scale=self.init_scale, negatives=negatives,
                                  device=device)
        return [(scores[a], users[a].copy()) for a in range(len(histories))]


def fit_users(item_table: np.ndarray, dim: int, histories: Sequence[np.ndarray], vectors: Sequence[np.ndarray | None],
              generators: Sequence[torch.Generator], *, fit_steps: int, lr: float, init_scale: float,
              negatives: int = 1, device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit A devices' user vectors to their histories together, then score every item for each.

    ``item_table`` ``(n_items, dim + 1)`` (last column: bias); ``vectors[a]`` device ``a``'s vector from
    its previous round (None: a fresh one from ``generators[a]``). The fit is ``fit_steps`` steps of SGD
    at ``lr`` on each device's mean BPR loss of its history against uniform negatives it has not had,
    drawn per device from its own generator with its own length, so the result does not depend on the
    batch. The arithmetic runs on ``device`` (default the CPU; the draws are made on the CPU either way).
    Returns the scores ``(A, n_items)`` and the fitted vectors ``(A, dim)``.
    """
    V, A = item_table.shape[0], len(histories)
    dev = torch.device("cpu") if device is None else device
    items_t = torch.from_numpy(np.ascontiguousarray(item_table[:, :dim], dtype=np.float32)).to(dev)
    bias_t = torch.from_numpy(np.ascontiguousarray(item_table[:, dim], dtype=np.float32)).to(dev)
    steps = max(fit_steps, 1)
    users = torch.zeros((A, dim))
    hists, negs = [], []
    for a, (hist, v, g) in enumerate(zip(histories, vectors, generators, strict=True)):
        h = np.asarray(hist, dtype=np.int64)
        users[a] = torch.from_numpy(v) if v is not None else torch.randn(dim, generator=g) * init_scale
        seen = np.zeros(V, bool)
        seen[h] = True
        cand = np.flatnonzero(~seen)
        if len(cand) == 0:
            cand = np.arange(V)
        hists.append(h)
        negs.append(torch.from_numpy(cand)[torch.randint(0, len(cand), (steps, len(h), negatives), generator=g)])
    users = users.to(dev)
    if fit_steps:
        for group in length_groups(np.array([len(h) for h in hists], np.int64)):
            idx = torch.from_numpy(group)
            users[idx] = _fit_group(items_t, bias_t, [hists[a] for a in group], [negs[a] for a in group], users[idx],
                                    fit_steps=fit_steps, lr=lr)
    return (users @ items_t.T + bias_t).cpu().numpy(), users.cpu().numpy()


def _fit_group(items_t: torch.Tensor, bias_t: torch.Tensor, hists: list[np.ndarray], negs: list[torch.Tensor],
               users: torch.Tensor, *, fit_steps: int, lr: float) -> torch.Tensor:
    """:func:`fit_users`' SGD for one group of devices (each with a history), padded to its longest history: each
    device's gradient is its own mean BPR loss's."""
    dev, (A, L) = items_t.device, (len(hists), max(len(h) for h in hists))
    pos = torch.zeros((A, L), dtype=torch.long)
    valid = torch.zeros((A, L))
    neg = torch.zeros((fit_steps, A, L, negs[0].shape[-1]), dtype=torch.long)
    for a, (h, n) in enumerate(zip(hists, negs, strict=True)):
        pos[a, : len(h)] = torch.from_numpy(h)
        valid[a, : len(h)] = 1.0
        neg[:, a, : len(h)] = n[:fit_steps]
    pos, valid, neg = pos.to(dev), valid.to(dev), neg.to(dev)  # drawn on the CPU, as alone
    n_valid = valid.sum(1)
    rows, bias = items_t[pos], bias_t[pos]  # (A, L, d), (A, L): the same at every step
    users = users.clone().requires_grad_(True)
    for t in range(fit_steps):
        # per-device mean BPR loss, summed over devices: each device's gradient is its own
        p = (users.unsqueeze(1) * rows).sum(-1) + bias  # (A, L)
        q = (users.unsqueeze(1).unsqueeze(2) * items_t[neg[t]]).sum(-1) + bias_t[neg[t]]  # (A, L, m)
        loss = torch.nn.functional.softplus(-(p.unsqueeze(-1) - q)).mean(-1)
        total = ((loss * valid).sum(1) / n_valid).sum()
        (grad,) = torch.autograd.grad(total, users)
        with torch.no_grad():
            users -= lr * grad
    return users.detach()


def bpr_event_grads(item: torch.Tensor, user: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each event's gradient of the BPR loss of MF, in closed form (no autograd).

    ``item`` (n_items, d+1), ``user`` (d,), ``idx`` (b, 1 + K): each event's positive item, then its
    K negatives. With the loss ``l = mean_k softplus(-(s_pos - s_neg_k))`` and ``c_k = dl/d(s_pos -
    s_neg_k) = -sigmoid(-(s_pos - s_neg_k)) / K``, the gradient on row ``idx[b, j]`` is
    ``a[b, j] * [user, 1]`` (``a = [sum_k c_k, -c_1, ..., -c_K]``; a row that appears twice in an
    event gets both terms) and on the user vector ``gu[b] = sum_k c_k (q_pos - q_neg_k)[:d]``.
    Returns ``(a, gu)`` of shapes (b, 1 + K) and (b, d).
    """
    d = user.shape[0]
    e = item[idx]  # (b, 1 + K, d + 1)
    s = e[..., :d] @ user + e[..., d]
    c = -torch.sigmoid(-(s[:, :1] - s[:, 1:])) / (idx.shape[1] - 1)
    a = torch.cat([c.sum(1, keepdim=True), -c], dim=1)
    gu = (c.unsqueeze(2) * (e[:, :1, :d] - e[:, 1:, :d])).sum(1)
    return a, gu


def bpr_event_grads_np(item: np.ndarray, user: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bpr_event_grads` in numpy, for a few events at a time (where a torch call's overhead is what costs):
    the same ``(a, gu)`` from the same ``item`` (n_items, d+1), ``user`` (d,) and ``idx`` (b, 1 + K)."""
    d = user.shape[0]
    e = item[idx]  # (b, 1 + K, d + 1)
    s = e @ np.append(user, np.ones(1, user.dtype))
    with np.errstate(over="ignore"):  # exp -> inf is the sigmoid's limit 0, as intended
        c = -1.0 / (1.0 + np.exp(s[:, :1] - s[:, 1:])) / (idx.shape[1] - 1)
    a = np.concatenate([c.sum(1, keepdims=True), -c], axis=1)
    gu = np.einsum("bk,bkd->bd", c, e[:, :1, :d] - e[:, 1:, :d])
    return a, gu


def row_grads(a: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
    """The item-row gradients ``a[b, j] * [user, 1]``, flattened to (b * (1 + K), d + 1)."""
    return a.reshape(-1, 1) * torch.cat([user, user.new_ones(1)]).unsqueeze(0)


@torch.no_grad()
def sgd_mf(item: torch.Tensor, user: torch.Tensor, items: torch.Tensor, *, steps: int, sample_rate: float,
           lr_item: float, lr_user: float, generator: torch.Generator) -> None:
    """Non-private local SGD on ``item`` and ``user`` (1, d) in place: each step takes every event of
    ``items`` (n, 1 + K) with probability ``sample_rate`` and descends the batch-mean BPR loss (what
    autograd with ``BPRLoss()`` and ``torch.optim.SGD`` computes; an empty step is skipped). Only the
    rows in the batch are touched, however large the table."""
    n = items.shape[0]
    for _ in range(steps):
        take = torch.rand(n, generator=generator) < sample_rate
        if not take.any():
            continue
        idx = items[take]
        u = user[0]
        a, gu = bpr_event_grads(item, u, idx)
        g_rows = row_grads(a, u)
        item.index_add_(0, idx.reshape(-1), g_rows, alpha=-lr_item / len(idx))
        u.add_(gu.sum(0), alpha=-lr_user / len(idx))


@torch.no_grad()
def sgd_mf_many(item: torch.Tensor, users: torch.Tensor, items: Sequence[torch.Tensor], draws: Sequence[torch.Tensor],
                *, sample_rate: float, lr_item: float, lr_user: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sgd_mf` of many devices at once, each from the same table ``item`` (not modified): device ``j`` with
    its vector ``users[j]`` (updated in place), its events ``items[j]`` (n_j, 1 + K) and its steps' uniform draws
    ``draws[j]`` (steps, n_j), which take its events as ``sgd_mf``'s ``torch.rand(n_j) < sample_rate`` would.
    Each device steps on its own copy of the rows its events touch; returns, per device, those rows' ids and
    values after its steps. The same arithmetic as ``sgd_mf`` device by device, up to float rounding."""
    if not len(items):
        return []
    d, dev = users.shape[1], item.device
    ids = [torch.unique(x, return_inverse=True) for x in items]  # the bookkeeping on the CPU, the arithmetic on dev
    sizes = torch.tensor([len(u) for u, _ in ids], dtype=torch.long)
    offset = torch.cumsum(sizes, 0) - sizes
    rows = item[torch.cat([u for u, _ in ids]).to(dev)].clone()  # each device's own copy of its rows
    local = torch.cat([inv.reshape(x.shape) + offset[j] for j, ((_, inv), x) in enumerate(zip(ids, items, strict=True))])
    owner = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(x) for x in items], dtype=torch.long))
    taken = torch.cat(list(draws), dim=1) < sample_rate
    for step in taken:
        ev = torch.nonzero(step).squeeze(1)
        if not len(ev):
            continue
        idx, who = local[ev].to(dev), owner[ev]
        n = torch.bincount(who, minlength=len(items)).to(item.dtype)[who].to(dev)  # each event's device's batch size
        who = who.to(dev)
        u = users[who]
        e = rows[idx]  # (b, 1 + K, d + 1)
        s = (e[..., :d] * u.unsqueeze(1)).sum(-1) + e[..., d]
        c = -torch.sigmoid(-(s[:, :1] - s[:, 1:])) / (idx.shape[1] - 1)
        a = torch.cat([c.sum(1, keepdim=True), -c], dim=1)
        gu = (c.unsqueeze(2) * (e[:, :1, :d] - e[:, 1:, :d])).sum(1)
        g_rows = a.unsqueeze(2) * torch.cat([u, u.new_ones(len(u), 1)], dim=1).unsqueeze(1)
        rows.index_add_(0, idx.reshape(-1), (g_rows * (-lr_item / n)[:, None, None]).reshape(-1, d + 1))
        users.index_add_(0, who, gu * (-lr_user / n)[:, None])
    rows = rows.cpu()
    return [(u, rows[o:o + m]) for (u, _), o, m in zip(ids, offset.tolist(), sizes.tolist(), strict=True)]


@torch.no_grad()
def fit_user_mf_many(item: torch.Tensor, users: torch.Tensor, pos: Sequence[torch.Tensor], cand: Sequence[torch.Tensor],
                     *, steps: int, negatives: int, lr: float, generators: Sequence[torch.Generator]) -> None:
    """:func:`fit_user_mf` for many devices at once: ``users`` ``(A, d)`` in place, device ``a`` fit to its events
    ``pos[a]`` (at least one) against negatives from ``cand[a]``, drawn from ``generators[a]`` as
    :func:`fit_user_mf` draws them (every step's, in order, in one call: the same numbers), so each vector is the one
    its device's own fit gives, up to float rounding (sums in another order)."""
    d, dev = users.shape[1], item.device
    n = torch.tensor([len(p) for p in pos], device=dev)
    owner = torch.repeat_interleave(torch.arange(len(pos), device=dev), n)
    neg = torch.cat([c[torch.randint(0, len(c), (steps, len(p), negatives), generator=g)]
                     for p, c, g in zip(pos, cand, generators, strict=True)], dim=1).to(dev)  # (steps, N, K)
    e_pos = item[torch.cat(list(pos)).to(dev)]  # (N, d+1)
    scale = (-lr / n.to(users.dtype))[owner].unsqueeze(1)
    for t in range(steps):
        e_neg = item[neg[t]]  # (N, K, d+1)
        diff = e_pos[:, None, :d] - e_neg[..., :d]  # (N, K, d)
        s = (diff * users[owner].unsqueeze(1)).sum(-1) + (e_pos[:, None, d] - e_neg[..., d])
        c = -torch.sigmoid(-s) / negatives  # (N, K)
        users.index_add_(0, owner, (c.unsqueeze(2) * diff).sum(1) * scale)


@torch.no_grad()
def fit_user_mf(item: torch.Tensor, user: torch.Tensor, pos: torch.Tensor, cand: torch.Tensor, *, steps: int,
                negatives: int, lr: float, generator: torch.Generator) -> None:
    """Full-batch steps on the user vector alone (items frozen), fresh negatives from ``cand`` each step."""
    u = user[0]
    d = u.shape[0]
    e_pos = item[pos]  # (n, d+1): the table is frozen here, so the positives are looked up once
    for _ in range(steps):
        neg = cand[torch.randint(0, len(cand), (len(pos), negatives), generator=generator)]
        e_neg = item[neg]  # (n, K, d+1)
        diff = (e_pos[:, None, :d] - e_neg[..., :d])  # (n, K, d)
        c = -torch.sigmoid(-(diff @ u + (e_pos[:, None, d] - e_neg[..., d]))) / negatives  # (n, K)
        u.add_((c.unsqueeze(2) * diff).sum((0, 1)), alpha=-lr / len(pos))
