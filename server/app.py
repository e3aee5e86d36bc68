"""Flower ServerApp: samples a cohort of devices, aggregates their deltas, publishes versions.

The round loop is our own (Flower strategies always restart at round 1 and cannot address
the devices inside a simulation shard): each round it samples ``cohort`` devices uniformly
from the population the nodes reported, sends each node the global version and the names of
its sampled devices, validates and aggregates the per-device deltas on the torch device, and
writes one metrics line. Baselines and the summary are written at the end.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.serverapp import Grid, ServerApp

from fedrec.asynchrony import Buffer, Update, discounted
from fedrec.checkpoint import load_checkpoint, save_checkpoint
from fedrec.clients.records import from_records, to_records
from fedrec.config import RunConfig
from fedrec.eval.metrics import PrequentialCounts
from fedrec.messages import (
    INFO,
    ROUND,
    DeviceUpdate,
    MessageError,
    NodeInfo,
    RoundInstruction,
    decode_reply,
    encode_query,
    encode_train,
)
from fedrec.models import model_from_config
from fedrec.privacy.accounting import calibrate_noise, event_accountant
from fedrec.privacy.ledger import Ledger, Release
from fedrec.privacy.report import privacy_report
from fedrec.privacy.user_level import delta_norm, noisy_mean, poisson_cohort
from fedrec.report import RunRecorder
from fedrec.robust import bound_norm, bound_rows, robust_mean
from fedrec.server_aggregate import pick_device, server_aggregate, weighted_sum
from fedrec.server_lr import ServerLR
from fedrec.server_opt import ServerOptimizer
from fedrec.wire import decode_delta


class FederationError(RuntimeError):
    """The federation cannot go on (no nodes, every reply failed); the message says why."""


def event_noise(cfg: RunConfig) -> float:
    """DP-SGD noise multiplier of the devices: given, or calibrated to the per-event ε budget."""
    if cfg.privacy not in ("event", "both"):
        return 0.0
    if cfg.epsilon > 0 and cfg.calibrate:
        steps = cfg.local_steps * (cfg.replay_rounds + 1)
        return calibrate_noise(cfg.epsilon, cfg.sample_rate, steps, cfg.delta, event_accountant(cfg.model, cfg.accountant))
    return cfg.noise_multiplier


def user_noise(cfg: RunConfig, q: float) -> float:
    """Server noise multiplier: given, or calibrated so one budget period's rounds spend the budget."""
    if cfg.privacy not in ("user", "both"):
        return 0.0
    if cfg.epsilon > 0 and cfg.calibrate:
        rounds = min(cfg.budget_period or cfg.rounds, cfg.rounds)
        return calibrate_noise(cfg.epsilon, q, rounds, cfg.delta, cfg.accountant)
    return cfg.noise_multiplier


def exchange(grid: Grid, msgs: list[Message], timeout: float, *, enough: int | None = None,
             late: dict[str, tuple[int, Message]] | None = None, round_: int = 0) -> list[Message]:
    """Push ``msgs`` and pull their replies until all are in or ``timeout`` s pass.

    Without ``late`` a node still silent at the deadline gets an error reply. With ``late`` (a dict
    the round loop keeps across rounds) each message still unanswered at the deadline, or once the
    replies cover ``enough`` devices (``min-reply-share``, when given), goes into ``late`` as
    ``id -> (round_, message)``: its reply is *late* (see :func:`pull_late`), not an error.

    Flower's ``send_and_receive`` over a SuperLink polls every 3 s; a round of small device
    updates takes well under that, so this polls every 0.05 s at first, backing off to 1 s.
    """
    if not msgs:
        return []
    sent = dict(zip(grid.push_messages(msgs), msgs, strict=True))
    ids = set(sent)
    out: list[Message] = []
    covered = 0
    t0, wait = time.time(), 0.05
    while ids:
        got = list(grid.pull_messages(ids))
        out.extend(got)
        for m in got:
            mid = m.metadata.reply_to_message_id
            ids.discard(mid)
            covered += len(sent[mid].content[ROUND].get("devices", [])) if mid in sent and ROUND in sent[mid].content else 0
        if not ids:
            break
        closed = late is not None and enough is not None and covered >= enough
        if closed or time.time() - t0 > timeout:
            for mid in ids:
                if late is not None:
                    late[mid] = (round_, sent[mid])
                else:
                    out.append(Message(Error(code=408, reason=f"node {sent[mid].metadata.dst_node_id} sent no reply "
                                                              f"within {timeout:g} s"), reply_to=sent[mid]))
            break
        time.sleep(wait)
        wait = min(1.0, wait * 1.5)
    return out


