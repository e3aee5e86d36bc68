"""Per-row averaging of item tables (FedSubAvg): each device's pushes on its own positive items' rows are
divided by the weight of the devices that had that item, every other push by the cohort's weight.
Hand-checked numbers, invariants against a numpy reference, the config rules, and a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.aggregation import AggregateGaussian, Mean, from_config
from fedrec.config import ConfigError, RunConfig
from fedrec.server_opt import ServerOptimizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Three devices, weights 1, 3, 2 (total 6), an item table of 5 rows x 2, and a 1-D bias.
WEIGHTS = [1.0, 3.0, 2.0]
PUSHED = [  # (row ids, rows) each device sent
    ([0, 1], [[6.0, 0.0], [0.0, 6.0]]),  # A: rows 0 and 1, both its positives
    ([1, 2], [[2.0, 2.0], [4.0, -2.0]]),  # B: row 1 (a positive) and row 2 (a sampled negative)
    ([3, 0], [[3.0, 0.0], [-3.0, 3.0]]),  # C: row 3 (a positive) and row 0 (a negative), ids unsorted
]
COUNTS = [  # positive-item counts (ids, counts): only the ids matter, not the counts
    (np.array([0, 1], np.int64), np.array([2.0, 1.0])),
    (np.array([1], np.int64), np.array([4.0])),
    (np.array([4, 3], np.int64), np.array([1.0, 5.0])),  # C had item 4 but pushed nothing on its row
]
BIASES = [[6.0, 0.0], [0.0, 2.0], [3.0, 3.0]]
# Plain mean, everything over 6: row 0 (1*[6,0] + 2*[-3,3])/6, row 1 (1*[0,6] + 3*[2,2])/6, row 2 3*[4,-2]/6,
# row 3 2*[3,0]/6, row 4 untouched.
PLAIN = np.array([[0.0, 1.0], [1.0, 2.0], [2.0, -1.0], [1.0, 0.0], [0.0, 0.0]])
# Per row: row 0 had by A only (weight 1): [6,0]/1 + C's negative 2*[-3,3]/6 = [5, 1]; row 1 had by A and B
# (weight 4): [6,12]/4; row 2 no one's positive (B's negative): plain; row 3 had by C only (weight 2): [3,0];
# row 4 had by C, nothing pushed: 0.
ROW_MEAN = np.array([[5.0, 1.0], [1.5, 3.0], [2.0, -1.0], [3.0, 0.0], [0.0, 0.0]])
BIAS_MEAN = np.array([2.0, 2.0])  # not an item table: (1*[6,0] + 3*[0,2] + 2*[3,3]) / 6


def _state(device: str = "cpu", n: int = 5, dim: int = 2) -> dict[str, torch.Tensor]:
    return {"item.weight": torch.zeros(n, dim, device=device), "out.bias": torch.zeros(dim, device=device)}


def _deltas(form: str) -> list[dict]:
    """The toy deltas with the item table sent sparsely, densely, or alternately."""
    out = []
    for j, ((ids, rows), bias) in enumerate(zip(PUSHED, BIASES, strict=True)):
        ids_a, rows_a = np.array(ids, np.int64), np.array(rows, np.float32)
        if form == "dense" or (form == "mixed" and j % 2):
            full = np.zeros((5, 2), np.float32)
            full[ids_a] = rows_a
            item = full
        else:
            item = (ids_a, rows_a)
        out.append({"item.weight": item, "out.bias": np.array(bias, np.float32)})
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["sparse", "dense", "mixed"])
def test_toy_hand_numbers_on_fedavg_and_fedadam(form, device):
    g = _state(device)
    diag = Mean(row_average=True).step(g, ServerOptimizer("fedavg"), _deltas(form), WEIGHTS, 2.0, counts=COUNTS)
    assert g["item.weight"].device.type == device
    np.testing.assert_allclose(_np(g["item.weight"]), 2.0 * ROW_MEAN, rtol=1e-6)
    np.testing.assert_allclose(_np(g["out.bias"]), 2.0 * BIAS_MEAN, rtol=1e-6)
    want = 2.0 * np.sqrt((ROW_MEAN**2).sum() + (BIAS_MEAN**2).sum())
    assert diag["update_norm"] == pytest.approx(want, rel=1e-6)

    # fedadam's first step from m = v = 0: m = (1 - b1) d, v = (1 - b2) d^2, x += lr m / (sqrt(v) + tau)
    adam = _state(device)
    Mean(row_average=True).step(adam, ServerOptimizer("fedadam", beta1=0.9, beta2=0.99, tau=1e-3),
                                _deltas(form), WEIGHTS, 0.1, counts=COUNTS)
    for key, d in (("item.weight", ROW_MEAN), ("out.bias", BIAS_MEAN)):
        np.testing.assert_allclose(_np(adam[key]), 0.1 * 0.1 * d / (np.sqrt(0.01 * d**2) + 1e-3), rtol=1e-5)
    # ... and the same as the optimizer applied to the hand mean
    ref = _state(device)
    ServerOptimizer("fedadam", beta1=0.9, beta2=0.99, tau=1e-3).step(
        ref, {"item.weight": torch.tensor(ROW_MEAN, dtype=torch.float32, device=device),
              "out.bias": torch.tensor(BIAS_MEAN, dtype=torch.float32, device=device)}, 0.1)
    for key in ref:
        torch.testing.assert_close(adam[key], ref[key])


@pytest.mark.parametrize("kwargs", [{}, {"counts": COUNTS, "presummed": 3}], ids=["no-counts", "presummed"])
def test_without_counts_or_with_a_presummed_delta_it_is_the_plain_mean(kwargs):
    g = _state()
    Mean(row_average=True).step(g, ServerOptimizer("fedavg"), _deltas("sparse"), WEIGHTS, 1.0, **kwargs)
    np.testing.assert_allclose(_np(g["item.weight"]), PLAIN, rtol=1e-6)
    plain = _state()  # and without row_average the counts are ignored
    Mean().step(plain, ServerOptimizer("fedavg"), _deltas("sparse"), WEIGHTS, 1.0, counts=COUNTS)
    np.testing.assert_allclose(_np(plain["item.weight"]), PLAIN, rtol=1e-6)


def test_inputs_are_left_untouched_and_count_values_do_not_matter():
    deltas = _deltas("sparse")
    scaled = [(ids, 7.0 * c) for ids, c in COUNTS]
    g1, g2 = _state(), _state()
    Mean(row_average=True).step(g1, ServerOptimizer("fedavg"), deltas, WEIGHTS, 1.0, counts=COUNTS)
    Mean(row_average=True).step(g2, ServerOptimizer("fedavg"), deltas, WEIGHTS, 1.0, counts=scaled)
    torch.testing.assert_close(g1["item.weight"], g2["item.weight"])
    assert np.array_equal(deltas[2]["item.weight"][0], [3, 0]) and np.array_equal(COUNTS[2][0], [4, 3])


def _reference(deltas_np, weights, had) -> np.ndarray:
    """Row i: sum of w_k d_k[i] over the devices that had i, over their weight; the rest over the total."""
    total, out = sum(weights), np.zeros_like(deltas_np[0], dtype=np.float64)
    for i in range(out.shape[0]):
        cover = sum(w for w, h in zip(weights, had, strict=True) if i in h)
        for d, w, h in zip(deltas_np, weights, had, strict=True):
            out[i] += w * d[i] / (cover if i in h else total)
    return out


def _random_round(rng, n_dev: int, n_rows: int, p_pos: float, sparse: bool, shuffle: bool):
    weights = rng.uniform(0.1, 5.0, size=n_dev).tolist()
    dense, deltas, counts, had = [], [], [], []
    for _ in range(n_dev):
        sent = np.flatnonzero(rng.random(n_rows) < 0.7)
        pos = np.flatnonzero(rng.random(n_rows) < p_pos)
        full = np.zeros((n_rows, 3), np.float32)
        full[sent] = rng.normal(size=(len(sent), 3)).astype(np.float32)
        order = rng.permutation(len(sent)) if shuffle else np.arange(len(sent))
        deltas.append({"item.weight": (sent[order].astype(np.int64), full[sent[order]]) if sparse else full,
                       "b": rng.normal(size=3).astype(np.float32)})
        pos_order = rng.permutation(len(pos)) if shuffle else np.arange(len(pos))
        counts.append((pos[pos_order].astype(np.int64), np.ones(len(pos))))
        dense.append(full)
        had.append(set(pos.tolist()))
    return weights, dense, deltas, counts, had


def _run(deltas, weights, counts, n_rows, lr=1.0, row_average=True):
    g = {"item.weight": torch.zeros(n_rows, 3), "b": torch.zeros(3)}
    Mean(row_average=row_average).step(g, ServerOptimizer("fedavg"), deltas, weights, lr, counts=counts)
    return g


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 9), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.4, 1.0]),
       st.booleans())
def test_random_rounds_match_the_reference_and_its_edge_cases(n_dev, n_rows, seed, p_pos, sparse):
    rng = np.random.default_rng(seed)
    weights, dense, deltas, counts, had = _random_round(rng, n_dev, n_rows, p_pos, sparse, shuffle=True)
    got = _run(deltas, weights, counts, n_rows, lr=3.0)
    plain = _run(deltas, weights, counts, n_rows, lr=3.0, row_average=False)
    np.testing.assert_allclose(_np(got["item.weight"]), 3.0 * _reference(dense, weights, had), rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(got["b"], plain["b"])  # non-table parameters: the plain mean
    nobody = [i for i in range(n_rows) if not any(i in h for h in had)]
    torch.testing.assert_close(got["item.weight"][nobody], plain["item.weight"][nobody])
    if p_pos == 1.0:  # every device had every row: the per-row mean over all devices is the plain mean
        torch.testing.assert_close(got["item.weight"], plain["item.weight"], rtol=1e-5, atol=1e-5)


def test_every_device_having_every_row_is_the_plain_mean_and_no_one_having_any_too():
    rng = np.random.default_rng(5)
    for ids in (np.arange(6, dtype=np.int64), np.array([], np.int64)):
        _, _, deltas, _, _ = _random_round(rng, 4, 6, 0.0, True, shuffle=False)
        weights = [1.0, 2.0, 0.5, 4.0]
        counts = [(ids, np.ones(len(ids)))] * 4
        got, plain = _run(deltas, weights, counts, 6), _run(deltas, weights, (), 6)
        for k in got:
            torch.testing.assert_close(got[k], plain[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_unsorted_sparse_ids_give_the_same_result_as_sorted(device):
    rng = np.random.default_rng(11)
    weights, _, deltas, counts, _ = _random_round(rng, 4, 12, 0.5, True, shuffle=True)
    srt = []
    for d in deltas:
        ids, rows = d["item.weight"]
        o = np.argsort(ids)
        srt.append({"item.weight": (ids[o], rows[o]), "b": d["b"]})
    assert any(not np.array_equal(np.sort(d["item.weight"][0]), d["item.weight"][0]) for d in deltas)
    sorted_counts = [(np.sort(ids), c) for ids, c in counts]
    a, b = _state(device, 12, 3), _state(device, 12, 3)
    a["b"], b["b"] = a.pop("out.bias"), b.pop("out.bias")
    Mean(row_average=True).step(a, ServerOptimizer("fedavg"), deltas, weights, 1.0, counts=counts)
    Mean(row_average=True).step(b, ServerOptimizer("fedavg"), srt, weights, 1.0, counts=sorted_counts)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_from_config_builds_the_row_average_mean_and_refuses_it_under_user_level_dp():
    g = torch.Generator()
    kw = {"noise_multiplier": 0.0, "expected_devices": 1.0, "generator": g}
    assert from_config(RunConfig(privacy="none", row_average=True), **kw) == Mean(row_average=True)
    assert from_config(RunConfig(privacy="none"), **kw) == Mean()
    for privacy in ("user", "event"):  # event noise on the device: the server has no row counts either
        with pytest.raises(ConfigError, match="row-average"):
            RunConfig(privacy=privacy, event_noise="device", row_average=True)
    assert RunConfig(privacy="event", row_average=True).aggregate_noise  # auto: at the aggregate, counts known
    agg = from_config(RunConfig(privacy="event", event_noise="aggregate", local_steps=1, row_average=True),
                      **{**kw, "noise_multiplier": 1.0})
    assert isinstance(agg, AggregateGaussian) and agg.row_average


WORLD_TOML = """\
world-users = 60
world-items = 120
world-topics = 4
world-events-per-user = 12
world-new-item-share = 0.1
dim = 4
rounds = 3
cohort = 20
privacy = "none"
uptake-probe = false
"""


def _simulate(tmp_path: Path, name: str, *flags: str) -> tuple[list[dict], np.ndarray]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / name
    p = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--config", "world.toml", "--out", str(out),
                        "--no-progress", *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    with np.load(out / "global_model.npz") as z:
        return rows, np.asarray(z["item.weight"])


@pytest.mark.slow
def test_a_short_simulation_with_row_average_runs_and_differs_from_the_plain_mean(tmp_path):
    (tmp_path / "world.toml").write_text(WORLD_TOML)
    # same seed and server lr: row averaging is the only difference between the two runs
    plain_rows, plain = _simulate(tmp_path, "plain", "--server-lr", "1", "--privacy", "none")
    rows, table = _simulate(tmp_path, "rows", "--server-lr", "1", "--privacy", "none", "--row-average")
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["failed"] == 0 for r in rows)
    assert all(0.0 <= r["hr@10"] <= 1.0 for r in rows)
    assert np.all(np.isfinite(table)) and table.shape == plain.shape
    assert not np.allclose(table, plain, atol=1e-6)
    # the first round trains the same model on the same events: its upload also carries the positive counts
    assert rows[0]["bytes_up"] > plain_rows[0]["bytes_up"]
