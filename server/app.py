"""Flower ServerApp: a thin adapter that moves the messages of :mod:`fedrec.federation`'s rounds.

The round itself (plan, validate, bound, ledger, aggregate, optimizer, publish) is written once in
:mod:`fedrec.federation` as plain functions over one server state. This module only carries its
requests and replies over a Flower :class:`~flwr.serverapp.Grid` (Simulation Engine, Deployment
Engine, or the in-process :class:`~fedrec.server.local_grid.LocalGrid`): it pushes messages, waits
for replies until the round closes (every reply, ``min-reply-share`` of the sampled devices, or the
deadline), keeps track of replies that come late, and runs SecAgg+ rounds (:mod:`.secagg`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.app import Context, Error, Message
from flwr.serverapp import Grid, ServerApp

from fedrec.clients.records import from_records, to_records, values_of
from fedrec.config import RunConfig
from fedrec.federation import run as federation
from fedrec.federation.replies import Reply, SecureSum
from fedrec.federation.state import FederationError
from fedrec.messages import (
    INFO,
    ROUND,
    MessageError,
    NodeInfo,
    RoundInstruction,
    decode_reply,
    encode_query,
    encode_train,
)

__all__ = ["FederationError", "FlowerTransport", "exchange", "make_server_app", "run_federation"]

#: the longest wait, in seconds, between the server's asks for replies (one small request to the SuperLink; it
#: bounds how long a finished round waits to be noticed)
MAX_POLL = 0.1


def exchange(grid: Grid, msgs: list[Message], timeout: float, *, enough: int | None = None,
             late: dict[str, tuple[int, Message]] | None = None, round_: int = 0) -> list[Message]:
    """Push ``msgs`` and pull their replies until all are in or ``timeout`` s pass.

    Without ``late`` a node still silent at the deadline gets an error reply. With ``late`` (a dict
    kept across rounds) each message still unanswered at the deadline, or once the replies cover
    ``enough`` devices (``min-reply-share``, when given), goes into ``late`` as ``id -> (round_, message)``:
    its reply is *late*, not an error.

    Flower's ``send_and_receive`` over a SuperLink polls every 3 s; a round of small device updates
    takes well under that, so this polls every 0.05 s at first, backing off to ``MAX_POLL``.
    """
    if not msgs:
        return []
    sent = dict(zip(grid.push_messages(msgs), msgs, strict=True))
    ids, out, covered = set(sent), [], 0
    t0, wait = time.time(), 0.05
    while ids:
        got = list(grid.pull_messages(ids))
        out.extend(got)
        for m in got:
            ids.discard(m.metadata.reply_to_message_id)
            covered += len(_devices(sent.get(m.metadata.reply_to_message_id)))
        closed = late is not None and enough is not None and covered >= enough
        if ids and (closed or time.time() - t0 > timeout):
            for mid in ids:
                if late is not None:
                    late[mid] = (round_, sent[mid])
                else:
                    out.append(Message(Error(code=408, reason=f"node {sent[mid].metadata.dst_node_id} sent no reply "
                                                              f"within {timeout:g} s"), reply_to=sent[mid]))
            break
        if ids:
            time.sleep(wait)
            wait = min(MAX_POLL, wait * 1.5)
    return out


def _devices(msg: Message | None) -> list[int]:
    """The devices a request asked to train."""
    flat = values_of(msg.content, ROUND) if msg is not None else None
    return [] if flat is None else list(RoundInstruction.from_flat(flat).devices)


def _reply(asked: int, m: Message, devices: list[int] | tuple[int, ...]) -> Reply:
    """A Flower reply as the core sees it (with the devices its request asked for): decoded, or the reason
    it failed (a bad one fails alone)."""
    node = m.metadata.src_node_id
    if m.has_error():
        return Reply(asked, node, None, str(m.error.reason))
    try:
        return Reply(asked, node, decode_reply(from_records(m.content)), devices=frozenset(devices))
    except MessageError as e:
        return Reply(asked, node, None, f"node {node}: {e}")
    except Exception as e:  # whatever else hostile content raises in decoding: that reply fails, not the round
        return Reply(asked, node, None, f"node {node}: its reply cannot be decoded ({type(e).__name__}: {str(e)[:200]})")


class FlowerTransport:
    """:class:`fedrec.federation.run.Transport` over a Flower grid."""

    def __init__(self, grid: Grid, cfg: RunConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.late: dict[str, tuple[int, Message]] = {}  #: message id -> (round asked, message), unanswered
        self.absent: list[str] = []  #: nodes that did not report their devices at the start, and why

    def discover(self, config: dict) -> list[tuple[int, NodeInfo]]:
        nodes = _wait_for_nodes(self.grid, self.cfg.nodes)
        replies = exchange(self.grid, [Message(to_records(encode_query(config)), dst_node_id=n, message_type="query")
                                       for n in nodes], self.cfg.round_timeout)
        out, failed = [], []
        for rep in replies:  # a node that is down or answers badly fails its own report, not the run
            node = rep.metadata.src_node_id
            if rep.has_error():
                failed.append(f"node {node}: {((rep.error.reason or '').strip().splitlines() or ['no reason'])[0]}")
                continue
            try:
                info = values_of(rep.content, INFO)
                if info is None:
                    raise MessageError(f"the reply holds no record {INFO!r}")
                out.append((node, NodeInfo.from_flat(info)))
            except (KeyError, MessageError) as e:
                failed.append(f"node {node}: a malformed device report ({e})")
        if not out:
            raise FederationError("No node reported its devices" + (f" ({'; '.join(failed[:3])})" if failed else "")
                                  + ".")
        self.absent = failed  # their devices sit this run out (a resubmitted run asks again)
        return out

    def start_round(self, r: int, patience: int) -> tuple[list[Reply], list[tuple[int, str]]]:
        arrived = self._pull_late()
        gone = []
        for mid, (asked, msg) in list(self.late.items()):
            if r - asked > patience:
                del self.late[mid]
                node = msg.metadata.dst_node_id
                gone.append((node, f"node {node} sent no reply for round {asked} within {patience} rounds"))
        return arrived, gone

    def busy_nodes(self) -> set[int]:
        return {m.metadata.dst_node_id for _, m in self.late.values()}

    def exchange(self, r: int, requests: dict[int, RoundInstruction], host: dict[str, np.ndarray], config: dict,
                 enough: int | None) -> list[Reply]:
        msgs = [Message(to_records(encode_train(host, config, ins)), dst_node_id=n, message_type="train")
                for n, ins in requests.items()]
        earlier = set(self.late)  # stragglers of earlier rounds may answer while this round runs
        # (with min-reply-share 1 the round waits for every message, serving-only ones included)
        replies = exchange(self.grid, msgs, self.cfg.round_timeout, late=self.late, round_=r, enough=enough)
        asked = {n: ins.devices for n, ins in requests.items()}
        return [_reply(r, m, asked.get(m.metadata.src_node_id, ())) for m in replies] + self._pull_late(only=earlier)

    def late_devices(self, r: int) -> set[int]:
        return {d for asked, m in self.late.values() if asked == r for d in _devices(m)}

    def in_flight(self) -> int:
        return sum(len(_devices(m)) for _, m in self.late.values())

    def secure(self, r: int, requests: dict[int, RoundInstruction], host: dict[str, np.ndarray],
               config: dict) -> tuple[list[Reply], SecureSum]:
        from .secagg import secure_round

        ins = next(iter(requests.values()), RoundInstruction(r))
        serve = [Message(to_records(encode_train(host, config, RoundInstruction(r, (), ins.noise_multiplier,
                                                                                 ins.clock))),
                         dst_node_id=n, message_type="query.serve") for n in sorted(requests)] \
            if self.cfg.serve_eval else []
        served = [_reply(r, m, ()) for m in exchange(self.grid, serve, self.cfg.round_timeout)]
        flat = {**config, **{k: v for k, v in ins.to_flat().items() if k not in ("devices", "acked")}}
        sec = secure_round(self.grid, {n: list(i.devices) for n, i in requests.items() if i.devices}, host, flat, r,
                           timeout=self.cfg.round_timeout, acked={n: i.acked for n, i in requests.items()})
        return served, sec

    def _pull_late(self, only: set[str] | None = None) -> list[Reply]:
        """The late replies that have come in (all, or those to the ids in ``only``); they leave ``late``."""
        ids = [i for i in self.late if only is None or i in only]
        if not ids:
            return []
        out = []
        for m in self.grid.pull_messages(ids):
            if m.metadata.reply_to_message_id in self.late:
                asked, sent = self.late.pop(m.metadata.reply_to_message_id)
                out.append(_reply(asked, m, _devices(sent)))
        return out


def _wait_for_nodes(grid: Grid, want: int, timeout: float = 120.0) -> list[int]:
    t0 = time.time()
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or (nodes and time.time() - t0 > 10):
            return nodes
        if time.time() - t0 > timeout:
            raise FederationError(f"No device node connected within {timeout:.0f} s; is a SuperNode running?")
        time.sleep(0.5)


def run_federation(grid: Grid, cfg: RunConfig, on_round: Callable[[dict], None] | None = None) -> dict:
    """Run ``cfg.rounds`` rounds over the nodes of ``grid`` (:func:`fedrec.federation.run.run_federation`)."""
    return federation.run_federation(FlowerTransport(grid, cfg), cfg, on_round)


def _warm_up(cfg: RunConfig) -> None:
    """A deployed ServerApp's process, before round 1: Flower's object pulls retry quickly
    (:mod:`fedrec.deploy.quick`), and under DP the accountant (Opacus, imported on first use: seconds) is
    imported now, so that round 1 takes what the others take."""
    from fedrec.deploy.quick import quick_pulls  # noqa: PLC0415
    from fedrec.registry import ACCOUNTANTS  # noqa: PLC0415

    quick_pulls()
    if cfg.privacy != "none":
        ACCOUNTANTS.get(cfg.accountant)


def make_server_app(cfg: RunConfig | None = None, on_round: Callable[[dict], None] | None = None,
                    errors: list[BaseException] | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (``fedrec simulate``) or reading Flower's run config (``flwr run``).

    With ``errors``, an exception of the run is appended there instead of raised into Flower's
    thread (the caller reports it); without, it propagates (Flower marks the run failed).
    """
    sapp = ServerApp()

    @sapp.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            c = cfg or RunConfig.from_mapping(dict(context.run_config), where="[tool.flwr.app.config]")
            if cfg is None:  # deployed (flwr run): a fresh process, the replies' objects come over the SuperLink
                _warm_up(c)
            run_federation(grid, c, on_round)
        except Exception as e:
            if errors is None:
                raise
            errors.append(e)

    return sapp


app = make_server_app()