def pull_late(grid: Grid, late: dict[str, tuple[int, Message]],
              only: set[str] | None = None) -> list[tuple[int, Message]]:
    """The late replies that have come in (all, or those to the ids in ``only``), each with the
    round it was asked for; they leave ``late``."""
    ids = [i for i in late if only is None or i in only]
    if not ids:
        return []
    return [(late.pop(m.metadata.reply_to_message_id)[0], m) for m in grid.pull_messages(ids)
            if m.metadata.reply_to_message_id in late]


def expire_late(late: dict[str, tuple[int, Message]], round_: int, patience: int) -> list[tuple[int, str]]:
    """Give up on nodes silent for more than ``patience`` rounds after their round closed."""
    gone = []
    for mid, (r, msg) in list(late.items()):
        if round_ - r > patience:
            del late[mid]
            gone.append((msg.metadata.dst_node_id, f"node {msg.metadata.dst_node_id} sent no reply for round {r} "
                                                   f"within {patience} rounds"))
    return gone


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
    """Run ``cfg.rounds`` rounds over the nodes of ``grid``; returns the summary dict."""
    rec = RunRecorder(cfg)
    z_event = event_noise(cfg)
    base_conf = cfg.to_flat()
    home, n_items, durable = _discover(grid, cfg, base_conf)
    population = sorted(home)
    nodes = sorted(set(home.values()))
    user_dp = cfg.privacy in ("user", "both")
    q_user = min(1.0, cfg.cohort / len(population))
    z_user = user_noise(cfg, q_user)
    ledger = Ledger(Path(cfg.out) / "privacy_ledger.jsonl")
    if ledger.records:
        rec.note(f"continuing the privacy ledger {ledger.path} ({len(ledger.records)} earlier releases)")

    dev = pick_device(cfg.device)
    model = model_from_config(cfg, n_items)
    gstate = {k: v.to(dev) for k, v in model.global_state().items()}
    # a run that continues a ledger must draw fresh cohorts and fresh noise, never replay earlier ones
    earlier = len(ledger.records)
    rng = np.random.default_rng([cfg.seed, 7, earlier])
    noise_gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 11, earlier]).generate_state(1)[0]))
    rec.start(population=len(population), n_items=n_items, noise_multiplier=z_event or z_user, device=str(dev))
    last_fresh, stopped, version = 0, "", 0
    lr_ctl = ServerLR(cfg.server_lr, adaptive=cfg.lr_schedule == "adaptive")
    opt = ServerOptimizer(cfg.server_opt)
    ckpt_path = Path(cfg.out) / "checkpoint.npz"
    buffer = Buffer(cfg.async_buffer, cfg.max_staleness) if cfg.async_buffer else None
    first = 1
    if cfg.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        if not ck["run"].get("finished", True):
            _check_resumable(ck, cfg, gstate, ckpt_path)
            if z_event and not durable:
                raise FederationError(
                    f"Cannot resume {ckpt_path} under event-level DP: these nodes keep device state in memory "
                    "(simulation), so each device's record of how often its events were used would restart; "
                    "start anew (resume = false) or deploy devices with stores.")
            gstate = {k: torch.as_tensor(v).to(dev) for k, v in ck["global"].items()}
            opt.load_state_dict(ck["optimizer"], dev)
            lr_ctl.load_state_dict(ck["lr_schedule"])
            rec.load_state_dict(ck["run"]["recorder"])
            last_fresh, stopped, first = int(ck["run"]["last_fresh"]), ck["run"]["stopped"], ck["round"] + 1
            version = int(ck["run"].get("version", ck["round"]))
            if buffer is not None:  # the updates that were waiting are applied as if no restart happened
                buffer.load(ck["run"].get("buffer", []), ck["buffer"])
            rec.note(f"resuming after round {ck['round']} from the checkpoint {ckpt_path}; "
                     f"the privacy ledger holds {earlier} earlier releases")
            # fresh randomness for the rounds still to come: never a replay of earlier cohorts or noise
            rng = np.random.default_rng([cfg.seed, 7, earlier, first])
            noise_gen = torch.Generator().manual_seed(
                int(np.random.SeedSequence([cfg.seed, 11, earlier, first]).generate_state(1)[0]))

    def checkpoint(r: int, finished: bool = False) -> None:
        meta, arrays = buffer.state() if buffer is not None else ([], {})
        save_checkpoint(ckpt_path, round_=r, global_state=gstate, optimizer=opt.state_dict(),
                        lr_schedule=lr_ctl.state_dict(), buffer=arrays,
                        run={"finished": finished, "last_fresh": last_fresh, "stopped": stopped, "version": version,
                             "buffer": meta, "config": _resume_key(cfg), "recorder": rec.state_dict()})

    clock_of = _clock(cfg, rec)
    # stragglers (fedrec.asynchrony): messages unanswered when their round closed, devices whose
    # update is in flight, and the version each round sent (staleness counts versions)
    late_msgs: dict[str, tuple[int, Message]] = {}
    busy: dict[int, int] = {}
    version_of: dict[int, int] = {}
    patience = max(1, cfg.max_staleness)
    r = first - 1
    for r in range(first, cfg.rounds + 1):
        t0 = time.time()
        version_of[r] = version
        arrived, gone = pull_late(grid, late_msgs), expire_late(late_msgs, r, patience)
        busy_nodes = {m.metadata.dst_node_id for _, m in late_msgs.values()}
        period = (r - 1) // cfg.budget_period if cfg.budget_period else 0
        if user_dp and cfg.epsilon > 0:
            eps_next = ledger.user_epsilon(cfg.delta, cfg.accountant, period=period, extra=(z_user, q_user, 1))
            if eps_next > cfg.epsilon * (1 + 1e-9):
                stopped = (f"user-level budget spent: round {r} would bring epsilon to {eps_next:.3f} > "
                           f"budget {cfg.epsilon} (period {period}); no further user-level releases")
                rec.note(stopped)
                if not cfg.budget_period:
                    break
                row = rec.skip(r, reason="budget", wall_s=time.time() - t0)
                checkpoint(r)
                if on_round:
                    on_round(row)
                continue
        # a device whose update is still in flight is not asked again (under user-level DP this only
        # lowers its chance of being in a round below q: the accounting stays an upper bound)
        free = [d for d in population if d not in busy and home[d] not in busy_nodes] if busy or busy_nodes \
            else population
        if user_dp:
            cohort = poisson_cohort(free, q_user, rng)
        else:
            cohort = sorted(int(d) for d in rng.choice(free, size=min(cfg.cohort, len(free)), replace=False))
        host = {k: v.detach().cpu().numpy() for k, v in gstate.items()}
        down = sum(a.nbytes for a in host.values())
        by_node: dict[int, list[int]] = {}
        for d in cohort:
            by_node.setdefault(home[d], []).append(d)
        for d, due in busy.items():  # a node hands in its slow devices' updates in a reply
            if due <= r:
                by_node.setdefault(home[d], [])
        if cfg.serve_eval:  # every node serves its devices the new version, sampled for training or not
            for n in nodes:
                by_node.setdefault(n, [])
        for n in busy_nodes:  # a node still working on an earlier round's message gets no new one
            by_node.pop(n, None)
        if cfg.secure_aggregation:
            got = _secure(grid, by_node, nodes, host, gstate, base_conf, RoundInstruction(r, (), z_event, clock_of(r)),
                          cfg)
        else:
            msgs = [Message(to_records(encode_train(host, base_conf, RoundInstruction(r, tuple(ds), z_event, clock_of(r)))),
                            dst_node_id=n, message_type="train") for n, ds in sorted(by_node.items())]
            earlier = set(late_msgs)  # stragglers of earlier rounds may answer while this round runs
            # (with min-reply-share 1 the round waits for every message, serving-only ones included)
            replies = exchange(grid, msgs, cfg.round_timeout, late=late_msgs, round_=r,
                               enough=math.ceil(cfg.min_reply_share * len(cohort)) if cfg.min_reply_share < 1 else None)
            arrived += pull_late(grid, late_msgs, only=earlier)
            # in a fixed order (round asked, node), whatever order the replies came in: float sums depend
            # on the order, and the same seed must give the same model on any engine
            got = _collect(sorted([(r, m) for m in replies] + arrived, key=lambda x: (x[0], x[1].metadata.src_node_id)),
                           gstate, cfg.clip if user_dp else None, r)
            got.failed += gone
        late_now = sorted({int(d) for rr, m in late_msgs.values() if rr == r for d in m.content[ROUND]["devices"]}
                          | set(got.inflight))
        for u in got.late:
            busy.pop(u.device, None)
            u.base_version = version_of.get(u.base_round, version)
        busy.update(got.inflight)
        if cfg.max_update_norm > 0 and not user_dp:  # norm bounding (under user-level DP the clip is enforced)
            got.bounded = sum(got.map_deltas(lambda d: bound_norm(d, cfg.max_update_norm)))
        if cfg.max_row_norm > 0 and got.presummed is None:  # per-row bounding (fedrec.robust.bound_rows)
            got.rows_bounded = sum(got.map_deltas(lambda d: bound_rows(d, cfg.max_row_norm)))
        if not got.deltas and not got.late and not late_now and got.failed and not user_dp:
            raise FederationError(f"Every device failed in round {r}; first reason: {got.failed[0][1]}")

        # device releases (event level) are recorded as reported; the server's own release is written
        # to the ledger before the version it produces is published
        ledger.append(*[Release(kind="device-dpsgd", unit="event", round=r, noise_multiplier=z_event,
                                sample_rate=cfg.sample_rate, steps=m["steps"], clip=cfg.event_clip,
                                subject=f"device-{d}", max_steps_per_event=m["max-exposure"])
                        for d, m in zip(got.done + [u.device for u in got.late], got.metrics + got.late_metrics,
                                        strict=True) if z_event and m["steps"]])
        # which updates this round applies: synchronous rounds take the on-time ones and drop late
        # ones; the async buffered mode (FedBuff) buffers every update and applies the buffer once full
        deltas, weights, dropped, applied = got.deltas, got.weights, len(got.late), got.done
        fresh_rounds = [r] if got.new_events else []
        staleness: list[int] = []
        if buffer is not None:
            dropped = 0
            ontime = [Update(d, x, w, version, new_events=1 if m_new else 0, base_round=r)
                      for d, x, w, m_new in zip(got.done, got.deltas, got.weights, got.n_new, strict=True)]
            for u in ontime + got.late:
                dropped += 0 if buffer.add(u, version) else 1
            deltas, weights, applied, fresh_rounds = [], [], [], []
            if buffer.ready():
                ups, staleness = buffer.take(version)
                deltas, weights = discounted(ups, staleness)
                applied = [u.device for u in ups]
                fresh_rounds = [u.base_round for u in ups if u.new_events]
        # the static baseline freezes the served model after `freeze_after` rounds (devices still
        # personalise their own vectors); the adaptive schedule reads only the aggregated counts
        served = got.served if cfg.serve_eval else None
        lr = 0.0 if cfg.freeze_after and r > cfg.freeze_after else lr_ctl.step(served.counts if served else got.counts)
        diag: dict = {"update_norm": 0.0}
        if user_dp:
            mean, diag = noisy_mean(gstate, deltas, clip=cfg.clip, noise_multiplier=z_user,
                                    expected_devices=q_user * len(population), generator=noise_gen,
                                    presummed=got.presummed)
            ledger.append(Release(kind="server-gaussian", unit="user", round=r, noise_multiplier=z_user,
                                  sample_rate=q_user, steps=1, clip=cfg.clip, period=period))
            diag["update_norm"] = opt.step(gstate, mean, lr)  # post-processing of the DP release
        elif not deltas:  # nothing to apply (async: the buffer is still filling)
            pass
        elif cfg.aggregator != "mean":
            mean, diag = robust_mean(gstate, deltas, method=cfg.aggregator, trim=cfg.trim)
            diag["update_norm"] = opt.step(gstate, mean, lr)
        elif cfg.server_opt == "fedavg":
            gstate, diag = server_aggregate(gstate, deltas, weights, server_lr=lr, inplace=True)
        else:
            total = float(sum(weights))
            diag = {"weight": total, "update_norm": 0.0}
            if total > 0:
                mean = weighted_sum(gstate, deltas, [w / total for w in weights])
                diag["update_norm"] = opt.step(gstate, mean, lr)
        if buffer is None or deltas:  # a new version is published (async: only when the buffer is applied)
            version += 1
        if fresh_rounds and lr > 0:  # a frozen (static) or skipped update reflects nothing new
            last_fresh = max(last_fresh, *fresh_rounds)
        ev = list(ledger.event_epsilons(cfg.delta, event_accountant(cfg.model, cfg.accountant)).values()) if z_event else []
        row = rec.round(r, done=got.done, counts=served.counts if served else got.counts, failed=got.failed,
                        per_device=served.per_device if served else got.per_device,
                        probes=served.probes if served else got.probes,
                        scored=[d for d, _ in served.per_device] if served else None, extra={
            "cohort_hr@10": _num(got.counts.hr), "cohort_events_scored": got.counts.n,
            "epsilon": _num(max(ev)) if ev else (_num(ledger.user_epsilon(cfg.delta, cfg.accountant)) if user_dp else 0.0),
            "epsilon_median": _num(statistics.median(ev)) if ev else 0.0,
            "epsilon_user": _num(ledger.user_epsilon(cfg.delta, cfg.accountant)) if user_dp else None,
            "epsilon_user_period": _num(ledger.user_epsilon(cfg.delta, cfg.accountant, period=period))
            if user_dp else None,
            "staleness": r + 1 - last_fresh, "new_events": got.new_events, "bytes_up": got.bytes_up,
            "bytes_down": down * len(cohort), "sampled": len(cohort),
            "bytes_down_serving": down * len(served.per_device) if served else 0, "skipped_budget": got.skipped,
            "frac_clipped": (sum(got.clipped) / len(got.clipped)) if user_dp and got.clipped else None,
            "mean_preclip_norm": float(np.mean(got.preclip)) if user_dp and got.preclip else None,
            "noise_std": diag.get("noise_std"), "snr": _num(diag.get("snr")),
            "update_norm": diag.get("update_norm", 0.0), "server_lr": lr, "bounded": got.bounded,
            "rows_bounded": got.rows_bounded,
            "robust_trimmed_share": diag.get("robust_trimmed_share"), "late": len(late_now),
            "late_arrived": len(got.late), "late_dropped": dropped, "applied": len(applied), "version": version,
            "buffered": len(buffer.items) if buffer is not None else None,
            "mean_staleness": float(np.mean(staleness)) if staleness else None,
            "wall_s": round(time.time() - t0, 3)})
        checkpoint(r)
        if on_round:
            on_round(row)
    waiting = (len(buffer.items) if buffer is not None else 0, len(busy) + sum(
        len(m.content[ROUND]["devices"]) for _, m in late_msgs.values()))
    if any(waiting):
        rec.note(f"at the end {waiting[0]} updates were still buffered and {waiting[1]} devices' updates still "
                 "in flight; they were not applied")
    checkpoint(r, finished=True)
    final = {k: v.detach().cpu() for k, v in gstate.items()}
    report = privacy_report(cfg, ledger, z_event=z_event, z_user=z_user, q_user=q_user,
                            population=len(population), stopped=stopped)
    return rec.finish(final, report)


