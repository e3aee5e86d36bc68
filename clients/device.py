"""The device SDK: a device records its own behaviour, trains when the server asks, recommends locally.

A :class:`Device` wraps one :class:`~fedrec.clients.store.EventStore`. Everything a round needs
and produces is read from and written to that store inside one SQLite transaction, so a device
(or the SuperNode hosting it) can be killed at any moment and restarts where it was: no event,
cursor, user vector or privacy record is lost, and a round that did not commit consumed nothing.

The round itself is the same code the simulation runs: :func:`fedrec.device_round.device_round`
(serving evaluation with the newest version, then :func:`fedrec.client_update.client_update`:
evaluate-before-train, DP local update, clipping).

Example
-------
>>> dev = Device("phone.sqlite", create=True, device_id=7, n_items=400)   # doctest: +SKIP
>>> dev.record(42, kind="click")                                           # doctest: +SKIP
>>> dev.recommend(10)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrec.client_update import DeviceState, UpdateResult, readable_kinds
from fedrec.config import RunConfig
from fedrec.device_round import DeviceData, DeviceOutcome, device_round, next_state
from fedrec.eval.metrics import BLENDS
from fedrec.itemgraph import split
from fedrec.messages import RoundInstruction
from fedrec.models import RecModel, model_from_config, version_features
from fedrec.privacy.accounting import event_accountant
from fedrec.serving import ServeInput, ServeResult
from fedrec.serving import serve as serve_devices

from .store import DEFAULT_MAX_EVENTS, EventStore, StoreError

_MODELS: dict[tuple, RecModel] = {}


@dataclass(frozen=True)
class Recommendation:
    """One recommended item, with what supports it (``recommend(k, explain=True)``)."""

    item: int
    score: float
    #: items of the user's own history most similar to ``item`` by the model's item representations,
    #: most similar first, as ``(item, cosine similarity)``; computed on the device
    because: tuple[tuple[int, float], ...]


@dataclass
class DeviceRound:
    """What one server round did on this device."""

    taken: int  #: events this round took in (recorded up to the round's clock)
    update: UpdateResult | None  #: the local update (None when the device was not asked to train)
    served: ServeResult | None  #: the serving evaluation of this round's events (None if none/off)


class Device:
    """One device: its event store, its private state and its part of each round.

    Parameters
    ----------
    path : the device's SQLite store.
    create : make a new store; needs ``device_id`` and ``n_items``.
    max_events : retention bound of the store (see :class:`EventStore`).
    """

    def __init__(self, path: str | Path, *, create: bool = False, device_id: int | None = None,
                 n_items: int | None = None, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.store = EventStore(path, create=create, device_id=device_id, n_items=n_items, max_events=max_events)
        self.device_id = self.store.device_id
        self.n_items = self.store.n_items

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- recording ------------------------------------------------------------------------------
    def record(self, item: int, *, timestamp: float | None = None, kind: str = "event", weight: float = 1.0) -> int:
        """Record one behaviour event durably (now, unless ``timestamp`` is given)."""
        return self.store.record(item, timestamp=timestamp, kind=kind, weight=weight)

    def record_many(self, events) -> int:
        """Record ``(item, timestamp, kind, weight)`` rows in one transaction."""
        return self.store.record_many(events)

    # ---- a server round ------------------------------------------------------------------------
    def run_round(self, global_state: dict[str, np.ndarray], cfg: RunConfig, round_: int, *, train: bool,
                  noise_multiplier: float = 0.0, clock: float = math.inf, serve: bool = True,
                  blend: int = 0, secret: int | None = None, acked: int | None = None) -> DeviceRound:
        """Take in the events recorded up to ``clock``, serve them, and train if asked; all in one commit.

        ``acked``: the round of this device's newest update that the server kept (-1: none; None: not told).
        Without DP or under user-level DP an update is delivered at least once: the device keeps the state it
        trained its last update from, and when the server did not keep that update (a crash discarded its
        round, its reply was lost) it trains from that state again, so those events go out again in this
        update. Under event-level DP an event's exposures are bounded by its replay window, so there a lost
        update's events are not trained a second time: they stay in the device's replay window only.

        ``clock`` is the server's time of the round: events with a later timestamp wait for a later
        round (a replayed dataset releases its events round by round; live devices use ``inf``).
        ``secret`` is mixed into the seed of the device's sampling and DP noise; by default fresh OS
        entropy, so that the server (which knows the run seed) cannot redraw them. Pass 0 only to
        reproduce a round exactly (tests).
        """
        secret = secrets.randbits(63) if secret is None else secret
        model = self._model(cfg, global_state)
        ins = RoundInstruction(round_, (self.device_id,) if train else (), noise_multiplier, clock, blend)
        with self.store.transaction():
            taken = self.store.take(round_, clock)
            items, rounds = self.store.events()
            raw = self._settle(self.store.load_state(), acked, cfg) if train else None
            dev = DeviceData(self.device_id, items, rounds, DeviceState.from_config(raw) if raw is not None else None,
                             self.store.kinds())
            vec = self.store.get_arrays("serve-vector")
            out = device_round(model, global_state, dev, vec[1]["vector"] if vec else None, ins, cfg, train=train,
                               serve=serve, secret=secret)
            pending = out.update is not None and not cfg.event_dp
            if pending:
                self.store.set_pending(round_, raw)
            # the events of an update not yet acknowledged stay until the server says whether it kept it
            self._keep(out, global_state, cfg, ins, raw["cursors"][0] if pending and raw is not None else None)
        return DeviceRound(taken=taken, update=out.update, served=out.served)

    def _settle(self, raw: dict | None, acked: int | None, cfg: RunConfig) -> dict | None:
        """The state to train from: the saved one, or, when the server did not keep the device's last update,
        the state that update was trained from (``run_round``'s ``acked``)."""
        if acked is None or cfg.event_dp:
            return raw
        pending = self.store.pending()
        if pending is None:
            return raw
        self.store.clear_pending()
        round_, before = pending
        return raw if acked >= round_ else before

    def _keep(self, out: DeviceOutcome, global_state: dict[str, np.ndarray], cfg: RunConfig,
              ins: RoundInstruction, pending_cursor: int | None) -> None:
        """Write what the round leaves on the device (inside the round's transaction): the serving vector,
        the training state, the privacy record of a DP update, the retention cut, the global version."""
        if out.served is not None and out.served.vector.size:
            self.store.put_arrays("serve-vector", ins.round, {"vector": out.served.vector})
        update = out.update
        state = next_state(update) if update is not None else None
        if update is not None and state is not None:
            self.store.save_state(state.to_config())
            if cfg.event_dp and update.steps:
                self.store.append_privacy(round_=ins.round, noise_multiplier=ins.noise_multiplier,
                                          sample_rate=cfg.sample_rate, steps=update.steps,
                                          max_exposure=state.max_exposure, epsilon=update.epsilon,
                                          delta=cfg.delta, accountant=event_accountant(cfg.model, cfg.accountant))
            self.store.retain(state.cursors[0] if pending_cursor is None else min(state.cursors[0], pending_cursor))
        self.store.put_arrays("global", ins.round, {k: np.asarray(v) for k, v in global_state.items()})
        self.store.set_meta("config", json.dumps(cfg.to_flat()))
        self.store.set_meta("blend", str(ins.blend))

    # ---- local recommendation ------------------------------------------------------------------
    def _model(self, cfg: RunConfig, version: dict[str, np.ndarray]) -> RecModel:
        """The model of ``cfg`` for ``version``, whose parameters must have the shapes this store's model needs."""
        model = shared_model(cfg, self.n_items, version)
        want = {n: tuple(v.shape) for n, v in model.global_state().items()}
        got = {n: tuple(np.shape(v)) for n, v in split(version)[0].items()}
        if got != want:
            raise StoreError(f"The global model ({cfg.model}) has parameters {got} but the device store "
                             f"{self.store.path} ({self.n_items} items) needs {want}.")
        return model

    def recommend(self, k: int = 10, *, explain: bool = False, reasons: int = 3) -> list:
        """The top-``k`` items for this user, ranked on the device with the newest global version.

        The user's state is refreshed on the spot from every event recorded so far, including those
        no round has taken yet: what the user just did shapes what they see next (``mf``/``neumf``
        refit the device's own user embedding, starting from its serving or training state;
        ``sasrec`` reads the recent history). Items already had are excluded. Nothing is written.

        Returns the item ids, best first; with ``explain=True`` a list of :class:`Recommendation`,
        each with the ``reasons`` items of the user's own history whose representations in the
        model are closest (cosine) to the recommended item's: which of the user's items most
        support it. All of it is computed on the device from its own history and the global model.
        """
        got = self.store.get_arrays("global")
        if got is None:
            raise StoreError(f"The device {self.store.path} has not received a global model yet; "
                             "it can recommend after its first round.")
        round_, glob = got
        cfg = RunConfig.from_mapping(json.loads(self.store.meta("config")), where=f"{self.store.path} meta")
        model = self._model(cfg, glob)
        vec = self.store.get_arrays("serve-vector")
        vectors = {self.device_id: vec[1]["vector"]} if vec else {}
        if not vectors and model.local_names:
            raw = self.store.load_state()
            local = DeviceState.from_config(raw).local if raw is not None else {}
            if set(local) == set(model.local_names):
                vectors[self.device_id] = np.concatenate([np.ravel(local[n]) for n in model.local_names])
        history, kinds = self.store.history()
        params, graph = split(glob)
        # the state after every event recorded so far: the row after the last event, as the serving path has it
        res = serve_devices(model, params, [ServeInput(self.device_id, history, history[:0],
                                                       kinds=readable_kinds(cfg, kinds))], vectors,
                            round_=round_ + 1, seed=cfg.seed, k=k, fit_steps=cfg.user_fit_steps,
                            lr=cfg.user_lr or cfg.lr, negatives=cfg.negatives, graph=graph, context=cfg.session_len,
                            blend=self._blend())[0]
        model.load({n: torch.as_tensor(np.asarray(v)) for n, v in params.items()})
        scores = np.asarray(res.next_scores, np.float64).copy()
        scores[history] = -np.inf
        order = np.argsort(-scores, kind="stable")
        top = [int(i) for i in order[: min(k, int(np.isfinite(scores).sum()))]]
        if not explain:
            return top
        return [Recommendation(item=i, score=float(scores[i]), because=why)
                for i, why in zip(top, explain_items(model.item_repr().numpy(), top, history, reasons), strict=True)]

    def _blend(self) -> int:
        """The blend the server last said to serve (0 for a store written before blends existed)."""
        try:
            b = int(self.store.meta("blend"))
        except (StoreError, ValueError):
            return 0
        return b if 0 <= b < len(BLENDS) else 0

    def epsilon(self) -> float:
        """This device's event-level ε so far (0 if it never released a DP-SGD update)."""
        led = self.store.privacy_ledger()
        return float(led[-1]["epsilon"]) if led else 0.0


def shared_model(cfg: RunConfig, n_items: int, version: Mapping[str, np.ndarray] | None = None) -> RecModel:
    """One reused model object per process and shape (every update overwrites its parameters); a model that
    reads item features takes them from the global ``version`` it will be loaded with."""
    feats = version_features(cfg.model, version) if version is not None else None
    key = (cfg.model, n_items, cfg.dim, cfg.seq_len, cfg.init_scale, cfg.seed, None if feats is None else feats.shape)
    if key not in _MODELS:
        _MODELS[key] = model_from_config(cfg, n_items, feats)
    if feats is not None:
        _MODELS[key].set_features(feats)
    return _MODELS[key]


def explain_items(reprs: np.ndarray, items: list[int], history: np.ndarray, n: int = 3
                  ) -> list[tuple[tuple[int, float], ...]]:
    """For each of ``items``: the ``n`` items of ``history`` with the highest cosine similarity of their
    representations ``reprs`` (n_items, d), most similar first (ties: the more recent history item)."""
    hist = np.asarray(history, np.int64)[::-1]
    _, first = np.unique(hist, return_index=True)
    hist = hist[np.sort(first)]  # distinct, most recent first
    if not len(hist) or not len(items):
        return [() for _ in items]
    r = reprs / np.maximum(np.linalg.norm(reprs, axis=1, keepdims=True), 1e-12)
    sim = r[np.asarray(items, np.int64)] @ r[hist].T  # (len(items), len(hist))
    out = []
    for row in sim:
        best = np.argsort(-row, kind="stable")[:n]
        out.append(tuple((int(hist[j]), float(row[j])) for j in best))
    return out
