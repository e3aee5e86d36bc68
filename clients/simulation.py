"""The simulated node: a shard of virtual devices, and the simulation-only instruments.

In simulation a Flower virtual node hosts a shard of devices (by ``partition-id``) and runs each
sampled device's round (:mod:`fedrec.device_round`) one after another, keeping each device's private
state in the node's ``context.state``; every hosted device with new events is served as one batch.
A deployed SuperNode hosts one real device with its store and never runs this module.

The instruments of an experiment live here too, outside any device's own round:
* the poisoning attack (:mod:`fedrec.attack`): fake devices train on the target only and boost
  their deltas; they are not served;
* the uptake probes (:mod:`fedrec.eval.freshness`): which launched items a device will use within the
  freshness window, and whether they are in its top-K (a measurement; it never changes training);
* seeded slow devices are a client mod (:func:`fedrec.clients.mods.slow_devices`).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedrec.attack import attack_target, attacker_set, boosted, poisoned
from fedrec.client_update import DeviceState
from fedrec.config import RunConfig
from fedrec.data.source import load_stream
from fedrec.data.stream import RoundStream
from fedrec.device_round import DeviceData, device_reply, next_state, serve_input, shard_serve, train_devices
from fedrec.eval.freshness import tracked_items
from fedrec.messages import DeviceFailure, NodeReply, RoundInstruction, ServeReport
from fedrec.models import RecModel
from fedrec.serving import serve_panel
from fedrec.wire import wire_mode

from .device import shared_model

#: the torch threads this process started with (a node sets one; the in-process engine's serving takes these)
PROCESS_THREADS = torch.get_num_threads()


def node_stream(cfg: RunConfig) -> RoundStream:
    """The run's events on a node without a store: the server names the data, so an error names only the
    path and the kind of failure, never what the file holds (a server could name any file the node can read)."""
    try:
        return load_stream(cfg)
    except Exception as e:
        raise RuntimeError(f"this node cannot load the run's data {cfg.data!r} ({type(e).__name__}); "
                           "check the file where the node runs") from None


def hosted_devices(context: Context, n_devices: int) -> list[int]:
    """Devices on this node: ``device-id`` from node config (deployment), else a shard by partition."""
    nc = context.node_config
    if "device-id" in nc:
        return [int(nc["device-id"])]
    pid, n = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
    return list(range(pid, n_devices, n))


@dataclass(frozen=True)
class _Instruments:
    """Simulation-only instruments of a run: fake devices and their target (fedrec.attack) and the uptake
    probes' launch rounds (fedrec.eval.freshness). Slow devices are a client mod (fedrec.clients.mods)."""

    fake: frozenset[int]
    target: int | None
    start: np.ndarray | None  #: per item, its launch round (uptake probes on), else None

    @classmethod
    def of(cls, stream: RoundStream, cfg: RunConfig) -> _Instruments:
        fake, target = _attack(stream, cfg)
        return cls(fake, target, tracked_items(stream)[0] if cfg.uptake_probe else None)


def train_shard(global_state: dict[str, np.ndarray], ins: RoundInstruction, context: Context, cfg: RunConfig, *,
                 train: bool, serve: bool) -> NodeReply:
    """Simulation: a shard of devices whose private state lives in ``context.state``; the round of each is
    :mod:`fedrec.device_round`'s, its serving batched over the shard."""
    stream = node_stream(cfg)
    model = shared_model(cfg, stream.log.n_items, global_state)
    mine = set(hosted_devices(context, stream.n_devices))
    sim = _Instruments.of(stream, cfg)
    wire = wire_mode(cfg.wire, cfg.privacy)
    out = NodeReply()
    devices, data = [], []
    for d in ins.devices if train else ():
        try:
            data.append(_device_data(stream, d, mine, ins, cfg, context, sim))
            devices.append(d)
        except Exception as e:  # one failing device must not sink its node's other devices
            out.failures.append(_failure(d, e))
    results = train_devices(model, global_state, [dev for dev, _ in data], cfg, ins, [p for _, p in data])
    for d, (_, probe), res in zip(devices, data, results, strict=True):
        if isinstance(res, Exception):
            out.failures.append(_failure(d, res))
            continue
        if d in sim.fake:
            try:
                res.delta = boosted(res.delta, cfg.attack_boost)
            except Exception as e:
                out.failures.append(_failure(d, e))
                continue
        state = next_state(res)
        if state is not None:
            context.state[f"device-{d}"] = ConfigRecord(state.to_config())
        out.add(device_reply(d, res, wire, probe))
    if serve:
        with serving_threads(cfg):
            out.served = _serve(context, stream, cfg, model, global_state, ins, mine, sim)
    return out


