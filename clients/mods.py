"""Flower client mods ``(msg, context, call_next)`` for simulation-only instruments.

A deployed SuperNode hosts one real device and runs the plain handlers of :mod:`fedrec.clients.app`;
these mods wrap them in simulation only (they pass every message of a node with a device store
straight through), so what they simulate never enters the device's own round.

* :func:`slow_devices`: seeded slow devices (:mod:`fedrec.asynchrony`). A slow device's finished
  update is held in the node's state and handed in, tagged with its round, in a later round; the
  server is told it is in flight meanwhile, and a held device asked to train again fails as busy.
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Callable
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord

from fedrec.asynchrony import lateness, slow_set
from fedrec.messages import (
    DeviceFailure,
    DeviceUpdate,
    InFlight,
    NodeReply,
    UpdateReport,
    decode_reply,
    decode_train,
    encode_reply,
    encode_train,
)

from .records import from_records, to_records
from .simulation import node_stream

CallNext = Callable[[Message, Context], Message]


def slow_devices(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Simulate seeded slow devices around a simulated node's ``train`` handler (``slow-devices`` > 0)."""
    from .app import run_config, store_path  # the handlers' module imports this one

    if msg.metadata.message_type != "train" or "fitins.parameters" in msg.content or store_path(context):
        return call_next(msg, context)
    req = decode_train(from_records(msg.content))
    cfg = run_config(req.config)
    if not cfg.slow_devices:
        return call_next(msg, context)
    ins = req.instruction
    handed = _hand_in(context, ins.round)
    busy = [d for d in ins.devices if f"held-metrics-{d}" in context.state]
    if busy:
        rest = dataclasses.replace(ins, devices=tuple(d for d in ins.devices if d not in busy))
        msg.content = to_records(encode_train(req.global_state, req.config, rest))
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    out = decode_reply(from_records(reply.content))
    slow = slow_set(node_stream(cfg).n_devices, cfg.slow_devices, cfg.seed)
    late = NodeReply(updates=handed, skips=out.skips, failures=out.failures + [_busy(context, d) for d in busy],
                     served=out.served)
    for u in out.updates:
        if u.device in slow:  # a straggler: its finished update comes in a later round
            _hold(context, late, u, ins.round, ins.round + lateness(u.device, ins.round, cfg.slow_rounds, cfg.seed))
        else:
            late.updates.append(u)
    order = {d: j for j, d in enumerate(ins.devices)}
    late.failures.sort(key=lambda f: order.get(f.device, len(order)))  # as the devices were asked
    reply.content = to_records(encode_reply(late))
    return reply


def _busy(context: Context, d: int) -> DeviceFailure:
    """The failure of a device asked to train while its previous update is still held."""
    base = int(_held(context, f"held-metrics-{d}")["base-round"])
    try:
        raise ValueError(f"device {d} is still busy with its update of round {base}")
    except ValueError as e:
        return DeviceFailure(d, f"{type(e).__name__}: {e}", traceback.format_exc()[-2000:])


def _hold(context: Context, out: NodeReply, u: DeviceUpdate, round_: int, due: int) -> None:
    """Keep a slow device's finished update in the node's state until round ``due`` and tell the server it
    is in flight (the server does not sample it again meanwhile)."""
    context.state[f"held-delta-{u.device}"] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                           for k, v in u.arrays.items()})
    if u.pairs is not None:  # its item pairs travel with it (the item graph's sums must not lose its events)
        context.state[f"held-pairs-{u.device}"] = ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                               for k, v in u.pairs.items()})
    context.state[f"held-metrics-{u.device}"] = MetricRecord({**u.report.to_flat(), "base-round": round_, "due": due})
    out.inflight.append(InFlight(u.device, round_, due))


def _hand_in(context: Context, round_: int) -> list[DeviceUpdate]:
    """The held updates of slow devices that are due by this round (tagged with their round), released."""
    out = []
    for key in [k for k in context.state.keys() if k.startswith("held-metrics-")]:
        m = _held(context, key)
        if int(m["due"]) > round_:
            continue
        d = key[len("held-metrics-"):]
        arrays = {k: v.numpy() for k, v in cast(ArrayRecord, context.state[f"held-delta-{d}"]).items()}
        pairs = None
        if f"held-pairs-{d}" in context.state:
            pairs = {k: v.numpy() for k, v in cast(ArrayRecord, context.state[f"held-pairs-{d}"]).items()}
            del context.state[f"held-pairs-{d}"]
        out.append(DeviceUpdate(int(d), arrays, UpdateReport.from_flat(m), pairs=pairs))
        del context.state[key]
        del context.state[f"held-delta-{d}"]
    return out


def _held(context: Context, key: str) -> dict[str, Any]:
    """A held update's metrics record, as a plain mapping."""
    return dict(cast(MetricRecord, context.state[key]))
