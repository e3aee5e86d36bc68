"""The in-process engine and Flower's Ray Simulation Engine run the same protocol to the same model.

The runs are independent processes: every run of the selected tests is started when the first of them begins
(a Ray run is mostly Ray starting up, which overlaps well with other work), and each test reads the outputs of
its own once they are done. The Ray run with user-level DP on two nodes is the same command in two tests; it
runs once and both read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _procs import Fedrec

WORLD = ["--world-users", "40", "--world-items", "60", "--rounds", "3", "--cohort", "12", "--dim", "4",
         "--user-fit-steps", "5", "--local-steps", "3", "--nodes", "2", "--seed", "5", "--no-progress"]
TIMEOUT = 400


class Runs:
    """``fedrec simulate`` runs of this module by name (:class:`_procs.Fedrec`), each started once; a name's outputs
    are read only after its process has ended well."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runs: dict[str, Fedrec] = {}
        self.done: dict[str, dict] = {}

    def start(self, name: str) -> None:
        if name not in self.runs:
            self.runs[name] = Fedrec(self.base / f"{name}.log", "simulate", *WORLD, "--out", str(self.base / name),
                                     *RUNS[name])

    def summary(self, name: str) -> dict:
        """Wait for run ``name`` (started now if it was not yet); its summary."""
        if name not in self.done:
            self.start(name)
            run = self.runs[name]
            assert run.wait(TIMEOUT) == 0, run.text()[-6000:]
            self.done[name] = json.loads((self.base / name / "summary.json").read_text())
        return self.done[name]

    def model(self, name: str) -> np.lib.npyio.NpzFile:
        self.summary(name)
        return np.load(self.base / name / "global_model.npz")

    def close(self) -> None:
        for run in self.runs.values():
            run.stop()


RAY_USER = ("--engine", "ray", "--privacy", "user")  #: the Ray run both tests read (two nodes, from WORLD)
#: every run by name: its flags after WORLD (event DP with deltas in float32 on the wire: see the test below)
RUNS = {
    "local-user": ("--engine", "local", "--privacy", "user"),
    "ray-user": RAY_USER,
    "local-event": ("--engine", "local", "--privacy", "event", "--wire", "dense"),
    "ray-event": ("--engine", "ray", "--privacy", "event", "--wire", "dense"),
    "one": ("--engine", "local", "--privacy", "user", "--nodes", "1"),
    "each": ("--engine", "local", "--privacy", "user", "--nodes", "40"),
}
NEEDS = {  # test (with its parameters) -> the runs it reads
    "test_local_and_ray_engines_give_the_same_global_model[user]": ("local-user", "ray-user"),
    "test_local_and_ray_engines_give_the_same_global_model[event]": ("local-event", "ray-event"),
    "test_sharded_and_one_node_per_device_runs_give_the_same_global_model": ("one", "each", "ray-user"),
    "test_a_ray_run_prints_its_rounds_not_flower_s_debug_log": ("ray-user",),
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """Every run of the selected tests of this module, started now."""
    r = Runs(tmp_path_factory.mktemp("engines"))
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            for name in NEEDS.get(item.name, ()):
                r.start(name)
    yield r
    r.close()


@pytest.mark.slow
@pytest.mark.parametrize("privacy", ["user", "event"])
def test_local_and_ray_engines_give_the_same_global_model(runs, privacy):
    # deltas in float32 on the wire: float results may differ in the last bit between the engines'
    # processes (thread counts, vector paths), and fp16 rounding (event DP's default wire) can now and
    # then turn such a bit into one fp16 step of a delta, which the server learning rate magnifies
    local, ray = f"local-{privacy}", f"ray-{privacy}"  # (RUNS: the same flags but the engine)
    a, b = runs.summary(local), runs.summary(ray)
    ma, mb = runs.model(local), runs.model(ray)
    assert set(ma.files) == set(mb.files) == {"item.weight"}
    # the same devices, seeds and noise; only the order in which replies are summed may differ
    assert np.allclose(ma["item.weight"], mb["item.weight"], atol=1e-5)
    for key in ("hr@10", "ndcg@10", "events_scored"):
        assert a["metrics"][key] == pytest.approx(b["metrics"][key], rel=1e-6)
    assert a["privacy"][privacy]["epsilon"] == pytest.approx(b["privacy"][privacy]["epsilon"], rel=1e-9)
    assert a["config"]["engine"] == "local" and b["config"]["engine"] == "ray"


@pytest.mark.slow
def test_sharded_and_one_node_per_device_runs_give_the_same_global_model(runs):
    """One node hosting every device, 40 nodes hosting one device each, and Ray's 2 shards agree."""
    one, per_device, ray2 = runs.summary("one"), runs.summary("each"), runs.summary("ray-user")
    assert (one["config"]["nodes"], per_device["config"]["nodes"], ray2["config"]["nodes"]) == (1, 40, 2)
    m = [runs.model(d)["item.weight"] for d in ("one", "each", "ray-user")]
    assert np.allclose(m[0], m[1], atol=1e-5) and np.allclose(m[0], m[2], atol=1e-5)
    assert one["metrics"]["hr@10"] == pytest.approx(per_device["metrics"]["hr@10"], rel=1e-6)
    assert one["metrics"]["hr@10"] == pytest.approx(ray2["metrics"]["hr@10"], rel=1e-6)


@pytest.mark.slow
def test_a_ray_run_prints_its_rounds_not_flower_s_debug_log(runs):
    """What a user reads of a Ray run (stdout and stderr): its rounds and summary; not Flower's DEBUG lines (importing
    Flower's logger resets its level), its deprecation of the ``run_simulation`` fedrec calls, or its actors' stops."""
    runs.summary("ray-user")
    out = runs.runs["ray-user"].text()
    assert "round   3  HR@10" in out and "fedrec run summary" in out
    for noise in (":DEBUG:", "DEBUG ", "DEPRECATED FEATURE", "Manually terminating"):
        assert noise not in out, out[:3000]
