"""The server's state between rounds, in one object whose ``state_dict`` is the checkpoint.

As FedJAX's ``ServerState``: the global model, the server optimizer and learning-rate schedule, the
FedBuff buffer, the item graph (its sums and the table published with the version), the published
version and the last finished round, and what the run has learned about itself (the newest round
reflected in the model, why user-level releases stopped). The round functions (:mod:`.plan`,
:mod:`.apply`) read and update it; nothing else carries state across rounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..asynchrony import Buffer
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import RunConfig
from ..data.features import ModelFeatures
from ..itemgraph import MODEL_FEATURES, PROFILES, ItemGraph, sensitivity
from ..itemgraph import TABLE_KEYS as GRAPH_KEYS
from ..models import model_from_config, reads_features
from ..privacy.accounting import graph_multiplier, user_parts
from ..privacy.ledger import Ledger
from ..server_aggregate import ITEM_TABLES, pick_device
from ..server_lr import ServerLR
from ..server_opt import ServerOptimizer

#: config keys a resumed run may change (the number of rounds may grow)
NOT_RESUME_KEYS = ("rounds", "out", "resume", "progress", "device")


class FederationError(RuntimeError):
    """The federation cannot go on (no nodes, every reply failed, a checkpoint it cannot continue)."""


class ResumeError(FederationError):
    """A checkpoint that this run cannot continue; the message says why and what to do."""


@dataclass
class ServerState:
    """Everything the server keeps between rounds."""

    global_state: dict[str, torch.Tensor]
    optimizer: ServerOptimizer
    lr: ServerLR
    buffer: Buffer | None = None
    graph: ItemGraph | None = None  #: the item graph's sums (None: the graph is off)
    graph_table: dict[str, np.ndarray] = field(default_factory=dict)  #: the table published (empty before round 1)
    #: the item features a model that reads them gets with every version, from the first one on (their age buckets
    #: change with the round); rebuilt from the data at every start, never checkpointed
    model_features: ModelFeatures | None = None
    round: int = 0  #: the last finished round
    version: int = 0  #: global versions published (async: only when the buffer is applied)
    last_fresh: int = 0  #: the newest round whose events the published model reflects
    stopped: str = ""  #: why user-level releases stopped (budget spent), else empty
    run_info: dict = field(default_factory=dict)  #: the run's own record (metrics so far), kept for a resume
    #: deployment: entropy only the server knows, mixed into the seeds of its noise (0 in simulation: same seed,
    #: same run); kept in the checkpoint, so a resumed graph draws what the uninterrupted one would
    secret: int = 0
    #: device -> the round its newest update kept by the server was trained in (applied, or held in the FedBuff
    #: buffer); sent back with each request to train, so that a device whose update a crash or a lost reply
    #: discarded trains those events again (``RoundInstruction.acked``). In the checkpoint with the model it is in.
    acked: dict[int, int] = field(default_factory=dict)

    def host_state(self, round_: int = 1) -> dict[str, np.ndarray]:
        """The global parameters as numpy arrays on the CPU and the item graph's table (what is sent to the
        nodes for ``round_``; :func:`fedrec.itemgraph.split` parts them)."""
        public = {MODEL_FEATURES: self.model_features.at(round_, self.graph_table.get(PROFILES))} \
            if self.model_features is not None else {}
        return {**{k: v.detach().cpu().numpy() for k, v in self.global_state.items()}, **public, **self.graph_table}

    def state_dict(self, cfg: RunConfig, *, finished: bool = False, ledger: dict | None = None) -> dict:
        """The checkpoint: what :func:`fedrec.checkpoint.save_checkpoint` writes; ``ledger`` is what it records
        of the privacy ledger (:meth:`fedrec.privacy.ledger.Ledger.mark`)."""
        meta, arrays = self.buffer.state() if self.buffer is not None else ([], {})
        return {"round_": self.round, "global_state": self.global_state, "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr.state_dict(), "buffer": arrays,
                "graph": {**self.graph.state(), **self.graph_table} if self.graph is not None else {},
                "acked": {"devices": np.fromiter(self.acked, np.int64, len(self.acked)),
                          "rounds": np.fromiter(self.acked.values(), np.int64, len(self.acked))},
                "run": {"finished": finished, "last_fresh": self.last_fresh, "stopped": self.stopped,
                        "version": self.version, "buffer": meta, "config": resume_key(cfg), "recorder": self.run_info,
                        "ledger": ledger or {}, "secret": str(self.secret)}}

    def save(self, path: Path, cfg: RunConfig, *, finished: bool = False, ledger: dict | None = None) -> None:
        save_checkpoint(path, **self.state_dict(cfg, finished=finished, ledger=ledger))

    def load_state_dict(self, ck: dict) -> None:
        """Continue from a checkpoint (:func:`fedrec.checkpoint.load_checkpoint`'s output)."""
        dev = next(iter(self.global_state.values())).device
        self.global_state = {k: torch.as_tensor(v).to(dev) for k, v in ck["global"].items()}
        needed = set(self.optimizer.rows)
        self.optimizer.load_state_dict(ck["optimizer"], dev)
        missing = sorted(needed - set(self.optimizer.rows))
        if missing:
            raise ValueError(f"it holds no per-row tally of {missing[0]}, which row-average needs")
        for k, t in self.optimizer.rows.items():
            if k not in self.global_state or t.shape != self.global_state[k].shape[:1]:
                raise ValueError(f"its per-row tally of {k} does not fit the model's {k}")
        self.lr.load_state_dict(ck["lr_schedule"])
        run = ck["run"]
        self.run_info = run["recorder"]
        self.round, self.last_fresh, self.stopped = int(ck["round"]), int(run["last_fresh"]), run["stopped"]
        self.version = int(run.get("version", ck["round"]))
        if self.buffer is not None:  # the updates that were waiting are applied as if no restart happened
            self.buffer.load(run.get("buffer", []), ck["buffer"])
        self.secret = int(run.get("secret", "0"))
        acked = ck.get("acked", {})
        self.acked = dict(zip(acked.get("devices", np.zeros(0, np.int64)).tolist(),
                              acked.get("rounds", np.zeros(0, np.int64)).tolist(), strict=True))
        if self.graph is not None and self.secret:
            self.graph.seed = mixed_seed(self.graph.seed, self.secret)
        graph = ck.get("graph", {})
        if self.graph is not None and graph:  # the sums, and the table as published (not recomputed)
            self.graph.load({k: v for k, v in graph.items() if k not in GRAPH_KEYS})
            self.graph_table = {k: graph[k] for k in GRAPH_KEYS if k in graph}


def mixed_seed(seed: int, secret: int) -> int:
    """``seed`` with the server's ``secret`` mixed in (``seed`` itself when there is none)."""
    return int(np.random.SeedSequence([seed, secret]).generate_state(1, np.uint64)[0] >> 1) if secret else seed


def init_state(cfg: RunConfig, n_items: int, features: np.ndarray | None = None,
               model_features: ModelFeatures | None = None, *, z_user: float = 0.0) -> ServerState:
    """A new server: the model's initial global parameters on the aggregation device (``features``: the public
    item features, rows L2-normalised, that the item graph publishes and learns profiles for; ``model_features``:
    what a model that reads them gets with each version; ``z_user``: user-level DP's noise multiplier, of which
    the item graph gets its part)."""
    dev = pick_device(cfg.device)
    mfeat = model_features if reads_features(cfg.model) else None
    model = model_from_config(cfg, n_items, mfeat.at(1) if mfeat is not None else None)
    gstate = model.global_state()
    optimizer = ServerOptimizer(cfg.server_opt)
    if cfg.row_average and cfg.privacy == "none":  # per-row averaging's tally: in every checkpoint from the start
        optimizer.rows = {k: torch.zeros(len(gstate[k]), dtype=torch.float64) for k in ITEM_TABLES if k in gstate}
    graph = new_graph(cfg, n_items, features, z_user=z_user)
    # under SecAgg+ the devices sum the affinities themselves, from the profiles of the table they were sent: the
    # first round's too (the lists, as the server reads them where it sums the affinities itself)
    table = graph.table() if graph is not None and cfg.secure_graph and features is not None else {}
    return ServerState(global_state={k: v.to(dev) for k, v in gstate.items()},
                       optimizer=optimizer,
                       lr=ServerLR(cfg.server_lr, adaptive=cfg.lr_schedule == "adaptive"),
                       buffer=Buffer(cfg.async_buffer, cfg.max_staleness) if cfg.async_buffer else None,
                       graph=graph, model_features=mfeat, graph_table=table)


def new_graph(cfg: RunConfig, n_items: int, features: np.ndarray | None = None, *,
              z_user: float = 0.0) -> ItemGraph | None:
    """The run's item graph (None: off). Under event noise at the aggregate its sums get Gaussian noise of std
    ``z_graph`` times their sensitivity (:func:`fedrec.itemgraph.sensitivity`: ``sqrt(3 W w^2 + 1)``, ``W`` the pair
    window, and 3 more under the root with non-negative ``features``), so the run's graph is one Gaussian mechanism of
    multiplier ``z_graph``, as accounted (:func:`fedrec.privacy.accounting.graph_records`). Under user-level DP
    each device's counts of a round are clipped to L2 norm 1 and the sums get noise of std ``z_graph``, the
    graph's part of the round's one Gaussian (:func:`fedrec.privacy.accounting.user_parts`). The noise is drawn
    from the run's seed. Under SecAgg+ (:attr:`~fedrec.config.RunConfig.secure_graph`) the same sums without pairs
    come from the devices' masked vectors with the same noise, as their shares."""
    if not cfg.graph:
        return None
    if cfg.user_graph:
        std, clip = user_parts(cfg, z_user)[1], 1.0
    else:
        # under SecAgg+ the window is 0: the std each device checks (:func:`fedrec.itemgraph.secure_noise_std`)
        std = graph_multiplier(cfg) * sensitivity(cfg.pair_window, features) if cfg.graph_noised else 0.0
        clip = 0.0
    if cfg.graph_noised and not std > 0:
        raise ValueError("The noisy item graph needs a positive noise multiplier (graph-share, epsilon).")
    return ItemGraph(n_items, neighbours=cfg.graph_neighbours, noise_std=std, seed=cfg.seed, features=features,
                     clip=clip, pairs=not (cfg.user_graph or cfg.secure_graph), affinity_every=cfg.affinity_every)


#: the outputs a finished run has written (a finished checkpoint without them rebuilds them)
OUTPUTS = ("metrics.jsonl", "summary.json", "global_model.npz")


#: keys a checkpoint of an earlier version lacks, by its privacy mode, and the value that run had: user-level DP
#: before its item graph, event level before the affinities were released in batches
BEFORE_KEYS = {("user", "user-graph-share"): 0.0, ("event", "affinity-rounds"): 1}


def checkpoint_to_continue(cfg: RunConfig, state: ServerState, path: Path, ledger: Ledger) -> dict | None:
    """The checkpoint in ``path`` this run continues, or None to start anew.

    An unfinished checkpoint must have this run's config and shapes; a finished one is continued (to rebuild
    its outputs, training nothing) only where an output is missing and the config is the same. Either way
    the privacy ledger must still hold what the checkpoint recorded of it (:meth:`Ledger.check_mark`).
    """
    if not (cfg.resume and path.exists()):
        return None
    ck = load_checkpoint(path)
    ledger.check_mark(ck["run"].get("ledger", {}), path)
    was = ck["run"].get("config", {})
    was = {**{k: v for (privacy, k), v in BEFORE_KEYS.items() if was.get("privacy") == privacy}, **was}
    key = resume_key(cfg)
    diff = [k for k, v in key.items() if k in was and was[k] != v]
    if ck["run"].get("finished", True):
        if diff or all((path.parent / name).is_file() for name in OUTPUTS):
            return None
    elif cfg.graph and ck["round"] >= 1 and not ck.get("graph"):  # e.g. SecAgg+ event noise before it had a graph
        raise ResumeError(f"The checkpoint {path} belongs to a run without the item graph, which this version runs "
                          "there (its budget was spent without the graph's share); use another --out.")
    elif diff:
        k = diff[0]
        raise ResumeError(f"The checkpoint {path} belongs to a run with {k} = {was[k]!r}, not {key[k]!r}; "
                          "use another --out, or resume = false to start anew there.")
    shapes = {k: tuple(np.shape(v)) for k, v in ck["global"].items()}
    want = {k: tuple(v.shape) for k, v in state.global_state.items()}
    if shapes != want:
        raise ResumeError(f"The checkpoint {path} holds a model of shapes {shapes}, this run builds {want}.")
    rows = ck["run"].get("recorder", {}).get("rows", [])
    if (rows[-1].get("round") if rows else 0) != ck["round"]:
        raise ResumeError(f"The checkpoint {path} is at round {ck['round']} but holds the metrics of round "
                          f"{rows[-1].get('round') if rows else 0}; it was edited or damaged, so use another --out.")
    return ck


def resume_key(cfg: RunConfig) -> dict:
    """The config a checkpoint must match to be resumed."""
    return {k: v for k, v in cfg.to_flat().items() if k not in NOT_RESUME_KEYS}
