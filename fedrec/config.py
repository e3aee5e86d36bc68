"""One source of configuration: a frozen, self-validating dataclass.

Keys are kebab-case everywhere (TOML files, ``[tool.flwr.app.config]``, CLI flags); in Python
they are the snake_case field names. Each field declares, through :func:`key`, its default, its
help sentence, its simple bounds and its choices (:class:`KeySpec`); the per-key checks, the CLI
flags (:mod:`fedrec.cli`) and the pyproject table (``python -m fedrec.config --pyproject``) are
generated from that. The rules that tie keys together are written out in
:meth:`RunConfig._check_rules`. Every invalid value fails with :class:`ConfigError`, one sentence
naming the key (and the file when it came from one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from .ray_cluster import is_ray_address
from .registry import (
    ACCOUNTANTS,
    AGGREGATORS,
    BASELINE_TIMINGS,
    CLOCKS,
    ENGINES,
    EVENT_DP_MODES,
    EVENT_NOISE_MODES,
    ITEM_GRAPH_MODES,
    LR_SCHEDULES,
    METHODS,
    MODELS,
    PRIVACY_MODES,
    ROUND_SPLITS,
    SERVER_OPTIMIZERS,
    UPDATE_BACKENDS,
    USER_DP_MODES,
    WIRES,
    Registry,
)


class ConfigError(ValueError):
    """A configuration key or value a user supplied is invalid."""


#: the most events a synthetic world may hold, and the most numbers an item table may hold
MAX_EVENTS = 10**8
MAX_TABLE = 10**9


@dataclass(frozen=True)
class KeySpec:
    """What a config key declares besides its type and default: help, bounds, choices.

    ``ge``/``gt``/``le``/``lt`` are inclusive and exclusive bounds; ``choices`` the allowed
    strings; ``says`` replaces the generated rule sentence where the generated one would not say
    what 0 means (``"must be 0 (off) or positive"``).
    """

    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    says: str = ""

    def holds(self, v: Any) -> bool:
        """Whether a value of the right type keeps to the bounds and choices."""
        if self.choices and v not in self.choices:
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def rule(self, value: Any = None) -> str:
        """The rule as the end of a sentence ("must lie in (0, 1]"); empty when there is none.

        Given the ``value`` that broke it, only the side it broke ("must be at most 4096"); without,
        the whole rule, as the flags' help shows it ("must be at least 1, at most 4096").
        """
        lo, hi = (self.ge if self.ge is not None else self.gt), (self.le if self.le is not None else self.lt)
        if self.choices:
            return self.says or f"must be one of {', '.join(self.choices)}"
        if lo is not None and hi is not None and hi <= 1 and not self.says:  # a share or a probability
            if self.gt is not None and self.lt is not None:
                return f"must lie strictly between {_num(lo)} and {_num(hi)}"
            return f"must lie in {'[' if self.ge is not None else '('}{_num(lo)}, {_num(hi)}{']' if self.le is not None else ')'}"
        if self.says and "[" in self.says:  # a sentence that states both bounds
            return self.says
        cap = "" if hi is None else f"{'at most' if self.le is not None else 'below'} {_num(hi)}"
        if self.says:
            low = self.says
        elif self.gt == 0:
            low = "must be positive"
        elif self.ge is not None:
            low = "must be 0 or more" if self.ge == 0 else f"must be at least {_num(self.ge)}"
        else:
            low = f"must be above {_num(lo)}" if lo is not None else ""
        if value is not None and cap:
            above = (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt)
            return f"must be {cap}" if above else low
        return f"{low}, {cap}" if low and cap else low or (cap and f"must be {cap}")

def _num(x: float) -> str:
    """A bound as a user reads it: ``1000000`` rather than ``1e+06``, ``0.5`` as is."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def key(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, choices: Registry | None = None, says: str = "") -> Any:
    """A :class:`RunConfig` field: its default and its :class:`KeySpec` (kept in the field's metadata)."""
    spec = KeySpec(help, ge=ge, gt=gt, le=le, lt=lt, choices=choices.names() if choices else (), says=says)
    return dataclasses.field(default=default, metadata={"spec": spec})


def spec_of(f: dataclasses.Field[Any]) -> KeySpec:
    """The :class:`KeySpec` a :class:`RunConfig` field declares."""
    spec: KeySpec = f.metadata["spec"]
    return spec


