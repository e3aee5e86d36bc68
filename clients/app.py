"""Flower ClientApp: a node hosts one device (deployment) or a shard of devices (simulation).

Every message carries the run config from the server. For each device named in a ``train``
message the node runs :func:`fedrec.client_update.client_update` and replies with that
device's delta of GLOBAL parameters and its counts only; the device's user vector, cursor and
privacy history stay in the node's ``context.state``.
"""

from __future__ import annotations

import traceback
import warnings

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedrec.asynchrony import lateness, slow_set
from fedrec.attack import attack_target, attacker_set
from fedrec.client_update import DeviceState, client_update
from fedrec.config import RunConfig
from fedrec.data.source import load_stream
from fedrec.eval.freshness import tracked_items
from fedrec.messages import (
    CONFIG,
    INFO,
    DeviceFailure,
    DeviceSkip,
    DeviceUpdate,
    InFlight,
    NodeInfo,
    NodeReply,
    RoundInstruction,
    ServeReport,
    UpdateReport,
    decode_train,
    encode_reply,
)
from fedrec.serving import ServeInput
from fedrec.serving import serve as serve_devices
from fedrec.wire import SECURE_METRICS, decode_delta, encode_delta, wire_mode

from .device import Device, shared_model
from .records import from_records, to_records

warnings.filterwarnings("ignore", message=".*Full backward hook.*")
warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")


