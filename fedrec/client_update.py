"""One device's round, written once: evaluate-before-train, DP local update, delta out.

Pure with respect to its inputs: it takes the global parameters, the device's state and its
events, and returns the delta of global parameters plus the device's next state. The Flower
ClientApp, the sharded simulator and the device SDK all call this same function.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .config import RunConfig
from .eval.metrics import PrequentialCounts, in_topk, prequential_counts
from .itemgraph import Pairs, device_pairs
from .models.base import RecModel
from .privacy.accounting import epsilon, event_accountant, graph_records
from .privacy.user_level import OUTSIZED, clip_delta, delta_norm, outsized_bound
from .server_aggregate import ITEM_TABLES, node_device
from .wire import wire_mode


def device_seed(seed: int, device: int, round_: int, stream: int = 0, *, secret: int = 0) -> int:
    """A seed for one device in one round, independent of which process runs it (``secret``: entropy only the
    device knows, mixed in; 0 keeps the seed a function of the public four)."""
    entropy = [seed, device, round_, stream] + ([secret] if secret else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class DeviceState:
    """What a device keeps between rounds and never sends.

    ``local``: the model's local parameters (user vector); ``cursors``: the last rounds up to
    which it trained, newest last (``cursors[-1]`` = events up to that round are consumed);
    ``recent_steps``: local steps of its last ``replay_rounds + 1`` participations;
    ``max_exposure``: most DP steps any one of its events has been used in; ``history``:
    its privacy records ``(noise_multiplier, sample_rate, steps)`` of each update.
    """

    local: dict[str, np.ndarray] = field(default_factory=dict)
    cursors: list[int] = field(default_factory=lambda: [0])
    recent_steps: list[int] = field(default_factory=list)
    max_exposure: int = 0
    participations: int = 0
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def to_config(self) -> dict:
        d = {"cursors": list(self.cursors), "recent-steps": list(self.recent_steps),
             "max-exposure": self.max_exposure, "participations": self.participations,
             "history-z": [h[0] for h in self.history], "history-q": [h[1] for h in self.history],
             "history-n": [h[2] for h in self.history]}
        for k, v in self.local.items():
            d[f"local:{k}"] = np.asarray(v, np.float32).tobytes()
            d[f"shape:{k}"] = list(np.asarray(v).shape)
        return d

    @classmethod
    def from_config(cls, d: dict) -> DeviceState:
        local = {k[6:]: np.frombuffer(v, np.float32).reshape(d[f"shape:{k[6:]}"]).copy()
                 for k, v in d.items() if k.startswith("local:")}
        return cls(local=local, cursors=list(d["cursors"]), recent_steps=list(d["recent-steps"]),
                   max_exposure=int(d["max-exposure"]), participations=int(d["participations"]),
                   history=list(zip(d["history-z"], d["history-q"], d["history-n"], strict=False)))


@dataclass
class UpdateResult:
    """What one device's round produced. Only ``delta`` and the counts are ever sent."""

    delta: dict[str, np.ndarray]  #: global parameter name -> delta (float32)
    n_train: int  #: events in the local update (new + replay)
    n_new: int
    counts: PrequentialCounts
    epsilon: float  #: the device's event-level ε so far (0 when not private)
    steps: int
    state: DeviceState
    preclip_norm: float = 0.0  #: norm of the delta before user-level clipping
    clipped: bool = False
    skipped: str = ""  #: why the device did not train this round (budget), else empty
    probe_hits: np.ndarray | None = None  #: for each probed item: in this device's top-K before training?
    pairs: Pairs | None = None  #: item graph on: the item pairs of its new events (sent in clear)
    #: event noise at the aggregate: the positive-item counts of the events its release took ``(ids, counts)``
    row_counts: tuple[np.ndarray, np.ndarray] | None = None


