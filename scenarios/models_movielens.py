"""The models table: mf, neumf, sasrec and deepfm on MovieLens replayed by time, non-private and at ε = 8.

    .venv/bin/python scenarios/models_movielens.py [--config scenarios/models_movielens.toml]
                                                   [--data PATH] [--out runs/models] [--jobs 2]

One real federation per (model, privacy) cell (the in-process engine, same ServerApp and ClientApp
as `fedrec simulate`), settings from the TOML. Each run measures the full-ranking prequential HR@10
and NDCG@10 of what every device was served, per event and at the round's start, and the baselines
(popularity, item-kNN) on exactly the same events. Writes results.csv, results.md and results.png into --out (one folder per run beside
them); a finished run is read back, not redone.
"""

from __future__ import annotations

import argparse
import csv
import json
import tomllib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.progress import Progress


def run_one(out: str, keys: dict) -> dict:
    from fedrec.clients.app import app
    from fedrec.config import RunConfig
    from fedrec.server.app import run_federation
    from fedrec.server.local_grid import LocalGrid

    summ = Path(out) / "summary.json"
    if summ.is_file():
        return json.loads(summ.read_text())
    cfg = RunConfig.from_mapping({**keys, "out": out}, where="scenarios/models_movielens.toml")
    return run_federation(LocalGrid(app, cfg.nodes, cfg.to_flat()), cfg)


def cells(spec: dict, data: str) -> dict[tuple[str, str], dict]:
    """(model, privacy) -> run config keys, validated before anything runs."""
    from fedrec.config import RunConfig

    out = {}
    for m in spec["models"]:
        for p in spec["privacies"]:
            keys = {**spec["base"], **spec["privacy"][p], **spec["model"][m], **spec.get("cell", {}).get(f"{m}-{p}", {}),
                    "data": data}
            RunConfig.from_mapping(keys, where=f"{spec['path']} cell {m}-{p}")
            out[(m, p)] = keys
    return out


def row(model: str, privacy: str, s: dict) -> dict:
    pr, pop = s["privacy"], s["baselines"]["popularity"]
    ev = pr.get("event", {})
    knn = s["baselines"].get("item_knn", {})
    return {"model": model, "privacy": privacy, "hr@10": s["metrics"]["hr@10"], "ndcg@10": s["metrics"]["ndcg@10"],
            "start_hr@10": s["metrics"].get("start_hr@10"), "blend": _served_blend(s),
            "popularity_hr@10": pop["hr@10"], "popularity_ndcg@10": pop["ndcg@10"],
            "item_knn_hr@10": knn.get("hr@10"),
            "epsilon": pr.get("epsilon"), "unit": pr["unit"], "delta": pr.get("delta"),
            "accountant": ev.get("accountant", pr.get("accountant")), "noise_multiplier": ev.get("noise_multiplier"),
            "session_epsilon": ev.get("session_epsilon"), "events": s["metrics"]["events_scored"],
            "wall_s": s["timings"]["wall_s"]}


def _served_blend(s: dict) -> str:
    """The blend that scored best over the run (each round serves the leader of the rounds before); without
    an item graph (under DP) the graph blends rank as the model, so only ``model`` and ``start`` compete."""
    blends = dict(s["metrics"].get("blends") or {})
    if s["config"].get("privacy") != "none":
        blends = {k: v for k, v in blends.items() if k in ("model", "start")}
    return max(blends, key=lambda b: blends[b] or 0.0) if blends else "—"


def table(rows: list[dict]) -> str:
    lines = ["| model | privacy | HR@10 per event | NDCG@10 | HR@10 at round start | best blend | popularity HR@10 / "
             "NDCG@10 | item-kNN HR@10 | per event / popularity | ε (δ, accountant) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "none" if r["epsilon"] is None else (
            f"event-level ε = {r['epsilon']:.2f} (δ={r['delta']:g}, {r['accountant']}, z={r['noise_multiplier']:.2f})"
            + (f"; per session {r['session_epsilon']:.2f}" if r["session_epsilon"] else ""))
        knn = "—" if r["item_knn_hr@10"] is None else f"{r['item_knn_hr@10']:.4f}"
        lines.append(f"| {r['model']} | {r['privacy']} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | "
                     f"{r['start_hr@10']:.4f} | {r['blend']} | "
                     f"{r['popularity_hr@10']:.4f} / {r['popularity_ndcg@10']:.4f} | {knn} | "
                     f"{r['hr@10'] / r['popularity_hr@10']:.2f}x | {eps} | {r['wall_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).with_name("models_movielens.toml")))
    ap.add_argument("--data", default=None, help="ratings.csv (default: the TOML's data)")
    ap.add_argument("--out", default="runs/models")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.config)
    spec = tomllib.loads(path.read_text())
    spec["path"] = str(path)
    data = args.data or str((path.parent / spec["data"]).resolve())
    if not Path(data).exists():
        raise SystemExit(f"{path}: data {data} does not exist; pass --data PATH to your ratings.csv.")
    todo = cells(spec, data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with Progress() as bar, ProcessPoolExecutor(args.jobs) as pool:
        task = bar.add_task("model runs", total=len(todo))
        futs = {c: pool.submit(run_one, str(out / f"{c[0]}-{c[1]}"), keys) for c, keys in todo.items()}
        for (m, p), fut in futs.items():
            rows.append(row(m, p, fut.result()))
            bar.advance(task)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = f"# {spec['title']}\n\n{table(rows)}\n"
    (out / "results.md").write_text(md)
    print(md)
    _plot(rows, out / "results.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"{r['model']}\n{r['privacy']}" for r in rows]
    for a, key in zip(ax, ("hr@10", "ndcg@10"), strict=True):
        a.bar(labels, [r[key] for r in rows], color=["C0" if r["privacy"] == "none" else "C1" for r in rows])
        a.axhline(rows[0][f"popularity_{key}"], color="k", ls="--", label="popularity")
        a.set(ylabel=f"{key.upper()} (prequential, full ranking)", title=key.upper())
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