_NOT_RESUME_KEYS = ("rounds", "out", "resume", "progress", "device")


def _resume_key(cfg: RunConfig) -> dict:
    """The config a checkpoint must match to be resumed (the number of rounds may grow)."""
    return {k: v for k, v in cfg.to_flat().items() if k not in _NOT_RESUME_KEYS}


def _check_resumable(ck: dict, cfg: RunConfig, gstate: dict[str, torch.Tensor], path: Path) -> None:
    was = ck["run"].get("config", {})
    diff = [k for k, v in _resume_key(cfg).items() if k in was and was[k] != v]
    if diff:
        k = diff[0]
        raise FederationError(f"The checkpoint {path} belongs to a run with {k} = {was[k]!r}, not {cfg.to_flat()[k]!r}; "
                              "use another --out, or resume = false to start anew there.")
    shapes = {k: tuple(np.shape(v)) for k, v in ck["global"].items()}
    want = {k: tuple(v.shape) for k, v in gstate.items()}
    if shapes != want:
        raise FederationError(f"The checkpoint {path} holds a model of shapes {shapes}, this run builds {want}.")


def _clock(cfg: RunConfig, rec: RunRecorder) -> Callable[[int], float]:
    """The time up to which device stores take in events in round r (deployment; simulation ignores it)."""
    if cfg.clock == "live":
        return lambda r: math.inf
    stream = rec.stream
    if stream is None:
        rec.note("clock = replay, but the server cannot load the data; devices take in every recorded event "
                 "(as with clock = live)")

    def replay(r: int) -> float:
        if stream is None:  # only a deployed device uses the clock; tell it to take everything
            return math.inf
        t = stream.round_end_time(r)
        return t if math.isfinite(t) else -math.inf

    return replay


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _discover(grid: Grid, cfg: RunConfig, base_conf: dict) -> tuple[dict[int, int], int, bool]:
    """Ask every node which devices it hosts: device -> node id, the catalogue size, and whether
    every node keeps its devices' state durably (device stores) rather than in memory."""
    nodes = _wait_for_nodes(grid, cfg.nodes)
    replies = exchange(grid, [Message(to_records(encode_query(base_conf)), dst_node_id=n, message_type="query")
                              for n in nodes], cfg.round_timeout)
    home: dict[int, int] = {}
    n_items = None
    durable = True
    for rep in replies:
        if rep.has_error():
            raise FederationError(f"Node {rep.metadata.src_node_id} failed to report its devices: {rep.error.reason}")
        try:
            info = NodeInfo.from_flat(dict(rep.content[INFO]))
        except (KeyError, MessageError) as e:
            raise FederationError(f"Node {rep.metadata.src_node_id} sent a malformed device report: {e}") from None
        for d in info.devices:
            if d in home:
                raise FederationError(f"Device {d} is hosted by two nodes; each device store must be on one node.")
            home[d] = rep.metadata.src_node_id
        if n_items is not None and info.n_items != n_items:
            raise FederationError("Nodes disagree on the item catalogue size; they must load the same data.")
        n_items = info.n_items
        durable = durable and info.durable
    if not home or n_items is None:
        raise FederationError("No node reported any device.")
    return home, n_items, durable


