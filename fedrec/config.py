"""One source of configuration: a frozen, self-validating dataclass.

Keys are kebab-case everywhere (TOML files, ``[tool.flwr.app.config]``, CLI flags); in Python
they are the snake_case field names. Every invalid value fails with :class:`ConfigError`, one
sentence naming the key (and the file when it came from one).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

PRIVACY_MODES = ("none", "event", "user", "both")
MODELS = ("mf", "neumf", "sasrec")
ACCOUNTANTS = ("prv", "rdp")
SPLITS = ("count", "time")
ENGINES = ("ray", "local")
METHODS = ("federated", "centralised")
LR_SCHEDULES = ("fixed", "adaptive")


class ConfigError(ValueError):
    """A configuration key or value a user supplied is invalid."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; defaults are those of ``[tool.flwr.app.config]``."""

    # data
    data: str = ""  #: path to a MovieLens file or generic CSV; empty = synthetic world
    world_users: int = 3000
    world_items: int = 400
    world_topics: int = 10
    world_events_per_user: int = 25
    world_shift_share: float = 0.3  #: share of users whose interest shifts (interest-shift scenario)
    world_shift_time: float = 0.5  #: when, as a fraction of the stream
    world_new_item_share: float = 0.1  #: share of items launched mid-stream (new-item scenario)
    world_bursts: int = 0  #: items that trend, spiking then fading (trending-burst scenario)
    world_burst_time: float = 0.6  #: peak of the burst, as a fraction of the stream
    rounds: int = 30
    round_split: str = "count"
    # federation
    cohort: int = 300
    nodes: int = 2  #: virtual Flower nodes; each hosts a shard of devices in simulation
    engine: str = "ray"  #: simulation transport: Flower's Simulation Engine (ray) or in-process (local)
    method: str = "federated"  #: federated, or centralised (the non-private freshness ceiling, all events)
    freeze_after: int = 0  #: static baseline: the global model stops changing after this round (0 = never)
    round_timeout: float = 600.0  #: round deadline: seconds the server waits for replies; later ones are late
    min_reply_share: float = 1.0  #: the round closes once this share of the sampled devices has replied
    async_buffer: int = 0  #: 0 = synchronous rounds (late updates dropped); K = FedBuff, apply once K are buffered
    max_staleness: int = 8  #: async: a buffered update older than this many versions is dropped
    slow_devices: float = 0.0  #: simulation only: share of devices whose updates arrive rounds late
    slow_rounds: int = 2  #: a slow device's update arrives 1..slow-rounds rounds after it was asked for
    seed: int = 0
    # model and local update
    model: str = "mf"
    dim: int = 8
    seq_len: int = 20  #: sasrec: longest input sequence (the device's recent items it attends over)
    init_scale: float = 0.1  #: std of the initial item and user vectors
    local_steps: int = 10
    sample_rate: float = 0.5  #: Poisson rate of each local step (expected batch = rate x events)
    lr: float = 1.0
    user_lr: float = 0.0  #: step size of the on-device user vector; 0 = same as lr
    user_fit_steps: int = 30  #: on-device fit of the user vector before scoring (0 = off)
    negatives: int = 1
    replay_rounds: int = 2  #: an event is replayed in at most this many later updates
    server_lr: float = 10.0
    lr_schedule: str = "fixed"  #: fixed, or adaptive (server lr raised when windowed HR drops)
    server_opt: str = "fedavg"  #: fedavg, fedadagrad, fedadam, fedyogi (adaptive ones want server-lr ~0.01-0.1)
    aggregator: str = "mean"  #: mean (FedAvg), or per item row: trimmed-mean, median (not under user-level DP)
    trim: float = 0.1  #: share trimmed from each end by the trimmed mean
    max_update_norm: float = 0.0  #: the server scales a larger delta down to this L2 norm (0 = off)
    max_row_norm: float = 0.0  #: the server scales each item row of a delta down to this L2 norm (0 = off)
    attackers: float = 0.0  #: simulation only: share of fake devices pushing one item (fedrec.attack)
    attack_boost: float = 1.0  #: fake devices scale their deltas by this (model-replacement boosting)
    attack_measure: bool = False  #: measure the target's exposure even without attackers (a no-attack baseline)
    wire: str = "auto"  #: delta encoding: auto (sparse rows without event DP, fp16 with), dense, fp16, sparse
    # privacy
    privacy: str = "user"
    noise_multiplier: float = 1.0
    secure_aggregation: bool = False  #: Flower SecAgg+: the server sees only the sum of the cohort's deltas
    clip: float = 1.0  #: user-level: L2 bound of a device's whole delta
    event_clip: float = 1.0  #: event-level: per-event gradient clip of DP-SGD
    update_backend: str = "auto"  #: local update: auto (closed form for mf; DP noise drawn lazily) or
    #                                 autograd (torch autograd; Opacus ghost clipping under event-level DP)
    epsilon: float = 0.0  #: budget per period (0 = none); see `calibrate`
    calibrate: bool = True  #: with a budget, pick the noise multiplier that fits it (else enforce only)
    budget_period: int = 0  #: rounds per user-level budget period (0 = the whole run)
    delta: float = 1e-5
    accountant: str = "prv"
    # evaluation and output
    k: int = 10
    freshness_window: int = 3  #: rounds in the sliding window of windowed HR@K
    serve_eval: bool = True  #: every round, every device with new events scores them with the newest version
    uptake_probe: bool = True  #: simulation only: devices report new-item top-K membership (a measurement)
    out: str = "runs/latest"
    resume: bool = True  #: continue an unfinished run from the checkpoint in `out` (same config), else start anew
    clock: str = "replay"  #: deployment: a round takes in device events up to the data's time of that round
    #                         (replay, the server needs the data) or everything recorded so far (live)
    device: str = "auto"  #: torch device for server aggregation: auto, cpu, cuda
    progress: bool = True

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"Config key '{key}' {what} (got {getattr(self, key.replace('-', '_'))!r}).")

        for f in fields(self):
            v = getattr(self, f.name)
            key = f.name.replace("_", "-")
            want = _type_of(f)
            if want is bool:
                need(isinstance(v, bool), key, "must be true or false")
            elif want is int:
                need(isinstance(v, int) and not isinstance(v, bool), key, "must be an integer")
            elif want is float:
                need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), key,
                     "must be a finite number")
            elif want is str:
                need(isinstance(v, str), key, "must be a string")
        for key in ("world-users", "world-items", "world-topics", "world-events-per-user", "rounds", "cohort",
                    "nodes", "dim", "local-steps", "negatives", "k", "freshness-window"):
            need(getattr(self, key.replace("-", "_")) >= 1, key, "must be at least 1")
        need(self.user_fit_steps >= 0, "user-fit-steps", "must be 0 or more")
        need(self.user_lr >= 0, "user-lr", "must be 0 (same as lr) or positive")
        need(0 < self.sample_rate <= 1, "sample-rate", "must lie in (0, 1]")
        need(self.replay_rounds >= 0, "replay-rounds", "must be 0 or more")
        for key in ("lr", "server-lr", "clip", "event-clip", "init-scale"):
            need(getattr(self, key.replace("-", "_")) > 0, key, "must be positive")
        need(self.noise_multiplier >= 0, "noise-multiplier", "must be 0 or more")
        need(self.epsilon >= 0, "epsilon", "must be 0 (no target) or positive")
        need(0 < self.delta < 1, "delta", "must lie strictly between 0 and 1")
        need(self.privacy in PRIVACY_MODES, "privacy", f"must be one of {', '.join(PRIVACY_MODES)}")
        need(self.budget_period >= 0, "budget-period", "must be 0 (whole run) or a number of rounds")
        need(self.model in MODELS, "model", f"must be one of {', '.join(MODELS)}")
        need(self.seq_len >= 2, "seq-len", "must be at least 2")
        need(self.method == "federated" or self.model == "mf", "model",
             "must be mf with method = centralised (the centralised ceiling is written for mf)")
        need(self.accountant in ACCOUNTANTS, "accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
        need(self.wire in ("auto", "dense", "fp16", "sparse"), "wire", "must be one of auto, dense, fp16, sparse")
        need(not (self.wire == "sparse" and self.privacy in ("event", "both")), "wire",
             "cannot be sparse under event-level DP (it would reveal which item rows a device touched)")
        need(self.server_opt in ("fedavg", "fedadagrad", "fedadam", "fedyogi"), "server-opt",
             "must be one of fedavg, fedadagrad, fedadam, fedyogi")
        need(self.engine in ENGINES, "engine", f"must be one of {', '.join(ENGINES)}")
        need(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        need(self.lr_schedule in LR_SCHEDULES, "lr-schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        need(self.freeze_after >= 0, "freeze-after", "must be 0 (never) or a round number")
        need(0 <= self.world_shift_share <= 1, "world-shift-share", "must lie in [0, 1]")
        need(0 <= self.world_new_item_share < 1, "world-new-item-share", "must lie in [0, 1)")
        need(0 <= self.world_shift_time <= 1, "world-shift-time", "must lie in [0, 1]")
        need(0 <= self.world_burst_time <= 1, "world-burst-time", "must lie in [0, 1]")
        need(self.world_bursts >= 0, "world-bursts", "must be 0 or more")
        need(not self.secure_aggregation or self.privacy in ("user", "both"), "secure-aggregation",
             "needs privacy = user or both (it protects the user-level DP sum)")
        need(self.aggregator in ("mean", "trimmed-mean", "median"), "aggregator",
             "must be one of mean, trimmed-mean, median")
        need(self.aggregator == "mean" or self.privacy in ("none", "event"), "aggregator",
             "must be mean under user-level DP (the noise is calibrated to the sum of clipped deltas)")
        need(0 <= self.trim < 0.5, "trim", "must lie in [0, 0.5)")
        need(0 <= self.attackers < 1, "attackers", "must lie in [0, 1)")
        need(self.attack_boost > 0, "attack-boost", "must be positive")
        need(self.max_update_norm >= 0, "max-update-norm", "must be 0 (off) or positive")
        need(self.max_row_norm >= 0, "max-row-norm", "must be 0 (off) or positive")
        need(not (self.secure_aggregation and self.max_row_norm), "max-row-norm",
             "must be 0 with secure-aggregation (the server sees only the masked sum)")
        need(self.round_timeout > 0, "round-timeout", "must be a positive number of seconds")
        need(0 < self.min_reply_share <= 1, "min-reply-share", "must lie in (0, 1]")
        need(self.async_buffer >= 0, "async-buffer", "must be 0 (synchronous) or a number of updates")
        need(self.max_staleness >= 0, "max-staleness", "must be 0 or more")
        need(0 <= self.slow_devices < 1, "slow-devices", "must lie in [0, 1)")
        need(self.slow_rounds >= 1, "slow-rounds", "must be at least 1")
        need(not (self.async_buffer and self.privacy in ("user", "both")), "async-buffer",
             "must be 0 under user-level DP (each noisy sum must hold only the devices sampled for it)")
        for key in ("async-buffer", "slow-devices"):
            need(not (self.secure_aggregation and getattr(self, key.replace("-", "_"))), key,
                 "must be 0 with secure-aggregation (a masked sum covers one round's replies)")
        need(not (self.secure_aggregation and self.min_reply_share < 1), "min-reply-share",
             "must be 1 with secure-aggregation (SecAgg+ sets its own reply threshold)")
        need(self.clock in ("replay", "live"), "clock", "must be replay or live")
        need(self.update_backend in ("auto", "autograd"), "update-backend", "must be auto or autograd")
        need(self.round_split in SPLITS, "round-split", f"must be one of {', '.join(SPLITS)}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
             "must be auto, cpu or cuda[:N]")
        if self.privacy != "none" and not (self.epsilon > 0 and self.calibrate):
            need(self.noise_multiplier > 0, "noise-multiplier", "must be positive when privacy is on")

    # ---- conversions -------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        """Kebab-case dict: what travels in Flower ConfigRecords and is written to summary.json."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, where: str = "config", base: RunConfig | None = None) -> RunConfig:
        """Build from kebab- or snake-case keys; unknown keys fail naming ``where``."""
        known = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for raw, v in values.items():
            name = str(raw).replace("-", "_")
            if name not in known:
                close = [k for k in cls.keys() if k.split("-")[0] == str(raw).replace("_", "-").split("-")[0]]
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ConfigError(f"Unknown config key {str(raw)!r} in {where}.{hint}")
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
    def from_toml(cls, path: str | Path, *, base: RunConfig | None = None) -> RunConfig:
        """Read a TOML file: keys at top level or under ``[run]``/``[tool.flwr.app.config]``."""
        p = Path(path)
        doc = read_toml(p, "config file")
        table = doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", doc.get("run", doc))
        table = {k: v for k, v in table.items() if not isinstance(v, dict)}
        return cls.from_mapping(table, where=str(p), base=base)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file a user named; a missing file or bad TOML is a :class:`ConfigError` naming it."""
    if not path.is_file():
        raise ConfigError(f"No such {what}: {path}.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}).") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8.") from None


def _type_of(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "str": str, "bool": bool}[t]


def load_pyproject_defaults(root: Path | None = None) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the project's pyproject.toml, if present."""
    root = root or Path(__file__).resolve().parents[1]
    p = root / "pyproject.toml"
    if not p.is_file():
        return {}
    return tomllib.loads(p.read_text()).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