def client_update(
    model: RecModel,
    global_state: dict[str, np.ndarray],
    state: DeviceState,
    items: np.ndarray,
    rounds: np.ndarray,
    round_: int,
    cfg: RunConfig,
    *,
    device_id: int,
    noise_multiplier: float,
    probe: np.ndarray | None = None,
    secret: int = 0,
    affinities: bool = False,
    kinds: np.ndarray | None = None,
) -> UpdateResult:
    """Run one device's round.

    model : a reused model object (its parameters are overwritten here).
    global_state : the global parameters the server sent (numpy arrays).
    state : the device's own state; not mutated, the next one is returned.
    items, rounds : the device's events so far (item ids and the round window of each), time order.
    round_ : the server round; events with ``rounds <= round_`` exist now.
    noise_multiplier : DP-SGD noise (used when ``cfg.privacy`` is ``event`` or ``both``).

    Under ``event``/``both`` with a budget (``cfg.epsilon > 0``) the device first checks that its
    per-event ε after this update stays within the budget; if not it skips the round (no training,
    nothing consumed) and says so in ``skipped``. Under ``user``/``both`` the whole delta of
    global parameters is clipped to ``cfg.clip`` before it leaves the device.

    ``probe`` (simulation only, a measuring instrument): items whose membership in the device's top-K
    before training is reported in ``probe_hits`` (new-item uptake); it changes nothing trained or sent.
    ``secret``: entropy the server does not know, mixed into the seed (a deployed device; simulation: 0).
    ``affinities``: the version has item features, so the pairs carry each new event's item before it.
    ``kinds``: the kind of each event (:data:`fedrec.data.events.KINDS` codes; None: not known), for a model that
    reads each event's context (:attr:`~fedrec.models.base.RecModel.reads_kinds`).
    """
    prep = prepare_update(model, global_state, state, items, rounds, round_, cfg, device_id=device_id,
                          noise_multiplier=noise_multiplier, probe=probe, secret=secret, kinds=kinds)
    if isinstance(prep, UpdateResult):
        return prep
    trained = _train(model, global_state, items, rounds, prep.train, prep.seen, cfg, prep.generator,
                     noise_multiplier, prep.kinds)
    return finish_update(prep, cfg, *trained, noise_multiplier=noise_multiplier, affinities=affinities,
                         version=global_state)


def readable_kinds(cfg: RunConfig, kinds: np.ndarray | None) -> np.ndarray | None:
    """The event kinds a device's model may read (None: none). An event's context is the kind of the event before
    it, another event: under event-level DP a sample that read it would let one event shape two samples (its own
    and the next one's), beyond the per-event bound the accounting assumes. There the model trains, and serves, in
    the context "none" (:data:`~fedrec.models.base.NO_CONTEXT`); user-level DP protects a device's events together,
    so its samples may read each other's kinds."""
    return None if cfg.event_dp else kinds


class DivergedUpdate(RuntimeError):
    """A device's local steps diverged (:data:`~fedrec.privacy.user_level.OUTSIZED`); the message says how far."""


def check_converged(delta: dict, preclip: float, version: Mapping[str, np.ndarray], cfg: RunConfig) -> None:
    """Raise :class:`DivergedUpdate` for a delta that is not finite or larger than :data:`OUTSIZED` times the version
    it started from (floored at 1): the device sends nothing that round and keeps its state from before. Under
    user-level DP (``preclip``: the norm before the clip) only a norm that is not finite: the clip bounds any other.
    Not under event-level DP: its steps are clipped per event, and on a device with few events its noise alone may be
    that large."""
    if cfg.event_dp:
        return
    norm = preclip if cfg.user_dp else delta_norm(delta)
    if cfg.user_dp or norm <= OUTSIZED:  # within the floor: no need to read the version
        if not np.isfinite(norm):
            raise DivergedUpdate(f"its local steps diverged: a delta of norm {norm}; it sends nothing this round")
        return
    most = outsized_bound({k: version[k] for k in delta})
    if not norm <= most:  # NaN fails too
        raise DivergedUpdate(f"its local steps diverged: a delta of norm {norm:.3g}, more than {OUTSIZED:g} times "
                             f"the version's {most / OUTSIZED:.3g}; it sends nothing this round")


