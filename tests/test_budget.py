"""Privacy budgets: the device's event-level guard, calibration, and the server's user-level stop.

Every ε bound is recomputed here with :func:`fedrec.privacy.accounting.epsilon` (Opacus PRV) from
the mechanism's parameters, never read back from the code under test. The slow tests run the real
``fedrec simulate`` in subprocesses, all started together when this module begins (see ``sims``)
so that their Ray start-ups overlap with each other and with the fast tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from _oracle import opacus_epsilon
from _procs import Fedrec

from fedrec.client_update import DeviceState, client_update
from fedrec.config import RunConfig
from fedrec.data.stream import RoundStream
from fedrec.data.world import WorldSpec, make_world
from fedrec.federation.run import event_noise, user_noise
from fedrec.models import build_model
from fedrec.privacy.accounting import epsilon

pytestmark = pytest.mark.filterwarnings("ignore:.*Full backward hook.*:UserWarning")

DELTA = 1e-5

# ----------------------------------------------------------------------------------------------
# device budget guard (event level), through client_update directly

ROUNDS = 8
N_ITEMS = 80
S, W, Z, Q = 2, 2, 1.1, 0.5  # local steps, replay rounds, noise multiplier, DP-SGD sample rate


@pytest.fixture(scope="module")
def stream():
    log = make_world(WorldSpec(users=20, items=N_ITEMS, topics=4, events_per_user=24, horizon=float(ROUNDS), seed=2))
    return RoundStream.build(log, ROUNDS)


def _device_with_events_every_round(stream) -> int:
    for d in range(stream.n_devices):
        if all(len(stream.device_events(d, r)) > len(stream.device_events(d, r - 1)) for r in range(1, 4)):
            return d
    raise AssertionError("no device with new events in rounds 1-3")


def _eps_at(exposure: int) -> float:
    return epsilon([(Z, Q, exposure)], DELTA) if exposure else 0.0


def _cfg(budget: float) -> RunConfig:
    return RunConfig(world_users=20, world_items=N_ITEMS, world_topics=4, world_events_per_user=24, rounds=ROUNDS,
                     dim=4, local_steps=S, sample_rate=Q, replay_rounds=W, privacy="event", noise_multiplier=Z,
                     epsilon=budget, calibrate=False, delta=DELTA, lr=0.5, progress=False)


@pytest.mark.parametrize("k", [0, 1, 2, "never"])
def test_device_budget_guard(stream, k):
    """Budget strictly between ε(S*k) and ε(S*(k+1)): the device trains k times, then skips for good."""
    exposures = [S * min(i, W + 1) for i in range(ROUNDS + 1)]  # an event's exposure after i participations
    eps = [_eps_at(x) for x in exposures]
    assert all(b > a for a, b in zip(eps[:W + 2], eps[1:W + 2], strict=False)), eps
    if k == "never":
        budget, trains = eps[W + 1] * 1.01, ROUNDS  # the exposure stops growing at S*(W+1): it always fits
    else:
        budget, trains = (eps[k] + eps[k + 1]) / 2, k
        assert eps[k] < budget < eps[k + 1]
    cfg = _cfg(budget)
    d = _device_with_events_every_round(stream)
    model = build_model("mf", N_ITEMS, cfg.dim, seed=cfg.seed)
    gstate = {k_: v.numpy() for k_, v in model.global_state().items()}
    state = DeviceState()
    for r in range(1, ROUNDS + 1):
        idx = stream.device_events(d, r)
        res = client_update(model, gstate, state, stream.log.item[idx], stream.round_of[idx], r, cfg,
                            device_id=d, noise_multiplier=Z)
        assert res.epsilon <= budget, (r, res.epsilon, budget)
        done = min(r - 1, trains)  # participations so far
        if r <= trains:
            assert res.skipped == "", (r, res.skipped)
            assert res.steps == S and res.n_train > 0
            assert res.state.max_exposure == exposures[r]
            assert res.epsilon == pytest.approx(eps[r], rel=1e-9)
            assert res.state.participations == r
            assert np.abs(res.delta["item.weight"]).max() > 0
        else:
            assert res.skipped, r
            assert "budget" in res.skipped
            assert res.n_train == 0 and res.n_new == 0 and res.steps == 0
            assert set(res.delta) == set(gstate)
            for key, v in res.delta.items():
                assert v.shape == gstate[key].shape and v.dtype == np.float32
                assert not v.any(), key
            # nothing consumed: same cursors, exposure, history (and user vector) as before this round
            assert res.state.cursors == state.cursors
            assert res.state.max_exposure == state.max_exposure == exposures[done]
            assert res.state.recent_steps == state.recent_steps
            assert res.state.participations == state.participations == done
            assert res.state.history == state.history == [(Z, Q, S)] * done
            for key in state.local:  # (empty before the first participation)
                np.testing.assert_array_equal(res.state.local[key], state.local[key])
            assert res.epsilon == pytest.approx(eps[done], rel=1e-9)
        state = res.state
        gstate = {key: gstate[key] + res.delta[key] for key in gstate}
    assert state.participations == trains


# ----------------------------------------------------------------------------------------------
# calibration of the noise multipliers


def test_event_noise_calibrated_to_budget():
    cfg = RunConfig(privacy="event", epsilon=2.0, calibrate=True, local_steps=5, replay_rounds=2, sample_rate=0.25)
    z = event_noise(cfg)
    e = epsilon([(z, 0.25, 15)], cfg.delta)
    assert e <= 2.0 * (1 + 1e-9) and e >= 0.98 * 2.0, (z, e)
    both = event_noise(dataclasses.replace(cfg, privacy="both"))
    assert both == z
    assert event_noise(dataclasses.replace(cfg, privacy="user")) == 0.0
    assert event_noise(dataclasses.replace(cfg, calibrate=False, noise_multiplier=0.9)) == 0.9
    assert event_noise(dataclasses.replace(cfg, epsilon=0.0, noise_multiplier=0.8)) == 0.8


@pytest.mark.parametrize("period,accountant", [(5, "rdp"), (0, "rdp"), (50, "rdp")])
def test_user_noise_calibrated_to_budget(period, accountant):
    """One budget period's rounds (at most the run's) spend the budget (RDP: PRV is checked above)."""
    cfg = RunConfig(privacy="user", epsilon=3.0, calibrate=True, rounds=20, budget_period=period, cohort=20,
                    accountant=accountant)
    q = 0.1
    z = user_noise(cfg, q)
    rounds = min(period or cfg.rounds, cfg.rounds)
    e = epsilon([(z, q, rounds)], cfg.delta, accountant)
    assert e <= 3.0 * (1 + 1e-9) and e >= 0.98 * 3.0, (z, e)
    assert user_noise(dataclasses.replace(cfg, privacy="event"), q) == 0.0
    assert user_noise(dataclasses.replace(cfg, calibrate=False, noise_multiplier=1.7), q) == 1.7


# ----------------------------------------------------------------------------------------------
# real simulations (subprocesses, as a user runs them)

WORLD = "world-items = 120\nworld-topics = 4\nworld-events-per-user = 20\ndim = 4\n"
SIM_TIMEOUT = 420


class Sim:
    """One ``fedrec simulate`` run (:class:`_procs.Fedrec`) and what it wrote."""

    def __init__(self, cwd: Path, out: str, *args: str, log: str = "") -> None:
        self.cwd, self.out = cwd, cwd / out
        self.run = Fedrec(cwd / f"{log or out}.log", "simulate", *args, "--out", out, "--no-progress", cwd=cwd)

    def wait(self) -> Sim:
        rc = self.run.wait(SIM_TIMEOUT, grace=30)
        text = self.run.text()
        assert rc == 0, text[-4000:]
        assert "Traceback" not in text, text[-4000:]
        return self

    def stop(self) -> None:
        self.run.stop(grace=30)

    @property
    def rows(self) -> list[dict]:
        return [json.loads(x) for x in (self.out / "metrics.jsonl").read_text().splitlines() if x.strip()]

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    @property
    def ledger(self) -> list[dict]:
        return [json.loads(x) for x in (self.out / "privacy_ledger.jsonl").read_text().splitlines() if x.strip()]




# server budget: cohort 10 of 30 devices (q = 1/3), z = 1, clip 1; the budget admits 3, then 5, releases
POP, COHORT = 30, 10
Q_USER = min(1.0, COHORT / POP)


def _user_eps(releases: int) -> float:
    return epsilon([(1.0, Q_USER, releases)], DELTA)


def _budget_args(releases: int) -> tuple[str, ...]:
    budget = (_user_eps(releases) + _user_eps(releases + 1)) / 2  # `releases` fit, one more does not
    return ("--config", "budget.toml", "--nodes", "1", "--privacy", "user", "--noise-multiplier", "1.0",
            "--clip", "1.0", "--cohort", str(COHORT), "--rounds", "6", "--epsilon", repr(budget))


CHAIN = ("test_server_stops_at_user_budget_and_ledger_continues", "test_continued_run_draws_fresh_server_noise")
STARTS = {  # the first simulation of each slow test: name -> (out dir, arguments)
    "budget": ("budget", lambda: _budget_args(3)),
    "acceptance": ("acceptance", ("--config", "world200.toml", "--nodes", "1", "--privacy", "user",
                                  "--noise-multiplier", "1.0", "--clip", "1.0", "--cohort", "20", "--rounds", "10")),
    "both": ("both", ("--config", "world30.toml", "--nodes", "1", "--privacy", "both", "--noise-multiplier", "1.0",
                      "--cohort", "10", "--rounds", "2")),
}
NEEDS = {"test_acceptance_user_level_epsilon": "acceptance", "test_privacy_both_reports_both_units": "both",
         **dict.fromkeys(CHAIN, "budget")}


@pytest.fixture(scope="module", autouse=True)
def sims(request, tmp_path_factory):
    """Start the first simulation of every selected slow test before this module's first test.

    They run side by side (and beside the fast tests): most of a Ray run is Ray starting up, and the budget chain
    (in-process engine) has a second run to follow its first.
    """
    selected = {NEEDS[item.originalname] for item in request.session.items
                if getattr(item, "module", None) is request.module and item.originalname in NEEDS}
    started: dict[str, Sim] = {}
    if selected:
        base = tmp_path_factory.mktemp("sims")
        (base / "world200.toml").write_text("world-users = 200\n" + WORLD)
        (base / "world30.toml").write_text("world-users = 30\n" + WORLD)
        # the budget chain on the in-process engine (the budget stop is the server's, the same on either engine);
        # the acceptance command and `--privacy both` keep the default engine, Ray, as a user runs them
        (base / "budget.toml").write_text(f"world-users = {POP}\n{WORLD}calibrate = false\nengine = \"local\"\n")
        for key in [k for k in STARTS if k in selected]:  # the budget chain, two runs in a row, first
            out, args = STARTS[key]
            started[key] = Sim(base, out, *(args() if callable(args) else args))
    yield started
    for sim in started.values():
        sim.stop()


@pytest.fixture(scope="module")
def budget_runs(sims):
    """The budget run (3 releases fit), then the same command, same --out, with a budget for 5."""
    first = sims["budget"].wait()
    snap = {"rows": first.rows, "summary": first.summary, "ledger": first.ledger,
            "ledger_text": (first.out / "privacy_ledger.jsonl").read_text()}
    second = Sim(first.cwd, "budget", *_budget_args(5), log="budget-2")
    sims["budget-2"] = second  # stopped with the others if the test is interrupted
    second.wait()
    return {"b1": (_user_eps(3) + _user_eps(4)) / 2, "b2": (_user_eps(5) + _user_eps(6)) / 2, "first": snap,
            "second": second}


@pytest.mark.slow
def test_server_stops_at_user_budget_and_ledger_continues(budget_runs):
    b1, b2, first = budget_runs["b1"], budget_runs["b2"], budget_runs["first"]
    assert _user_eps(3) <= b1 < _user_eps(4)

    # first run: exactly three releases fit
    rows = first["rows"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    eps_rows = [r["epsilon_user"] for r in rows]
    assert all(b > a for a, b in zip(eps_rows, eps_rows[1:], strict=False)), eps_rows
    for i, r in enumerate(rows, start=1):
        assert r["epsilon_user"] == pytest.approx(_user_eps(i), rel=1e-9)
        assert r["epsilon_user"] <= b1
    s = first["summary"]
    assert s["rounds"] == 3
    priv = s["privacy"]
    assert "budget" in priv["stopped"] and "round 4" in priv["stopped"]
    assert priv["budget"] == pytest.approx(b1)
    assert priv["user"]["epsilon"] <= b1
    assert priv["user"]["epsilon"] == pytest.approx(_user_eps(3), rel=1e-5)
    assert priv["user"]["releases"] == 3
    assert priv["user"]["sample_rate"] == pytest.approx(Q_USER, rel=1e-12)
    server = [x for x in first["ledger"] if x["kind"] == "server-gaussian"]
    assert len(server) == 3 == len(first["ledger"])
    assert [x["round"] for x in server] == [1, 2, 3]
    for x in server:
        assert x["noise_multiplier"] == 1.0 and x["clip"] == 1.0 and x["steps"] == 1
        assert x["sample_rate"] == pytest.approx(Q_USER, rel=1e-12) and x["unit"] == "user"

    # second run, same --out, a budget for five: the ledger continues, two more releases
    second = budget_runs["second"]
    text = (second.out / "privacy_ledger.jsonl").read_text()
    assert text.startswith(first["ledger_text"])  # append-only: the earlier records are untouched
    ledger = second.ledger
    assert len(ledger) == 5 and all(x["kind"] == "server-gaussian" for x in ledger)
    assert [x["round"] for x in ledger[3:]] == [1, 2]
    rows2 = second.rows
    assert len(rows2) == 2
    assert [r["epsilon_user"] for r in rows2] == pytest.approx([_user_eps(4), _user_eps(5)], rel=1e-9)
    s2 = second.summary
    p2 = s2["privacy"]
    assert s2["rounds"] == 2
    assert "budget" in p2["stopped"]
    assert p2["user"]["releases"] == 5 and p2["ledger_records"] == 5
    assert p2["user"]["epsilon"] >= priv["user"]["epsilon"]
    assert p2["user"]["epsilon"] <= b2
    assert p2["user"]["epsilon"] == pytest.approx(opacus_epsilon(1.0, Q_USER, 5, DELTA), rel=1e-5)
    assert any("continuing the privacy ledger" in n and "3 earlier releases" in n for n in s2["notes"]), s2["notes"]


@pytest.mark.slow
def test_continued_run_draws_fresh_server_noise(budget_runs):
    a, b = budget_runs["first"]["rows"], budget_runs["second"].rows
    same = [math.isclose(x["update_norm"], y["update_norm"], rel_tol=1e-4) for x, y in zip(a[:2], b[:2], strict=True)]
    assert not all(same), [(x["update_norm"], y["update_norm"]) for x, y in zip(a, b, strict=False)]


@pytest.mark.slow
def test_acceptance_user_level_epsilon(sims):
    sim = sims["acceptance"].wait()
    s = sim.summary
    priv = s["privacy"]
    assert priv["unit"] == "user"
    u = priv["user"]
    assert u["unit"] == "user"
    assert u["sample_rate"] == 0.1
    assert u["population"] == 200 and s["data"]["population"] == 200
    assert u["noise_multiplier"] == 1.0 and u["clip"] == 1.0 and u["accountant"] == "PRV"
    assert u["releases"] == 10
    assert u["graph_share"] == 0.1 and u["noise_multiplier_model"] == pytest.approx(1 / math.sqrt(0.9))
    assert u["graph_noise_multiplier"] == pytest.approx(1 / math.sqrt(0.1))
    ref = opacus_epsilon(1.0, 0.1, 10, u["delta"])
    assert u["epsilon"] == pytest.approx(ref, rel=0.01)
    assert priv["epsilon"] == u["epsilon"] and priv["delta"] == u["delta"] == 1e-5
    assert "stopped" not in priv
    rows = sim.rows
    assert [r["round"] for r in rows] == list(range(1, 11))
    for r in rows:
        for key in ("frac_clipped", "mean_preclip_norm", "noise_std", "snr", "epsilon_user"):
            assert key in r and r[key] is not None, (key, r)
        assert 0.0 <= r["frac_clipped"] <= 1.0
        assert r["mean_preclip_norm"] > 0
        # the model's part of the round's one Gaussian (the item graph has user-graph-share 0.1 of 1/z^2)
        assert r["noise_std"] == pytest.approx(1.0 / math.sqrt(1 - 0.1) * 1.0 / (0.1 * 200), rel=1e-9)
        assert r["snr"] >= 0
    assert [r["epsilon_user"] for r in rows] == pytest.approx(
        [epsilon([(1.0, 0.1, i)], DELTA) for i in range(1, 11)], rel=1e-9)
    assert rows[-1]["epsilon_user"] == pytest.approx(u["epsilon"], rel=1e-5)
    ledger = sim.ledger
    assert len(ledger) == 10 and {x["kind"] for x in ledger} == {"server-gaussian"}


@pytest.mark.slow
def test_privacy_both_reports_both_units(sims):
    sim = sims["both"].wait()
    priv = sim.summary["privacy"]
    assert priv["mode"] == "both" and priv["unit"] == "user+event"
    for unit in ("user", "event"):
        block = priv[unit]
        assert block["unit"] == unit
        assert block["epsilon"] > 0 and math.isfinite(block["epsilon"])
        assert block["delta"] == 1e-5 and block["accountant"] == "PRV"
    assert priv["user"]["epsilon"] == pytest.approx(opacus_epsilon(1.0, 10 / 30, 2, DELTA), rel=1e-5)
    kinds = [x["kind"] for x in sim.ledger]
    assert kinds.count("server-gaussian") == 2 and kinds.count("device-dpsgd") > 0
    # event level: the worst device's ε is that of its largest exposure so far
    dev = [x for x in sim.ledger if x["kind"] == "device-dpsgd"]
    worst = max(x["max_steps_per_event"] for x in dev)
    assert priv["event"]["epsilon"] == pytest.approx(opacus_epsilon(1.0, sim.summary["config"]["sample-rate"], worst, DELTA), rel=1e-5)
    for r in sim.rows:
        assert r["epsilon_user"] is not None and r["frac_clipped"] is not None
