"""The CUDA paths beside the CPU's: a node's batched devices and the server's aggregation.

Run by hand on a machine with a GPU: ``python benchmarks/bench_cuda.py [--devices 512 4096] [--items 20000]``.
For each batch size (a node's devices in one round, of a synthetic world with ``--items`` items) it times,
with ``device = "cpu"`` and then ``device = "cuda"`` in the run config, what a node runs:

* ``train``: :func:`fedrec.device_round.train_devices` (the round-start fit and the local steps of ``mf``,
  each device from its own state and generator, with the per-device work around them);
* ``serve``: :func:`fedrec.device_round.serve_devices` (the serving fit and every item scored, then the new
  events scored one by one).

It prints the median seconds of ``--repeats`` runs after a warm-up, the CPU's time over CUDA's, and the
largest difference between the two devices' results (deltas, vectors, counts): the same up to float rounding.
Then :mod:`bench_aggregate`'s server aggregation on both. Needs numpy and torch, and this package's source
(no Flower, Opacus or Ray), so it runs on a bare GPU machine. Results also go to ``--out`` as JSONL.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_aggregate import bench_size  # noqa: E402

from fedrec.config import RunConfig  # noqa: E402
from fedrec.data.stream import RoundStream  # noqa: E402
from fedrec.data.world import WorldSpec, make_world  # noqa: E402
from fedrec.device_round import DeviceData, serve_devices, serve_input, train_devices  # noqa: E402
from fedrec.messages import RoundInstruction  # noqa: E402
from fedrec.models import build_model  # noqa: E402

ROUND = 3  #: the round timed: devices have two rounds of history to fit to


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int):
    out = fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _node(n_devices: int, items: int, seed: int):
    """A node's devices in round ``ROUND`` of a synthetic world, and a global table to start from."""
    world = make_world(WorldSpec(users=n_devices, items=items, topics=max(2, items // 200), events_per_user=30,
                                 seed=seed))
    stream = RoundStream.build(world, 5)
    devs = []
    for d in range(n_devices):
        idx = stream.device_events(d, ROUND)
        devs.append(DeviceData(d, stream.log.item[idx], stream.round_of[idx]))
    rng = np.random.default_rng(seed)
    table = {"item.weight": (rng.normal(size=(stream.log.n_items, 33)) * 0.1).astype(np.float32)}
    return stream.log.n_items, devs, table


def _train_diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for name, v in x.delta.items():
            w = y.delta[name]
            if isinstance(v, tuple):  # sparse rows: the same rows, then their values
                if not np.array_equal(v[0], w[0]):
                    return float("inf")
                v, w = v[1], w[1]
            worst = max(worst, float(np.abs(np.asarray(v) - np.asarray(w)).max(initial=0.0)))
        worst = max(worst, float(np.abs(x.state.local["user.weight"] - y.state.local["user.weight"]).max()))
    return worst


def _serve_diff(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        worst = max(worst, float(np.abs(x.vector - y.vector).max(initial=0.0)),
                    float(np.abs(x.next_scores - y.next_scores).max(initial=0.0)))
    return worst


def bench_node(n_devices: int, items: int, repeats: int, seed: int, against: str = "cuda") -> list[dict]:
    n_items, devs, table = _node(n_devices, items, seed)
    model = build_model("mf", n_items, 32, init_scale=0.1)
    inputs = [s for s in (serve_input(d, ROUND) for d in devs) if s is not None]
    ins = RoundInstruction(ROUND, tuple(d.device for d in devs))
    rows, results = [], {}
    for device in ("cpu", against):
        cfg = RunConfig(privacy="none", dim=32, seed=seed, device=device, local_steps=2)
        t_train, trained = _timed(lambda cfg=cfg: train_devices(model, table, devs, cfg, ins, [None] * len(devs)),
                                  device, repeats)
        t_serve, served = _timed(lambda cfg=cfg: serve_devices(model, table, inputs, {}, cfg, ROUND), device, repeats)
        assert not any(isinstance(r, Exception) for r in trained), [r for r in trained if isinstance(r, Exception)]
        results[len(rows)] = (trained, served)
        rows.append({"what": "node", "device": device, "devices": n_devices, "items": n_items,
                     "events": int(sum(len(d.items) for d in devs)), "train_s": t_train, "serve_s": t_serve})
    diff_train = _train_diff(results[0][0], results[1][0])
    diff_serve = _serve_diff(results[0][1], results[1][1])
    hits = [sum(r.counts.start.hits for r in results[j][1]) for j in (0, 1)]
    cpu, gpu = rows
    print(f"node of {n_devices} devices, {n_items} items: train CPU {cpu['train_s']:.3f}s CUDA {gpu['train_s']:.3f}s "
          f"({cpu['train_s'] / gpu['train_s']:.2f}x); serve CPU {cpu['serve_s']:.3f}s CUDA {gpu['serve_s']:.3f}s "
          f"({cpu['serve_s'] / gpu['serve_s']:.2f}x); max |CPU-CUDA| train {diff_train:.2e} serve {diff_serve:.2e}; "
          f"round-start hits CPU {hits[0]} CUDA {hits[1]}", flush=True)
    for r in rows:
        r.update(diff_train=diff_train, diff_serve=diff_serve)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[256, 2048, 8192])
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--agg-rows", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_cuda"))
    ap.add_argument("--against", default="cuda", help="the device timed beside the CPU (cpu: a dry run of the script)")
    args = ap.parse_args()
    if args.against.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_cuda: this machine has no CUDA device; it times the CPU beside CUDA.")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {gpu}", flush=True)
    rows = []
    for n in args.devices:
        rows += bench_node(n, args.items, args.repeats, args.seed, args.against)
    for n in args.agg_rows:
        by = {}
        for side, dev in (("cpu", "cpu"), ("cuda", args.against)):
            for r in bench_size(n, 32, 64, 512, torch.device(dev), args.repeats, args.seed):
                by[side, r["kind"]] = r
                rows.append({"what": "aggregate", **r})
        cpu, gpu = (by[s, "dense"]["agg_s"] for s in ("cpu", "cuda")), (by[s, "sparse"]["agg_s"] for s in ("cpu", "cuda"))
        (dc, dg), (sc, sg) = cpu, gpu
        print(f"aggregate 64 deltas of {n} rows: dense CPU {dc:.4f}s CUDA {dg:.4f}s ({dc / dg:.1f}x); "
              f"sparse CPU {sc:.4f}s CUDA {sg:.4f}s ({sc / sg:.1f}x)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_cuda.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({k: (v if not dataclasses.is_dataclass(v) else dataclasses.asdict(v))
                                for k, v in r.items()}) + "\n")
    print(f"wrote {args.out / 'bench_cuda.jsonl'}")


if __name__ == "__main__":
    main()
