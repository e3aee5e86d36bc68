"""DeepFM (Guo et al., IJCAI 2017) over the item id, the item's public features and the device's user vector.

The fields of an event are four embeddings of width ``dim``: the device's user vector ``p`` (local), the item's
id embedding ``e_i``, its features' embedding ``f_i = x_i V`` (``x_i``: the item's row of the run's public item
features, L2-normalised as published; ``V``: the feature table) and the event's context ``g_k``: the kind of the
event before it (viewed, clicked, bought, rated; :meth:`~fedrec.models.base.RecModel.event_contexts`), what the
device knows the moment before. The score is the factorisation machine over them plus a deep part over the same
embeddings (shared, as in DeepFM):

``s(u, i, k) = b_i + c_i + <p, e_i> + <p, f_i> + <e_i, f_i> + <g_k, e_i + f_i> + MLP([p ; e_i ; f_i ; g_k])``

with ``b_i`` the id bias and ``c_i = x_i w`` the features' bias (the pairs that read no item, ``<p, g_k>`` and a
context bias, rank nothing and cancel in every pairwise loss, so they are left out). A new item has no id signal yet (its row is
as initialised: a small random vector, bias 0), but its features score it from the round it launches:
``<p, f_i> + c_i`` is what every device that liked items with those features taught the feature table. The
feature table has one row per feature (a genre, a topic), touched by every device whose events have it, so it
needs less noise per unit of signal under DP than any item row (docs/privacy.md: the features are public, the
table learned from them is protected as every global parameter is).

Without features (a run with none) every item's feature row is 0 and the model is an FM over user, id and
context plus the deep part. Data without kinds (MovieLens ratings: one kind) gives every event the same context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .base import (
    N_CONTEXTS,
    NO_CONTEXT,
    EventBlock,
    RecModel,
    block_contexts,
    length_groups,
    ridge_users,
    seeded_linear,
    unseen,
)


class DeepFM(RecModel):
    """Parameters: ``item.weight`` ``(n_items, dim + 1)`` (id embedding, id bias last), ``feat.weight``
    ``(dim + 1, n_features)`` (a bias-free linear map of an item's feature row: its embedding, its bias last),
    ``ctx.weight`` ``(N_CONTEXTS, dim)`` (the contexts' embeddings), the deep part ``4 dim -> dim -> dim // 2 -> 1``
    (ReLU); all global. Local: the device's ``user.weight``
    ``(1, dim)``. The features are a buffer (public, never trained nor sent back), set by :meth:`set_features`
    from the published version (:func:`fedrec.models.shared_features`)."""

    global_names = ("item.weight", "feat.weight", "ctx.weight", "mlp1.weight", "mlp1.bias", "mlp2.weight",
                    "mlp2.bias", "out.weight", "out.bias")
    local_names = ("user.weight",)
    uses_features = True
    reads_kinds = True
    max_grad_norm = 3.0  #: chosen on the held-out world seed 3 (docs/robustness.md)
    features: torch.Tensor  #: a buffer: the items' public feature rows

    def __init__(self, n_items: int, dim: int, *, generator: torch.Generator | None = None,
                 init_scale: float = 0.1, features: np.ndarray | None = None) -> None:
        super().__init__()
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.n_items, self.dim, self.init_scale = n_items, dim, init_scale
        width = features.shape[1] if features is not None and features.ndim == 2 and features.shape[1] else 1
        self.register_buffer("features", torch.zeros(n_items, width))
        self.item = nn.Embedding(n_items, dim + 1)
        self.feat = nn.Linear(width, dim + 1, bias=False)
        self.user = nn.Embedding(1, dim)
        self.ctx = nn.Embedding(N_CONTEXTS, dim)
        h = max(dim // 2, 1)
        self.mlp1 = seeded_linear(4 * dim, dim, g)
        self.mlp2 = seeded_linear(dim, h, g)
        self.out = seeded_linear(h, 1, g)
        with torch.no_grad():
            self.item.weight.normal_(0.0, init_scale, generator=g)
            self.item.weight[:, dim] = 0.0
            self.feat.weight.normal_(0.0, init_scale, generator=g)
            self.feat.weight[dim] = 0.0
            self.out.weight.mul_(init_scale)
            self.user.weight.normal_(0.0, init_scale, generator=g)
            self.ctx.weight.normal_(0.0, init_scale, generator=g)
        if features is not None and features.shape[1]:
            self.set_features(features)
        self.check_partition()

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    @torch.no_grad()
    def set_features(self, features: np.ndarray) -> None:
        """The items' public feature rows ``(n_items, n_features)``, as published (float16 values are exact)."""
        x = np.asarray(features)
        if x.shape != tuple(self.features.shape):
            raise ValueError(f"deepfm: item features of shape {x.shape}, the model was built for "
                             f"{tuple(self.features.shape)}.")
        self.features.copy_(torch.from_numpy(x.astype(np.float32)))

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"user.weight": torch.randn(1, self.dim, generator=generator) * self.init_scale}

    def _fields(self, items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The id rows and the feature rows ``(..., dim + 1)`` of ``items`` (None: every item)."""
        if items is None:
            return self.item.weight, self.feat(self.features)
        return self.item(items), self.feat(self.features[items])

    def _score(self, p: torch.Tensor, e: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``p``, ``g``: user vectors and contexts ``(..., dim)`` broadcastable to the field rows ``e``, ``f``
        ``(..., dim + 1)``."""
        d = self.dim
        ev, fv = e[..., :d], f[..., :d]
        p, g = p.expand_as(ev), g.expand_as(ev)
        fm = e[..., d] + f[..., d] + (p * ev).sum(-1) + (p * fv).sum(-1) + (ev * fv).sum(-1) + (g * (ev + fv)).sum(-1)
        z = torch.relu(self.mlp1(torch.cat([p, ev, fv, g], dim=-1)))
        return fm + self.out(torch.relu(self.mlp2(z))).squeeze(-1)

    def forward(self, user: torch.Tensor, items: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """``user``: (B,) zeros (the device's own row); ``items``: (B, m); ``ctx``: (B,) each sample's context
        (None: :data:`~fedrec.models.base.NO_CONTEXT`) -> scores (B, m)."""
        e, f = self._fields(items)
        if ctx is None:
            ctx = torch.full((len(items),), NO_CONTEXT, dtype=torch.long)
        return self._score(self.user(user).unsqueeze(1), e, f, self.ctx(ctx).unsqueeze(1))

    @torch.no_grad()
    def score_all(self, history: np.ndarray | None = None, kinds: np.ndarray | None = None) -> torch.Tensor:
        e, f = self._fields()
        return self._score(self.user.weight[0].unsqueeze(0), e, f, self.ctx.weight[_last(kinds)].unsqueeze(0))

    def item_repr(self) -> torch.Tensor:
        """An item as a user vector sees it: its id embedding plus its features' embedding."""
        with torch.no_grad():
            e, f = self._fields()
        return (e[:, : self.dim] + f[:, : self.dim]).detach()

    @torch.no_grad()
    def score_events(self, history: np.ndarray, new: np.ndarray, vector: np.ndarray | None, *,
                     context: int, kinds: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`RecModel.score_events` with the user vector refit per event in closed form to the FM part,
        which is linear in it with features ``e_i + f_i`` (:func:`~fedrec.models.base.ridge_users` over the
        ``context`` newest items, anchored at ``vector``); the deep part stays at the round-start vector (it was
        trained on vectors of that kind, not on ridge fits), so it is computed once for every row of one context.
        Row ``j``'s context is the kind of the event before ``new[j]`` (``kinds``: of ``history`` then ``new``)."""
        u0 = torch.as_tensor(vector) if vector is not None and len(vector) else self.user.weight[0]
        return self.score_event_blocks([(history, new, u0.numpy())], context=context, kinds=[kinds])

    @torch.no_grad()
    def score_event_blocks(self, blocks: Sequence[EventBlock], *, context: int,
                           kinds: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
        """:meth:`score_events` of every block at once: one refit for all rows, the deep part once per block and
        context."""
        ctx, w, starts, lens = block_contexts(blocks, context, self.user.weight[0])
        item = self._item_side()
        users = ridge_users(item["vec"], ctx, w, starts.repeat_interleave(lens, dim=0))
        codes = torch.cat([_row_contexts(k, len(h), len(n))
                           for (h, n, _), k in zip(blocks, kinds or [None] * len(blocks), strict=True)])
        block = torch.arange(len(blocks)).repeat_interleave(lens)
        pairs, which = torch.unique(block * N_CONTEXTS + codes, return_inverse=True)  # (block, context) met
        pb, pc = pairs // N_CONTEXTS, pairs % N_CONTEXTS
        step = self._users_at_once()
        fixed = torch.cat([self._scores_from(starts[pb[a:a + step]], item, ctx=pc[a:a + step])
                           - starts[pb[a:a + step]] @ item["vec"].T for a in range(0, len(pairs), step)])
        return fixed[which] + users @ item["vec"].T

    def fit_and_score(self, global_state: Mapping[str, np.ndarray], histories: Sequence[np.ndarray],
                      vectors: Sequence[np.ndarray | None], generators: Sequence[torch.Generator], *,
                      fit_steps: int, negatives: int, lr: float, device: torch.device | None = None,
                      kinds: Sequence[np.ndarray | None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`RecModel.fit_and_score` with the devices fitted in batches of similar history length
        (:func:`~fedrec.models.base.length_groups`): the same draws from each device's
        generator in the same order, and the same steps (a device's loss reads only its own vector, so the sum of
        the devices' mean losses gives each its own gradient), up to float rounding. The item side of every layer
        is computed once for the batch: the global version is frozen while devices fit (on the CPU: ``device`` is
        not used). Each history event's context is the kind of the one before it, and every item is scored in the
        context of the last (``kinds[a]``: device ``a``'s history's kinds; None: unknown)."""
        self.load({n: torch.as_tensor(np.asarray(v)) for n, v in global_state.items()})
        hist = [np.asarray(h, dtype=np.int64) for h in histories]
        ks = list(kinds) if kinds is not None else [None] * len(hist)
        ctxs = [self.event_contexts(k, len(h)) for h, k in zip(hist, ks, strict=True)]
        users = torch.stack([self._start_vector(v, g) for v, g in zip(vectors, generators, strict=True)])
        with torch.no_grad():
            item = self._item_side()
        for fit in length_groups(np.array([len(h) for h in hist], np.int64)) if fit_steps else []:
            idx = torch.from_numpy(fit)
            users[idx] = self._fit_group(users[idx], item, [hist[a] for a in fit], [ctxs[a] for a in fit],
                                         [generators[a] for a in fit], fit_steps=fit_steps, negatives=negatives, lr=lr)
        with torch.no_grad():
            last = torch.tensor([_last(k) for k in ks], dtype=torch.long)
            step = self._users_at_once()
            scores = torch.cat([self._scores_from(users[a:a + step], item, ctx=last[a:a + step])
                                for a in range(0, len(users), step)])
            if len(users):
                self.user.weight.copy_(users[-1:])
        return [(scores[a].numpy(), users[a].numpy().astype(np.float32).copy()) for a in range(len(hist))]

    def _fit_group(self, users: torch.Tensor, item: dict[str, torch.Tensor], hist: list[np.ndarray],
                   ctxs: list[torch.Tensor], generators: list[torch.Generator], *, fit_steps: int, negatives: int,
                   lr: float) -> torch.Tensor:
        """:meth:`fit_and_score`'s steps for one group of devices of similar history length
        (:func:`~fedrec.models.base.length_groups`), each with a history and its events' contexts: their fitted
        vectors."""
        cands = [unseen(h, self.n_items) for h in hist]
        p = users.clone().requires_grad_(True)
        ctx, _ = _padded([c.unsqueeze(1) for c in ctxs])
        ctx = ctx.squeeze(-1)  # (A, L)
        for _ in range(fit_steps):
            items, mask = _padded([torch.cat([torch.from_numpy(h).unsqueeze(1),
                                              c[torch.randint(0, len(c), (len(h), negatives), generator=g)]], dim=1)
                                   for h, c, g in zip(hist, cands, generators, strict=True)])
            s = self._scores_from(p, item, items, ctx=ctx)  # (A, L, 1 + K)
            per = nn.functional.softplus(s[..., 1:] - s[..., :1]).mean(-1)  # (A, L): BPRLoss of each sample
            loss = ((per * mask).sum(1) / mask.sum(1)).sum()
            (grad,) = torch.autograd.grad(loss, p)
            with torch.no_grad():
                p -= lr * grad
        return p.detach()

    def _users_at_once(self) -> int:
        """How many users' scores of every item are computed at once: the deep part holds ``users x n_items x dim``
        floats, kept to about :data:`~fedrec.eval.metrics.CELLS` (at most 32 users)."""
        from ..eval.metrics import CELLS  # the models do not depend on evaluation otherwise

        return max(1, min(32, CELLS // (self.n_items * self.dim)))

    def _start_vector(self, vector: np.ndarray | None, generator: torch.Generator) -> torch.Tensor:
        """A device's user vector before its fit: its own from the last round, else a fresh one from its generator."""
        if vector is not None and len(vector):
            return torch.as_tensor(np.asarray(vector, np.float32)).reshape(self.dim)
        return self.init_local(generator)["user.weight"][0]

    def _item_side(self) -> dict[str, torch.Tensor]:
        """Every item's share of the score that does not read the user: the FM's item terms, the vector the user
        is multiplied with, and the item's part of the first deep layer."""
        d = self.dim
        e, f = self._fields()
        ev, fv = e[:, :d], f[:, :d]
        w1 = self.mlp1.weight
        return {"base": e[:, d] + f[:, d] + (ev * fv).sum(-1), "vec": ev + fv,
                "deep": ev @ w1[:, d:2 * d].T + fv @ w1[:, 2 * d:3 * d].T + self.mlp1.bias}

    def _scores_from(self, users: torch.Tensor, item: dict[str, torch.Tensor], items: torch.Tensor | None = None,
                     ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of ``items`` ``(A, ...)`` for the users ``(A, dim)`` (None: every item, ``(A, n_items)``) in the
        contexts ``ctx`` (``(A,)``, or ``(A, L)`` with ``items`` ``(A, L, m)``; None: every one
        :data:`~fedrec.models.base.NO_CONTEXT`) from the item side :meth:`_item_side` computed; what :meth:`_score`
        gives, in another order of sums."""
        d = self.dim
        side = item if items is None else {k: v[items] for k, v in item.items()}
        shape = (len(users),) + (1,) * (side["vec"].dim() - (1 if items is None else 2)) + (d,)
        if ctx is None:
            ctx = torch.full((len(users),), NO_CONTEXT, dtype=torch.long)
        g = self.ctx.weight[ctx]
        g = g.reshape(g.shape[:-1] + (1,) * (len(shape) - g.dim()) + (d,))  # (A, [L,] 1, d)
        u = users.reshape(shape)
        w1 = self.mlp1.weight
        first = (users @ w1[:, :d].T).reshape(shape[:-1] + (-1,)) + g @ w1[:, 3 * d:].T
        z = torch.relu(side["deep"] + first)
        deep = self.out(torch.relu(self.mlp2(z))).squeeze(-1)
        return side["base"] + ((u + g) * side["vec"]).sum(-1) + deep


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device ``(n_a, m)`` samples as one ``(A, max n_a, m)`` batch (padding repeats item 0) and its mask."""
    n = max(len(r) for r in rows)
    items = torch.zeros(len(rows), n, rows[0].shape[1], dtype=torch.long)
    mask = torch.zeros(len(rows), n)
    for a, r in enumerate(rows):
        items[a, : len(r)] = r
        mask[a, : len(r)] = 1.0
    return items, mask


def _last(kinds: np.ndarray | None) -> int:
    """The context after a history: the kind of its last event (:data:`~fedrec.models.base.NO_CONTEXT` without)."""
    return int(kinds[-1]) if kinds is not None and len(kinds) else NO_CONTEXT


def _row_contexts(kinds: np.ndarray | None, n_history: int, n_new: int) -> torch.Tensor:
    """The contexts of the rows of :meth:`DeepFM.score_events`: row ``j`` (before new event ``j``, the last after
    them all) in the kind of the event before it, ``kinds[n_history + j - 1]`` (``kinds``: of the history then the
    new events; :data:`~fedrec.models.base.NO_CONTEXT` where there is none)."""
    out = torch.full((n_new + 1,), NO_CONTEXT, dtype=torch.long)
    if kinds is not None:
        k = np.asarray(kinds, np.int64)
        if len(k) != n_history + n_new:
            raise ValueError(f"deepfm: {len(k)} event kinds for {n_history + n_new} events.")
        at = n_history + np.arange(n_new + 1) - 1
        out[at >= 0] = torch.from_numpy(k[at[at >= 0]])
    return out
