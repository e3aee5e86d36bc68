"""One DP local step against the non-private step, at item tables of 2k, 20k and 200k rows.

Run by hand: ``python benchmarks/bench_step.py [--rows 2000 20000 200000] [--events 64] [--dim 32] [--out DIR]``.
Times fedrec's own device update (``fedrec.client_update._local_sgd``, ``--steps`` Poisson-sampled
steps) per local step, on one torch thread: without DP, with event-level DP as fedrec runs it for
MF (``update-backend = auto``: closed-form per-event clipping, noise drawn lazily, one dense draw per
update; ``fedrec.privacy.fast_dpsgd``), with event-level DP as the default runs it for MF (``event-noise = auto``:
the noise at the aggregate, so the device's step is one clipped release, ``fedrec.client_update._release``, its
item noise added once to the cohort's sum on the server), and with ``update-backend = autograd`` (Opacus ghost clipping,
one ``make_private`` per update, dense noise every step); for reference Opacus's default ``hooks``
mode (the stock pattern's, which materialises a dense per-sample gradient of the whole table)
where it fits.
Every ratio compares two figures measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedrec.client_update import _local_sgd, _release  # noqa: E402
from fedrec.config import RunConfig  # noqa: E402
from fedrec.models import build_model  # noqa: E402
from fedrec.models.base import BPRLoss  # noqa: E402


def _events(pos):
    """``pos`` as a device's events of one window, all trained on (``_local_sgd``'s arguments)."""
    items = pos.numpy() if hasattr(pos, "numpy") else np.asarray(pos)
    return items, np.ones(len(items), np.int64), np.ones(len(items), bool)



def _ours(rows: int, dim: int, events: int, steps: int, private: bool, repeats: int, backend: str = "auto") -> float:
    cfg = dataclasses.replace(RunConfig(), dim=dim, local_steps=steps, sample_rate=0.5,
                              privacy="event" if private else "none", update_backend=backend)
    model = build_model("mf", rows, dim, seed=0)
    rng = np.random.default_rng(0)
    pos = torch.from_numpy(rng.choice(rows, size=events, replace=False).astype(np.int64))
    seen = np.zeros(rows, bool)
    seen[pos.numpy()] = True
    times = []
    for rep in range(repeats + 1):
        g = torch.Generator().manual_seed(rep)
        t0 = time.perf_counter()
        _local_sgd(model, *_events(pos), seen, cfg, g, 1.0 if private else 0.0, private)
        if rep:  # the first is a warm-up
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


def _aggregate(rows: int, dim: int, events: int, repeats: int) -> float:
    """The device's DP step with the noise at the aggregate: one clipped release of its events (one step)."""
    cfg = dataclasses.replace(RunConfig(), dim=dim, local_steps=1, sample_rate=0.5, privacy="event",
                              event_noise="aggregate")
    model = build_model("mf", rows, dim, seed=0)
    rng = np.random.default_rng(0)
    items = rng.choice(rows, size=events, replace=False).astype(np.int64)
    seen = np.zeros(rows, bool)
    seen[items] = True
    times = []
    for rep in range(repeats * 10 + 1):
        g = torch.Generator().manual_seed(rep)
        t0 = time.perf_counter()
        _release(model, *_events(items), seen, cfg, g, 1.0)
        if rep:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _hooks(rows: int, dim: int, events: int, steps: int) -> float:
    """Opacus's default per-sample gradients (hooks), a new PrivacyEngine per update: the stock way."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model("mf", rows, dim, seed=0)
    rng = np.random.default_rng(0)
    items = torch.from_numpy(rng.integers(0, rows, size=(events, 2)))
    user = torch.zeros(events, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp")
        dp_model, opt, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(user, items), batch_size=max(1, events // 2)),
            noise_multiplier=1.0, max_grad_norm=1.0)
        crit = BPRLoss()
        t0 = time.perf_counter()
        done = 0
        for u, it in loader:
            if len(u) == 0:
                continue
            opt.zero_grad()
            s = dp_model(u, it)
            crit(s[:, :1] - s[:, 1:]).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return (time.perf_counter() - t0) / max(done, 1)


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000, 20_000, 200_000])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--events", type=int, default=64, help="events in the device's update")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hooks-max-rows", type=int, default=20_000, help="largest table to time hooks mode on")
    ap.add_argument("--out", type=Path, default=None, help="write step.json here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; {args.events} events, dim {args.dim}, {args.steps} steps per update")
    print(f"{'rows':>8} {'plain ms':>9} {'DP ms':>8} {'DP/plain':>9} {'agg DP ms':>10} {'agg/plain':>10} "
          f"{'opacus ms':>10} {'opacus/plain':>13} {'hooks ms':>9} {'hooks/DP':>9}")
    print("(DP: noise on the device, drawn lazily; agg DP: noise at the aggregate, the default for MF: the device's "
          "step is one clipped release, its item noise added once to the cohort's sum on the server)")
    res = []
    for n in args.rows:
        plain = _ours(n, args.dim, args.events, args.steps, False, args.repeats)
        dp = _ours(n, args.dim, args.events, args.steps, True, args.repeats)
        agg = _aggregate(n, args.dim, args.events, args.repeats)
        opa = _ours(n, args.dim, args.events, args.steps, True, args.repeats, backend="autograd")
        hooks = _hooks(n, args.dim, args.events, 3) if n <= args.hooks_max_rows else None
        print(f"{n:>8} {plain * 1e3:9.2f} {dp * 1e3:8.2f} {dp / plain:9.1f} {agg * 1e3:10.2f} {agg / plain:10.1f} "
              f"{opa * 1e3:10.2f} {opa / plain:13.1f} "
              + (f"{hooks * 1e3:9.1f} {hooks / dp:9.1f}" if hooks else f"{'-':>9} {'-':>9}"))
        res.append({"rows": n, "dim": args.dim, "events": args.events, "steps": args.steps, "plain_s": plain,
                    "dp_s": dp, "dp_aggregate_s": agg, "dp_aggregate_over_plain": agg / plain, "dp_autograd_opacus_s": opa, "opacus_hooks_s": hooks, "dp_over_plain": dp / plain})
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