@dataclass
class Prepared:
    """One device's update up to its local steps: what :func:`client_update` did before them and needs after."""

    device: int
    state: DeviceState
    items: np.ndarray
    rounds: np.ndarray
    round_: int
    train: np.ndarray  #: the events trained on (the new ones and the replayed windows)
    new: np.ndarray  #: the events new since the device's last update
    seen: np.ndarray  #: the items the device has had, through its training events
    counts: PrequentialCounts
    probe_hits: np.ndarray | None
    generator: torch.Generator  #: the device's own, as the steps before left it
    local: dict[str, torch.Tensor]  #: its local parameters as its steps start from them
    kinds: np.ndarray | None = None  #: the kind of each of ``items`` the model may read (:func:`readable_kinds`)


@dataclass
class Opened:
    """A device's update as it opens: its generator, its state (a new device's fresh local state drawn from it) and
    which of its events it knew, which are new and which items it had."""

    generator: torch.Generator
    state: DeviceState
    known: np.ndarray
    new: np.ndarray
    seen: np.ndarray


def open_update(model: RecModel, global_state: dict[str, np.ndarray], state: DeviceState, items: np.ndarray,
                rounds: np.ndarray, round_: int, cfg: RunConfig, *, device_id: int, secret: int = 0,
                loaded: bool = False) -> Opened:
    """:func:`client_update`'s start: the device's generator seeded, the model loaded (``loaded``: it holds
    ``global_state`` already; a batch of devices loads it once, as nothing before the local steps changes a global
    parameter) with the device's local state, its events split at its cursor."""
    torch_g = torch.Generator().manual_seed(device_seed(cfg.seed, device_id, round_, secret=secret))
    state = _load(model, None if loaded else global_state, state, torch_g)
    cur = state.cursors[-1]
    known = rounds <= cur
    return Opened(torch_g, state, known, (rounds > cur) & (rounds <= round_), _mask(items[known], model.n_items))


def prepare_update(model: RecModel, global_state: dict[str, np.ndarray], state: DeviceState, items: np.ndarray,
                   rounds: np.ndarray, round_: int, cfg: RunConfig, *, device_id: int, noise_multiplier: float,
                   probe: np.ndarray | None = None, secret: int = 0, loaded: bool = False,
                   opened: Opened | None = None, kinds: np.ndarray | None = None) -> Prepared | UpdateResult:
    """:func:`client_update` up to the local steps: the update opened (:func:`open_update`), the device's vector fit
    to its past events, the new events evaluated, the budget checked (a skipped :class:`UpdateResult` where it says
    no). ``opened``: opened and fit already, the fit vector in the model (a batch fits its devices together:
    :func:`fit_batch`)."""
    kinds = readable_kinds(cfg, kinds)
    if opened is None:
        opened = open_update(model, global_state, state, items, rounds, round_, cfg, device_id=device_id,
                             secret=secret, loaded=loaded)
        if _fits(cfg, opened):
            _fit_local(model, torch.from_numpy(items[opened.known].astype(np.int64)), opened.seen, cfg,
                       opened.generator, None if kinds is None else kinds[opened.known])
    state, known, new, seen, torch_g = opened.state, opened.known, opened.new, opened.seen, opened.generator
    counts, probe_hits = _evaluate(model, state, items, known, new, seen, cfg, probe, kinds)

    skipped = _budget_guard(global_state, state, cfg, noise_multiplier) if cfg.event_dp and cfg.epsilon > 0 else None
    if skipped is not None:
        skipped.probe_hits = probe_hits
        return skipped
    # training set: the new events plus those of the device's last `replay_rounds` windows (cursors holds the
    # last replay_rounds + 1 cursors, initially [0])
    train = (rounds > state.cursors[0]) & (rounds <= round_)
    params = dict(model.named_parameters())
    return Prepared(device_id, state, items, rounds, round_, train, new, seen | _mask(items[train], model.n_items),
                    counts, probe_hits, torch_g, {k: params[k].detach().clone() for k in model.local_names}, kinds)