@dataclass
class _Served:
    counts: PrequentialCounts = field(default_factory=PrequentialCounts)
    per_device: list = field(default_factory=list)
    probes: list = field(default_factory=list)


@dataclass
class _Replies:
    done: list = field(default_factory=list)
    deltas: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    clipped: list = field(default_factory=list)
    preclip: list = field(default_factory=list)
    counts: PrequentialCounts = field(default_factory=PrequentialCounts)
    per_device: list = field(default_factory=list)  #: (device, PrequentialCounts) of each completed device
    probes: list = field(default_factory=list)  #: (items, hits) uptake probes (simulation measurement)
    served: _Served | None = None  #: what every device with events this round was served (serve-eval)
    bytes_up: int = 0
    new_events: int = 0
    skipped: int = 0
    presummed: int | None = None  #: secure aggregation: ``deltas`` is one sum of this many devices' deltas
    bounded: int = 0  #: deltas the server scaled down to ``max-update-norm``
    rows_bounded: int = 0  #: item rows the server scaled down to ``max-row-norm``
    late: list = field(default_factory=list)  #: Update of devices asked in an earlier round (stragglers)
    late_metrics: list = field(default_factory=list)  #: their metrics (for the privacy ledger)
    n_new: list = field(default_factory=list)  #: new events of each on-time device
    inflight: dict = field(default_factory=dict)  #: device -> round its update is due (simulated slow devices)

    def map_deltas(self, fn: Callable[[dict], tuple[dict, int]]) -> list[int]:
        """Replace every delta, on-time and late, by ``fn(delta)[0]``; the list of ``fn(delta)[1]``."""
        out = [fn(d) for d in self.deltas]
        self.deltas = [d for d, _ in out]
        for u in self.late:
            u.delta, n = fn(u.delta)
            out.append((u.delta, n))
        return [int(n) for _, n in out]


