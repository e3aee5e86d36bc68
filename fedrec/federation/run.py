"""The server's run: set up, then plan -> exchange -> collect -> apply, round after round.

:func:`run_federation` drives the round functions of this package over a :class:`Transport`, the only
part that moves messages (the Flower ServerApp in ``fedrec.server.app``, or any other). It owns the
run's randomness (cohorts and server noise, seeded from the config and the ledger's length so a
continued run never replays earlier draws), the checkpoint after every round, and the metrics lines.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import aggregation
from ..config import RunConfig
from ..data.features import ModelFeatures
from ..messages import NodeInfo, RoundInstruction, wire_arrays
from ..models import reads_features
from ..privacy.accounting import calibrate_noise, event_accountant, graph_records, user_parts
from ..privacy.ledger import Ledger
from ..privacy.report import privacy_report
from ..report import RunRecorder
from ..server_aggregate import pick_device
from .apply import apply_round, round_metrics
from .plan import Federation, RoundPlan, budget_spent, plan_round
from .replies import GraphCheck, Limits, Replies, Reply, RowCheck, SecureSum, add_secure_sum, collect
from .state import FederationError, ServerState, checkpoint_to_continue, init_state, mixed_seed


class Transport(Protocol):
    """Moves one run's messages; :mod:`fedrec.messages` defines what they hold."""

    absent: list[str]  #: after :meth:`discover`: the nodes that did not report their devices, and why

    def discover(self, config: dict) -> list[tuple[int, NodeInfo]]:
        """Every node that reports the devices it hosts (a node that fails to goes into ``absent``; raises
        :class:`FederationError` when none reports)."""
        ...

    def start_round(self, r: int, patience: int) -> tuple[list[Reply], list[tuple[int, str]]]:
        """Late replies that came in since the last round, and nodes given up on (silent > patience rounds)."""
        ...

    def busy_nodes(self) -> set[int]:
        """Nodes still working on an earlier round's message."""
        ...

    def exchange(self, r: int, requests: dict[int, RoundInstruction], host: dict[str, np.ndarray], config: dict,
                 enough: int | None) -> list[Reply]:
        """Send round ``r``'s requests with the version ``host`` as messages carry it
        (:func:`~fedrec.messages.wire_arrays`); the replies by the round's close (late ones of earlier rounds too)."""
        ...

    def late_devices(self, r: int) -> set[int]:
        """Devices of round ``r``'s messages still unanswered when it closed."""
        ...

    def in_flight(self) -> int:
        """Devices whose messages are still unanswered."""
        ...

    def secure(self, r: int, requests: dict[int, RoundInstruction], host: dict[str, np.ndarray],
               config: dict) -> tuple[list[Reply], SecureSum]:
        """A SecAgg+ round: the serving replies, and the masked sum of the sampled devices' deltas."""
        ...


def event_noise(cfg: RunConfig) -> float:
    """DP-SGD noise multiplier of the devices: given, or calibrated to the per-event ε budget."""
    if not cfg.event_dp:
        return 0.0
    if cfg.epsilon > 0 and cfg.calibrate:  # with a noisy item graph, what it spends comes first
        steps = cfg.steps * (cfg.replay_rounds + 1)
        return calibrate_noise(cfg.epsilon, cfg.sample_rate, steps, cfg.delta,
                               event_accountant(cfg.model, cfg.accountant), extra=graph_records(cfg))
    return cfg.noise_multiplier


def row_check(cfg: RunConfig, n_items: int) -> RowCheck | None:
    """What each update's row counts are checked against, where the run asks for them (else None)."""
    if cfg.aggregate_noise:
        return RowCheck(n_items, cfg.lr * cfg.event_clip)
    if cfg.select_rows:
        return RowCheck(n_items, math.inf, soft=True)
    return RowCheck(n_items, math.inf) if cfg.row_average and cfg.privacy == "none" else None


def user_noise(cfg: RunConfig, q: float) -> float:
    """Server noise multiplier: given, or calibrated so one budget period's rounds spend the budget."""
    if not cfg.user_dp:
        return 0.0
    if cfg.epsilon > 0 and cfg.calibrate:
        rounds = min(cfg.budget_period or cfg.rounds, cfg.rounds)
        return calibrate_noise(cfg.epsilon, q, rounds, cfg.delta, cfg.accountant)
    return cfg.noise_multiplier


