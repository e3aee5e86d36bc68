"""Server aggregation throughput (GB/s of deltas) against a plain memory copy of the same bytes.

Run by hand: ``python benchmarks/bench_aggregate.py [--cohort 64] [--dim 32] [--out DIR]``.
For each item-table size it times, on the CPU and on CUDA when present:

* ``dense``: ``server_aggregate`` over ``cohort`` dense float32 deltas arriving as host arrays,
  against ``copy``: the same bytes copied from those host arrays into one buffer on the same
  torch device (a memcpy on the CPU, a host-to-device copy on CUDA);
* ``sparse``: the same with sparse deltas (``touched`` row ids + rows per device), aggregated by
  ``index_add_``, against a copy of the same number of bytes;
* on CUDA also ``resident``: deltas already in GPU memory, against a device-to-device copy.

Figures are medians of ``--repeats`` timed runs after one warm-up; every ratio compares two
figures measured in this run. Needs only numpy and torch (it runs on a bare GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedrec.server_aggregate import delta_nbytes, server_aggregate, weighted_sum  # noqa: E402


def _timed(fn, dev: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copy_fn(arrays: list, dst: torch.Tensor):
    """Copy every array into consecutive slices of ``dst`` (the same bytes the aggregator reads)."""
    def run():
        off = 0
        for a in arrays:
            t = torch.as_tensor(a).reshape(-1)
            dst[off:off + t.numel()].copy_(t, non_blocking=True)
            off += t.numel()
    return run


def bench_size(rows: int, dim: int, cohort: int, touched: int, dev: torch.device, repeats: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    state = {"item.weight": torch.zeros(rows, dim + 1, device=dev)}
    dense = [{"item.weight": rng.standard_normal((rows, dim + 1), dtype=np.float32)} for _ in range(cohort)]
    sparse = []
    for _ in range(cohort):
        ids = np.sort(rng.choice(rows, size=min(touched, rows), replace=False)).astype(np.int64)
        sparse.append({"item.weight": (ids, rng.standard_normal((len(ids), dim + 1), dtype=np.float32))})
    w = rng.uniform(1, 50, size=cohort).tolist()
    out = []

    def row(kind, nbytes, t_agg, t_copy):
        out.append({"device": dev.type, "rows": rows, "dim": dim, "cohort": cohort, "kind": kind,
                    "bytes": nbytes, "agg_s": t_agg, "copy_s": t_copy, "agg_gbps": nbytes / t_agg / 1e9,
                    "copy_gbps": nbytes / t_copy / 1e9, "ratio": t_copy / t_agg})

    nb = sum(delta_nbytes(d) for d in dense)
    dst = torch.empty(nb // 4, dtype=torch.float32, device=dev)
    t_agg = _timed(lambda: server_aggregate(state, dense, w, inplace=True), dev, repeats)
    t_copy = _timed(_copy_fn([d["item.weight"] for d in dense], dst), dev, repeats)
    row("dense", nb, t_agg, t_copy)

    nb_s = sum(delta_nbytes(d) for d in sparse)
    dst_s = torch.empty(nb_s // 4 + 1, dtype=torch.float32, device=dev)
    flat = [a for d in sparse for a in (d["item.weight"][0].view(np.float32), d["item.weight"][1])]
    t_agg = _timed(lambda: server_aggregate(state, sparse, w, inplace=True), dev, repeats)
    t_copy = _timed(_copy_fn(flat, dst_s), dev, repeats)
    row("sparse", nb_s, t_agg, t_copy)

    if dev.type == "cuda":
        on_gpu = [{"item.weight": torch.from_numpy(d["item.weight"]).to(dev)} for d in dense]
        coefs = (np.asarray(w) / sum(w)).tolist()
        t_agg = _timed(lambda: weighted_sum(state, on_gpu, coefs), dev, repeats)
        t_copy = _timed(_copy_fn([d["item.weight"] for d in on_gpu], dst), dev, repeats)
        row("resident", nb, t_agg, t_copy)
    return out


def check_cuda_matches_cpu(seed: int = 0) -> float:
    """The CUDA path must give the CPU's result (dense, sparse and noisy user-level mean)."""
    from fedrec.privacy.user_level import noisy_mean

    rng = np.random.default_rng(seed)
    deltas = []
    for k in range(8):
        ids = np.sort(rng.choice(500, size=40, replace=False)).astype(np.int64)
        rows = rng.standard_normal((40, 9), dtype=np.float32) * 0.01
        deltas.append({"item.weight": (ids, rows)} if k % 2 else {"item.weight": _dense(ids, rows, 500)})
    w = rng.uniform(1, 5, size=8).tolist()
    worst = 0.0
    for fn in (lambda s: server_aggregate(s, deltas, w, server_lr=3.0)[0],
               lambda s: server_aggregate(s, deltas[1::2], w[1::2], server_lr=3.0)[0],
               lambda s: noisy_mean(s, deltas, clip=1.0, noise_multiplier=1.0, expected_devices=8.0,
                                    generator=torch.Generator().manual_seed(1))[0]):
        cpu = fn({"item.weight": torch.ones(500, 9)})["item.weight"]
        gpu = fn({"item.weight": torch.ones(500, 9, device="cuda")})["item.weight"].cpu()
        worst = max(worst, float((cpu - gpu).abs().max()))
    assert worst < 1e-5, f"CUDA aggregation differs from the CPU's by {worst}"
    return worst


def _dense(ids: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    full = np.zeros((n, *rows.shape[1:]), np.float32)
    full[ids] = rows
    return full


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000, 20_000, 200_000])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--cohort", type=int, default=64)
    ap.add_argument("--touched", type=int, default=256, help="rows each sparse delta touches")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=None, help="folder for aggregate.json")
    args = ap.parse_args(argv)
    devs = [torch.device(d) for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, os.cpu_count()={os.cpu_count()}"
          + (f", CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no CUDA"))
    if torch.cuda.is_available() and "cuda" in args.devices:
        print(f"CUDA path matches the CPU path (dense, sparse, user-level noisy mean): max |diff| "
              f"{check_cuda_matches_cpu():.2e}")
    rows = []
    print(f"{'device':6} {'rows':>7} {'kind':8} {'MB':>8} {'agg GB/s':>9} {'copy GB/s':>9} {'agg/copy':>8}")
    for dev in devs:
        for n in args.rows:
            for r in bench_size(n, args.dim, args.cohort, args.touched, dev, args.repeats, seed=0):
                rows.append(r)
                print(f"{r['device']:6} {r['rows']:>7} {r['kind']:8} {r['bytes'] / 1e6:8.1f} {r['agg_gbps']:9.2f} "
                      f"{r['copy_gbps']:9.2f} {r['ratio']:8.2f}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    by = {(r["device"], r["rows"], r["kind"]): r for r in rows}
    for n in args.rows:
        if ("cuda", n, "dense") in by:
            print(f"rows {n}: CUDA dense aggregation is {by['cpu', n, 'dense']['agg_s'] / by['cuda', n, 'dense']['agg_s']:.1f}x "
                  f"the CPU's; sparse {by['cpu', n, 'sparse']['agg_s'] / by['cuda', n, 'sparse']['agg_s']:.1f}x")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "aggregate.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
