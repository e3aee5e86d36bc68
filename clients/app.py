"""Flower ClientApp: a node hosts one device (deployment) or a shard of devices (simulation).

Every message carries the run config from the server. For each device named in a ``train``
message the node runs :func:`fedrec.client_update.client_update` and replies with that
device's delta of GLOBAL parameters and its counts only; the device's user vector, cursor and
privacy history stay in the node's ``context.state``.
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedrec.attack import attack_target, attacker_set, boosted, poisoned
from fedrec.client_update import DeviceState, UpdateResult
from fedrec.config import RunConfig
from fedrec.data.source import load_stream
from fedrec.data.stream import RoundStream
from fedrec.device_round import (
    DeviceData,
    device_reply,
    next_state,
    serve_input,
    shard_serve,
    train_device,
)
from fedrec.eval.freshness import tracked_items
from fedrec.messages import (
    CONFIG,
    INFO,
    DeviceFailure,
    DeviceSkip,
    DeviceUpdate,
    NodeInfo,
    NodeReply,
    RoundInstruction,
    ServeReport,
    decode_train,
    encode_reply,
)
from fedrec.models import RecModel
from fedrec.wire import SECURE_METRICS, decode_delta, wire_mode

from .device import Device, shared_model
from .mods import slow_devices
from .records import from_records, to_records

warnings.filterwarnings("ignore", message=".*Full backward hook.*")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")


def _secagg_gate(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod, for the messages of a secure round only."""
    if msg.metadata.message_type == "train" and "secaggplus_configs" in msg.content:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


#: the simulation's instruments wrap the handlers as mods; they pass a deployed node's messages through
app = ClientApp(mods=[_secagg_gate, slow_devices])


def run_config(conf: dict) -> RunConfig:
    """The run config a server message carries (its other entries are per-round instructions)."""
    return RunConfig.from_mapping({k: v for k, v in conf.items() if k in RunConfig.keys()}, where="server message")


def hosted_devices(context: Context, n_devices: int) -> list[int]:
    """Devices on this node: ``device-id`` from node config (deployment), else a shard by partition."""
    nc = context.node_config
    if "device-id" in nc:
        return [int(nc["device-id"])]
    pid, n = int(nc.get("partition-id", 0)), int(nc.get("num-partitions", 1))
    return list(range(pid, n_devices, n))


def store_path(context: Context) -> str | None:
    """The device store of this node (deployment: ``--node-config "store='PATH'"``), else None."""
    p = context.node_config.get("store")
    return str(p) if p else None


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which devices this node hosts, the catalogue size, and whether their state is durable."""
    path = store_path(context)
    if path:
        with Device(path) as dev:
            info = NodeInfo((dev.device_id,), dev.n_items, durable=True)
    else:
        cfg = run_config(from_records(msg.content)[CONFIG])
        stream = load_stream(cfg)
        info = NodeInfo(tuple(hosted_devices(context, stream.n_devices)), stream.log.n_items, durable=False)
    return Message(to_records({INFO: info.to_flat()}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the named devices (and serve every hosted device, with serving evaluation on)."""
    if "fitins.parameters" in msg.content:  # a SecAgg+ round (server.secagg): Flower's legacy FitIns
        return Message(_train_secure(msg.content, context), reply_to=msg)
    req = decode_train(from_records(msg.content))
    return Message(to_records(encode_reply(handle(req.global_state, req.config, req.instruction, context))),
                   reply_to=msg)


@app.query("serve")
def serve(msg: Message, context: Context) -> Message:
    """Serving evaluation only (the secure-aggregation rounds train in separate messages)."""
    req = decode_train(from_records(msg.content))
    return Message(to_records(encode_reply(handle(req.global_state, req.config, req.instruction, context,
                                                  train=False))), reply_to=msg)


def handle(global_state: dict[str, np.ndarray], conf: dict, ins: RoundInstruction, context: Context, *,
           train: bool = True, serve: bool = True) -> NodeReply:
    """One round on this node: the devices in ``ins.devices`` train; every hosted device is served."""
    torch.set_num_threads(1)
    cfg = run_config(conf)
    serve = serve and cfg.serve_eval
    if store_path(context):
        return _train_store(global_state, ins, context, cfg, train=train, serve=serve)
    return _train_shard(global_state, ins, context, cfg, train=train, serve=serve)


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


def _train_shard(global_state: dict[str, np.ndarray], ins: RoundInstruction, context: Context, cfg: RunConfig, *,
                 train: bool, serve: bool) -> NodeReply:
    """Simulation: a shard of devices whose private state lives in ``context.state``; the round of each is
    :mod:`fedrec.device_round`'s, its serving batched over the shard."""
    stream = load_stream(cfg)
    model = shared_model(cfg, stream.log.n_items)
    mine = set(hosted_devices(context, stream.n_devices))
    sim = _Instruments.of(stream, cfg)
    wire = wire_mode(cfg.wire, cfg.privacy)
    out = NodeReply()
    for d in ins.devices if train else ():
        try:
            res, probe = _train_one(model, global_state, stream, d, mine, ins, cfg, context, sim)
        except Exception as e:  # one failing device must not sink its node's other devices
            out.failures.append(DeviceFailure(d, f"{type(e).__name__}: {e}", traceback.format_exc()[-2000:]))
            continue
        state = next_state(res)
        if state is not None:
            context.state[f"device-{d}"] = ConfigRecord(state.to_config())
        _add_reply(out, device_reply(d, res, wire, probe))
    if serve:
        out.served = _serve(context, stream, cfg, model, global_state, ins.round, mine, sim)
    return out


