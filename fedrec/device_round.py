"""A device's part of one server round, written once for the simulation and the device SDK.

Each device, in each round: 1. each of its events of the round is scored the moment before it has it
(prequential HR/NDCG per event), with the newest global version and its own state through the event
before (:mod:`fedrec.serving`); 2. if the server sampled it, it runs its local
update (:func:`fedrec.client_update.client_update`); 3. it keeps its private state and serving
vector, and replies with its delta of GLOBAL parameters and its counts only.

These are pure functions over the device's events, its :class:`DeviceState`, its serving vector
and the server's :class:`~fedrec.messages.RoundInstruction`; they return what to reply and the
device's next state. Where that state lives is the caller's business: a simulated node keeps a
shard of devices in Flower's ``context.state`` (and serves them as one batch: :func:`serve_devices`
takes a list, and each device's result does not depend on the batch), a deployed device keeps its
own in its SQLite store (:meth:`fedrec.clients.device.Device.run_round`, one transaction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from .client_update import (
    DeviceState,
    Opened,
    Prepared,
    UpdateResult,
    batched_fits,
    batched_updates,
    client_update,
    finish_update,
    fit_batch,
    open_update,
    prepare_update,
    readable_kinds,
    train_batch,
    train_prepared,
)
from .config import RunConfig
from .itemgraph import PROFILES, split
from .messages import DeviceSkip, DeviceUpdate, RoundInstruction, UpdateReport
from .models.base import RecModel
from .server_aggregate import node_device
from .serving import ServeInput, ServeResult, serve
from .wire import encode_delta

T = TypeVar("T")


@dataclass
class DeviceData:
    """One device as its round sees it (nothing here is ever sent)."""

    device: int
    items: np.ndarray  #: item ids of its events so far (rounds ``<=`` the current one), time order
    rounds: np.ndarray  #: the round window of each event
    state: DeviceState | None = None  #: its private training state (None: a device that never trained)
    kinds: np.ndarray | None = None  #: the kind of each event (:data:`fedrec.data.events.KINDS` codes; None: unknown)


def serve_input(dev: DeviceData, round_: int, probe: np.ndarray | None = None) -> ServeInput | None:
    """What serving needs of ``dev`` in ``round_``: its history and its new events (None without new events)."""
    new = dev.rounds == round_
    if not new.any():
        return None
    kinds = None if dev.kinds is None else dev.kinds[dev.rounds <= round_]
    return ServeInput(device=dev.device, history=dev.items[dev.rounds < round_], new=dev.items[new], probe=probe,
                      kinds=kinds)


def serve_devices(model: RecModel, global_state: Mapping[str, np.ndarray], inputs: list[ServeInput],
                  vectors: dict[int, np.ndarray], cfg: RunConfig, round_: int, blend: int = 0) -> list[ServeResult]:
    """Step 1 for a batch of devices: score their new events with the newest version (see :func:`serve`);
    ``global_state`` is the version as sent (the model's parameters, and the item graph's table if any). The events'
    kinds are read only where the run allows it (:func:`~fedrec.client_update.readable_kinds`): a model serves in the
    contexts it was trained in."""
    params, graph = split(global_state)
    inputs = [dataclasses.replace(s, kinds=readable_kinds(cfg, s.kinds)) for s in inputs]
    return serve(model, params, inputs, vectors, round_=round_, seed=cfg.seed, k=cfg.k,
                 fit_steps=cfg.user_fit_steps, lr=cfg.user_lr if cfg.user_lr > 0 else cfg.lr, negatives=cfg.negatives,
                 graph=graph, context=cfg.session_len, blend=blend, per_event=cfg.per_event,
                 device=node_device(cfg.device))


def train_device(model: RecModel, global_state: Mapping[str, np.ndarray], dev: DeviceData, cfg: RunConfig,
                 ins: RoundInstruction, probe: np.ndarray | None = None, secret: int = 0) -> UpdateResult:
    """Step 2: the device's local update on its events, from its state (a new device: a fresh one); ``secret``:
    see :func:`~fedrec.client_update.client_update`."""
    return client_update(model, split(global_state)[0], dev.state if dev.state is not None else DeviceState(),
                         dev.items, dev.rounds, ins.round, cfg, device_id=dev.device,
                         noise_multiplier=ins.noise_multiplier, probe=probe, secret=secret,
                         affinities=PROFILES in global_state, kinds=dev.kinds)


def train_devices(model: RecModel, global_state: Mapping[str, np.ndarray], devs: Sequence[DeviceData], cfg: RunConfig,
                  ins: RoundInstruction, probes: Sequence[np.ndarray | None]) -> list[UpdateResult | Exception]:
    """Step 2 for many devices of one node: each one's :func:`train_device`, their round-start fits run together
    where the model allows (:func:`~fedrec.client_update.batched_fits`) and their local steps too where the mode
    does (:func:`~fedrec.client_update.batched_updates`; under event-level DP each device's update then runs
    alone), each device still from its own state and generator. A device that fails is its exception in the list;
    the others go on (should the batch's steps fail as a whole, each device runs its round alone)."""
    one = [lambda dev=dev, probe=probe: train_device(model, global_state, dev, cfg, ins, probe)
           for dev, probe in zip(devs, probes, strict=True)]
    if not devs or not batched_fits(cfg):
        return [_caught(f) for f in one]
    params = split(global_state)[0]
    model.load({k: torch.from_numpy(np.asarray(v)) for k, v in params.items()})
    out: list = [_caught(open_update, model, params, dev.state if dev.state is not None else DeviceState(),
                         dev.items, dev.rounds, ins.round, cfg, device_id=dev.device, loaded=True) for dev in devs]
    opened = [j for j, o in enumerate(out) if isinstance(o, Opened)]
    fitted = _caught(fit_batch, model, [out[j] for j in opened], [devs[j].items for j in opened], cfg)
    if isinstance(fitted, Exception):  # the batch's fit failed as a whole: each device runs its round alone
        return [_caught(f) for f in one]
    for n, j in enumerate(opened):
        model.load({model.local_names[0]: torch.from_numpy(fitted[n])})
        out[j] = _caught(prepare_update, model, params, out[j].state, devs[j].items, devs[j].rounds, ins.round, cfg,
                         device_id=devs[j].device, noise_multiplier=ins.noise_multiplier, probe=probes[j],
                         opened=out[j], kinds=devs[j].kinds)
    ready = [j for j, p in enumerate(out) if isinstance(p, Prepared)]
    trained: list | Exception
    if batched_updates(cfg):
        trained = _caught(train_batch, model, params, [out[j] for j in ready], cfg)
    else:  # each device's local update alone (event-level DP), from its own vector and the version
        trained = [_caught(train_prepared, model, params, out[j], cfg, ins.noise_multiplier) for j in ready]
    for n, j in enumerate(ready):
        if isinstance(trained, Exception):  # the batch failed as a whole: each device alone, from its own start
            out[j] = _caught(one[j])
        elif isinstance(trained[n], Exception):  # this device's own release failed: it fails alone
            out[j] = trained[n]
        else:
            out[j] = _caught(finish_update, out[j], cfg, *trained[n], noise_multiplier=ins.noise_multiplier,
                             affinities=PROFILES in global_state, version=params)
    return out


def _caught(f: Callable[..., T], *args: Any, **kw: Any) -> T | Exception:
    """``f(*args, **kw)``, or the exception it raised."""
    try:
        return f(*args, **kw)
    except Exception as e:
        return e


def device_update(device: int, res: UpdateResult, wire: str, probe: np.ndarray | None = None) -> DeviceUpdate:
    """Device ``device``'s update as sent: its delta of global parameters, wire-encoded, and its counts."""
    report = UpdateReport(num_examples=res.n_train, n_new=res.n_new, counts=res.counts, epsilon=res.epsilon,
                          steps=res.steps, max_exposure=res.state.max_exposure, clipped=res.clipped,
                          preclip_norm=res.preclip_norm)
    hits = ([int(i) for i in probe], [int(h) for h in res.probe_hits]) \
        if res.probe_hits is not None and probe is not None else None
    rows = {"ids": res.row_counts[0], "counts": res.row_counts[1]} if res.row_counts is not None else None
    return DeviceUpdate(device, encode_delta(res.delta, wire), report, hits,
                        res.pairs.arrays() if res.pairs is not None else None, rows)


def device_reply(device: int, res: UpdateResult, wire: str,
                 probe: np.ndarray | None = None) -> DeviceUpdate | DeviceSkip:
    """Step 3: the device's reply: its update, or why it skipped (its budget guard said no: not an error)."""
    if res.skipped:
        return DeviceSkip(device, float(res.epsilon), res.skipped)
    return device_update(device, res, wire, probe)


def next_state(res: UpdateResult) -> DeviceState | None:
    """The state the device keeps after its update (None: keep the old one; a skipped round consumed nothing)."""
    return None if res.skipped else res.state


@dataclass
class DeviceOutcome:
    """What one device's round produced: its served result and its update (each None when not run)."""

    served: ServeResult | None
    update: UpdateResult | None


def device_round(model: RecModel, global_state: Mapping[str, np.ndarray], dev: DeviceData,
                 vector: np.ndarray | None, ins: RoundInstruction, cfg: RunConfig, *, train: bool,
                 serve: bool = True, secret: int = 0) -> DeviceOutcome:
    """One device's whole round: serve its new events (with serving evaluation on), then train if asked."""
    served = None
    if serve and cfg.serve_eval:
        s = serve_input(dev, ins.round)
        if s is not None:
            (served,) = serve_devices(model, global_state, [s], {dev.device: vector} if vector is not None else {},
                                      cfg, ins.round, ins.blend)
    update = train_device(model, global_state, dev, cfg, ins, secret=secret) if train else None
    return DeviceOutcome(served, update)


def shard_serve(model: RecModel, global_state: Mapping[str, np.ndarray], inputs: Sequence[ServeInput],
                vectors: dict[int, np.ndarray], cfg: RunConfig, ins: RoundInstruction
                ) -> tuple[list[ServeResult], dict[int, np.ndarray]]:
    """Step 1 over a shard of devices at once, and the shard's serving vectors after it (a new mapping)."""
    res = serve_devices(model, global_state, list(inputs), vectors, cfg, ins.round, ins.blend)
    after = dict(vectors)
    for x in res:
        if x.vector.size:  # sasrec keeps no serving vector: its user state is the history
            after[x.device] = x.vector
    return res, after