def _secure(grid: Grid, by_node: dict[int, list[int]], nodes: list[int], host: dict[str, np.ndarray],
            gstate: dict[str, torch.Tensor], conf: dict, ins: RoundInstruction, cfg: RunConfig) -> _Replies:
    """A round under SecAgg+: serving in plain messages, then the masked sum of the cohort's deltas."""
    from .secagg import secure_round

    serve = [Message(to_records(encode_train(host, conf, ins)), dst_node_id=n, message_type="query.serve")
             for n in nodes] if cfg.serve_eval else []
    r = ins.round
    got = _collect([(r, m) for m in exchange(grid, serve, cfg.round_timeout)], gstate, cfg.clip, r)
    flat = {**conf, **{k: v for k, v in ins.to_flat().items() if k != "devices"}}
    sec = secure_round(grid, {n: ds for n, ds in by_node.items() if ds}, host, flat, r, timeout=cfg.round_timeout)
    got.failed += [("secure aggregation", f) for f in sec.failures]
    if sec.total is not None:
        problem = _validate(sec.total, gstate)
        norm = delta_norm(sec.total)
        if problem is None and norm > len(sec.devices) * cfg.clip * (1 + 1e-3) + 1e-3:
            problem = f"the sum of {len(sec.devices)} clipped deltas has norm {norm:.4g} > {len(sec.devices)} x clip"
        if problem:
            got.failed.append(("secure aggregation", problem))
        else:
            got.deltas, got.presummed = [sec.total], len(sec.devices)
            got.bytes_up = sum(v.nbytes for v in host.values()) * len(by_node)  # masked vectors: about dense size
    for d in sec.devices if got.presummed else []:
        m = sec.metrics[d]
        c = PrequentialCounts(int(m["eval-n"]), m["eval-hits"], m["eval-ndcg"])
        got.done.append(d)
        got.weights.append(1.0)
        got.metrics.append({"steps": int(m["steps"]), "max-exposure": int(m["max-exposure"])})
        got.counts.add(c)
        got.per_device.append((d, c))
        got.new_events += int(m["n-new"])
        got.clipped.append(bool(m["clipped"]))
        got.preclip.append(m["preclip-norm"])
    return got