def discover(transport: Transport, cfg: RunConfig, z_event: float) -> Federation:
    """Ask every node which devices it hosts; the federation the run works with. A node's report is its claim: a node
    whose catalogue differs from the one most nodes report sits the run out, and so does a device two nodes claim
    (each goes into ``transport.absent``, which the run notes); only a tie on the catalogue stops the run."""
    reports = transport.discover(cfg.to_flat())
    sizes = Counter(info.n_items for _, info in reports).most_common()
    if len(sizes) > 1 and sizes[0][1] == sizes[1][1]:
        raise FederationError("Nodes disagree on the item catalogue size; they must load the same data.")
    n_items = sizes[0][0] if sizes else None
    claims: dict[int, list[int]] = {}
    durable, stores = True, False
    for node, info in reports:
        if info.n_items != n_items:
            transport.absent.append(f"node {node} reported {info.n_items} items, where most nodes report {n_items}")
            continue
        for d in dict.fromkeys(info.devices):  # in its order, once each
            claims.setdefault(d, []).append(node)
        durable, stores = durable and info.durable, stores or info.durable
    home = {d: ns[0] for d, ns in claims.items() if len(ns) == 1}
    twice = sorted(d for d, ns in claims.items() if len(ns) > 1)
    if twice:
        transport.absent.append(f"devices {twice[:5]}{' ...' if len(twice) > 5 else ''} ({len(twice)}), each reported "
                                "by two nodes (each device store must be on one node)")
    if not home or n_items is None:
        raise FederationError("No node reported any device.")
    q_user = min(1.0, cfg.cohort_for(len(home)) / len(home))
    return Federation(cfg, home, n_items, durable, z_event, user_noise(cfg, q_user), q_user, stores=stores)


def run_federation(transport: Transport, cfg: RunConfig, on_round: Callable[[dict], None] | None = None) -> dict:
    """Run ``cfg.rounds`` rounds over the nodes ``transport`` reaches; returns the summary dict."""
    run = _Run.start(transport, cfg)
    last = run.state.round if run.rebuild else cfg.rounds  # a finished run only rebuilds its outputs
    try:
        for r in range(run.state.round + 1, last + 1):
            row = run.round(r)
            if row is None:
                break
            if on_round:
                on_round(row)
        return run.finish()
    except BaseException:
        run.rec.abort()
        raise


