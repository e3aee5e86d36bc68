"""Flower ServerApp: samples a cohort of devices, aggregates their deltas, publishes versions.

The round loop is our own (Flower strategies always restart at round 1 and cannot address
the devices inside a simulation shard): each round it samples ``cohort`` devices uniformly
from the population the nodes reported, sends each node the global version and the names of
its sampled devices, validates and aggregates the per-device deltas on the torch device, and
writes one metrics line. Baselines and the summary are written at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrec.config import RunConfig
from fedrec.eval.metrics import PrequentialCounts
from fedrec.models.mf import build_model
from fedrec.privacy.accounting import calibrate_noise
from fedrec.report import RunRecorder
from fedrec.server_aggregate import pick_device, server_aggregate


class FederationError(RuntimeError):
    """The federation cannot go on (no nodes, every reply failed); the message says why."""


def effective_noise(cfg: RunConfig) -> float:
    """The DP-SGD noise multiplier devices use: given, or calibrated to the per-event ε target."""
    if cfg.privacy not in ("event", "both"):
        return 0.0
    if cfg.epsilon > 0:
        steps = cfg.local_steps * (cfg.replay_rounds + 1)
        return calibrate_noise(cfg.epsilon, cfg.sample_rate, steps, cfg.delta, cfg.accountant)
    return cfg.noise_multiplier


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
    flat = cfg.to_flat()
    noise = effective_noise(cfg)
    base_conf = {**flat, "effective-noise-multiplier": noise}

    nodes = _wait_for_nodes(grid, cfg.nodes)
    replies = list(grid.send_and_receive([
        Message(RecordDict({"config": ConfigRecord(base_conf)}), dst_node_id=n, message_type="query")
        for n in nodes]))
    home: dict[int, int] = {}
    n_items = None
    for rep in replies:
        if rep.has_error():
            raise FederationError(f"Node {rep.metadata.src_node_id} failed to report its devices: {rep.error.reason}")
        info = rep.content["info"]
        for d in info["devices"]:
            home[int(d)] = rep.metadata.src_node_id
        if n_items is not None and int(info["n-items"]) != n_items:
            raise FederationError("Nodes disagree on the item catalogue size; they must load the same data.")
        n_items = int(info["n-items"])
    if not home or n_items is None:
        raise FederationError("No node reported any device.")
    population = sorted(home)

    dev = pick_device(cfg.device)
    model = build_model(cfg.model, n_items, cfg.dim, seed=cfg.seed, init_scale=cfg.init_scale)
    gstate = {k: v.to(dev) for k, v in model.global_state().items()}
    rng = np.random.default_rng([cfg.seed, 7])
    rec.start(population=len(population), n_items=n_items, noise_multiplier=noise, device=str(dev))
    last_fresh = 0
    for r in range(1, cfg.rounds + 1):
        t0 = time.time()
        cohort = sorted(int(d) for d in rng.choice(population, size=min(cfg.cohort, len(population)), replace=False))
        by_node: dict[int, list[int]] = {}
        for d in cohort:
            by_node.setdefault(home[d], []).append(d)
        arrays = ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in gstate.items()})
        down = sum(a.numpy().nbytes for a in arrays.values())
        msgs = [Message(RecordDict({"arrays": arrays, "config": ConfigRecord({**base_conf, "round": r,
                                                                               "devices": ds})}),
                        dst_node_id=n, message_type="train") for n, ds in by_node.items()]
        deltas, weights, done, failed = [], [], [], []
        counts, eps, up, new_events = PrequentialCounts(), [], 0, 0
        for rep in grid.send_and_receive(msgs):
            if rep.has_error():
                failed.append((rep.metadata.src_node_id, rep.error.reason))
                continue
            for key in rep.content.keys():
                if key.startswith("error-"):
                    failed.append((int(key[6:]), rep.content[key]["reason"]))
                if not key.startswith("delta-"):
                    continue
                d = int(key[6:])
                delta = {k: v.numpy() for k, v in rep.content[key].items()}
                m = rep.content[f"metrics-{d}"]
                problem = _validate(delta, gstate)
                if problem:
                    failed.append((d, problem))
                    continue
                up += sum(v.nbytes for v in delta.values())
                deltas.append(delta)
                weights.append(float(m["num-examples"]))
                counts.add(PrequentialCounts(int(m["eval-n"]), float(m["eval-hits"]), float(m["eval-ndcg"])))
                eps.append(float(m["epsilon"]) if m["epsilon"] >= 0 else math.inf)  # -1 encodes infinity
                new_events += int(m["n-new"])
                done.append(d)
        if not deltas and failed:
            raise FederationError(f"Every device failed in round {r}; first reason: {failed[0][1]}")
        gstate, diag = server_aggregate(gstate, deltas, weights, server_lr=cfg.server_lr)
        if new_events:
            last_fresh = r
        row = rec.round(r, done=done, counts=counts, eps=eps, diag=diag, failed=failed, bytes_up=up,
                        bytes_down=down * len(cohort), staleness=r + 1 - last_fresh, new_events=new_events,
                        wall_s=time.time() - t0)
        if on_round:
            on_round(row)
    final = {k: v.detach().cpu() for k, v in gstate.items()}
    return rec.finish(final)


def _validate(delta: dict[str, np.ndarray], gstate: dict[str, torch.Tensor]) -> str | None:
    if set(delta) != set(gstate):
        return f"delta has keys {sorted(delta)}, expected {sorted(gstate)}"
    for k, v in delta.items():
        if tuple(v.shape) != tuple(gstate[k].shape):
            return f"delta {k} has shape {tuple(v.shape)}, expected {tuple(gstate[k].shape)}"
        if not np.all(np.isfinite(v)):
            return f"delta {k} has non-finite values"
    return None


def make_server_app(cfg: RunConfig | None = None, on_round: Callable[[dict], None] | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (``fedrec simulate``) or reading Flower's run config (``flwr run``)."""
    sapp = ServerApp()

    @sapp.main()
    def main(grid: Grid, context: Context) -> None:
        c = cfg or RunConfig.from_mapping(dict(context.run_config), where="[tool.flwr.app.config]")
        run_federation(grid, c, on_round)

    return sapp


app = make_server_app()
