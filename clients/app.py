"""Flower ClientApp: a node hosts one device (deployment) or a shard of devices (simulation).

The handlers decode the server's request (:mod:`fedrec.messages`), run the device round written once
in :mod:`fedrec.device_round`, and reply with each trained device's delta of GLOBAL parameters and
its counts only. A deployed SuperNode's device keeps its events and private state in its SQLite store
(:class:`~fedrec.clients.device.Device`); a simulated node runs a shard of devices
(:mod:`fedrec.clients.simulation`, where the experiment's instruments live too).
"""

from __future__ import annotations

import math
import secrets
import traceback
import warnings
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from fedrec.config import RunConfig
from fedrec.device_round import (
    device_reply,
)
from fedrec.itemgraph import (
    FEATURES,
    PROFILES,
    Pairs,
    bounded_profiles,
    clip_scale,
    dense_contribution,
    device_pairs,
    secure_noise_std,
)
from fedrec.messages import (
    CONFIG,
    INFO,
    SECURE_METRICS,
    DeviceFailure,
    DeviceUpdate,
    NodeInfo,
    NodeReply,
    RoundInstruction,
    ServeReport,
    decode_train,
    encode_reply,
)
from fedrec.privacy.accounting import graph_multiplier
from fedrec.privacy.shares import add_shares, device_signal, node_share_seed, share_generator, share_plan
from fedrec.ray_cluster import quiet_flower
from fedrec.server_aggregate import ITEM_TABLES
from fedrec.wire import decode_delta, wire_mode

from .device import Device
from .mods import slow_devices
from .records import from_records, to_records
from .simulation import hosted_devices, node_stream, train_shard

quiet_flower()  # here too: a Ray node's actor imports this module in its own process, which logs its own stop

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
    return RunConfig.of_message(conf, "server message")


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
        stream = node_stream(cfg)
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
    return train_shard(global_state, ins, context, cfg, train=train, serve=serve)


def _train_secure(content: RecordDict, context: Context) -> RecordDict:
    """The SecAgg+ collect stage: this node's devices train; the reply is the MEAN of their vectors as a legacy
    FitRes with weight = number of devices (secaggplus_mod masks ``weight * mean`` = their sum).

    A device's vector is its dense delta and its clipped item graph parts (user-level DP, :func:`_clipped_vectors`);
    under event noise at the aggregate the node sends one vector, its devices' releases, counts and graph parts
    summed with their noise shares added (:func:`_share_vectors`).
    """
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    conf: dict[str, Any] = dict(fitins.config)
    sent = str(conf.pop("global-keys")).split(",")
    keys = str(conf.pop("delta-keys")).split(",")  # the parameters: a version also carries what devices read beside
    conf["devices"] = [int(x) for x in str(conf["devices"]).split(",") if x]
    conf["acked"] = [int(x) for x in str(conf.get("acked", "")).split(",") if x]
    ins = RoundInstruction.from_flat(conf)
    conf["wire"] = "dense"  # the masked vector is dense whatever the wire setting
    arrays = dict(zip(sent, parameters_to_ndarrays(fitins.parameters), strict=True))
    cfg = run_config(conf)
    graph_std = _graph_std(cfg, arrays, conf)  # before the round: a refused round must not use up its events
    out = handle(arrays, conf, ins, context, serve=False)
    if cfg.aggregate_noise and len(out.updates) < len(ins.devices):
        # a device that skipped or failed adds no noise share, yet its node would count towards the threshold
        # of nodes SecAgg+ unmasks with: the node drops out of this round instead
        raise RuntimeError(f"{len(ins.devices) - len(out.updates)} of this node's devices have no update this round; "
                           "the node leaves the secure round (its devices' noise shares would be missing)")
    if cfg.aggregate_noise:
        vectors = _share_vectors(out, keys, arrays, cfg, ins, int(conf["share-devices"]), context, graph_std)
    else:
        vectors = _clipped_vectors(out, keys, arrays, cfg)
    metrics: dict = {"devices": ",".join(str(u.device) for u in out.updates)}
    for u in out.updates:
        m = u.report.to_flat()
        for name in SECURE_METRICS:
            metrics[f"{name}:{u.device}"] = float(m[name])
    mean = [np.asarray(sum(parts)) / max(len(out.updates), 1) for parts in zip(*vectors, strict=True)]
    res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(mean),
                 num_examples=len(out.updates), metrics=metrics)
    return compat.fitres_to_recorddict(res, keep_input=True)


def _graph_std(cfg: RunConfig, arrays: dict[str, np.ndarray], conf: dict) -> float:
    """Under :attr:`~fedrec.config.RunConfig.secure_graph`: the item graph's noise std, as this device computes it
    from the run's settings and the version's features (:func:`fedrec.itemgraph.secure_noise_std`); the round must
    name the same, or the node leaves it (its graph's sums would carry less noise than the ledger says). Else 0."""
    if not (cfg.secure_graph and cfg.aggregate_noise):  # user level: the server noises the graph's sum itself
        return 0.0
    own = secure_noise_std(graph_multiplier(cfg), arrays.get(FEATURES))
    sent = float(conf.get("graph-noise-std", 0.0))
    if not math.isclose(sent, own, rel_tol=1e-6):
        raise RuntimeError(f"the secure round names the item graph's noise std {sent:g}, not the {own:g} this run's "
                           "settings give; the node leaves the round")
    return own


