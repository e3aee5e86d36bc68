"""The saved reference runs that hold the server round to its behaviour across refactors.

``python tests/round_reference.py --write`` records, for each case below, every round's metrics line
(minus wall-clock fields) and the final global model of a small in-process federation; the test
``tests/test_round_reference.py`` runs the same cases and compares. The reference files in
``tests/data/round_reference/`` were first written by the code *before* the server round moved into
``fedrec/`` (issue 15), so the test checked that the move kept the behaviour. Issue 16 (per-event
scoring, the item graph, two more baselines) changed what a metrics line holds, so they were written
again, after checking, case by case, against the issue-15 files: every final global model equal, every
line's ``start_hr@10``/``start_ndcg@10`` equal to the old ``hr@10``/``ndcg@10`` (the old headline was
the round-start metric), every other field equal but the bytes (item pairs up, the graph's table down),
the per-event metrics and the new baseline columns. Issue 17 added the ``noise`` field to the privacy
report's event block (``device`` in these cases): the files were written again after checking that it is
the only difference, and the two new cases (``aggregate``, ``row-average``) were added. Then event-level
DP changed on purpose (negatives from the whole catalogue, so that one event shapes no other event's
negatives; the selected rows' noisy total as the normaliser at the aggregate): exactly the event-level
cases (event, both, median, neumf, slow-sync, aggregate) were written again; every other case is unchanged.
The ``features`` blend (item counts filtered by public features) added one key to every summary's
``metrics.blends``: all files were written again after checking that it is the only difference (every
final model equal; secagg's model kept, as its rounding varies between runs). The item x feature affinities added
``graph_sensitivity`` to the privacy block of ``aggregate`` and named it in the block's ``graph`` text, and the
private pair window went from 2 to 1: that case alone was written again after checking that its final model is
equal and that only the graph's parts differ (the window, the sensitivity, the item pairs' bytes up, and the
metrics of the blends that read the graph); the cases run without item features, so no device sends affinities.
The pairs' weight in the graph's Gaussian (``PAIR_WEIGHT`` 1 -> 0.5) changed the same parts of ``aggregate`` only
(its final model equal; the sensitivity, the new ``graph_pair_weight`` and the graph's blends' metrics differ).
Per-row averaging without DP changed on purpose (each row's step scaled by how little the run has heard of it,
not FedSubAvg's per-round division): ``row-average`` alone was written again after checking that only what the
model decides differs (the update norms, the HR and NDCG fields, the served blend); no other case averages rows.
The item graph under user-level DP (on by default since, ``user-graph-share`` 0.1) would change every user-level
case: those four keep ``user-graph-share = 0`` and pass unchanged, which checks that the path without the graph is
the one before; the new case ``user-graph`` holds the default.
Event noise at the aggregate for every model with one sample per event (``deepfm``, ``neumf``: their releases
through Opacus's clipping) made ``event-noise = "auto"`` choose it for ``neumf``: that case now names
``event-noise = "device"`` and passes unchanged; the new case ``deepfm-aggregate`` holds the new path. Then
``deepfm`` gained the event's context (the kind of the event before it, a fourth field in its FM and its deep
part): ``deepfm-aggregate`` alone was written again (its model has a new parameter and a wider first deep layer,
so every number of it moved); every other case passes unchanged. Under event-level DP no sample may read another
event's kind, so there ``deepfm`` trains and serves in the context "none": ``deepfm-aggregate`` was written again
(every other case unchanged).
The synthetic world then changed on purpose (its users' events drawn a block of users at a time, issue 18): the same
distribution (``tests/test_world.py`` holds it to a plain per-user generator), other draws. Every case reads the
world, so all files were written again with the round code unchanged. The centralised MF baseline's user table then
began to step lazily (only a minibatch's users' rows, as SparseAdam): all files were written again after checking that
besides the ``centralised_mf`` fields only float rounding moved (final models within 1.2e-7, secagg's within its
usual 1e-5; the batched local steps of ``mf`` round differently from one device at a time).
The item graph's prior came to sum as many rounds as the released rounds show to predict best (``prior_window``, in a
new metrics field ``prior_rounds``), and the centralised item-kNN baseline scores with the same graph: the cases with
a graph (aggregate, async, attack, fedadam, freeze, none, robust, row-average, user-graph) and those whose item-kNN
baseline column moved (both, deepfm-aggregate, event, median, slow-sync, user, user-budget) were written again after
checking that every final model is equal and that only the new field, the per-event HR and NDCG fields and blends
that read the prior, and the item-kNN baseline's figures differ; neumf, sasrec, secagg and user-stop pass unchanged.
User-level DP under SecAgg+ then gained the item graph (its clipped counts and affinities summed masked beside the
deltas, the server noising the sum; ``user-graph-share`` of the one Gaussian goes to it, so the model's noise grows):
``secagg`` alone was written again (its model and every serving figure moved; it gained ``prior_rounds``); every other
case passes unchanged.
The item graph's neighbour table then began to travel as its used slots where at most 10% of them are used
(``fedrec.messages.wire_arrays``), and ``bytes_down`` to count what travels: the cases with an item graph were written
again after checking that ``bytes_down`` and ``bytes_down_serving`` are the only differences (every model file kept;
secagg's json kept but for those two fields, as its rounding varies between runs; under SecAgg+ a train round's
version travels whole, so only its serving bytes moved).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent / "data" / "round_reference"
SMALL = {"world-users": 240, "world-items": 80, "world-events-per-user": 12, "rounds": 5, "cohort": 40,
         "nodes": 2, "engine": "local", "progress": False, "dim": 4, "local-steps": 3, "user-fit-steps": 5,
         "resume": False, "item-features": "none"}  # the references predate item features (tests/test_features.py)
CASES: dict[str, dict] = {
    "none": {"privacy": "none"},
    "user": {"privacy": "user", "noise-multiplier": 0.8, "clip": 0.5, "user-graph-share": 0},
    "user-budget": {"privacy": "user", "epsilon": 3.0, "budget-period": 2, "rounds": 6, "user-graph-share": 0},
    "user-stop": {"privacy": "user", "epsilon": 3.0, "calibrate": False, "noise-multiplier": 1.0,
                  "user-graph-share": 0},
    "secagg": {"privacy": "user", "secure-aggregation": True, "noise-multiplier": 1.0, "rounds": 2},
    "event": {"privacy": "event", "epsilon": 8.0, "event-clip": 0.2},
    "both": {"privacy": "both", "noise-multiplier": 1.2},
    "robust": {"privacy": "none", "aggregator": "trimmed-mean", "trim": 0.2, "max-update-norm": 0.3,
               "max-row-norm": 0.1},
    "median": {"privacy": "event", "noise-multiplier": 1.0, "aggregator": "median"},
    "fedadam": {"privacy": "none", "server-opt": "fedadam", "server-lr": 0.05, "lr-schedule": "adaptive"},
    "async": {"privacy": "none", "async-buffer": 15, "slow-devices": 0.3, "slow-rounds": 2, "rounds": 7},
    "slow-sync": {"privacy": "event", "noise-multiplier": 1.0, "slow-devices": 0.3, "rounds": 6},
    "freeze": {"privacy": "none", "freeze-after": 2, "serve-eval": False},
    "attack": {"privacy": "none", "attackers": 0.05, "attack-boost": 3.0},
    "neumf": {"privacy": "event", "model": "neumf", "noise-multiplier": 1.0, "rounds": 3, "event-noise": "device"},
    "sasrec": {"privacy": "user", "model": "sasrec", "noise-multiplier": 1.0, "rounds": 3, "seq-len": 5,
               "user-graph-share": 0},
    # issue 17: event noise at the aggregate (with the noisy item graph), and per-row averaging without DP
    "aggregate": {"privacy": "event", "event-noise": "aggregate", "local-steps": 1, "epsilon": 4.0},
    "row-average": {"privacy": "none", "row-average": True, "server-lr": 1.0},
    # the item graph under user-level DP, part of the round's one Gaussian (the default since it came)
    "user-graph": {"privacy": "user", "epsilon": 3.0},
    # event noise at the aggregate for a model with parameters beside the item table (its release through Opacus)
    "deepfm-aggregate": {"privacy": "event", "model": "deepfm", "epsilon": 4.0},
}
#: fields of a metrics line that measure the machine, not the algorithm
VOLATILE = ("wall_s", "ts", "time")


def run_case(name: str, out: Path) -> tuple[list[dict], dict, dict[str, np.ndarray]]:
    """Run one case into ``out``; its metric lines (volatile fields dropped), summary and final model."""
    from fedrec.checkpoint import load_checkpoint
    from fedrec.clients.app import app as client_app
    from fedrec.config import RunConfig
    from fedrec.server.app import run_federation
    from fedrec.server.local_grid import LocalGrid

    cfg = RunConfig.from_mapping({**SMALL, **CASES[name], "out": str(out)}, where=name)
    summary = run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [{k: v for k, v in r.items() if not any(t in k for t in VOLATILE)} for r in rows]
    model = {k: np.asarray(v) for k, v in load_checkpoint(out / "checkpoint.npz")["global"].items()}
    return rows, summary, model


def stable_summary(summary: dict) -> dict:
    """The parts of a summary that the algorithm decides (metrics, baselines, privacy)."""
    keep = {k: summary[k] for k in ("metrics", "baselines", "privacy") if k in summary}
    return json.loads(json.dumps(keep, default=str))


def write(names: list[str]) -> None:
    import tempfile

    HERE.mkdir(parents=True, exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            rows, summary, model = run_case(name, Path(tmp) / name)
        (HERE / f"{name}.json").write_text(json.dumps({"rows": rows, "summary": stable_summary(summary)},
                                                      indent=1, sort_keys=True, default=str))
        np.savez(HERE / f"{name}.npz", **model)
        print(name, "written", flush=True)


if __name__ == "__main__":
    if "--write" in sys.argv:
        write([a for a in sys.argv[1:] if not a.startswith("--")] or list(CASES))
