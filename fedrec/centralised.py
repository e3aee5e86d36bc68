"""The freshness ceiling: centralised online learning on all events, non-private, every round.

A server that saw every event would, each round, score each user's new events with what it holds
and then train on them. This runs that, served as devices serve (:func:`fedrec.serving.serve`: per
event with the user's state through the event before, every blend, and at the round's start) from a
centralised MF (``<p_u, q_i> + b_i``) and, where the federated run would have one, a centralised item
graph of every event of earlier rounds; with the same full-ranking metrics and the same run outputs as a
federated run (``metrics.jsonl``, ``summary.json`` with freshness and baselines), so a sweep can
put it beside the federated cells. It is a baseline, not a deployment mode: it needs all raw data.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .config import RunConfig
from .data.source import load_features, load_stream
from .device_round import DeviceData, serve_input
from .eval.baselines import round_sums
from .eval.freshness import tracked_items
from .eval.metrics import ServeCounts, in_topk
from .itemgraph import ItemGraph
from .models.mf import MF
from .report import RunRecorder
from .serving import serve

EPOCHS = 3  #: passes over each round's training events (new + replay windows)
BATCH = 256  #: events a minibatch takes (more on large rounds: BATCHES)
BATCHES = 512  #: most minibatches a pass takes: on larger rounds a minibatch takes more events


class Adam:
    """``torch.optim.Adam`` with its defaults on CPU tensors, step for step (its single-tensor update); and for a
    table whose gradient is given as rows (``step(rows=...)``), ``torch.optim.SparseAdam``'s update of those rows
    only (lazy Adam: a row no event touched keeps its value and moments).

    torch's optimizers import ``torch._dynamo`` when built (about 2 s), in every process that runs this
    baseline; this is the same arithmetic without it. Lazy rows keep a step over a million users' vectors from
    costing a million rows' arithmetic.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """One step: each parameter with a ``.grad`` as Adam; the parameter of ``rows`` (``(param, ids, grad)``,
        unique ids) as SparseAdam, those rows only."""
        self.t += 1
        b1, b2 = self.betas
        size = self.lr / (1 - b1 ** self.t)
        root2 = (1 - b2 ** self.t) ** 0.5
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if rows is not None and p is rows[0]:
                self._rows(p, m, v, rows[1], rows[2])
            elif p.grad is not None:
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v.sqrt() / root2).add_(self.eps), value=-size)

    def _rows(self, p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """SparseAdam's update (torch 2.x ``_sparse_adam``) of the rows ``ids`` of ``p``."""
        b1, b2 = self.betas
        m_new = m[ids] + (grad - m[ids]) * (1 - b1)
        v_new = v[ids] + (grad * grad - v[ids]) * (1 - b2)
        m[ids], v[ids] = m_new, v_new
        size = self.lr * (1 - b2 ** self.t) ** 0.5 / (1 - b1 ** self.t)
        p[ids] = p[ids] - size * (m_new / (v_new.sqrt() + self.eps))


def run_centralised(cfg: RunConfig, on_round=None) -> dict:
    """Run the centralised online baseline for ``cfg`` (its data, rounds, dim, seed); returns the summary."""
    stream = load_stream(cfg)
    log = stream.log
    U, V, D = log.n_users, log.n_items, cfg.dim
    g = torch.Generator().manual_seed(cfg.seed)
    item = torch.randn(V, D + 1, generator=g) * cfg.init_scale
    item[:, D] = 0.0  # biases start at zero, as in MF
    user = torch.randn(U, D, generator=g) * cfg.init_scale
    item.requires_grad_(True)
    opt = Adam([item, user], lr=0.02)
    rec = RunRecorder(cfg, stream=stream)
    rec.start(population=U, n_items=V, noise_multiplier=0.0, device="cpu")
    start = tracked_items(stream)[0] if cfg.uptake_probe else None
    seen = np.zeros((U, V), bool)
    rec.features = load_features(cfg, log) if cfg.graph else None
    graph = ItemGraph(V, cfg.graph_neighbours, features=rec.features.normalised() if rec.features is not None else None)
    for r in range(1, cfg.rounds + 1):
        t0 = time.time()
        idx = np.flatnonzero(stream.round_of == r)
        users = np.unique(log.user[idx])
        if cfg.graph and r > 1:
            graph.add_sums(*round_sums(stream, r - 1, cfg.graph_window))
        counts, per_user = _serve_round(stream, r, users, item, user, graph.table() if cfg.graph else None, cfg,
                                        rec.leader())
        probes = []
        if start is not None:
            with torch.no_grad():
                scores = (user @ item[:, :D].T + item[:, D]).numpy()
            probes = _probes(stream, start, scores, seen, r, cfg)
        for u in users:
            seen[u, log.item[idx[log.user[idx] == u]]] = True
        train = np.flatnonzero((stream.round_of <= r) & (stream.round_of > r - 1 - cfg.replay_rounds))
        _train(item, user, opt, log.user[train], log.item[train], seen, D, g)
        row = rec.round(r, done=[int(u) for u in users], counts=counts, failed=[], per_device=per_user,
                        probes=probes, extra={"epsilon": 0.0, "staleness": 1, "new_events": int(len(idx)),
                                              "bytes_up": 0, "bytes_down": 0, "server_lr": 0.0,
                                              "wall_s": round(time.time() - t0, 3)})
        if on_round:
            on_round(row)
    final = {"item.weight": item.detach().clone()}
    return rec.finish(final, {"unit": "none", "what": "centralised, non-private: every raw event on the server"})