@dataclass
class _Run:
    """One run's moving parts; :meth:`round` is one round, top to bottom."""

    transport: Transport
    fed: Federation
    state: ServerState
    ledger: Ledger
    rec: RunRecorder
    rng: np.random.Generator
    aggregator: aggregation.Aggregator
    clock: Callable[[int], float]
    busy: dict[int, int] = field(default_factory=dict)  #: device -> round its held update is due
    version_of: dict[int, int] = field(default_factory=dict)  #: round -> the version it sent
    rebuild: bool = False  #: a finished run whose outputs are missing: rebuild them, train nothing

    @classmethod
    def start(cls, transport: Transport, cfg: RunConfig) -> _Run:
        """Set the run up. Nothing in ``out`` changes until every check (ledger, checkpoint, calibration) has
        passed: a run that fails here leaves an earlier run's files as they were."""
        stream, why = _load_stream(cfg)
        rec = RunRecorder(cfg, stream=stream, no_stream=why)
        fed = discover(transport, cfg, event_noise(cfg))
        for why in transport.absent:
            rec.note(f"not in this run: {why}")
        ledger = Ledger(Path(cfg.out) / "privacy_ledger.jsonl")
        rec.features = _features(cfg, stream, fed.n_items, rec)
        state = init_state(cfg, fed.n_items, rec.features.normalised() if rec.features is not None else None,
                           ModelFeatures.of(rec.features, stream.round_at)
                           if rec.features is not None and reads_features(cfg.model) else None, z_user=fed.z_user)
        rec.start(population=len(fed.population), n_items=fed.n_items, noise_multiplier=fed.z_event or fed.z_user,
                  device=str(pick_device(cfg.device)))
        first, rebuild = _resume(fed, state, rec, ledger)
        if first == 1:
            _fresh_start(fed, state, ledger)
        if ledger.records:  # after every check that can refuse the run: a refusal is its one sentence
            rec.note(f"continuing the privacy ledger {ledger.path} ({len(ledger.records)} earlier releases)")
        # a run that continues a ledger must draw fresh cohorts and fresh noise, never replay earlier ones; a
        # deployed server mixes in its secret (kept in its checkpoint), so no node can redraw the noise
        seeds = [cfg.seed, len(ledger.records)] + ([first] if first > 1 else []) + \
            ([state.secret] if state.secret else [])
        noise_gen = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seeds[0], 11, *seeds[1:]]).generate_state(1)[0]))
        agg = aggregation.from_config(cfg, noise_multiplier=fed.z_event if cfg.aggregate_noise else
                                      user_parts(cfg, fed.z_user)[0],
                                      expected_devices=fed.q_user * len(fed.home),
                                      generator=noise_gen)
        run = cls(transport, fed, state, ledger, rec, np.random.default_rng([seeds[0], 7, *seeds[1:]]), agg,
                  _clock(cfg, stream, rec), rebuild=rebuild)
        kept = _keep_earlier(Path(cfg.out)) if first == 1 else None
        if kept is not None:
            rec.note(f"the earlier run's outputs in {cfg.out} were moved to {kept} (its ledger goes on here)")
        rec.begin()
        return run

    def round(self, r: int) -> dict | None:
        """Round ``r``: its metrics line, or None when the run stops here (user-level budget spent)."""
        cfg, t0 = self.fed.cfg, time.time()
        self.version_of[r] = self.state.version
        arrived, gone = self.transport.start_round(r, max(1, cfg.max_staleness))
        stop = budget_spent(self.fed, self.ledger, r)
        if stop:
            return self._skip(r, stop, t0)
        busy_nodes = self.transport.busy_nodes()
        # a held update that never arrives must not keep its device out of every later cohort
        grace = max(1, cfg.max_staleness)
        self.busy = {d: due for d, due in self.busy.items() if due + grace >= r}
        plan = plan_round(self.fed, r, self.rng, busy=self.busy, busy_nodes=busy_nodes,
                          due=[d for d, due in self.busy.items() if due <= r])
        host = self.state.host_state(r)
        sent = wire_arrays(host)  # what a train or serve message carries: packed once, for every node
        got = self._exchange(plan, host, sent, arrived)
        got.failed += gone
        late_now = sorted(self.transport.late_devices(r) | set(got.inflight))
        for u in got.late:
            self.busy.pop(u.device, None)
            u.base_version = self.version_of.get(u.base_round, self.state.version)
        self.busy.update(got.inflight)
        self.state, step = apply_round(self.state, self.fed, got, self.ledger, self.aggregator, plan,
                                       late_now=len(late_now))
        serve = sum(a.nbytes for a in sent.values())
        # SecAgg+ sends the train rounds' version whole, as Flower parameters (server/secagg.py)
        down = sum(a.nbytes for a in host.values()) if self.fed.cfg.secure_aggregation else serve
        extra = round_metrics(self.fed, self.state, got, step, self.ledger, plan, down=down, down_serving=serve,
                              late_now=len(late_now))
        row = self._record(r, got, {**extra, "wall_s": round(time.time() - t0, 3)})
        self._checkpoint()
        return row

    def _exchange(self, plan: RoundPlan, host: dict[str, np.ndarray], sent: dict[str, np.ndarray],
                  arrived: list[Reply]) -> Replies:
        """The round's replies: ``host`` the version whole (SecAgg+ sends it so), ``sent`` as messages carry it
        (:func:`~fedrec.messages.wire_arrays`)."""
        cfg, r = self.fed.cfg, plan.round
        requests = {n: RoundInstruction(r, tuple(ds), self.fed.z_event, self.clock(r), self.rec.leader(),
                                        tuple(self.state.acked.get(d, -1) for d in ds))
                    for n, ds in plan.by_node.items()}
        clip = cfg.clip if cfg.user_dp else None
        graph = GraphCheck(self.fed.n_items, cfg.pair_window, on_time_only=cfg.user_graph) if cfg.graph_sent else None
        rows = row_check(cfg, self.fed.n_items)
        if cfg.secure_aggregation:
            shapes, extra = self._secure_graph()
            served, sec = self.transport.secure(r, requests, host, {**cfg.to_flat(), **extra})
            limits = self._limits()
            got = collect(served, self.state.global_state, clip, r, self.fed.home, graph, rows, limits)
            add_secure_sum(got, sec, self.state.global_state, cfg.clip, len(plan.by_node), shapes, limits)
            return got
        enough = math.ceil(cfg.min_reply_share * len(plan.cohort)) if cfg.min_reply_share < 1 else None
        replies = self.transport.exchange(r, requests, sent, cfg.to_flat(), enough)
        # in a fixed order (round asked, node), whatever order the replies came in: float sums depend
        # on the order, and the same seed must give the same model on any engine
        return collect(sorted(replies + arrived, key=lambda x: (x.asked, x.node)), self.state.global_state, clip, r,
                       self.fed.home, graph, rows, self._limits())

    def _limits(self) -> Limits:
        """What a node may claim this round: the config's limits, the catalogue, the devices in flight, and the
        rounds that sent a version (:class:`~fedrec.federation.replies.Limits`)."""
        return Limits.of(self.fed.cfg, self.fed.n_items, busy=list(self.busy), versions=list(self.version_of),
                         z_event=self.fed.z_event, dims=sum(v.numel() for v in self.state.global_state.values()))

    def _secure_graph(self) -> tuple[list[tuple[int, ...]], dict]:
        """Under :attr:`~fedrec.config.RunConfig.secure_graph`: the shapes of the item graph's sums in the masked
        vector (its counts, and its affinities where it has features: every version then carries the profiles the
        devices read them from) and the noise std the devices' shares make up (sent with the round's config); else
        nothing."""
        if not self.fed.cfg.secure_graph or self.state.graph is None:
            return [], {}
        # the devices' shares make up the graph's noise (event noise at the aggregate; user level: the server adds it)
        extra = {"graph-noise-std": float(self.state.graph.noise_std)} if self.fed.cfg.aggregate_noise else {}
        return self.state.graph.sum_shapes, extra

    def _record(self, r: int, got: Replies, extra: dict) -> dict:
        served = got.served if self.fed.cfg.serve_eval else None
        return self.rec.round(r, done=got.done, counts=served.counts if served else got.counts, failed=got.failed,
                              per_device=served.per_device if served else got.per_device,
                              probes=served.probes if served else got.probes,
                              scored=[d for d, _ in served.per_device] if served else None, extra=extra)

    def _skip(self, r: int, reason: str, t0: float) -> dict | None:
        """A round whose budget period is spent: the run stops, or (with budget periods) skips the round."""
        self.state.stopped = reason
        self.rec.note(reason)
        if not self.fed.cfg.budget_period:
            return None
        row = self.rec.skip(r, reason="budget", wall_s=time.time() - t0)
        self.state.round = r
        self._checkpoint()
        return row

    def _checkpoint(self, finished: bool = False) -> None:
        """The state after a round (with what it holds of the ledger): written after the round's releases."""
        self.state.run_info = self.rec.state_dict()
        self.state.save(Path(self.fed.cfg.out) / "checkpoint.npz", self.fed.cfg, finished=finished,
                        ledger=self.ledger.mark())

    def finish(self) -> dict:
        """Write every output, and only then mark the run finished: a crash before that resumes after the last
        round, trains nothing and writes the outputs again, so no release is ever spent twice."""
        waiting = (len(self.state.buffer.items) if self.state.buffer is not None else 0,
                   len(self.busy) + self.transport.in_flight())
        if any(waiting):
            self.rec.note(f"at the end {waiting[0]} updates were still buffered and {waiting[1]} devices' updates "
                          "still in flight; they were not applied")
        final = {k: v.detach().cpu() for k, v in self.state.global_state.items()}
        fed = self.fed
        report = privacy_report(fed.cfg, self.ledger, z_event=fed.z_event, z_user=fed.z_user, q_user=fed.q_user,
                                population=len(fed.population), stopped=self.state.stopped,
                                graph_features=self.state.graph.features if self.state.graph is not None else None)
        summary = self.rec.finish(final, report)
        if self.state.graph is not None:  # the affinities of a batch the run ended in are never released
            self.state.graph.drop_pending()
        self._checkpoint(finished=True)
        return summary