def fit_batch(model: RecModel, opened: list[Opened], items: list[np.ndarray], cfg: RunConfig) -> list[np.ndarray]:
    """The round-start fit of many opened devices (``items[j]``: device ``j``'s events) at once, ``mf``'s closed form
    (:func:`~fedrec.models.mf.fit_user_mf_many`): each device's local vector as its own fit leaves it, up to float
    rounding (a device with nothing to fit keeps its own)."""
    from .models.mf import fit_user_mf_many

    name, = model.local_names
    users = torch.stack([torch.from_numpy(np.asarray(o.state.local[name], np.float32))[0] for o in opened])
    fit = [j for j, o in enumerate(opened) if _fits(cfg, o)]
    if fit:
        dev = node_device(cfg.device)
        sub = users[fit].to(dev)
        fit_user_mf_many(dict(model.named_parameters())[model.global_names[0]].data.to(dev), sub,
                         [torch.from_numpy(items[j][opened[j].known].astype(np.int64)) for j in fit],
                         [_fit_candidates(opened[j].seen) for j in fit], steps=cfg.user_fit_steps,
                         negatives=cfg.negatives, lr=cfg.user_lr if cfg.user_lr > 0 else cfg.lr,
                         generators=[opened[j].generator for j in fit])
        users[fit] = sub.cpu()
    return [users[j:j + 1].numpy() for j in range(len(opened))]


def _fits(cfg: RunConfig, opened: Opened) -> bool:
    """Whether the device fits its local vector to its past events before scoring (instant personalisation)."""
    return bool(cfg.user_fit_steps) and bool(opened.known.any())


def finish_update(prep: Prepared, cfg: RunConfig, steps: int, delta: dict, local: dict[str, np.ndarray],
                  preclip: float, clipped: bool, row_counts: tuple[np.ndarray, np.ndarray] | None, *,
                  noise_multiplier: float, affinities: bool, version: Mapping[str, np.ndarray]) -> UpdateResult:
    """:func:`client_update` after the local steps: the device's next state, its ε and its item pairs; a diverged
    update (:func:`check_converged` against the ``version`` it started from) raises instead."""
    check_converged(delta, preclip, version, cfg)
    nxt, eps = _next_state(prep.state, local, prep.round_, steps, cfg, noise_multiplier)
    pairs = device_pairs(prep.items, prep.new, cfg.pair_window, affinities=affinities) if cfg.graph else None
    return UpdateResult(delta=delta, n_train=int(prep.train.sum()), n_new=int(prep.new.sum()), counts=prep.counts,
                        epsilon=eps, steps=steps, state=nxt, preclip_norm=preclip, clipped=clipped,
                        probe_hits=prep.probe_hits, pairs=pairs, row_counts=row_counts)


def batched_updates(cfg: RunConfig) -> bool:
    """Whether :func:`train_batch` can run a node's devices' local steps together: ``mf``'s closed-form,
    non-private local SGD (privacy none or user-level)."""
    return cfg.model == "mf" and cfg.update_backend == "auto" and not cfg.event_dp and not cfg.aggregate_noise


def batched_fits(cfg: RunConfig) -> bool:
    """Whether :func:`fit_batch` can fit a node's devices' vectors together: ``mf``'s closed form, in every privacy
    mode (under event-level DP the fit serves the device's scoring only). Where the local steps do not batch
    (:func:`batched_updates`), each device's then run alone (:func:`train_prepared`)."""
    return cfg.model == "mf" and cfg.update_backend == "auto"


def train_prepared(model: RecModel, global_state: dict[str, np.ndarray], prep: Prepared, cfg: RunConfig,
                   noise_multiplier: float) -> tuple:
    """One prepared device's local update, as :func:`client_update` runs it, in a model that may hold another
    device's vector, and after local steps that moved the global parameters, another device's version of them:
    ``prep``'s own local state is loaded first, and the version ``global_state`` again unless the update only reads
    it (event noise at the aggregate: one clipped release)."""
    if not cfg.aggregate_noise:
        model.load({k: torch.from_numpy(np.asarray(v)) for k, v in global_state.items()})
    model.load({k: v.clone() for k, v in prep.local.items()})
    return _train(model, global_state, prep.items, prep.rounds, prep.train, prep.seen, cfg, prep.generator,
                  noise_multiplier, prep.kinds)