AUTO_COHORT_CAP = 5000  #: cohort = 0 under event noise at the aggregate: every device, up to this many a round


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; defaults are those of ``[tool.flwr.app.config]``."""

    # data
    data: str = key("", "path to a MovieLens file or generic CSV; empty = synthetic world")
    world_users: int = key(3000, "users (one device each) of the synthetic world", ge=1, le=10**7)
    world_items: int = key(400, "items of the synthetic world", ge=1, le=10**7)
    world_topics: int = key(10, "interest topics of the synthetic world (users hold interests, items belong to one)",
                            ge=1, le=10**5)
    world_events_per_user: int = key(25, "events of each user of the synthetic world", ge=1, le=10**6)
    world_shift_share: float = key(0.3, "share of users whose interest shifts (interest-shift scenario)", ge=0, le=1)
    world_shift_time: float = key(0.5, "when, as a fraction of the stream", ge=0, le=1)
    world_new_item_share: float = key(0.1, "share of items launched mid-stream (new-item scenario)", ge=0, lt=1)
    world_bursts: int = key(0, "items that trend, spiking then fading (trending-burst scenario)", ge=0, le=10**6)
    world_burst_time: float = key(0.6, "peak of the burst, as a fraction of the stream", ge=0, le=1)
    world_feature_noise: float = key(0.3, "share of the world's items whose feature lists a random topic instead of "
                                     "their own (how informative its item features are)", ge=0, le=1)
    rounds: int = key(30, "rounds of the federation; the stream is cut into this many windows", ge=1, le=10**6)
    round_split: str = key("count", "how the stream is cut into rounds: equal event counts or equal time spans",
                           choices=ROUND_SPLITS)
    # federation
    cohort: int = key(0, "devices per round (under user-level DP the expected number, Poisson-sampled); 0 = auto: "
                      "every device up to 5000 under event noise at the aggregate, else 300", ge=0, le=10**8)
    nodes: int = key(2, "virtual Flower nodes; each hosts a shard of devices in simulation", ge=1, le=10**4)
    engine: str = key("ray", "simulation transport: Flower's Simulation Engine (ray) or in-process (local)",
                      choices=ENGINES)
    ray_address: str = key("", "engine = ray: the Ray cluster to join, auto or host:port of its head (docs/scale.md); "
                           "empty = RAY_ADDRESS if set, else a local Ray bound to 127.0.0.1")
    method: str = key("federated", "federated, or centralised: the non-private freshness ceiling, trained on all events",
                      choices=METHODS)
    freeze_after: int = key(0, "static baseline: the global model stops changing after this round (0 = never)",
                            ge=0, le=10**6, says="must be 0 (never) or a round number")
    round_timeout: float = key(600.0, "round deadline: seconds the server waits for replies; later ones are late",
                               gt=0, le=10**7, says="must be a positive number of seconds")
    min_reply_share: float = key(1.0, "the round closes once this share of the sampled devices has replied",
                                 gt=0, le=1)
    async_buffer: int = key(0, "0 = synchronous rounds (late updates dropped); K = FedBuff, apply once K are buffered",
                            ge=0, le=10**8, says="must be 0 (synchronous) or a number of updates")
    max_staleness: int = key(8, "async: a buffered update older than this many versions is dropped", ge=0, le=10**6)
    slow_devices: float = key(0.0, "simulation only: share of devices whose updates arrive rounds late", ge=0, lt=1)
    slow_rounds: int = key(2, "a slow device's update arrives 1..slow-rounds rounds after it was asked for", ge=1, le=10**6)
    seed: int = key(0, "seed of every random draw of the run (same seed, same run)", ge=0,
                   le=2**32 - 1, says="must lie in [0, 4294967295]")
    # model and local update
    model: str = key("mf", "recommender: matrix factorisation, neural MF, a SASRec-style transformer, or "
                     "DeepFM over the item features",
                     choices=MODELS)
    dim: int = key(8, "embedding dimension", ge=1, le=4096)
    seq_len: int = key(20, "sasrec: longest input sequence (the device's recent items it attends over)", ge=2, le=10**5)
    init_scale: float = key(0.1, "std of the initial item and user vectors", gt=0, le=10**3)
    local_steps: int = key(0, "local (DP-)SGD steps of each device update; 0 = auto: 1 with event noise at the "
                           "aggregate, else 10", ge=0, le=10**6)
    sample_rate: float = key(0.5, "Poisson rate of each local step (expected batch = rate x events)", gt=0, le=1)
    lr: float = key(1.0, "on-device step size", gt=0, le=10**6)
    user_lr: float = key(0.0, "step size of the on-device user vector; 0 = same as lr",
                         ge=0, le=10**6, says="must be 0 (same as lr) or positive")
    user_fit_steps: int = key(30, "on-device fit of the user vector before scoring (0 = off)", ge=0, le=10**6)
    negatives: int = key(1, "sampled negative items per positive event", ge=1, le=10**6)
    session_len: int = key(10, "on-device scoring reads the device's this many newest events before each event", ge=1, le=10**6)
    item_graph: str = key("auto", "federated item co-occurrence for on-device session scoring (item pairs, or under "
                          "user-level DP item counts only, are sent in clear to the server; with secure-aggregation "
                          "item counts and affinities are summed masked: auto = on without DP, and noised under event "
                          "noise at the aggregate or user-level DP; else off)", choices=ITEM_GRAPH_MODES)
    graph_window: int = key(50, "item graph: each new event pairs with this many of the device's events before it",
                            ge=1, le=10**6)
    private_graph_window: int = key(1, "item graph under DP: the window (at event level one event's "
                                    "pairs move the noisy counts by at most sqrt(3 x window x w^2 + 1), w the pairs' weight in the noise; + 3 under the root with item features, + 5 "
                                    "with negative feature values)", ge=1, le=10**6)
    affinity_rounds: int = key(4, "event noise at the aggregate, the server adding it: the item graph's item x feature "
                               "affinities are summed over this many rounds before each noisy release (the same epsilon, "
                               "fewer draws in their sum; 1 = every round)",
                               ge=1, le=10**6)
    graph_share: float = key(0.9, "event noise at the aggregate: share of the event-level budget spent on the noisy "
                             "item graph (0 = no graph)", ge=0, lt=1)
    user_graph_share: float = key(0.1, "user-level DP: share of each round's one Gaussian (in 1/z^2) spent on the noisy "
                                  "item graph, whose per-device counts are clipped to L2 norm 1 (0 = no graph)",
                                  ge=0, lt=1)
    graph_neighbours: int = key(100, "item graph: neighbours per item in the published table", ge=1, le=10**6)
    item_features: str = key("auto", "public item features for the session scores and deepfm: auto (movies.csv beside the "
                             "events, the world's topics), none, or a CSV path (docs/online.md)")
    replay_rounds: int = key(2, "an event is replayed in at most this many later updates", ge=0, le=10**3)
    server_lr: float = key(10.0, "server step size on the round's aggregated delta", gt=0, le=10**6)
    lr_schedule: str = key("fixed", "fixed, or adaptive: the server lr is raised when windowed HR drops",
                           choices=LR_SCHEDULES)
    server_opt: str = key("fedavg", "server optimizer (adaptive ones want server-lr ~0.01-0.1)",
                          choices=SERVER_OPTIMIZERS)
    aggregator: str = key("mean", "mean (FedAvg), or per item row: trimmed-mean, median (not under user-level DP)",
                          choices=AGGREGATORS)
    trim: float = key(0.1, "share trimmed from each end by the trimmed mean", ge=0, lt=0.5)
    max_update_norm: float = key(0.0, "the server scales a larger delta down to this L2 norm (0 = off)",
                                 ge=0, le=10**6, says="must be 0 (off) or positive")
    max_row_norm: float = key(0.0, "the server scales each item row of a delta down to this L2 norm (0 = off)",
                              ge=0, le=10**6, says="must be 0 (off) or positive")
    max_weight: int = key(10_000, "without user-level DP: the most events one device's update may weigh in the mean "
                          "(and one device may report serving in a round); a larger claim is cut to it",
                          ge=1, le=10**9)
    attackers: float = key(0.0, "simulation only: share of fake devices pushing one item (fedrec.attack)", ge=0, lt=1)
    attack_boost: float = key(1.0, "fake devices scale their deltas by this (model-replacement boosting)", gt=0, le=10**6)
    attack_measure: bool = key(False, "measure the target's exposure even without attackers (a no-attack baseline)")
    wire: str = key("auto", "delta encoding on the wire; auto: sparse rows without event DP, fp16 with",
                    choices=WIRES)
    # privacy
    privacy: str = key("user", "DP unit: event (one event; where its noise goes: event-noise), user (noise on the "
                       "server's sum), both, or none",
                       choices=PRIVACY_MODES)
    noise_multiplier: float = key(1.0, "noise std over the clip, where no budget calibrates it", ge=0, le=10**4)
    secure_aggregation: bool = key(False, "Flower SecAgg+: the server sees only the sum of the cohort's deltas")
    event_noise: str = key("auto", "event-level: device, noise on each device's DP-SGD (protects against the server); "
                           "aggregate, once on the cohort's sum of clipped gradients (trusts the server, or SecAgg+); "
                           "auto, aggregate where the run allows it (model mf, one local step), else device",
                           choices=EVENT_NOISE_MODES)
    count_share: float = key(0.1, "event noise at the aggregate: share of the privacy budget (in 1/z^2) spent on "
                             "the noisy per-row event counts that select the updated item rows", gt=0, lt=1)
    row_threshold: float = key(3.0, "event noise at the aggregate: an item row is updated when its noisy event count "
                               "exceeds this many count-noise stds", ge=0, le=10**6)
    select_rows: bool = key(False, "user-level DP: noisy per-row device counts select the item rows a round updates "
                            "(DP-AdaFEST); only those rows get noise, the rest of the table does not change")
    row_average: bool = key(False, "per-row averaging: without DP each item row's step is scaled up while the run "
                            "has had fewer contributors to it than to the average row (new items catch up); under "
                            "event noise at the aggregate each row is divided by its own noisy count (FedSubAvg)")
    dropout_tolerance: float = key(0.2, "SecAgg+ with event noise at the aggregate: share of sampled nodes that may "
                                   "drop while the unmasked sum still carries the full noise", ge=0, lt=1)
    clip: float = key(1.0, "user-level: L2 bound of a device's whole delta", gt=0, le=10**6)
    event_clip: float = key(1.0, "event-level: per-event gradient clip of DP-SGD", gt=0, le=10**6)
    update_backend: str = key("auto", "local update: auto (closed form for mf; DP noise drawn lazily) or autograd "
                              "(torch autograd; Opacus ghost clipping under event-level DP)",
                              choices=UPDATE_BACKENDS, says="must be auto or autograd")
    epsilon: float = key(0.0, "budget per period (0 = none); see calibrate",
                         ge=0, le=10**4, says="must be 0 (no target) or positive")
    calibrate: bool = key(True, "with a budget, pick the noise multiplier that fits it (else enforce only)")
    budget_period: int = key(0, "rounds per user-level budget period (0 = the whole run)",
                             ge=0, le=10**6, says="must be 0 (whole run) or a number of rounds")
    delta: float = key(1e-5, "delta of (epsilon, delta)-DP", gt=0, lt=1)
    accountant: str = key("prv", "privacy accountant (Opacus): privacy random variables or Renyi DP",
                          choices=ACCOUNTANTS)
    # evaluation and output
    k: int = key(10, "length of the top-K lists scored (HR@K, NDCG@K)", ge=1, le=10**4)
    freshness_window: int = key(3, "rounds in the sliding window of windowed HR@K", ge=1, le=10**6)
    serve_eval: bool = key(True, "every round, every device with new events scores them with the newest version")
    serve_panel: int = key(20_000, "simulation only: the devices served and scored are a fixed panel of at most "
                           "this many, drawn once from the seed (0: every device)", ge=0, le=10**8)
    baselines: str = key("auto", "when the baselines are measured: alongside (a process of their own follows the rounds "
                         "as they end, on a core the rounds leave idle), after (once the rounds are done), or auto "
                         "(alongside on a machine of two cores or more for streams of 1,000,000 events or more)",
                         choices=BASELINE_TIMINGS, says="must be auto, alongside or after")
    per_event: bool = key(True, "serving scores each event with the device's state through the event before "
                          "(off: only with its state at the round's start)")
    uptake_probe: bool = key(True, "simulation only: devices report new-item top-K membership (a measurement)")
    out: str = key("runs/latest", "output folder: metrics.jsonl, summary.json, checkpoint, privacy ledger")
    resume: bool = key(True, "continue an unfinished run from the checkpoint in out (same config), else start anew")
    clock: str = key("replay", "deployment: a round takes in device events up to the data's time of that round "
                     "(replay, the server needs the data) or everything recorded so far (live)",
                     choices=CLOCKS, says="must be replay or live")
    device: str = key("auto", "torch device for server aggregation (auto: CUDA when present), cpu, or cuda[:N], "
                      "which also runs a node's batched mf devices there")
    progress: bool = key(True, "a progress bar (else plain per-round lines)")

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            spec = spec_of(f)
            broken = _type_rule(_type_of(f), v) or ("" if spec.holds(v) else spec.rule(v))
            self._need(not broken, f.name.replace("_", "-"), broken)
        self._check_rules()

    def _need(self, cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"Config key '{key}' {what} (got {getattr(self, key.replace('-', '_'))!r}).")

    def _check_rules(self) -> None:
        """The rules that tie keys together (each key alone has passed its own checks), in a fixed order."""
        need = self._need
        need(self.method == "federated" or self.model == "mf", "model",
             "must be mf with method = centralised (the centralised ceiling is written for mf)")
        need(not (self.wire == "sparse" and self.event_dp), "wire",
             "cannot be sparse under event-level DP (with the noise on the device it would reveal which item rows a "
             "device touched; with the noise at the aggregate the release is sparse rows already: use auto)")
        need(not (self.event_noise == "aggregate" and self.privacy != "event"), "event-noise",
             "can be aggregate only with privacy = event (user-level noise on the sum already covers each event)")
        need(not (self.aggregate_noise and self.model == "sasrec"), "event-noise",
             "cannot be aggregate with model = sasrec (its samples span a session of events, so no release is "
             "bounded per event)")
        need(not self.select_rows or (self.privacy == "user" and not self.secure_aggregation), "select-rows",
             "needs privacy = user without secure-aggregation (the server reads each device's row counts)")
        need(not (self.select_rows and self.model == "sasrec"), "select-rows",
             "cannot be used with model = sasrec (its start and padding rows have no item counts)")
        need(not self.row_average or self.privacy == "none" or self.aggregate_noise, "row-average",
             "needs privacy = none, or privacy = event with event-noise = aggregate (the modes whose row counts the "
             "server has)")
        need(bool(self.out.strip()), "out", "must name a folder (an empty one would write into the current folder)")
        need(not (self.row_average and self.async_buffer), "async-buffer",
             "must be 0 with row-average (row counts hold for one round's replies)")
        need(not (self.aggregate_noise and self.async_buffer), "async-buffer",
             "must be 0 with event-noise = aggregate (each noisy sum must hold only its own round's devices)")
        need(not (self.aggregate_noise and self.local_steps > 1), "local-steps",
             "must be 1 with event-noise = aggregate (noise added once to the sum covers one step per round; "
             "docs/privacy.md says why)")
        need(not self.secure_aggregation or self.user_dp or self.aggregate_noise, "secure-aggregation",
             "needs privacy = user or both, or privacy = event with event-noise = aggregate (it protects a noisy sum)")
        need(self.aggregator == "mean" or not self.user_dp, "aggregator",
             "must be mean under user-level DP (the noise is calibrated to the sum of clipped deltas)")
        need(not (self.secure_aggregation and self.max_row_norm), "max-row-norm",
             "must be 0 with secure-aggregation (the server sees only the masked sum)")
        need(not (self.async_buffer and self.user_dp), "async-buffer",
             "must be 0 under user-level DP (each noisy sum must hold only the devices sampled for it)")
        for key in ("async-buffer", "slow-devices"):
            need(not (self.secure_aggregation and getattr(self, key.replace("-", "_"))), key,
                 "must be 0 with secure-aggregation (a masked sum covers one round's replies)")
        need(not (self.secure_aggregation and self.min_reply_share < 1), "min-reply-share",
             "must be 1 with secure-aggregation (SecAgg+ sets its own reply threshold)")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             "must be auto, cpu or cuda[:N]")
        need(is_ray_address(self.ray_address), "ray-address",
             "must be empty (a local Ray), auto, or host:port of a Ray head")
        need(not (self.item_graph == "on" and self.privacy != "none" and not self._private_graph), "item-graph",
             "must be auto or off under DP, except under event noise at the aggregate with graph-share > 0 or "
             "user-level DP with user-graph-share > 0 (only there are the graph's sums noised)")
        need(not (self.privacy == "none" and self.epsilon > 0), "epsilon",
             "is a privacy budget, which privacy = none does not have (it would be ignored): set privacy = event, user "
             "or both, or leave epsilon at 0")
        if self.privacy != "none" and not (self.epsilon > 0 and self.calibrate):
            need(self.noise_multiplier > 0, "noise-multiplier", "must be positive when privacy is on")
        if not self.data:
            self._check_world()
        self.check_catalogue(self.world_items if not self.data else None)

    def _check_world(self) -> None:
        """The synthetic world's keys together (:class:`fedrec.data.world.WorldSpec` needs them so)."""
        need, items = self._need, self.world_items
        launched = int(items * (1 - self.world_new_item_share))
        need(self.world_topics >= 2, "world-topics", "must be at least 2")
        need(items >= 2 * self.world_topics, "world-items", f"must be at least 2 per topic ({2 * self.world_topics})")
        need(self.world_events_per_user < launched, "world-events-per-user",
             f"must be below the items launched at the start ({launched} of world-items)")
        need(self.world_bursts <= launched / 2, "world-bursts",
             f"must be at most half the items launched at the start ({launched // 2})")
        need(self.world_users * self.world_events_per_user <= MAX_EVENTS, "world-users",
             f"must be at most {MAX_EVENTS // self.world_events_per_user} with world-events-per-user = "
             f"{self.world_events_per_user} (a synthetic world holds at most {MAX_EVENTS} events)")

    def check_catalogue(self, n_items: int | None, where: str = "") -> None:
        """The keys bounded by the item catalogue (world-items, or a data file's items once loaded)."""
        if n_items is None:
            return
        of = f"the {n_items} items of {where}" if where else f"world-items ({n_items})"
        for key, ok, what in (("negatives", self.negatives < n_items, f"must be below {of}"),
                              ("k", self.k <= n_items, f"must be at most {of}"),
                              ("dim", self.dim * n_items <= MAX_TABLE,
                               f"must be at most {MAX_TABLE // n_items} with {of} (an item table holds at most "
                               f"{MAX_TABLE} numbers)")):
            self._need(ok, key, what)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def event_dp(self) -> bool:
        """Event-level DP is on: each device runs DP-SGD (privacy ``event`` or ``both``)."""
        return self.privacy in EVENT_DP_MODES

    @property
    def _private_graph(self) -> bool:
        """A DP item graph is possible: budget for the graph, under event noise at the aggregate or user-level DP
        (with secure-aggregation, summed masked: :attr:`secure_graph`)."""
        return (self.aggregate_noise and self.graph_share > 0) or (self.privacy == "user" and self.user_graph_share > 0)

    @property
    def secure_graph(self) -> bool:
        """The item graph's counts and item x feature affinities (no pairs) are summed under SecAgg+ beside the
        model's release, nothing sent in clear: with the devices' noise shares (event noise at the aggregate), or
        each device's part clipped and the server noising the unmasked sum (user-level DP)."""
        return self.graph and self.secure_aggregation

    @property
    def graph_sent(self) -> bool:
        """Devices send their item graph contributions (pairs, or counts) in clear beside their update."""
        return self.graph and not self.secure_graph

    @property
    def graph(self) -> bool:
        """Devices contribute item pairs and are served the item graph (:mod:`fedrec.itemgraph`); under event
        noise at the aggregate the server noises its sums (:attr:`graph_noised`)."""
        return self.item_graph == "on" or (self.item_graph == "auto" and (self.privacy == "none" or self._private_graph))

    @property
    def graph_noised(self) -> bool:
        """The item graph's sums get Gaussian noise (event noise at the aggregate, or user-level DP)."""
        return self.graph and (self.aggregate_noise or self.privacy == "user")

    @property
    def affinity_every(self) -> int:
        """Rounds whose item x feature affinities one noisy release sums: ``affinity-rounds`` where the server itself
        noises an event-level graph; else 1 (SecAgg+ shares carry each round's noise; user-level DP accounts each
        round's clipped sums as that round's release)."""
        return self.affinity_rounds if self.graph_noised and self.privacy == "event" and not self.secure_graph else 1

    @property
    def user_graph(self) -> bool:
        """The item graph is part of user-level DP's one Gaussian per round: each sampled device's counts are
        clipped, and noised with the round's sum (:func:`fedrec.privacy.accounting.user_parts`)."""
        return self.graph_noised and self.privacy == "user"

    @property
    def pair_window(self) -> int:
        """The window of a device's item pairs: ``graph-window``, ``private-graph-window`` when noised at event level,
        0 (no pairs) under user-level DP or from the secure sum (:class:`fedrec.itemgraph.ItemGraph` ``pairs``)."""
        if self.user_graph or self.secure_graph:
            return 0
        return self.private_graph_window if self.graph_noised else self.graph_window

    @property
    def aggregate_noise(self) -> bool:
        """Event-level DP with the noise added once to the cohort's sum (:mod:`fedrec.privacy.aggregate`):
        ``event-noise = aggregate``, or ``auto`` where the run allows it. Where it costs least for the guarantee
        stated: the sum of the cohort carries the noise of one Gaussian, not sqrt(cohort) times it. Its trust
        model (a trusted server, or SecAgg+ with distributed noise shares) is in the report."""
        if self.event_noise == "auto":
            return self.privacy == "event" and self._aggregate_fits
        return self.event_dp and self.event_noise == "aggregate"

    @property
    def _aggregate_fits(self) -> bool:
        """What event noise at the aggregate needs of the other keys (a model with one sample per event: every one
        but ``sasrec``; one local step; one round's devices per sum)."""
        return self.model != "sasrec" and self.local_steps <= 1 and not self.async_buffer

    def cohort_for(self, population: int) -> int:
        """Devices per round: ``cohort``, or with 0 (auto) every device, up to :data:`AUTO_COHORT_CAP`, under event
        noise at the aggregate (its noise does not grow with the cohort and device sampling is not counted as
        amplification, so each device left out only delays its events' signal) and 300 otherwise (under
        user-level DP the cohort sets the sampling rate q of the accounting)."""
        if self.cohort:
            return self.cohort
        return min(population, AUTO_COHORT_CAP) if self.aggregate_noise else 300

    @property
    def steps(self) -> int:
        """Local steps of a device update: ``local-steps``, or with 0 (auto) 1 under event noise at the aggregate
        (the noise on the sum covers one step a round) and 10 otherwise."""
        return self.local_steps or (1 if self.aggregate_noise else 10)

    @property
    def user_dp(self) -> bool:
        """User-level DP is on: the server noises the sum of clipped deltas (privacy ``user`` or ``both``)."""
        return self.privacy in USER_DP_MODES

    # ---- conversions -------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """Kebab-case dict: what travels in Flower ConfigRecords and is written to summary.json."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def specs(cls) -> dict[str, tuple[type, Any, KeySpec]]:
        """``key -> (type, default, spec)`` for every key, in order: what flags and tables are made from."""
        return {f.name.replace("_", "-"): (_type_of(f), f.default, spec_of(f)) for f in fields(cls)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, where: str = "config",
                     base: RunConfig | None = None) -> RunConfig:
        """Build from kebab- or snake-case keys; unknown keys fail naming ``where``."""
        known = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        spelt: dict[str, str] = {}
        for raw, v in values.items():
            name = str(raw).replace("-", "_")
            if name not in known:
                close = [k for k in cls.keys() if k.split("-")[0] == str(raw).replace("_", "-").split("-")[0]]
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ConfigError(f"Unknown config key {str(raw)!r} in {where}.{hint}")
            if name in spelt:
                raise ConfigError(f"Config key {name.replace('_', '-')!r} is given twice in {where} "
                                  f"(as {spelt[name]!r} and {str(raw)!r}); keep one.")
            spelt[name] = str(raw)
            want = _type_of(known[name])
            if want is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if want is bool and isinstance(v, str) and v.lower() in ("true", "false"):
                v = v.lower() == "true"
            kw[name] = v
        try:
            return dataclasses.replace(base, **kw) if base is not None else cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{e} [{where}]") from None

    @classmethod
    def of_message(cls, entries: Mapping[str, Any], where: str) -> RunConfig:
        """The run config among a message's entries (the others are per-round instructions). The same entries give
        the same config, checked once: every message of a run carries it, and a node's every round parses it."""
        mine = tuple((k, v) for k, v in entries.items() if k in _KEYS)
        try:
            return _of_entries(mine, where)
        except TypeError:  # an unhashable value: checked (and refused) without the cache
            return cls.from_mapping(dict(mine), where=where)

    @classmethod
    def from_toml(cls, path: str | Path, *, base: RunConfig | None = None) -> RunConfig:
        """Read a TOML file: keys at top level or under ``[run]``/``[tool.flwr.app.config]``."""
        p = Path(path)
        doc = read_toml(p, "config file")
        table = _run_table(p, doc)
        for k, v in table.items():  # a sub-table is no key: refused, never silently dropped
            if isinstance(v, dict):
                raise ConfigError(f"{p}: {k!r} is a table, but a run config file holds only `key = value` lines "
                                  "(at top level, under [run] or under [tool.flwr.app.config]).")
        return cls.from_mapping(table, where=str(p), base=base)