def _fresh_start(fed: Federation, state: ServerState, ledger: Ledger) -> None:
    """A run that starts at round 1: a new server secret where the server must keep its noise to itself
    (deployment: the run's seed travels to every node), and no new event-level run in simulation on a ledger
    that already composes event-level releases (simulated devices restart their exposure counts)."""
    if fed.z_event and not fed.durable and any(r.unit == "event" for r in ledger.records):
        raise FederationError(
            f"Cannot start a new event-level run on the ledger {ledger.path}: it holds an earlier run's event-level "
            "releases, and simulated devices, which keep their state in memory, would count their events' use "
            "from zero again; use a new --out.")
    spent = budget_spent(fed, ledger, 1) if not fed.cfg.budget_period else ""
    if spent:  # a run that could release nothing would only replace the earlier outputs with empty ones
        raise FederationError(f"Nothing to run: {spent.replace('; no further user-level releases', '')}, with the "
                              f"{len(ledger.records)} earlier releases of {ledger.path}; raise epsilon or use a new --out.")
    state.secret = secrets.randbits(63) if fed.stores else 0
    if state.graph is not None:  # a run that continues a ledger draws fresh graph noise, as it does model noise
        state.graph.seed = mixed_seed(mixed_seed(fed.cfg.seed, len(ledger.records)), state.secret)