def train_batch(model: RecModel, global_state: dict[str, np.ndarray], preps: list[Prepared], cfg: RunConfig
                ) -> list[tuple]:
    """The local steps of many prepared devices at once (:func:`batched_updates`): each device's ``_train``
    result, as :func:`client_update` computes it one device at a time, up to float rounding. Each device draws its
    negatives and its steps' samples from its own generator, in the same order."""
    from .models.mf import sgd_mf_many

    if not preps:
        return []
    name, = model.global_names
    table = torch.from_numpy(np.asarray(global_state[name]))
    batches, draws, users = [], [], []
    for p in preps:
        n = int(p.train.sum())
        batch, _ = model.samples(p.items, p.rounds, p.train, _negatives(model, p.seen, cfg), negatives=cfg.negatives,
                                 generator=p.generator) if n else ((None, torch.zeros((0, 1 + cfg.negatives),
                                                                                     dtype=torch.long)), None)
        batches.append(batch[1])
        draws.append(torch.rand(cfg.steps * n, generator=p.generator).reshape(cfg.steps, n))
        users.append(p.local[model.local_names[0]][0])
    dev = node_device(cfg.device)
    user = torch.stack(users).to(dev)
    rows = sgd_mf_many(table.to(dev), user, batches, draws, sample_rate=cfg.sample_rate, lr_item=cfg.lr,
                       lr_user=cfg.user_lr if cfg.user_lr > 0 else cfg.lr)
    user = user.cpu()
    out = []
    for j, p in enumerate(preps):
        delta, preclip, clipped = _rows_delta(name, table, *rows[j], cfg)
        out.append((cfg.steps if p.train.any() else 0, delta, {model.local_names[0]: user[j:j + 1].numpy().copy()},
                    preclip, clipped, _row_counts(p.items[p.train], cfg)))
    return out


def _rows_delta(name: str, table: torch.Tensor, ids: torch.Tensor, after: torch.Tensor, cfg: RunConfig
                ) -> tuple[dict, float, bool]:
    """:func:`_delta` of a table that changed on rows ``ids`` alone (to ``after``), read from those rows only: the
    rows that moved, clipped under user-level DP, as sparse rows where the wire sends them so (the same ids and rows
    the wire takes from the dense delta), else the dense delta."""
    delta: dict = {name: (ids.numpy(), (after - table[ids]).numpy())}
    preclip, clipped = 0.0, False
    if cfg.user_dp:
        delta, preclip, clipped = clip_delta(delta, cfg.clip)
    at, moved = delta[name]
    if wire_mode(cfg.wire, cfg.privacy) == "sparse":  # the rows still nonzero after the clip, as the dense wire's
        keep = np.any(moved != 0, axis=1)
        return {name: (at[keep], moved[keep])}, preclip, clipped
    dense = np.zeros(tuple(table.shape), np.float32)
    dense[at] = moved
    return {name: dense}, preclip, clipped


def _train(model: RecModel, global_state: dict[str, np.ndarray], items: np.ndarray, rounds: np.ndarray,
           train: np.ndarray, seen: np.ndarray, cfg: RunConfig, g: torch.Generator, noise_multiplier: float,
           kinds: np.ndarray | None = None
           ) -> tuple[int, dict, dict[str, np.ndarray], float, bool, tuple[np.ndarray, np.ndarray] | None]:
    """The local update: its steps, the delta to send, the local state after it, the norm before the clip, whether
    the clip bit, and the positive-item counts where the server needs them (event noise at the aggregate, or
    per-row averaging without DP)."""
    if cfg.aggregate_noise:  # one clipped step; the item noise is added once to the cohort's sum
        steps, delta, local, counts = _release(model, items, rounds, train, seen, cfg, g, noise_multiplier, kinds)
        return steps, delta, local, 0.0, False, counts
    before = {k: torch.from_numpy(np.asarray(v)).clone() for k, v in global_state.items()}
    steps = 0 if not train.any() else _local_sgd(model, items, rounds, train, seen, cfg, g,
                                                 noise_multiplier if cfg.event_dp else 0.0, cfg.event_dp, kinds)
    params = dict(model.named_parameters())
    delta, local, preclip, was_clipped = _delta({k: params[k].detach() for k in model.global_names}, before,
                                                {k: params[k].detach() for k in model.local_names}, cfg)
    return steps, delta, local, preclip, was_clipped, _row_counts(items[train], cfg)