def _collect(replies: list[tuple[int, Message]], gstate: dict[str, torch.Tensor], clip: float | None,
             round_: int) -> _Replies:
    """Validate and unpack per-device replies, each given with the round it was asked for; a bad
    one is recorded as failed, never fatal. An update computed for an earlier round than ``round_``
    (a straggler's) goes to ``late``, not into this round's lists.

    With ``clip`` (user-level DP) every device weighs the same; else deltas are weighted by events.
    """
    out = _Replies()
    for asked, rep in replies:
        if rep.has_error():
            out.failed.append((rep.metadata.src_node_id, rep.error.reason))
            continue
        try:
            node = decode_reply(from_records(rep.content))
        except MessageError as e:
            out.failed.append((rep.metadata.src_node_id, f"node {rep.metadata.src_node_id}: {e}"))
            continue
        if node.served is not None and asked == round_:
            out.served = out.served or _Served()
            for d, c in node.served.per_device:
                out.served.counts.add(c)
                out.served.per_device.append((d, c))
            out.served.probes.append((node.served.probe_items, node.served.probe_hits))
        out.failed += [(f.device, f.reason) for f in node.failures]
        out.inflight.update({i.device: i.due for i in node.inflight})
        out.skipped += len(node.skips)
        for u in node.updates:
            _take_update(out, u, asked, round_, gstate, clip)
    return out