def _train_one(model: RecModel, global_state: dict[str, np.ndarray], stream: RoundStream, d: int, mine: set[int],
               ins: RoundInstruction, cfg: RunConfig, context: Context, sim: _Instruments
               ) -> tuple[UpdateResult, np.ndarray | None]:
    """Device ``d``'s local update on this node (and the uptake probe it measured, if any)."""
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
    res = train_device(model, global_state, DeviceData(d, items, stream.round_of[idx], state), cfg, ins, probe)
    if d in sim.fake:
        res.delta = boosted(res.delta, cfg.attack_boost)
    return res, probe


def _add_reply(out: NodeReply, reply: DeviceUpdate | DeviceSkip) -> None:
    if isinstance(reply, DeviceSkip):
        out.skips.append(reply)
    else:
        out.updates.append(reply)


def _train_secure(content: RecordDict, context: Context) -> RecordDict:
    """The SecAgg+ collect stage: this node's devices train; the reply is their MEAN delta as a legacy
    FitRes with weight = number of devices (secaggplus_mod masks ``weight * mean`` = their sum)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    conf: dict[str, Any] = dict(fitins.config)
    keys = str(conf.pop("global-keys")).split(",")
    conf["devices"] = [int(x) for x in str(conf["devices"]).split(",") if x]
    ins = RoundInstruction.from_flat(conf)
    conf["wire"] = "dense"  # the masked vector is dense whatever the wire setting
    arrays = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
    out = handle(arrays, conf, ins, context, serve=False)
    total = [np.zeros_like(arrays[k], dtype=np.float32) for k in keys]
    metrics: dict = {"devices": ",".join(str(u.device) for u in out.updates)}
    for u in out.updates:
        delta = decode_delta(u.arrays)
        for j, k in enumerate(keys):
            total[j] += delta[k]
        m = u.report.to_flat()
        for name in SECURE_METRICS:
            metrics[f"{name}:{u.device}"] = float(m[name])
    mean = [t / max(len(out.updates), 1) for t in total]
    res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(mean),
                 num_examples=len(out.updates), metrics=metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


def _train_store(global_state: dict[str, np.ndarray], ins: RoundInstruction, context: Context, cfg: RunConfig, *,
                 train: bool, serve: bool) -> NodeReply:
    """Deployment: one device whose events and private state live in its SQLite store."""
    asked = list(ins.devices) if train else []
    out = NodeReply()
    with Device(store_path(context)) as dev:  # type: ignore[arg-type]
        d = dev.device_id
        try:
            if any(x != d for x in asked):
                raise ValueError(f"this node hosts device {d}, not {[x for x in asked if x != d]}")
            res = dev.run_round(global_state, cfg, ins.round, train=d in asked, noise_multiplier=ins.noise_multiplier,
                                clock=ins.clock, serve=serve)
        except Exception as e:  # an error reply names the device; the store rolled the round back
            out.failures.append(DeviceFailure(d, f"{type(e).__name__}: {e}", traceback.format_exc()[-2000:]))
            return out
    if res.update is not None:
        _add_reply(out, device_reply(d, res.update, wire_mode(cfg.wire, cfg.privacy)))
    if serve:
        out.served = ServeReport([(d, res.served.counts)] if res.served is not None else [])
    return out


def _serve(context: Context, stream: RoundStream, cfg: RunConfig, model: RecModel, global_state: dict, round_: int,
           mine: set[int], sim: _Instruments) -> ServeReport:
    """Score every hosted device's events of this round with the newest version, as one batch."""
    log = stream.log
    idx = np.flatnonzero(stream.round_of == round_)
    active = sorted(set(int(u) for u in np.unique(log.user[idx])) & mine)
    inputs = []
    for d in active:
        if d in sim.fake:  # fake devices are not users: nobody is served there
            continue
        di = stream.by_user[d]
        di = di[stream.round_of[di] <= round_]
        probe = _probe(stream, sim.start, d, round_ - 1, cfg.freshness_window)
        if sim.target is not None:  # the poisoning target's exposure: is it in this benign user's top-K?
            probe = np.union1d(probe, [sim.target]) if probe is not None else np.asarray([sim.target])
        s = serve_input(DeviceData(d, log.item[di], stream.round_of[di]), round_, probe)
        if s is not None:
            inputs.append(s)
    res, vectors = shard_serve(model, global_state, inputs, _vectors(context), cfg, round_)
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