def _row_counts(trained: np.ndarray, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """The positive items of the trained events, where the server asks for them: their counts without DP
    (per-row averaging's tally: :func:`fedrec.aggregation.per_row_mean`), or under user-level DP with selected rows an indicator of L2 norm 1 (one user moves the
    count vector by at most 1: ``1 / sqrt(k)`` on each of its ``k`` items)."""
    if cfg.row_average and cfg.privacy == "none":
        ids, n = np.unique(trained.astype(np.int64), return_counts=True)
        return ids, n
    if cfg.select_rows:
        ids = np.unique(trained.astype(np.int64))
        return ids, np.full(len(ids), 1.0 / np.sqrt(max(len(ids), 1)))
    return None


def _load(model: RecModel, global_state: dict[str, np.ndarray] | None, state: DeviceState,
          g: torch.Generator) -> DeviceState:
    """Load the global version (None: the model holds it already) and the device's local state (a new device: a
    fresh one from ``g``)."""
    if set(state.local) != set(model.local_names):  # a new device: a fresh local state, the rest kept
        state = replace(state, local={k: v.numpy() for k, v in model.init_local(g).items()})
    if global_state is not None:
        model.load({k: torch.from_numpy(np.asarray(v)) for k, v in global_state.items()})
    model.load({k: torch.from_numpy(np.asarray(v)) for k, v in state.local.items()})
    return state


def _delta(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], local: dict[str, torch.Tensor],
           cfg: RunConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, bool]:
    """The delta of global parameters (clipped under user-level DP), the local state, the norm before the
    clip and whether the clip bit."""
    delta = {k: (after[k] - before[k]).numpy().astype(np.float32) for k in after}
    local_np = {k: v.numpy().copy() for k, v in local.items()}
    preclip, was_clipped = 0.0, False
    if cfg.user_dp:
        delta, preclip, was_clipped = clip_delta(delta, cfg.clip)
    return delta, local_np, preclip, was_clipped


def _evaluate(model: RecModel, state: DeviceState, items: np.ndarray, known: np.ndarray, new: np.ndarray,
              seen: np.ndarray, cfg: RunConfig, probe: np.ndarray | None, kinds: np.ndarray | None = None
              ) -> tuple[PrequentialCounts, np.ndarray | None]:
    """Score the new events (and the probe) before training, with the device's state as of its past events: its
    local vector fit to them against the global version just received (:func:`_fit_local`, instant on-device
    personalisation: nothing new is looked at). Under event-level DP that vector is used for local scoring only;
    training restarts from the DP-trained one, so no non-private step ever shapes a released delta."""
    scores = model.score_all(items[known], None if kinds is None else kinds[known]).numpy()
    counts = prequential_counts(scores, seen, items[new], cfg.k)
    probe_hits = in_topk(scores, probe, seen, cfg.k) if probe is not None and len(probe) else None
    if cfg.user_fit_steps and known.any() and cfg.event_dp:
        model.load({k: torch.from_numpy(np.asarray(v)) for k, v in state.local.items()})
    return counts, probe_hits