def _take_update(out: _Replies, u: DeviceUpdate, asked: int, round_: int, gstate: dict[str, torch.Tensor],
                 clip: float | None) -> None:
    d, m = u.device, u.report
    try:
        delta = decode_delta(u.arrays)
    except ValueError as e:
        out.failed.append((d, str(e)))
        return
    problem = _validate(delta, gstate, clip)
    if problem:
        out.failed.append((d, problem))
        return
    out.bytes_up += sum(v.nbytes for v in u.arrays.values())
    weight = 1.0 if clip is not None else float(m.num_examples)
    ledger = {"steps": m.steps, "max-exposure": m.max_exposure}
    base = m.base_round if m.base_round is not None else asked
    if base < round_:
        out.late.append(Update(d, delta, weight, base_version=base, new_events=m.n_new, base_round=base))
        out.late_metrics.append(ledger)
        return
    out.done.append(d)
    out.deltas.append(delta)
    out.weights.append(weight)
    out.metrics.append(ledger)
    out.counts.add(m.counts)
    out.per_device.append((d, m.counts))
    if u.probe is not None:
        out.probes.append(u.probe)
    out.new_events += m.n_new
    out.n_new.append(m.n_new)
    out.clipped.append(m.clipped)
    out.preclip.append(m.preclip_norm)