_KEYS = frozenset(RunConfig.keys())


def _run_table(p: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """A config file's keys: under ``[tool.flwr.app.config]`` or ``[run]`` (then nothing else may stand beside it,
    or it would be silently ignored), else at top level."""
    flwr = doc.get("tool", {})
    for name in ("flwr", "app", "config"):
        flwr = flwr.get(name) if isinstance(flwr, dict) else None
    table = flwr if flwr is not None else doc.get("run", doc)
    if not isinstance(table, dict):
        where = "[tool.flwr.app.config]" if flwr is not None else "run"
        raise ConfigError(f"{p}: {where} must be a table of `key = value` lines, not {type(table).__name__} {table!r}.")
    if "run" in doc and flwr is None and len(doc) > 1:
        raise ConfigError(f"{p}: keys beside the [run] table ({', '.join(sorted(k for k in doc if k != 'run'))}) "
                          "would be ignored; put every key under [run], or none.")
    return table


@lru_cache(maxsize=16)
def _of_entries(entries: tuple[tuple[str, Any], ...], where: str) -> RunConfig:
    return RunConfig.from_mapping(dict(entries), where=where)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file a user named; a missing file or bad TOML is a :class:`ConfigError` naming it."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; name the {what} in it.")
    if not path.is_file():
        raise ConfigError(f"No such {what}: {path}.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}).") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8.") from None


