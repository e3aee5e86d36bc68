"""A device's round with per-event scoring against the same round without it, measured in the same run.

Run by hand: ``python benchmarks/bench_online.py [--data PATH] [--rounds 10] [--model mf]``.

1. **Through the path a user takes**: ``fedrec simulate`` twice on the same stream, ``per-event = true``
   (the default: every event scored with the device's state through the event before it) and ``false``
   (every event scored with the state at the round's start), each in its own process. Printed: the mean
   round time of each (the end-of-run baselines excluded) and their ratio.
2. **One device's round**, in process: for the devices with events in one mid-run round of the stream,
   the serving step (:func:`fedrec.serving.serve`) with and without per-event scoring, and the local
   update (:func:`fedrec.client_update.client_update`) that a sampled device runs after it. Printed: the
   mean milliseconds per device of each, and per-event serving + update over round-start serving + update.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-latest-small" / "ratings.csv"


def simulate(data: Path, rounds: int, model: str, per_event: bool) -> float:
    """Mean round time of one ``fedrec simulate`` run (seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / "extra.toml"
        extra.write_text(f"per-event = {'true' if per_event else 'false'}\n")
        cmd = [sys.executable, "-m", "fedrec.cli", "simulate", "--data", str(data), "--rounds", str(rounds),
               "--model", model, "--privacy", "none", "--engine", "local", "--out", str(Path(tmp) / "run"),
               "--no-progress", "--config", str(extra)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if p.returncode:
            raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return float(np.mean([r["wall_s"] for r in rows]))


def one_round(data: Path, rounds: int, model_name: str) -> dict[str, float]:
    """Per-device milliseconds of serving (per event / round start) and of the local update, in one round."""
    import torch

    from fedrec.client_update import DeviceState, client_update
    from fedrec.config import RunConfig
    from fedrec.data.source import load_stream
    from fedrec.device_round import DeviceData, serve_input
    from fedrec.itemgraph import ItemGraph, device_pairs
    from fedrec.models import model_from_config
    from fedrec.serving import serve

    torch.set_num_threads(1)
    cfg = RunConfig(data=str(data), rounds=rounds, model=model_name, privacy="none")
    stream = load_stream(cfg)
    log, r = stream.log, rounds // 2
    model = model_from_config(cfg, log.n_items)
    params = {k: v.numpy() for k, v in model.global_state().items()}
    graph = ItemGraph(log.n_items, cfg.graph_neighbours)
    devices = sorted(set(int(u) for u in np.unique(log.user[stream.round_of == r])))
    data_of = {d: DeviceData(d, log.item[stream.by_user[d]], stream.round_of[stream.by_user[d]]) for d in devices}
    graph.add([device_pairs(x.items, x.rounds < r, cfg.graph_window) for x in data_of.values()])
    table = graph.table()
    inputs = [s for s in (serve_input(data_of[d], r) for d in devices) if s is not None]
    out: dict[str, float] = {"devices": len(inputs), "events": int(sum(len(s.new) for s in inputs))}
    for name, per_event in (("serve_per_event_ms", True), ("serve_round_start_ms", False)):
        t0 = time.perf_counter()
        serve(model, params, inputs, {}, round_=r, seed=0, k=cfg.k, fit_steps=cfg.user_fit_steps, lr=cfg.lr,
              graph=table, context=cfg.session_len, per_event=per_event)
        out[name] = 1000 * (time.perf_counter() - t0) / len(inputs)
    t0 = time.perf_counter()
    for s in inputs:
        x = data_of[s.device]
        keep = x.rounds <= r
        client_update(model, params, DeviceState(), x.items[keep], x.rounds[keep], r, cfg, device_id=s.device,
                      noise_multiplier=0.0)
    out["update_ms"] = 1000 * (time.perf_counter() - t0) / len(inputs)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", default="mf")
    args = ap.parse_args(argv)
    dev = one_round(args.data, args.rounds, args.model)
    on, off = (simulate(args.data, args.rounds, args.model, p) for p in (True, False))
    print(f"stream {args.data.name}, {args.rounds} rounds, model {args.model}")
    print(f"one round in process: {dev['devices']} devices, {dev['events']} events")
    print(f"  serving per event     {dev['serve_per_event_ms']:8.2f} ms/device")
    print(f"  serving at the start  {dev['serve_round_start_ms']:8.2f} ms/device")
    print(f"  local update          {dev['update_ms']:8.2f} ms/device")
    full_on = dev["serve_per_event_ms"] + dev["update_ms"]
    full_off = dev["serve_round_start_ms"] + dev["update_ms"]
    print(f"  a sampled device's round: {full_on / full_off:.2f}x with per-event scoring "
          f"(serving alone {dev['serve_per_event_ms'] / dev['serve_round_start_ms']:.2f}x)")
    print(f"fedrec simulate, mean round: per event {on:.2f} s, round start {off:.2f} s: {on / off:.2f}x")


if __name__ == "__main__":
    main()