def _validate(delta: dict, gstate: dict[str, torch.Tensor], clip: float | None = None) -> str | None:
    """Why a decoded delta (dense arrays or sparse ``(ids, rows)``) cannot be aggregated, or None."""
    if set(delta) != set(gstate):
        return f"delta has keys {sorted(delta)}, expected {sorted(gstate)}"
    for k, v in delta.items():
        shape = tuple(gstate[k].shape)
        if isinstance(v, tuple):
            ids, rows = v
            if ids.ndim != 1 or ids.dtype.kind not in "iu" or tuple(rows.shape) != (len(ids), *shape[1:]):
                return f"sparse delta {k} has ids {ids.shape} and rows {rows.shape}, expected rows of shape {shape[1:]}"
            if len(ids) and (ids.min() < 0 or ids.max() >= shape[0] or len(np.unique(ids)) != len(ids)):
                return f"sparse delta {k} has row ids out of range [0, {shape[0]}) or repeated"
            v = rows
        elif tuple(v.shape) != shape:
            return f"delta {k} has shape {tuple(v.shape)}, expected {shape}"
        if not np.all(np.isfinite(v)):
            return f"delta {k} has non-finite values"
    if clip is not None:
        norm = delta_norm(delta)
        if norm > clip * (1 + 1e-4):
            return f"delta norm {norm:.4g} exceeds the clip {clip}"
    return None


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
            run_federation(grid, c, on_round)
        except Exception as e:
            if errors is None:
                raise
            errors.append(e)

    return sapp


app = make_server_app()