def _serve_round(stream, r: int, users: np.ndarray, item: torch.Tensor, user: torch.Tensor,
                 table: dict[str, np.ndarray] | None, cfg: RunConfig, blend: int) -> tuple[ServeCounts, list]:
    """Each user's events of round ``r`` served as devices serve them (:func:`fedrec.serving.serve`: per
    event, every blend, and at the round's start), from the centralised MF (the user's row of the user
    table as its vector, no refit) and the centralised item graph (``table``: every event of earlier rounds)."""
    log = stream.log
    D = cfg.dim
    model = MF(log.n_items, D, init_scale=cfg.init_scale)
    inputs = []
    for u in users:
        idx = stream.device_events(int(u), r)
        s = serve_input(DeviceData(int(u), log.item[idx], stream.round_of[idx]), r)  # what a device is served
        if s is not None:
            inputs.append(s)
    with torch.no_grad():
        vectors = {int(u): user[u].numpy().copy() for u in users}
        res = serve(model, {"item.weight": item.detach().numpy()}, inputs, vectors, round_=r, seed=cfg.seed, k=cfg.k,
                    fit_steps=0, lr=0.0, graph=table, context=cfg.session_len, blend=blend, per_event=cfg.per_event)
    counts = ServeCounts()
    for x in res:
        counts.add(x.counts)
    return counts, [(x.device, x.counts) for x in res]


def _probes(stream, start: np.ndarray, scores: np.ndarray, seen: np.ndarray, r: int, cfg: RunConfig) -> list:
    """For every user with a tracked, launched item in their next window: is it in their top-K now?"""
    log = stream.log
    nxt = np.flatnonzero((stream.round_of > r) & (stream.round_of <= r + cfg.freshness_window))
    keep = nxt[(start[log.item[nxt]] >= 1) & (start[log.item[nxt]] <= r)]
    out = []
    for u in np.unique(log.user[keep]):
        items = np.unique(log.item[keep[log.user[keep] == u]])
        out.append((items.tolist(), in_topk(scores[u], items, seen[u], cfg.k).astype(int).tolist()))
    return out


def _train(item, user, opt, us: np.ndarray, its: np.ndarray, seen: Any, D: int, g: torch.Generator) -> None:
    """BPR with one uniform negative per event (not one the user has had: ``seen[users, items]`` says, a dense
    boolean matrix or anything indexed alike), ``EPOCHS`` shuffled passes of minibatches of ``BATCH`` events (at
    most ``BATCHES`` a pass); the item table steps as Adam, the user table lazily (only the batch's users' rows)."""
    n = len(us)
    if n == 0:
        return
    u_t, i_t = torch.from_numpy(us.astype(np.int64)), torch.from_numpy(its.astype(np.int64))
    V = item.shape[0]
    for _ in range(EPOCHS):
        neg = torch.randint(0, V, (n,), generator=g)
        bad = torch.from_numpy(seen[us, neg.numpy()])
        neg[bad] = torch.randint(0, V, (int(bad.sum()),), generator=g)  # one redraw is enough at these densities
        perm = torch.randperm(n, generator=g)
        size = max(BATCH, -(-n // BATCHES))
        for b in range(0, n, size):
            j = perm[b:b + size]
            ids, at = torch.unique(u_t[j], return_inverse=True)
            rows = user.detach()[ids].requires_grad_(True)  # the batch's users only: their rows step lazily
            p = rows[at]
            ei, en = item[i_t[j]], item[neg[j]]
            diff = (p * (ei[:, :D] - en[:, :D])).sum(-1) + ei[:, D] - en[:, D]
            loss = torch.nn.functional.softplus(-diff).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(rows=(user, ids, rows.grad))
