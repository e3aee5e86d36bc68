"""What every fedrec model declares: its global and its local (on-device) parameters."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data.events import KINDS


class BPRLoss(nn.Module):
    """Pairwise logistic loss on (positive - negative) score differences.

    Input ``diff`` has shape ``(B, n_neg)`` (one target per sample) or ``(B, P, n_neg)`` (a
    sequence sample with P target positions); ``weight`` (optional, ``(B, P)``) masks the
    positions that hold a target. A sample's loss is the mean over its negatives and its target
    positions; with ``reduction="none"`` it is per sample, shape ``(B,)``, which is what Opacus's
    ghost clipping needs to bound each sample's contribution.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, diff: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        per = nn.functional.softplus(-diff).mean(dim=-1) if diff.dim() > 1 else nn.functional.softplus(-diff)
        if per.dim() > 1:
            if weight is None:
                per = per.mean(dim=tuple(range(1, per.dim())))
            else:
                w = weight.reshape(per.shape).to(per.dtype)
                per = (per * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        if self.reduction == "none":
            return per
        return per.sum() if self.reduction == "sum" else per.mean()


class RecModel(nn.Module):
    """A recommender split into global parameters (shared, aggregated) and local ones.

    Subclasses set ``global_names`` and ``local_names`` (parameter names, together covering every
    trainable parameter) and implement:

    * ``forward(*batch) -> scores``: ``batch`` is what :meth:`samples` built (tensors indexed by
      sample along dim 0); scores have shape ``(B, 1 + K)`` or ``(B, P, 1 + K)``, the positive
      first, then ``K`` negatives.
    * :meth:`samples`: the device's training samples (one per event for ``mf`` and ``neumf``).
    * :meth:`score_all`: scores of every item for this device (its local parameters loaded), given
      its history (``sasrec`` reads the history; the others ignore it).
    * :meth:`item_repr`: one vector per item, what explanations compare.

    Local parameters never leave the device: only :meth:`global_state` is ever sent. A model whose
    user state is its recent history (``uses_history``) may have no local parameters at all.
    """

    global_names: tuple[str, ...] = ()
    local_names: tuple[str, ...] = ()
    uses_history: bool = False
    uses_features: bool = False  #: reads the run's public item features (:meth:`set_features`)
    #: reads each event's context, the kind of the event before it (:meth:`event_contexts`): its samples carry it
    #: as one more input, and its scoring methods read the ``kinds`` they are given
    reads_kinds: bool = False
    #: a non-private local step's gradient (every parameter together) is scaled down to at most this L2 norm (None:
    #: not bounded). Models whose scores multiply several trained layers set it: plain SGD at the run's lr lets
    #: their products grow step by step until a device's update diverges (under DP every event is clipped already)
    max_grad_norm: float | None = None
    n_items: int

    def check_partition(self) -> None:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        if names != set(self.global_names) | set(self.local_names) or set(self.global_names) & set(self.local_names):
            raise TypeError(f"{type(self).__name__}: global {self.global_names} and local {self.local_names} "
                            f"must partition the trainable parameters {sorted(names)}.")

    def set_features(self, features: np.ndarray) -> None:
        """The items' public feature rows, as a global version carries them (models with ``uses_features``)."""
        raise TypeError(f"{type(self).__name__} reads no item features.")

    def global_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n].detach().clone() for n in self.global_names}

    def local_state(self) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n].detach().clone() for n in self.local_names}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        for n, v in state.items():
            params[n].copy_(torch.as_tensor(v, dtype=params[n].dtype))

    def local_flat(self) -> np.ndarray:
        """The local parameters as one float32 vector (the serving state a node keeps per device)."""
        params = dict(self.named_parameters())
        if not self.local_names:
            return np.zeros(0, np.float32)
        return torch.cat([params[n].detach().reshape(-1) for n in self.local_names]).numpy().astype(np.float32)

    @torch.no_grad()
    def load_local_flat(self, vec: np.ndarray) -> None:
        params = dict(self.named_parameters())
        v = torch.as_tensor(np.asarray(vec, np.float32))
        need = sum(params[n].numel() for n in self.local_names)
        if v.numel() != need:
            raise ValueError(f"{type(self).__name__}: a local state of {v.numel()} values, expected {need}.")
        at = 0
        for n in self.local_names:
            p = params[n]
            p.copy_(v[at: at + p.numel()].reshape(p.shape))
            at += p.numel()

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A fresh local state for a new device (drawn from ``generator``)."""
        raise NotImplementedError

    def samples(self, items: np.ndarray, rounds: np.ndarray, train: np.ndarray, cand: torch.Tensor, *,
                negatives: int, generator: torch.Generator, sessions: bool = False, kinds: np.ndarray | None = None
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The training samples of one update and each one's target-position weights.

        ``items``/``rounds``: the device's events in time order; ``train``: boolean mask of those
        trained on; ``cand``: the candidate negatives (items the device has not had). Default: one
        sample per training event, ``(user row 0, [positive, K negatives])``, weights ``(n,)`` ones; a model that
        reads the event's context (``reads_kinds``) gets each one's context as one more input
        (:meth:`event_contexts` of ``kinds``, the kind of each event in ``items``; None: unknown).
        ``sessions`` only matters for models whose samples span several events (see SASRec).
        """
        pos = torch.from_numpy(items[train].astype(np.int64))
        n = len(pos)
        neg = cand[torch.randint(0, len(cand), (n, negatives), generator=generator)]
        extra = (self.event_contexts(kinds, len(items))[torch.from_numpy(np.asarray(train, bool))],) \
            if self.reads_kinds else ()
        return (torch.zeros(n, dtype=torch.long), torch.cat([pos.unsqueeze(1), neg], dim=1).contiguous(), *extra), \
            torch.ones(n)

    def event_contexts(self, kinds: np.ndarray | None, n: int) -> torch.Tensor:
        """The context of each of a device's ``n`` events (time order): the kind of the event before it
        (:data:`fedrec.data.events.KINDS` codes), :data:`NO_CONTEXT` for the first and wherever ``kinds`` is None.
        What a device knows the moment before each event: what the user just did (viewed, clicked, bought)."""
        out = torch.full((n,), NO_CONTEXT, dtype=torch.long)
        if kinds is not None and n > 1:
            k = np.asarray(kinds, np.int64)
            if len(k) != n:
                raise ValueError(f"{type(self).__name__}: {len(k)} event kinds for {n} events.")
            out[1:] = torch.from_numpy(k[:-1])
        return out

    def score_all(self, history: np.ndarray | None = None, kinds: np.ndarray | None = None) -> torch.Tensor:
        """Every item's score for this device (local parameters loaded) after its ``history``; ``kinds``: the kind
        of each event of ``history`` (read by a model with ``reads_kinds``)."""
        raise NotImplementedError

    def item_repr(self) -> torch.Tensor:
        """``(n_items, d)``: the model's representation of each item (explanations compare these)."""
        raise NotImplementedError

    # ---- the model's own local steps (a subclass may override them with a faster exact trainer) ----
    def train_local(self, batch: tuple[torch.Tensor, ...], weight: torch.Tensor, *, steps: int, sample_rate: float,
                    lr_global: float, lr_local: float, generator: torch.Generator, backend: str = "auto",
                    private: bool = False, clip: float = 1.0, noise_multiplier: float = 0.0) -> None:
        """``steps`` local steps on the samples ``batch`` (from :meth:`samples`) and their ``weight``, in place.

        Each step takes every sample independently with probability ``sample_rate`` (``torch.rand(n) < q``
        from ``generator``) and descends the batch-mean BPR loss; global parameters step at ``lr_global``,
        local ones at ``lr_local``. With ``private`` the step is DP-SGD through Opacus with ghost clipping
        (per-sample clip ``clip``, noise ``noise_multiplier * clip`` on the sum, normalised by the expected
        batch size ``q n``; an empty step still adds noise, as the accountant assumes). ``backend`` names
        the trainer (``"auto"`` or ``"autograd"``); this one is autograd, whatever it says.
        """
        params = dict(self.named_parameters())
        groups = [(params[n], lr_global) for n in self.global_names] + [(params[n], lr_local) for n in self.local_names]
        if private:
            self._dp_steps(batch, weight, groups, steps=steps, sample_rate=sample_rate, generator=generator,
                           clip=clip, noise_multiplier=noise_multiplier)
            return
        n = len(weight)
        crit = BPRLoss()
        for _ in range(steps):
            take = torch.rand(n, generator=generator) < sample_rate
            if not take.any():
                continue
            for p, _ in groups:
                p.grad = None
            crit(score_diff(self, *(t[take] for t in batch)), weight[take]).backward()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_([p for p, _ in groups], self.max_grad_norm)
            sgd_step(groups)

    def clipped_release(self, batch: tuple[torch.Tensor, ...], *, sample_rate: float, lr_global: float,
                        lr_local: float, clip: float, noise_multiplier: float, generator: torch.Generator,
                        backend: str = "auto") -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
        """One step of event-level DP whose noise on the global parameters is added once to the cohort's sum,
        by the server (:mod:`fedrec.privacy.aggregate`).

        Each sample of ``batch`` (one per event, from :meth:`samples`) is taken with probability
        ``sample_rate`` (``torch.rand(n)`` from ``generator``) and its gradient clipped to ``clip``, global and
        local parameters together: Opacus's ghost clipping with its noise off (:meth:`_clipped_sum`). The local
        parameters step at once by ``-lr_local / (q n)`` times their clipped sum plus their own noise
        ``N(0, (noise_multiplier * clip)^2)`` (drawn next from ``generator``); the global ones are not changed.
        Returns the release, ``-lr_global`` times the clipped sum of every global parameter: per item table
        (:data:`~fedrec.server_aggregate.ITEM_TABLES`) the rows the taken samples touched ``(row ids, rows)``,
        every other parameter dense; and the taken samples' positive-item counts ``(ids, counts)``.
        ``backend``: ``mf``'s closed form unless ``"autograd"``; this one is autograd, whatever it says.
        """
        from ..server_aggregate import ITEM_TABLES

        n = len(batch[0])
        take = torch.rand(n, generator=generator) < sample_rate
        taken = tuple(t[take] for t in batch)
        params = dict(self.named_parameters())
        sums = self._clipped_sum(taken, clip) if int(take.sum()) else \
            {k: torch.zeros_like(p) for k, p in params.items()}
        with torch.no_grad():
            for k in self.local_names:
                noise = torch.randn(sums[k].shape, generator=generator, dtype=sums[k].dtype) * noise_multiplier * clip
                params[k].add_(sums[k] + noise, alpha=-lr_local / max(sample_rate * n, 1e-6))
        items = taken[1] if len(taken) > 1 else torch.zeros((0, 1), dtype=torch.long)
        touched = torch.unique(items.reshape(-1))
        release: dict = {}
        for k in self.global_names:  # an item table: only its touched rows are scaled and sent
            g = (sums[k][touched] if k in ITEM_TABLES else sums[k]).detach() * -lr_global
            release[k] = (touched.numpy(), g.numpy().astype(np.float32)) if k in ITEM_TABLES else \
                g.numpy().astype(np.float32)
        ids, counts = torch.unique(items[:, 0], return_counts=True) if len(items) else (touched, touched)
        return release, (ids.numpy(), counts.numpy())

    def _clipped_sum(self, batch: tuple[torch.Tensor, ...], clip: float) -> dict[str, torch.Tensor]:
        """The sum over the samples of ``batch`` of each one's BPR-loss gradient clipped to L2 norm ``clip`` (every
        trainable parameter together), by parameter name: Opacus's ghost clipping with the noise off and the sum
        taken as it is (``loss_reduction = "sum"``). The model's parameters are not changed."""
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        n = len(batch[0])
        named = [(k, p) for k, p in self.named_parameters() if p.requires_grad]
        opt = torch.optim.SGD([p for _, p in named], lr=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            dp_model, dp_opt, dp_crit, _ = engine.make_private(
                module=self, optimizer=opt, data_loader=DataLoader(TensorDataset(torch.ones(n)), batch_size=n),
                criterion=BPRLoss(reduction="sum"), noise_multiplier=0.0, max_grad_norm=clip,
                grad_sample_mode="ghost", poisson_sampling=False, loss_reduction="sum")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                dp_opt.zero_grad()
                dp_crit(score_diff(dp_model, *batch), torch.ones(n)).backward()
                dp_opt.pre_step()
            return {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for k, p in named}
        finally:
            dp_model.to_standard_module()
            for _, p in named:
                p.grad = None
                for attr in ("summed_grad", "grad_sample", "_norm_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)

    def _dp_steps(self, batch: tuple[torch.Tensor, ...], weight: torch.Tensor,
                  groups: list[tuple[nn.Parameter, float]], *, steps: int, sample_rate: float,
                  generator: torch.Generator, clip: float, noise_multiplier: float) -> None:
        """DP-SGD steps through Opacus (ghost clipping; its own accountant unused: fedrec accounts per event)."""
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        n = len(weight)
        opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in groups])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            dp_model, dp_opt, dp_crit, _ = engine.make_private(
                module=self, optimizer=opt, data_loader=DataLoader(TensorDataset(weight), batch_size=max(1, n)),
                criterion=BPRLoss(), noise_multiplier=noise_multiplier, max_grad_norm=clip,
                grad_sample_mode="ghost", poisson_sampling=False, noise_generator=generator)
        dp_opt.expected_batch_size = max(sample_rate * n, 1e-6)
        try:
            with warnings.catch_warnings():
                # Opacus's ghost clipping backward warns that no input requires grad (true: inputs are ids)
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for _ in range(steps):
                    take = torch.rand(n, generator=generator) < sample_rate
                    dp_opt.zero_grad()
                    if take.any():
                        dp_crit(score_diff(dp_model, *(t[take] for t in batch)), weight[take]).backward()
                    else:
                        for p in self.parameters():
                            p.grad = torch.zeros_like(p)
                    dp_opt.step()
        finally:
            dp_model.to_standard_module()

    def fit_local(self, pos: torch.Tensor, cand: torch.Tensor, *, steps: int, negatives: int, lr: float,
                  generator: torch.Generator, backend: str = "auto", kinds: np.ndarray | None = None) -> None:
        """``steps`` full-batch SGD steps of the BPR loss of the events ``pos`` on the local parameters only
        (global ones frozen), fresh negatives from ``cand`` each step (``kinds``: the events' kinds, for a model
        that reads contexts). Nothing to do for a model without local parameters (``sasrec``: its user state is the
        history itself)."""
        if not self.local_names or not steps or not len(pos):
            return
        params = dict(self.named_parameters())
        local = [params[n] for n in self.local_names]
        frozen = [params[n] for n in self.global_names]
        for p in frozen:
            p.requires_grad_(False)
        try:
            user = torch.zeros(len(pos), dtype=torch.long)
            extra = (self.event_contexts(kinds, len(pos)),) if self.reads_kinds else ()
            crit = BPRLoss()
            for _ in range(steps):
                neg = cand[torch.randint(0, len(cand), (len(pos), negatives), generator=generator)]
                for p in local:
                    p.grad = None
                crit(score_diff(self, user, torch.cat([pos.unsqueeze(1), neg], dim=1), *extra)).backward()
                sgd_step([(p, lr) for p in local])
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def fit_and_score(self, global_state: Mapping[str, np.ndarray], histories: Sequence[np.ndarray],
                      vectors: Sequence[np.ndarray | None], generators: Sequence[torch.Generator], *,
                      fit_steps: int, negatives: int, lr: float, device: torch.device | None = None,
                      kinds: Sequence[np.ndarray | None] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Serve a batch of devices: for each, its scores of every item and its local state after the fit.

        The global version is loaded once; device ``a``'s local parameters (``vectors[a]``, as
        :meth:`local_flat`; None or empty: fresh ones from ``generators[a]``) are fitted to its history
        ``histories[a]`` with ``fit_steps`` steps of :meth:`fit_local` against items it has not had, then
        every item is scored from its state and history. Devices are independent (each draws from its own
        generator), so the result does not depend on the batch. The vector is empty without local parameters.
        ``device``: where a model with a batched form runs it (this form, one device after another, runs on the CPU).
        ``kinds[a]``: the kinds of device ``a``'s history (None: unknown), for a model that reads contexts.
        """
        self.load({n: torch.as_tensor(np.asarray(v)) for n, v in global_state.items()})
        out = []
        for h, v, g, k in zip(histories, vectors, generators, kinds or [None] * len(histories), strict=True):
            h = np.asarray(h, dtype=np.int64)
            if self.local_names:
                if v is not None and len(v):
                    self.load_local_flat(v)
                else:
                    self.load(self.init_local(g))
                cand = unseen(h, self.n_items)
                self.fit_local(torch.from_numpy(h), cand, steps=fit_steps, negatives=negatives, lr=lr, generator=g,
                               backend="autograd", kinds=k)
            out.append((self.score_all(h, k).numpy(), self.local_flat()))
        return out


    @torch.no_grad()
    def score_events(self, history: np.ndarray, new: np.ndarray, vector: np.ndarray | None, *,
                     context: int, kinds: np.ndarray | None = None) -> torch.Tensor:
        """The device's instant scores: every item, before each of the ``new`` events and after the last.

        Row ``j`` of the result ``(len(new) + 1, n_items)`` comes from the device's state through event
        ``j - 1`` (``history`` then ``new[:j]``) and the global version loaded in the model; it never reads
        ``new[j:]``. ``vector`` is the device's local state at the round's start (:meth:`local_flat`; None:
        as loaded). ``context``: how many of the newest events a refit reads. ``kinds``: the kind of each event of
        ``history`` then ``new`` (None: unknown), for a model that reads contexts. This default keeps the local
        state and reads the growing history through :meth:`score_all`, one row at a time; models override it
        with a batched instant refit.
        """
        if self.local_names and vector is not None and len(vector):
            self.load_local_flat(vector)
        seq = np.concatenate([np.asarray(history, np.int64), np.asarray(new, np.int64)])
        return torch.stack([self.score_all(seq[: len(history) + j], None if kinds is None else kinds[: len(history) + j])
                            for j in range(len(new) + 1)])

    def score_event_blocks(self, blocks: Sequence[EventBlock], *, context: int,
                           kinds: Sequence[np.ndarray | None] | None = None) -> torch.Tensor:
        """:meth:`score_events` of several blocks (each ``(history, new, vector)``, of one device or of many),
        their rows stacked in order: ``(sum(len(new) + 1), n_items)``. Each block's rows equal its own
        :meth:`score_events` (``kinds[b]``: block ``b``'s). This default scores block by block; a model with a
        closed-form refit overrides it to score every row at once."""
        ks = kinds or [None] * len(blocks)
        return torch.cat([self.score_events(h, n, v, context=context, kinds=k) for (h, n, v), k in zip(blocks, ks, strict=True)])


def unseen(history: np.ndarray, n_items: int) -> torch.Tensor:
    """The items a device has not had (every item if it has had them all): the candidates of its negatives."""
    seen = np.zeros(n_items, bool)
    seen[history] = True
    return torch.from_numpy(np.flatnonzero(~seen)) if (~seen).any() else torch.arange(n_items)


#: one block of events to score (:meth:`RecModel.score_event_blocks`): the history, the new events, the vector
EventBlock = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]

#: an event's context where the kind of the event before it is not known (a device's first event, data without kinds)
NO_CONTEXT = len(KINDS)
N_CONTEXTS = len(KINDS) + 1  #: the contexts a model that reads them embeds: every kind, and none


def block_contexts(blocks: Sequence[EventBlock], context: int, default: torch.Tensor
                   ) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """Every block's context rows (:func:`fedrec.itemgraph.contexts`) stacked, their weights, each block's start
    vector ``(blocks, d)`` (``default`` where a block has none) and each block's number of rows."""
    from ..itemgraph import contexts  # the item graph reads models' outputs, not the other way round

    parts = [contexts(h, n, context) for h, n, _ in blocks]
    starts = torch.stack([torch.as_tensor(np.asarray(v, np.float32)).reshape(default.shape)
                          if v is not None and len(v) else default for _, _, v in blocks])
    lens = torch.tensor([len(c) for c, _ in parts])
    return np.concatenate([c for c, _ in parts]), np.concatenate([w for _, w in parts]), starts, lens


#: a model's round-start fit (:meth:`RecModel.fit_and_score`) takes devices together whose histories differ in
#: length by at most this factor (lengths under ``FIT_GROUP_FLOOR`` count as that). A batch is padded to its longest
#: history: a batch of 200 users of ml-latest-small, one of 1,688 ratings among a mean of 94, was 18 times the work,
#: and its fit of 30 steps took 9.4 s against 0.19 s in groups (the same vectors to 2e-8). A round of `fedrec
#: simulate` there (61 devices) serves smaller batches: its fits took 1.4 s of 10 rounds' 17.6 s, now 0.9 s (py-spy)
FIT_GROUP = 2.0
FIT_GROUP_FLOOR = 16


def length_groups(lengths: np.ndarray) -> list[np.ndarray]:
    """The devices (indices into ``lengths``), in groups of similar history length (:data:`FIT_GROUP`); devices
    without a history in none."""
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    groups, first = [], 0
    for j in range(1, len(order) + 1):
        if j == len(order) or lengths[order[j]] > FIT_GROUP * max(lengths[order[first]], FIT_GROUP_FLOOR):
            groups.append(order[first:j])
            first = j
    return groups


RIDGE = 1.0  #: weight of the round-start user vector in the per-event refit (:func:`ridge_users`)


def ridge_users(features: torch.Tensor, ctx: np.ndarray, weight: np.ndarray, u0: torch.Tensor,
                lam: float = RIDGE) -> torch.Tensor:
    """Each row's user vector refit in closed form to its context items (``ctx``/``weight``, as
    :func:`fedrec.itemgraph.contexts` gives them; -1 pads): ``argmin_u sum_l w_l (1 - f_l . u)^2 +
    lam |u - u0|^2`` with ``f_l = features[ctx_l]``, i.e. ``(lam I + sum w f f^T)^-1 (lam u0 + sum w f)``.
    Returns ``(rows, d)``; a row without context keeps ``u0``."""
    d = features.shape[1]
    w = torch.from_numpy(np.where(ctx >= 0, weight, 0.0)).to(features.dtype)
    f = features[torch.from_numpy(np.maximum(ctx, 0))]  # (rows, L, d)
    wf = f * w.unsqueeze(-1)
    A = lam * torch.eye(d, dtype=features.dtype) + wf.transpose(1, 2) @ f  # (bmm: einsum plans cost more here)
    rhs = lam * u0.to(features.dtype) + wf.sum(dim=1)
    return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)


def score_diff(m: nn.Module, *batch: torch.Tensor) -> torch.Tensor:
    """The positive's score minus each negative's, from a model's ``(..., 1 + K)`` scores."""
    s = m(*batch)
    return s[..., :1] - s[..., 1:]


def sgd_step(groups: list[tuple[nn.Parameter, float]]) -> None:
    """A plain SGD step (what ``torch.optim.SGD`` does without momentum; building one costs ~3 ms)."""
    with torch.no_grad():
        for p, lr in groups:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)


def seeded_linear(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """An ``nn.Linear`` initialised from ``generator`` (torch's default init draws from the global RNG,
    which would make two processes with the same seed build different models)."""
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        bound = 1.0 / np.sqrt(n_in)
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.zero_()
    return layer
