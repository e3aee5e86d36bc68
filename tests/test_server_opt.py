"""Server optimizers against a hand-written numpy reference of Reddi et al. (2021)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.server_opt import ServerOptimizer


def _reference(name, deltas, lr, b1=0.9, b2=0.99, tau=1e-3):
    x = np.zeros_like(deltas[0], dtype=np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for d in deltas:
        d = d.astype(np.float64)
        if name == "fedavg":
            x += lr * d
            continue
        m = b1 * m + (1 - b1) * d
        if name == "fedadagrad":
            v = v + d * d
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * np.sign(v - d * d)
        x += lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedavg", "fedadagrad", "fedadam", "fedyogi"])
def test_matches_the_reference(name):
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=(5, 3)).astype(np.float32) * s for s in (1.0, 0.5, 2.0, 0.1)]
    opt = ServerOptimizer(name)
    state = {"t": torch.zeros(5, 3)}
    for d in deltas:
        opt.step(state, {"t": torch.from_numpy(d)}, lr=0.05)
    assert np.allclose(state["t"].numpy(), _reference(name, deltas, 0.05), atol=1e-5)


def test_state_round_trips_and_continues_identically():
    rng = np.random.default_rng(1)
    deltas = [{"t": torch.from_numpy(rng.normal(size=(4, 2)).astype(np.float32))} for _ in range(6)]
    a, sa = ServerOptimizer("fedyogi"), {"t": torch.zeros(4, 2)}
    for d in deltas:
        a.step(sa, d, 0.1)
    b, sb = ServerOptimizer("fedyogi"), {"t": torch.zeros(4, 2)}
    for d in deltas[:3]:
        b.step(sb, d, 0.1)
    c = ServerOptimizer("fedyogi")
    c.load_state_dict(b.state_dict())
    for d in deltas[3:]:
        c.step(sb, d, 0.1)
    assert torch.allclose(sa["t"], sb["t"]) and c.steps == 6
    with pytest.raises(ValueError, match="fedyogi"):
        ServerOptimizer("fedadam").load_state_dict(b.state_dict())


def test_bad_names_and_settings():
    with pytest.raises(ValueError, match="Unknown server optimizer"):
        ServerOptimizer("sgd")
    with pytest.raises(ValueError):
        ServerOptimizer("fedadam", tau=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("privacy", ["none", "user"])
def test_fedadam_runs_end_to_end_and_its_state_is_in_the_checkpoint(tmp_path, privacy):
    import json
    import os
    import subprocess
    import sys

    from fedrec.checkpoint import load_checkpoint

    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", "--engine", "local", "--world-users", "40",
                        "--world-items", "60", "--rounds", "3", "--cohort", "12", "--dim", "4", "--user-fit-steps", "5",
                        "--local-steps", "3", "--server-opt", "fedadam", "--server-lr", "0.05", "--privacy", privacy,
                        "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ck = load_checkpoint(out / "checkpoint.npz")
    assert ck["round"] == 3 and ck["optimizer"]["name"] == "fedadam" and ck["optimizer"]["steps"] == 3
    assert ck["optimizer"]["m:item.weight"].shape == ck["global"]["item.weight"].shape
    assert np.array_equal(ck["global"]["item.weight"], np.load(out / "global_model.npz")["item.weight"])
    assert ck["lr_schedule"]["lr"] == 0.05
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["update_norm"] > 0 for r in rows)
