"""Per-row averaging of item tables without DP: the plain mean, each item row's scaled by
``clamp(mean h / h_i, 1, ROW_BOOST_MAX)``, ``h_i`` the weight of the devices that had item ``i``, summed over
the run (the server optimizer's tally, checkpointed). Hand-checked numbers over two rounds, a numpy reference
over random runs, the cap, the checkpoint (a resumed tally goes on as the uninterrupted one; a damaged one is
refused), the config rules, and a real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _procs import Fedrec
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.aggregation import ROW_BOOST_MAX, AggregateGaussian, Mean, from_config
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
# Who had each item, by weight: row 0 A (1), row 1 A and B (4), row 2 no one, rows 3 and 4 C (2): tally
# [1, 4, 0, 2, 2], whose mean over the rows heard of is 9/4. Factors: 2.25, 1 (0.5625 is raised to 1), 1 (never
# heard of), 1.125, 1.125.
ROW_MEAN = PLAIN * np.array([[2.25], [1.0], [1.0], [1.125], [1.125]])
# A second round in which only B (weight 3) had item 0: tally [4, 4, 0, 2, 2], mean 3, factors 1, 1, 1, 1.5, 1.5.
COUNTS_2 = [(np.array([], np.int64), np.array([])), (np.array([0], np.int64), np.array([1.0])),
            (np.array([], np.int64), np.array([]))]
ROW_MEAN_2 = PLAIN * np.array([[1.0], [1.0], [1.0], [1.5], [1.5]])
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
    np.testing.assert_allclose(_np(g["item.weight"]), 2.0 * ROW_MEAN, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_np(g["out.bias"]), 2.0 * BIAS_MEAN, rtol=1e-6)
    want = 2.0 * np.sqrt((ROW_MEAN**2).sum() + (BIAS_MEAN**2).sum())
    assert diag["update_norm"] == pytest.approx(want, rel=1e-6)

    # fedadam's first step from m = v = 0: m = (1 - b1) d, v = (1 - b2) d^2, x += lr m / (sqrt(v) + tau)
    adam = _state(device)
    Mean(row_average=True).step(adam, ServerOptimizer("fedadam", beta1=0.9, beta2=0.99, tau=1e-3),
                                _deltas(form), WEIGHTS, 0.1, counts=COUNTS)
    for key, d in (("item.weight", ROW_MEAN), ("out.bias", BIAS_MEAN)):
        np.testing.assert_allclose(_np(adam[key]), 0.1 * 0.1 * d / (np.sqrt(0.01 * d**2) + 1e-3), rtol=1e-5,
                                   atol=1e-5)
    # ... and the same as the optimizer applied to the hand mean
    ref = _state(device)
    ServerOptimizer("fedadam", beta1=0.9, beta2=0.99, tau=1e-3).step(
        ref, {"item.weight": torch.tensor(ROW_MEAN, dtype=torch.float32, device=device),
              "out.bias": torch.tensor(BIAS_MEAN, dtype=torch.float32, device=device)}, 0.1)
    for key in ref:
        torch.testing.assert_close(adam[key], ref[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_the_tally_adds_up_over_rounds_and_the_boost_is_capped(device):
    g, opt = _state(device), ServerOptimizer("fedavg")
    Mean(row_average=True).step(g, opt, _deltas("sparse"), WEIGHTS, 1.0, counts=COUNTS)
    np.testing.assert_array_equal(opt.rows["item.weight"].numpy(), [1.0, 4.0, 0.0, 2.0, 2.0])
    before = _np(g["item.weight"]).copy()
    Mean(row_average=True).step(g, opt, _deltas("sparse"), WEIGHTS, 1.0, counts=COUNTS_2)
    np.testing.assert_array_equal(opt.rows["item.weight"].numpy(), [4.0, 4.0, 0.0, 2.0, 2.0])
    np.testing.assert_allclose(_np(g["item.weight"]) - before, ROW_MEAN_2, rtol=1e-6, atol=1e-6)
    # a row heard of 100 times less than another steps ROW_BOOST_MAX times FedAvg's step, not 50.5 times
    g, opt = _state(device), ServerOptimizer("fedavg")
    deltas = [{"item.weight": (np.array([0, 1], np.int64), np.ones((2, 2), np.float32)),
               "out.bias": np.zeros(2, np.float32)}] * 2
    counts = [(np.array([0], np.int64), np.ones(1)), (np.array([1], np.int64), np.ones(1))]
    Mean(row_average=True).step(g, opt, deltas, [100.0, 1.0], 1.0, counts=counts)
    np.testing.assert_allclose(_np(g["item.weight"])[:2], [[1.0, 1.0], [ROW_BOOST_MAX, ROW_BOOST_MAX]], rtol=1e-6)


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


def _reference(rounds) -> np.ndarray:
    """The item table after ``rounds`` of ``(weights, dense deltas, had)`` at lr 1: each round the plain weighted
    mean, each row scaled by clamp(mean tally / tally, 1, ROW_BOOST_MAX) with the run's tally so far."""
    table = np.zeros_like(rounds[0][1][0], dtype=np.float64)
    tally = np.zeros(table.shape[0])
    for weights, dense, had in rounds:
        total = sum(weights)
        tally += [sum(w for w, h in zip(weights, had, strict=True) if i in h) for i in range(len(tally))]
        factor = np.ones_like(tally)
        heard = tally > 0
        if heard.any():
            factor[heard] = np.clip(tally[heard].mean() / tally[heard], 1.0, ROW_BOOST_MAX)
        table += factor[:, None] * sum(w * d for w, d in zip(weights, dense, strict=True)) / total
    return table


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