def _share_vectors(out: NodeReply, keys: list[str], arrays: dict[str, np.ndarray], cfg: RunConfig,
                   ins: RoundInstruction, devices: int, context: Context, graph_std: float) -> list[list[np.ndarray]]:
    """The node's masked vector: its trained devices' releases and counts (and under
    :attr:`~fedrec.config.RunConfig.secure_graph` their item graph contributions), each clamped
    (:func:`fedrec.privacy.shares.device_signal`), summed, plus every device's noise share (the server's
    ``graph_std`` on the graph's parts; :func:`fedrec.privacy.shares.add_shares`).

    Every device in the reply adds its share, also one that took no event: the server counts it among the
    ``m`` devices whose shares make up the noise. A device alone on its node (deployment) draws its share from its
    own seed and round (stream ``SHARE_STREAM``) mixed with fresh OS entropy, since the server knows the run's seed
    and could otherwise draw the same shares and subtract them; a simulated node that hosts ``k`` devices draws
    their ``k`` shares as one Gaussian of ``k`` times the variance, seeded by the round and its devices: the same
    distribution, ``k`` times fewer draws.
    """
    plan = share_plan(ins.noise_multiplier, cfg.count_share, cfg.dropout_tolerance, devices, graph_std)
    shapes = {k: tuple(arrays[k].shape) for k in keys}
    n_items = shapes[ITEM_TABLES[0]][0]
    secret = secrets.randbits(128) if store_path(context) else 0
    profiles = _profiles(arrays)
    total: list[np.ndarray] | None = None
    for u in out.updates:
        counts = (u.rows or {}).get("ids", np.zeros(0, np.int64)), (u.rows or {}).get("counts", np.zeros(0))
        signal = device_signal(decode_delta(u.arrays), counts, shapes, cfg.lr * cfg.event_clip,
                               _graph_parts(u, n_items, profiles, cfg))
        total = signal if total is None else [np.add(a, b, out=a) for a, b in zip(total, signal, strict=True)]
    if total is None:
        return [[np.zeros(s) for s in shapes.values()] + [np.zeros(n_items)] + _idle_graph(arrays, cfg)]
    ids = [u.device for u in out.updates]
    gen = share_generator(node_share_seed(cfg.seed, ids, ins.round), secret)
    return [add_shares(total, len(shapes), plan, gen, devices=len(ids))]


def _clipped_vectors(out: NodeReply, keys: list[str], arrays: dict[str, np.ndarray], cfg: RunConfig
                     ) -> list[list[np.ndarray]]:
    """User level: each device's clipped delta and, under :attr:`~fedrec.config.RunConfig.secure_graph`, its graph
    parts scaled together to L2 norm at most 1 and sent in the delta's range (times ``clip``; the server divides
    back and noises the sum, as it noises the deltas')."""
    n_items, profiles = arrays[ITEM_TABLES[0]].shape[0], _profiles(arrays)
    vectors = [[decode_delta(u.arrays)[k] for k in keys] +
               [p * (clip_scale(g, 1.0) * cfg.clip) for g in [_graph_parts(u, n_items, profiles, cfg)] for p in g]
               for u in out.updates]
    return vectors or [[np.zeros_like(arrays[k], dtype=np.float32) for k in keys] + _idle_graph(arrays, cfg)]


def _profiles(arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """The version's profiles within the bounds the graph's sensitivity assumes, once for the node's devices."""
    nonnegative = FEATURES in arrays and bool((arrays[FEATURES] >= 0).all())
    return bounded_profiles(arrays.get(PROFILES), nonnegative=nonnegative)


def _graph_parts(u: DeviceUpdate, n_items: int, profiles: np.ndarray | None, cfg: RunConfig) -> list[np.ndarray]:
    """Under :attr:`~fedrec.config.RunConfig.secure_graph`, a device's item graph contribution, dense
    (:func:`fedrec.itemgraph.dense_contribution`, from the profiles of the version it was sent); else none."""
    if not cfg.secure_graph:
        return []
    mine = Pairs.from_arrays(u.pairs, n_items, events=u.report.n_new, window=0) if u.pairs is not None else \
        device_pairs(np.zeros(0), np.zeros(0, bool), 0)
    return dense_contribution(mine, n_items, profiles)


def _idle_graph(arrays: dict[str, np.ndarray], cfg: RunConfig) -> list[np.ndarray]:
    """The graph parts of a node without a device update: zeros of the layout the server expects."""
    if not cfg.secure_graph:
        return []
    n_items = arrays[ITEM_TABLES[0]].shape[0]
    return [np.zeros(n_items)] + ([np.zeros(arrays[PROFILES].shape)] if PROFILES in arrays else [])


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
                                blend=ins.blend, clock=ins.clock, serve=serve, acked=ins.acked_for(d))
        except Exception as e:  # an error reply names the device; the store rolled the round back
            out.failures.append(DeviceFailure(d, f"{type(e).__name__}: {e}", traceback.format_exc()[-2000:]))
            return out
    if res.update is not None:
        out.add(device_reply(d, res.update, wire_mode(cfg.wire, cfg.privacy)))
    if serve:
        out.served = ServeReport([(d, res.served.counts)] if res.served is not None else [])
    return out