@contextlib.contextmanager
def serving_threads(cfg: RunConfig) -> Iterator[None]:
    """A node keeps one torch thread, except while it serves in the in-process engine, whose nodes run one after
    another: serving's passes over (events x catalogue) take the process's threads (ml-latest-small, 2 cores:
    a round's serving 1.3-1.5x faster); training's small steps keep one (no gain measured there)."""
    if cfg.engine != "local":
        yield
        return
    torch.set_num_threads(PROCESS_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _failure(d: int, e: Exception) -> DeviceFailure:
    return DeviceFailure(d, f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e))[-2000:])


def _device_data(stream: RoundStream, d: int, mine: set[int], ins: RoundInstruction, cfg: RunConfig, context: Context,
                 sim: _Instruments) -> tuple[DeviceData, np.ndarray | None]:
    """Device ``d`` as its round sees it on this node (its events poisoned if it is a fake one), and the uptake
    probe it measures, if any."""
    if d not in mine:
        raise ValueError(f"device {d} is not hosted on this node")
    skey = f"device-{d}"
    state = DeviceState.from_config(dict(context.state[skey])) if skey in context.state else None
    idx = stream.device_events(d, ins.round)
    # with serving evaluation on, the uptake probes come from every served device instead
    probe = _probe(stream, None if cfg.serve_eval else sim.start, d, ins.round, cfg.freshness_window)
    items = stream.log.item[idx]
    if d in sim.fake and sim.target is not None:
        items = poisoned(items, sim.target)
    return DeviceData(d, items, stream.round_of[idx], state, stream.log.kind[idx]), probe


def _serve(context: Context, stream: RoundStream, cfg: RunConfig, model: RecModel, global_state: dict,
           ins: RoundInstruction, mine: set[int], sim: _Instruments) -> ServeReport:
    """Score every hosted device's events of this round with the newest version, as one batch."""
    round_ = ins.round
    log = stream.log
    idx = np.flatnonzero(stream.round_of == round_)
    users = np.unique(log.user[idx])
    active = sorted(set(users[serve_panel(stream.n_devices, cfg.serve_panel, cfg.seed)[users]].tolist()) & mine)
    inputs = []
    for d in active:
        if d in sim.fake:  # fake devices are not users: nobody is served there
            continue
        di = stream.by_user[d]
        di = di[stream.round_of[di] <= round_]
        probe = _probe(stream, sim.start, d, round_ - 1, cfg.freshness_window)
        if sim.target is not None:  # the poisoning target's exposure: is it in this benign user's top-K?
            probe = np.union1d(probe, [sim.target]) if probe is not None else np.asarray([sim.target])
        s = serve_input(DeviceData(d, log.item[di], stream.round_of[di], kinds=log.kind[di]), round_, probe)
        if s is not None:
            inputs.append(s)
    res, vectors = shard_serve(model, global_state, inputs, _vectors(context), cfg, ins)
    if vectors:
        keys = sorted(vectors)
        context.state["serve-vectors"] = ArrayRecord({"ids": _array(np.asarray(keys, np.int64)),
                                                     "vectors": _array(np.stack([vectors[d] for d in keys]))})
    items = [int(i) for x, s in zip(res, inputs, strict=True) if x.probe_hits is not None and s.probe is not None
             for i in s.probe]
    hits = [int(h) for x in res if x.probe_hits is not None for h in x.probe_hits]
    return ServeReport([(x.device, x.counts) for x in res], items, hits)


def _vectors(context: Context) -> dict[int, np.ndarray]:
    """The shard's serving vectors, as the node keeps them in its state."""
    if "serve-vectors" not in context.state:
        return {}
    vec = cast(ArrayRecord, context.state["serve-vectors"])
    ids, mat = vec["ids"].numpy(), vec["vectors"].numpy()
    return {int(d): mat[j] for j, d in enumerate(ids)}


def _attack(stream: RoundStream, cfg: RunConfig) -> tuple[frozenset[int], int | None]:
    """Simulation-only poisoning experiment (fedrec.attack): the fake devices and their target."""
    if not (cfg.attackers or cfg.attack_measure):
        return frozenset(), None
    return (attacker_set(stream.n_devices, cfg.attackers, cfg.seed),
            attack_target(stream.log.item, stream.round_of, stream.log.n_items))


def _probe(stream: RoundStream, start: np.ndarray | None, device: int, round_: int, window: int) -> np.ndarray | None:
    """Simulation-only measurement: tracked items, already launched, that this device will use later."""
    if start is None:
        return None
    idx = stream.by_user[device]
    r = stream.round_of[idx]
    # "the users who go on to interact with it": those who do within the next freshness window
    fut = np.unique(stream.log.item[idx[(r > round_) & (r <= round_ + window)]])
    s = start[fut]
    return fut[(s >= 1) & (s <= round_)]


def _array(v: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(v))