def _stepped(state, rounds) -> None:
    for weights, _, deltas, counts, _ in rounds:
        Mean(row_average=True).step(state.global_state, state.optimizer, deltas, weights, 1.0, counts=counts)


def test_a_resumed_tally_goes_on_as_the_uninterrupted_one_and_a_damaged_one_is_refused(tmp_path):
    from fedrec.checkpoint import load_checkpoint
    from fedrec.federation.state import init_state

    cfg, n = RunConfig(privacy="none", row_average=True, dim=2), 9
    rng = np.random.default_rng(3)
    rounds = []
    for _ in range(5):
        weights, _, deltas, counts, had = _random_round(rng, 4, n, 0.3, True, shuffle=True)
        rounds.append((weights, None, [{"item.weight": (d["item.weight"][0], d["item.weight"][1][:, :3])}
                                       for d in deltas], counts, had))
    straight, first = init_state(cfg, n), init_state(cfg, n)
    assert straight.global_state["item.weight"].shape == (n, 3)
    _stepped(straight, rounds)
    _stepped(first, rounds[:2])
    first.save(tmp_path / "ck.npz", cfg)
    resumed = init_state(cfg, n)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck.npz"))
    torch.testing.assert_close(resumed.optimizer.rows["item.weight"], first.optimizer.rows["item.weight"])
    _stepped(resumed, rounds[2:])
    torch.testing.assert_close(resumed.global_state["item.weight"], straight.global_state["item.weight"])
    ck = load_checkpoint(tmp_path / "ck.npz")
    del ck["optimizer"]["rows:item.weight"]  # a checkpoint without it (or from before it) cannot go on as before
    with pytest.raises(ValueError, match="no per-row tally of item.weight"):
        init_state(cfg, n).load_state_dict(ck)
    assert "rows:item.weight" in init_state(cfg, n).optimizer.state_dict()  # saved from round 0 on
    for bad, says in ((np.array([1.0, -1.0] + [0.0] * (n - 2)), "non-negative"), (np.full(n, np.nan), "finite"),
                      (np.ones(n + 1), "does not fit")):
        ck["optimizer"]["rows:item.weight"] = bad
        with pytest.raises(ValueError, match=f"per-row tally of item.weight.*{says}"):
            init_state(cfg, n).load_state_dict(ck)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 9), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.2, 1.0]),
       st.booleans(), st.integers(1, 4))
def test_random_runs_match_the_reference_and_its_edge_cases(n_dev, n_rows, seed, p_pos, sparse, n_rounds):
    rng = np.random.default_rng(seed)
    g = {"item.weight": torch.zeros(n_rows, 3), "b": torch.zeros(3)}
    plain = {"item.weight": torch.zeros(n_rows, 3), "b": torch.zeros(3)}
    opt, done = ServerOptimizer("fedavg"), []
    for _ in range(n_rounds):
        weights, dense, deltas, counts, had = _random_round(rng, n_dev, n_rows, p_pos, sparse, shuffle=True)
        Mean(row_average=True).step(g, opt, deltas, weights, 1.0, counts=counts)
        Mean().step(plain, ServerOptimizer("fedavg"), deltas, weights, 1.0, counts=counts)
        done.append((weights, dense, had))
    np.testing.assert_allclose(_np(g["item.weight"]), _reference(done), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g["b"], plain["b"])  # non-table parameters: the plain mean
    nobody = [i for i in range(n_rows) if not any(i in h for _, _, had in done for h in had)]
    torch.testing.assert_close(g["item.weight"][nobody], plain["item.weight"][nobody])
    if p_pos == 1.0:  # every device had every row in every round: every row is the average row, FedAvg's step
        torch.testing.assert_close(g["item.weight"], plain["item.weight"], rtol=1e-5, atol=1e-5)


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
engine = "local"
"""


def _start(tmp_path: Path, name: str, *flags: str) -> Fedrec:
    """A ``fedrec simulate`` of the test's world (:class:`_procs.Fedrec`), logging to ``<name>.log``."""
    return Fedrec(tmp_path / f"{name}.log", "simulate", "--config", "world.toml", "--out", str(tmp_path / name),
                  "--no-progress", *flags, cwd=tmp_path)


def _outputs(tmp_path: Path, name: str, run: Fedrec) -> tuple[list[dict], np.ndarray]:
    assert run.wait(600) == 0, run.text()[-6000:]
    out = tmp_path / name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    with np.load(out / "global_model.npz") as z:
        return rows, np.asarray(z["item.weight"])


@pytest.mark.slow
def test_a_short_simulation_with_row_average_runs_and_differs_from_the_plain_mean(tmp_path):
    (tmp_path / "world.toml").write_text(WORLD_TOML)
    # same seed and server lr: row averaging is the only difference between the two runs
    # (two independent processes, run side by side, each on the in-process engine: the aggregation rule under test is
    # the server's, the same on either engine, and test_engines holds the engines to the same model)
    runs = {"plain": _start(tmp_path, "plain", "--server-lr", "1", "--privacy", "none"),
            "rows": _start(tmp_path, "rows", "--server-lr", "1", "--privacy", "none", "--row-average")}
    try:
        plain_rows, plain = _outputs(tmp_path, "plain", runs["plain"])
        rows, table = _outputs(tmp_path, "rows", runs["rows"])
    finally:
        for run in runs.values():
            run.stop()
    assert [r["round"] for r in rows] == [1, 2, 3] and all(r["failed"] == 0 for r in rows)
    assert all(0.0 <= r["hr@10"] <= 1.0 for r in rows)
    assert np.all(np.isfinite(table)) and table.shape == plain.shape
    assert not np.allclose(table, plain, atol=1e-6)
    # the first round trains the same model on the same events: its upload also carries the positive counts
    assert rows[0]["bytes_up"] > plain_rows[0]["bytes_up"]
