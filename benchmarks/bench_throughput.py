"""Simulated device-updates per second on ml-latest-small, 61 devices per round, with and without
event-level DP, against the stock pattern (``benchmarks/stock_pattern.py``) measured in the same run;
and the bytes each device-round sends up and down.

Run by hand: ``python benchmarks/bench_throughput.py [--data PATH] [--rounds 20] [--stock-rounds 3]``.
fedrec runs as a user runs it (``fedrec simulate --cohort 61``, each configuration in its own
process); its rate is device-updates over the summed round times in ``metrics.jsonl`` (start-up
and the end-of-run baselines excluded, as for the stock pattern, whose first round is not timed).
``--serve-eval`` is timed both off (training only) and on. Training only is timed twice: with the model alone
(``item-graph = "off"``: as the stock pattern, MF alone, with each trained device's round-start evaluation
besides) and with the defaults' item graph, which the stock pattern has no counterpart of (its
pair sums, neighbour table and prior are built every round for serving). With DP, fedrec's default for MF puts the noise at
the aggregate (one clipped step per device and round); ``--event-noise device`` (DP-SGD with local steps on every
device, the stock pattern's work) is timed beside it, training only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ml-latest-small" / "ratings.csv"


def ours(data: Path, privacy: str, rounds: int, serve: bool, engine: str, *extra: str, graph: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "fedrec.cli", "simulate", "--data", str(data), "--rounds", str(rounds),
               "--cohort", "61", "--privacy", privacy, "--engine", engine, "--out", tmp, "--no-progress",
               "--config", str(Path(tmp) / "extra.toml"), *extra]
        (Path(tmp) / "extra.toml").write_text(f"serve-eval = {'true' if serve else 'false'}\n"
                                              + ("" if graph else 'item-graph = "off"\n'))
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if p.returncode:
            raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    done = sum(r["devices"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    # steady state: after the first 3 rounds, when every device's DP history has been seen (each new
    # history costs one PRV accountant computation, cached afterwards: 0.2-0.3 s for the first, 0.03 s since for
    # the next exposures, whose RDP sweeps are memoised)
    late = rows[3:]
    return {"updates_per_s": done / wall, "updates": done, "wall_s": wall,
            "steady_updates_per_s": sum(r["devices"] for r in late) / max(sum(r["wall_s"] for r in late), 1e-9),
            "bytes_up_per_update": sum(r["bytes_up"] for r in rows) / done,
            "bytes_down_per_update": sum(r["bytes_down"] for r in rows) / max(sum(r["sampled"] for r in rows), 1)}


def stock(data: Path, dp: bool, rounds: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import stock_pattern as s; "
            f"print('RESULT', json.dumps(s.run({str(data)!r}, dp={dp!r}, rounds={rounds + 1}, fraction=0.1)))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
    return json.loads(line[-1][7:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--stock-rounds", type=int, default=3, help="timed rounds of the stock pattern (after one warm-up)")
    ap.add_argument("--engine", default="local", choices=["local", "ray"])
    ap.add_argument("--out", type=Path, default=None, help="write throughput.json here")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"No ratings file at {args.data}; pass --data PATH/ratings.csv (ml-latest-small).")
    res = {}
    for dp in (False, True):
        tag = "dp" if dp else "plain"
        res[f"stock_{tag}"] = stock(args.data, dp, args.stock_rounds)
        privacy = "event" if dp else "none"
        res[f"ours_{tag}_model"] = ours(args.data, privacy, args.rounds, False, args.engine, graph=False)
        res[f"ours_{tag}"] = ours(args.data, privacy, args.rounds, False, args.engine)
        res[f"ours_{tag}_serving"] = ours(args.data, privacy, args.rounds, True, args.engine)
        base = res[f"stock_{tag}"]["updates_per_s"]

        def rate(key: str, field: str = "updates_per_s", base: float = base) -> str:
            return f"{res[key][field]:8.1f} ({res[key][field] / base:.1f}x)"

        print(f"{tag:>5}: stock {base:8.2f} updates/s | fedrec, the model alone (no item graph, as the stock pattern) "
              f"{rate(f'ours_{tag}_model')}, after round 3 {rate(f'ours_{tag}_model', 'steady_updates_per_s')} "
              f"| with the item graph (the default) {rate(f'ours_{tag}')}, after round 3 "
              f"{rate(f'ours_{tag}', 'steady_updates_per_s')} | with serving {rate(f'ours_{tag}_serving')}", flush=True)
    res["ours_dp_device"] = ours(args.data, "event", args.rounds, False, args.engine, "--event-noise", "device")
    dev = res["ours_dp_device"]
    print(f"   dp, noise on each device (the stock pattern's work): fedrec {dev['updates_per_s']:8.1f} updates/s "
          f"({dev['updates_per_s'] / res['stock_dp']['updates_per_s']:.0f}x) | after round 3 "
          f"{dev['steady_updates_per_s']:8.1f} ({dev['steady_updates_per_s'] / res['stock_dp']['updates_per_s']:.0f}x)",
          flush=True)
    for tag in ("plain", "dp"):
        o, s = res[f"ours_{tag}"], res[f"stock_{tag}"]
        print(f"bytes per device-round ({tag}): up {o['bytes_up_per_update']:,.0f} vs stock "
              f"{s['bytes_up_per_update']:,.0f} ({o['bytes_up_per_update'] / s['bytes_up_per_update']:.3f}); down "
              f"{o['bytes_down_per_update']:,.0f} vs {s['bytes_down_per_update']:,.0f} "
              f"({o['bytes_down_per_update'] / s['bytes_down_per_update']:.3f})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