def _secagg_gate(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod, for the messages of a secure round only."""
    if msg.metadata.message_type == "train" and "secaggplus_configs" in msg.content:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[_secagg_gate])


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
    round_, noise = ins.round, ins.noise_multiplier
    serve = serve and cfg.serve_eval
    if store_path(context):
        return _train_store(global_state, ins, context, cfg, train=train, serve=serve)
    stream = load_stream(cfg)
    log = stream.log
    model = shared_model(cfg, log.n_items)
    mine = set(hosted_devices(context, stream.n_devices))
    start = tracked_items(stream)[0] if cfg.uptake_probe else None
    wire = wire_mode(cfg.wire, cfg.privacy)
    cohort_start = None if cfg.serve_eval else start  # with serving, the probes come from every device
    fake, target = _attack(stream, cfg)
    out = NodeReply()
    slow = slow_set(stream.n_devices, cfg.slow_devices, cfg.seed) if cfg.slow_devices else frozenset()
    _hand_in(out, context, round_)
    for d in ins.devices if train else ():
        skey = f"device-{d}"
        try:
            if d not in mine:
                raise ValueError(f"device {d} is not hosted on this node")
            if f"held-metrics-{d}" in context.state:
                base = int(context.state[f"held-metrics-{d}"]["base-round"])
                raise ValueError(f"device {d} is still busy with its update of round {base}")
            state = DeviceState.from_config(dict(context.state[skey])) if skey in context.state else DeviceState()
            idx = stream.device_events(d, round_)
            probe = _probe(stream, cohort_start, d, round_, cfg.freshness_window)
            items = log.item[idx] if d not in fake else np.full(len(idx), target, dtype=log.item.dtype)
            res = client_update(model, global_state, state, items, stream.round_of[idx], round_, cfg,
                                device_id=d, noise_multiplier=noise, probe=probe)
            if d in fake and cfg.attack_boost != 1.0:  # model-replacement boosting
                res.delta = {k: (v * cfg.attack_boost).astype(np.float32) for k, v in res.delta.items()}
        except Exception as e:  # one failing device must not sink its node's other devices
            out.failures.append(DeviceFailure(d, f"{type(e).__name__}: {e}", traceback.format_exc()[-2000:]))
            continue
        if not res.skipped:
            context.state[skey] = ConfigRecord(res.state.to_config())
        if d in slow and not res.skipped:  # a straggler: its finished update comes in a later round
            _hold(context, out, _device_update(d, res, wire), round_,
                  round_ + lateness(d, round_, cfg.slow_rounds, cfg.seed))
            continue
        _reply_update(out, d, res, wire, probe)
    if serve:
        out.served = _serve(context, stream, cfg, model, global_state, round_, mine, start)
    return out


def _hold(context: Context, out: NodeReply, u: DeviceUpdate, round_: int, due: int) -> None:
    """Simulation of a slow device: keep its finished update in the node's state until round ``due``
    and tell the server it is in flight (the server does not sample it again meanwhile)."""
    context.state[f"held-delta-{u.device}"] = ArrayRecord({k: _array(v) for k, v in u.arrays.items()})
    context.state[f"held-metrics-{u.device}"] = MetricRecord({**u.report.to_flat(), "base-round": round_, "due": due})
    out.inflight.append(InFlight(u.device, round_, due))


def _hand_in(out: NodeReply, context: Context, round_: int) -> None:
    """Reply with the held updates of slow devices that are due by this round (tagged with their round)."""
    for key in [k for k in context.state.keys() if k.startswith("held-metrics-")]:
        m = dict(context.state[key])
        if int(m["due"]) > round_:
            continue
        d = key[len("held-metrics-"):]
        arrays = {k: v.numpy() for k, v in context.state[f"held-delta-{d}"].items()}
        out.updates.append(DeviceUpdate(int(d), arrays, UpdateReport.from_flat(m)))
        del context.state[key]
        del context.state[f"held-delta-{d}"]


def _train_secure(content: RecordDict, context: Context) -> RecordDict:
    """The SecAgg+ collect stage: this node's devices train; the reply is their MEAN delta as a legacy
    FitRes with weight = number of devices (secaggplus_mod masks ``weight * mean`` = their sum)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    conf = dict(fitins.config)
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


def _device_update(d: int, res, wire: str, probe: np.ndarray | None = None) -> DeviceUpdate:
    """Device ``d``'s update as sent: its delta of global parameters and its counts."""
    report = UpdateReport(num_examples=res.n_train, n_new=res.n_new, counts=res.counts, epsilon=res.epsilon,
                          steps=res.steps, max_exposure=res.state.max_exposure, clipped=res.clipped,
                          preclip_norm=res.preclip_norm)
    hits = ([int(i) for i in probe], [int(h) for h in res.probe_hits]) \
        if res.probe_hits is not None and probe is not None else None
    return DeviceUpdate(d, encode_delta(res.delta, wire), report, hits)


def _reply_update(out: NodeReply, d: int, res, wire: str, probe: np.ndarray | None = None) -> None:
    """Device ``d``'s reply: its update, or why it skipped (the budget guard said no: not an error)."""
    if res.skipped:
        out.skips.append(DeviceSkip(d, float(res.epsilon), res.skipped))
    else:
        out.updates.append(_device_update(d, res, wire, probe))


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
        _reply_update(out, d, res.update, wire_mode(cfg.wire, cfg.privacy))
    if serve:
        out.served = ServeReport([(d, res.served.counts)] if res.served is not None else [])
    return out


def _serve(context: Context, stream, cfg: RunConfig, model, global_state: dict, round_: int,
           mine: set[int], start: np.ndarray | None) -> ServeReport:
    """Score every hosted device's events of this round with the newest version (see fedrec.serving)."""
    log = stream.log
    idx = np.flatnonzero(stream.round_of == round_)
    active = sorted(set(int(u) for u in np.unique(log.user[idx])) & mine)
    vec = context.state["serve-vectors"] if "serve-vectors" in context.state else None
    vectors = {}
    if vec is not None:
        ids, mat = vec["ids"].numpy(), vec["vectors"].numpy()
        vectors = {int(d): mat[j] for j, d in enumerate(ids)}
    fake, target = _attack(stream, cfg)
    inputs = []
    for d in active:
        if d in fake:  # fake devices are not users: nobody is served there
            continue
        di = stream.by_user[d]
        r = stream.round_of[di]
        probe = _probe(stream, start, d, round_ - 1, cfg.freshness_window)
        if target is not None:  # the poisoning target's exposure: is it in this benign user's top-K?
            probe = np.union1d(probe, [target]) if probe is not None else np.asarray([target])
        inputs.append(ServeInput(device=d, history=log.item[di[r < round_]], new=log.item[di[r == round_]],
                                 probe=probe))
    res = serve_devices(model, global_state, inputs, vectors, round_=round_, seed=cfg.seed, k=cfg.k,
                        fit_steps=cfg.user_fit_steps, lr=cfg.user_lr if cfg.user_lr > 0 else cfg.lr, negatives=cfg.negatives)
    for x in res:
        if x.vector.size:  # sasrec keeps no serving vector: its user state is the history
            vectors[x.device] = x.vector
    if vectors:
        keys = sorted(vectors)
        context.state["serve-vectors"] = ArrayRecord({"ids": _array(np.asarray(keys, np.int64)),
                                                     "vectors": _array(np.stack([vectors[d] for d in keys]))})
    items = [int(i) for x, s in zip(res, inputs, strict=True) if x.probe_hits is not None for i in s.probe]
    hits = [int(h) for x in res if x.probe_hits is not None for h in x.probe_hits]
    return ServeReport([(x.device, x.counts) for x in res], items, hits)


def _attack(stream, cfg: RunConfig) -> tuple[frozenset[int], int | None]:
    """Simulation-only poisoning experiment (fedrec.attack): the fake devices and their target."""
    if not (cfg.attackers or cfg.attack_measure):
        return frozenset(), None
    return (attacker_set(stream.n_devices, cfg.attackers, cfg.seed),
            attack_target(stream.log.item, stream.round_of, stream.log.n_items))


def _probe(stream, start: np.ndarray | None, device: int, round_: int, window: int) -> np.ndarray | None:
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