def _budget_guard(global_state: dict[str, np.ndarray], state: DeviceState, cfg: RunConfig,
                  noise_multiplier: float) -> UpdateResult | None:
    """The event-level budget guard: a skipped result if this update would exceed ``cfg.epsilon``, else None.

    The events of the last ``replay_rounds`` windows and the new ones would reach this exposure; the
    device trains only if the per-event bound stays within the budget.
    """
    acc = event_accountant(cfg.model, cfg.accountant)  # sasrec: per-event ε by group privacy of its sessions
    keep, q = cfg.replay_rounds + 1, cfg.sample_rate
    would = max(state.max_exposure, sum(state.recent_steps[-(keep - 1):]) + cfg.steps
                if keep > 1 else cfg.steps)
    eps_next = epsilon([(noise_multiplier, q, would), *graph_records(cfg)], cfg.delta, acc)
    if eps_next <= cfg.epsilon * (1 + 1e-9):
        return None
    zero = {k: np.zeros_like(np.asarray(v), dtype=np.float32) for k, v in global_state.items()}
    eps_now = epsilon([(noise_multiplier, q, state.max_exposure), *graph_records(cfg)], cfg.delta, acc) \
        if state.max_exposure else 0.0
    return UpdateResult(delta=zero, n_train=0, n_new=0, counts=PrequentialCounts(), epsilon=eps_now, steps=0,
                        state=state, skipped=f"budget: this update would bring per-event epsilon to {eps_next:.3f} "
                                             f"> budget {cfg.epsilon}")


def _next_state(state: DeviceState, local: dict[str, np.ndarray], round_: int, steps: int, cfg: RunConfig,
                noise_multiplier: float) -> tuple[DeviceState, float]:
    """The device's state after an update of ``steps`` steps, and its event-level ε so far.

    Each participation opens one event window (cursor..round_); a window is trained on in its own
    participation and the next ``replay_rounds`` ones, so an event's DP steps are the sum of at most
    replay_rounds + 1 consecutive participations' steps (a suffix sum of recent_steps).
    """
    private, keep, q = cfg.event_dp, cfg.replay_rounds + 1, cfg.sample_rate
    cursors = (list(state.cursors) + [round_])[-keep:]
    recent_steps = (list(state.recent_steps) + [steps])[-keep:]
    history = list(state.history)
    if private and steps:
        history.append((float(noise_multiplier), q, steps))
    max_exposure = max(state.max_exposure, sum(recent_steps)) if private else 0
    nxt = DeviceState(local=local, cursors=cursors, recent_steps=recent_steps, max_exposure=max_exposure,
                      participations=state.participations + 1, history=history)
    acc = event_accountant(cfg.model, cfg.accountant)
    eps = epsilon([(noise_multiplier, q, max_exposure), *graph_records(cfg)], cfg.delta, acc) \
        if private and max_exposure else 0.0
    return nxt, eps


def _mask(idx: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, bool)
    m[idx] = True
    return m


def _fit_local(model: RecModel, pos: torch.Tensor, seen: np.ndarray, cfg: RunConfig, g: torch.Generator,
               kinds: np.ndarray | None = None) -> None:
    """``cfg.user_fit_steps`` full-batch steps on the local parameters only (global ones frozen)."""
    cand = _fit_candidates(seen)
    model.fit_local(pos, cand, steps=cfg.user_fit_steps, negatives=cfg.negatives,
                    lr=cfg.user_lr if cfg.user_lr > 0 else cfg.lr, generator=g, backend=cfg.update_backend, kinds=kinds)


def _fit_candidates(seen: np.ndarray) -> torch.Tensor:
    """The negatives of the round-start fit: the items not had (every item where all were)."""
    return torch.from_numpy(np.flatnonzero(~seen)) if (~seen).any() else torch.arange(len(seen))