def _type_of(f: dataclasses.Field[Any]) -> type:
    t = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "str": str, "bool": bool}[t]


def _type_rule(want: type, v: Any) -> str:
    """The rule ``v`` breaks by its type alone ("must be an integer"), or "" if it has the right type."""
    if want is bool:
        return "" if isinstance(v, bool) else "must be true or false"
    if want is int:
        return "" if isinstance(v, int) and not isinstance(v, bool) else "must be an integer"
    if want is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return "" if ok else "must be a finite number"
    return "" if isinstance(v, str) else "must be a string"


def load_pyproject_defaults(root: Path | None = None) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the project's pyproject.toml, if present."""
    root = root or Path(__file__).resolve().parents[1]
    p = root / "pyproject.toml"
    if not p.is_file():
        return {}
    table: dict[str, Any] = tomllib.loads(p.read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    return table


# ---- TOML out: the project's one writer ------------------------------------------------------
def toml_value(v: bool | int | float | str) -> str:
    """One value as TOML: ``true``/``false``, a number as Python writes it, anything else a basic string."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


def dump_toml(table: Mapping[str, Any]) -> str:
    """``key = value`` lines of a flat table (no header), each ending in a newline."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())


def pyproject_table() -> str:
    """The ``[tool.flwr.app.config]`` table of pyproject.toml, generated from RunConfig's defaults."""
    return "[tool.flwr.app.config]\n" + dump_toml(RunConfig().to_flat())


def main(argv: list[str] | None = None) -> int:
    """``python -m fedrec.config --pyproject``: print the pyproject table to paste over the old one."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["--pyproject"]:
        print("usage: python -m fedrec.config --pyproject  (prints [tool.flwr.app.config] from RunConfig's defaults)",
              file=sys.stderr)
        return 2
    sys.stdout.write(pyproject_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
