"""The in-process engine and Flower's Ray Simulation Engine run the same protocol to the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORLD = ["--world-users", "40", "--world-items", "60", "--rounds", "3", "--cohort", "12", "--dim", "4",
         "--user-fit-steps", "5", "--local-steps", "3", "--nodes", "2", "--seed", "5", "--no-progress"]


def _simulate(out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "fedrec.cli", "simulate", *WORLD, "--out", str(out), *extra],
                       env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("privacy", ["user", "event"])
def test_local_and_ray_engines_give_the_same_global_model(tmp_path, privacy):
    # deltas in float32 on the wire: float results may differ in the last bit between the engines'
    # processes (thread counts, vector paths), and fp16 rounding (event DP's default wire) can now and
    # then turn such a bit into one fp16 step of a delta, which the server learning rate magnifies
    wire = ("--wire", "dense") if privacy == "event" else ()
    a = _simulate(tmp_path / "local", "--engine", "local", "--privacy", privacy, *wire)
    b = _simulate(tmp_path / "ray", "--engine", "ray", "--privacy", privacy, *wire)
    ma, mb = np.load(tmp_path / "local/global_model.npz"), np.load(tmp_path / "ray/global_model.npz")
    assert set(ma.files) == set(mb.files) == {"item.weight"}
    # the same devices, seeds and noise; only the order in which replies are summed may differ
    assert np.allclose(ma["item.weight"], mb["item.weight"], atol=1e-5)
    for key in ("hr@10", "ndcg@10", "events_scored"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-6)
    assert a["privacy"][privacy]["epsilon"] == pytest.approx(b["privacy"][privacy]["epsilon"], rel=1e-9)


@pytest.mark.slow
def test_sharded_and_one_node_per_device_runs_give_the_same_global_model(tmp_path):
    """One node hosting every device, 40 nodes hosting one device each, and Ray's 2 shards agree."""
    one = _simulate(tmp_path / "one", "--engine", "local", "--privacy", "user", "--nodes", "1")
    per_device = _simulate(tmp_path / "each", "--engine", "local", "--privacy", "user", "--nodes", "40")
    ray2 = _simulate(tmp_path / "ray2", "--engine", "ray", "--privacy", "user", "--nodes", "2")
    m = [np.load(tmp_path / d / "global_model.npz")["item.weight"] for d in ("one", "each", "ray2")]
    assert np.allclose(m[0], m[1], atol=1e-5) and np.allclose(m[0], m[2], atol=1e-5)
    assert one["metrics"]["hr@10"] == pytest.approx(per_device["metrics"]["hr@10"], rel=1e-6)
    assert one["metrics"]["hr@10"] == pytest.approx(ray2["metrics"]["hr@10"], rel=1e-6)