def _release(model: RecModel, events: np.ndarray, rounds: np.ndarray, train: np.ndarray, seen: np.ndarray,
             cfg: RunConfig, g: torch.Generator, noise_multiplier: float, kinds: np.ndarray | None = None
             ) -> tuple[int, dict, dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Event noise at the aggregate: the device's one clipped step (:meth:`RecModel.clipped_release`).

    Returns the steps (1: the step counts even when no event was taken, as the accountant assumes), the
    release as a sparse delta, the local state after the step (its user vector took its own noise) and
    the taken events' positive-item counts. The user vector's noise is the gradient share of the split
    (:func:`fedrec.privacy.aggregate.split`), the noise the item rows get on the server.
    """
    from .privacy.aggregate import split

    params = dict(model.named_parameters())
    if not train.any():  # no event to expose: nothing released (no row, every other parameter 0), nothing accounted
        empty = {k: (np.zeros(0, np.int64), np.zeros((0, *params[k].shape[1:]), np.float32)) if k in ITEM_TABLES
                 else np.zeros(tuple(params[k].shape), np.float32) for k in model.global_names}
        return 0, empty, {k: params[k].detach().numpy().copy() for k in model.local_names}, \
            (np.zeros(0, np.int64),) * 2
    batch, _ = model.samples(events, rounds, train, _negatives(model, seen, cfg), negatives=cfg.negatives, generator=g,
                             kinds=kinds)
    delta, counts = model.clipped_release(
        batch, sample_rate=cfg.sample_rate, lr_global=cfg.lr, lr_local=cfg.user_lr if cfg.user_lr > 0 else cfg.lr,
        clip=cfg.event_clip, noise_multiplier=split(noise_multiplier, cfg.count_share).grad, generator=g,
        backend=cfg.update_backend)
    local = {k: params[k].detach().numpy().copy() for k in model.local_names}
    return 1, delta, local, counts


def _negatives(model: RecModel, seen: np.ndarray, cfg: RunConfig) -> torch.Tensor:
    """The candidate negatives of an update: the items the user has not had; under event-level DP the whole
    catalogue, since a candidate set made of the device's other events would let one event shape every other
    event's sampled negatives, outside the per-event bound (a negative equal to its event's positive adds
    nothing: the two rows' gradients cancel)."""
    cand = _catalogue(model.n_items) if cfg.event_dp else torch.from_numpy(np.flatnonzero(~seen))
    return cand if len(cand) else _catalogue(model.n_items)


@functools.lru_cache(maxsize=4)
def _catalogue(n_items: int) -> torch.Tensor:
    """Every item id, made once per catalogue size (only ever indexed, never written)."""
    return torch.arange(n_items)


def _local_sgd(model: RecModel, events: np.ndarray, rounds: np.ndarray, train: np.ndarray, seen: np.ndarray,
               cfg: RunConfig, g: torch.Generator, noise_multiplier: float, private: bool,
               kinds: np.ndarray | None = None) -> int:
    """``cfg.steps`` steps; each takes every sample independently with prob ``sample_rate``.

    The samples are the model's (:meth:`RecModel.samples`): one per training event for ``mf`` and
    ``neumf``; sequence chunks for ``sasrec`` (under event-level DP one per round window, so that
    no sample reads an event of another). The steps are the model's own (:meth:`RecModel.train_local`:
    autograd, and Opacus with ghost clipping under DP; ``mf`` overrides it with its closed-form
    trainer unless ``update-backend = "autograd"``). Under DP the step is DP-SGD (per-event clip
    ``cfg.event_clip``, noise ``noise_multiplier * clip`` on the sum, normalised by the expected batch
    size); a DP step whose Poisson batch is empty still adds noise, as the accountant assumes.
    """
    batch, weight = model.samples(events, rounds, train, _negatives(model, seen, cfg), negatives=cfg.negatives, generator=g,
                                  sessions=private, kinds=kinds)
    # the item table (global) and the user vector (local) take separate step sizes: the user vector
    # receives DP noise of the same std on each step but only its own signal, so it needs a
    # smaller step to average the noise out across steps
    model.train_local(batch, weight, steps=cfg.steps, sample_rate=cfg.sample_rate, lr_global=cfg.lr,
                      lr_local=cfg.user_lr if cfg.user_lr > 0 else cfg.lr, generator=g, backend=cfg.update_backend,
                      private=private, clip=cfg.event_clip, noise_multiplier=noise_multiplier)
    return cfg.steps