def _resume(fed: Federation, state: ServerState, rec: RunRecorder, ledger: Ledger) -> tuple[int, bool]:
    """Continue from the checkpoint in ``out``, if any (:func:`.state.checkpoint_to_continue`): the first
    round to run, and whether the run had finished (its outputs are only rebuilt)."""
    path = Path(fed.cfg.out) / "checkpoint.npz"
    ck = checkpoint_to_continue(fed.cfg, state, path, ledger)
    if ck is None:
        return 1, False
    finished = bool(ck["run"].get("finished"))
    if fed.z_event and not fed.durable and not finished and ck["round"] < fed.cfg.rounds:
        raise FederationError(
            f"Cannot resume {path} under event-level DP: these nodes keep device state in memory "
            "(simulation), so each device's record of how often its events were used would restart; "
            "start anew (resume = false) or deploy devices with stores.")
    try:
        state.load_state_dict(ck)
    except ValueError as e:
        raise FederationError(f"Cannot resume {path}: {e}.") from None
    rec.load_state_dict(state.run_info)
    if finished:
        rec.note(f"the run of the checkpoint {path} finished, but some of its outputs are missing; they are "
                 "written again from it, and nothing is trained")
    else:
        rec.note(f"resuming after round {state.round} from the checkpoint {path}; "
                 f"the privacy ledger holds {len(ledger.records)} earlier releases")
    return state.round + 1, finished


#: what a run writes into its folder besides the ledger, which a new run in that folder continues
OUTPUTS = ("metrics.jsonl", "summary.json", "global_model.npz", "hr_epsilon.png", "checkpoint.npz")


def _keep_earlier(out: Path) -> Path | None:
    """A new run in a folder that holds an earlier run's outputs: those move to ``out/earlier/run-K`` (K counting up)
    before anything is written, so no output is ever replaced; the folder they went to, or None (there were none)."""
    found = [out / f for f in OUTPUTS if (out / f).exists()]
    if not found:
        return None
    k = 1
    while (out / "earlier" / f"run-{k}").exists():
        k += 1
    dest = out / "earlier" / f"run-{k}"
    dest.mkdir(parents=True)
    for f in found:
        f.rename(dest / f.name)
    return dest


def _load_stream(cfg: RunConfig) -> tuple[Any, str]:
    """The run's events, for baselines and the replay clock; the server may not see them (deployment)."""
    try:
        from ..data.source import load_stream

        return load_stream(cfg), ""
    except Exception as e:  # say so in the summary, never fail the run
        return None, f"{type(e).__name__}: {e}"


def _features(cfg: RunConfig, stream: Any, n_items: int, rec: RunRecorder) -> Any:
    """The run's public item features (``item-features``), or None; one the server cannot read is a note, not a
    failure (``fedrec simulate`` and ``deploy local`` check the file before any process starts)."""
    if stream is None or cfg.item_features == "none":
        return None
    if not cfg.graph and not reads_features(cfg.model):  # they act in the graph's session scores and in deepfm
        if cfg.item_features != "auto":
            rec.note(f"item features {cfg.item_features} not used: they act in the item graph's session scores "
                     f"and in model = deepfm, and this run has no item graph and model = {cfg.model} (docs/online.md)")
        return None
    from ..data.events import DataError
    from ..data.source import load_features

    try:
        features = load_features(cfg, stream.log)
    except DataError as e:
        rec.note(f"item features not used: {e}")
        return None
    if features is not None and features.matrix.shape[0] != n_items:
        rec.note(f"item features not used: {features.matrix.shape[0]} items in them, {n_items} in the federation")
        return None
    return features


def _clock(cfg: RunConfig, stream: Any, rec: RunRecorder) -> Callable[[int], float]:
    """The time up to which device stores take in events in round r (deployment; simulation ignores it)."""
    if cfg.clock == "live":
        return lambda r: math.inf
    if stream is None:
        rec.note("clock = replay, but the server cannot load the data; devices take in every recorded event "
                 "(as with clock = live)")

    def replay(r: int) -> float:
        if stream is None:  # only a deployed device uses the clock; tell it to take everything
            return math.inf
        t = stream.round_end_time(r)
        return t if math.isfinite(t) else -math.inf

    return replay
