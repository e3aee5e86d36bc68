"""A device whose local steps diverge sends nothing and fails alone (``check_converged``): one such delta would
wreck the next version for every device (seen with ``deepfm`` at lr 1 on a world seed: a delta of norm 1e16)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedrec.client_update import DeviceState, DivergedUpdate, check_converged, client_update
from fedrec.config import RunConfig
from fedrec.data.features import world_features
from fedrec.data.stream import RoundStream
from fedrec.data.world import WorldSpec, make_world
from fedrec.device_round import DeviceData, train_devices
from fedrec.messages import RoundInstruction
from fedrec.models import build_model
from fedrec.privacy.user_level import OUTSIZED


def test_the_rule_reads_the_delta_against_the_version_it_started_from():
    version = {"item.weight": np.full((10, 3), 10.0, np.float32)}  # norm 54.8
    cfg = RunConfig(privacy="none")
    check_converged({"item.weight": np.full((10, 3), 50.0, np.float32)}, 0.0, version, cfg)  # 274: 5x, fine
    with pytest.raises(DivergedUpdate, match="diverged"):
        check_converged({"item.weight": np.full((10, 3), 1e4, np.float32)}, 0.0, version, cfg)
    with pytest.raises(DivergedUpdate):
        check_converged({"item.weight": (np.array([2]), np.full((1, 3), np.nan, np.float32))}, 0.0, version, cfg)
    tiny = {"item.weight": np.zeros((10, 3), np.float32)}  # the version's norm is floored at 1
    check_converged({"item.weight": np.full((10, 3), OUTSIZED / 6, np.float32)}, 0.0, tiny, cfg)
    with pytest.raises(DivergedUpdate):
        check_converged({"item.weight": np.full((10, 3), OUTSIZED / 5, np.float32)}, 0.0, tiny, cfg)
    # under user-level DP the clip bounds any finite delta: only a norm before it that is not finite fails
    small = {"item.weight": np.full((10, 3), 0.01, np.float32)}
    check_converged(small, 1e6, version, RunConfig(privacy="user"))
    with pytest.raises(DivergedUpdate):
        check_converged(small, float("inf"), version, RunConfig(privacy="user"))
    # event-level DP clips every event's step: a large delta there is noise (a device with one event), not divergence
    check_converged({"item.weight": np.full((10, 3), 1e4, np.float32)}, 0.0, version,
                    RunConfig(privacy="event", event_noise="device"))


@pytest.mark.parametrize("model_name", ["deepfm", "mf"])
def test_devices_that_diverge_fail_alone(model_name):
    world = make_world(WorldSpec(users=12, items=40, topics=4, events_per_user=14, seed=1))
    stream = RoundStream.build(world, 2)
    feats = world_features(world, 0.0, 0).normalised() if model_name == "deepfm" else None
    cfg = RunConfig(model=model_name, privacy="none", dim=4, seed=0)
    model = build_model(model_name, stream.log.n_items, cfg.dim, features=feats)
    version = {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k in model.global_names}
    devs = [DeviceData(d, stream.log.item[i], stream.round_of[i], DeviceState())
            for d in range(12) for i in [stream.device_events(d, 1)]]
    empty = np.zeros(0, np.int64)
    devs.append(DeviceData(99, empty, empty, DeviceState()))  # no events: no steps, nothing to diverge
    ins = RoundInstruction(1, tuple(d.device for d in devs))
    calm = train_devices(model, version, devs, cfg, ins, [None] * len(devs))
    assert not any(isinstance(r, Exception) for r in calm)
    wild = dataclasses.replace(cfg, lr=1e6)
    got = train_devices(model, version, devs, wild, ins, [None] * len(devs))
    assert all(isinstance(r, DivergedUpdate) for r in got[:-1]), got
    assert not isinstance(got[-1], Exception)  # the device without events is not failed with them
    with pytest.raises(DivergedUpdate, match="sends nothing"):  # one device alone, as a node runs it
        client_update(model, version, devs[0].state, devs[0].items, devs[0].rounds, 1, wild, device_id=0,
                      noise_multiplier=0.0)


def test_a_deepfm_step_moves_its_parameters_by_at_most_lr_times_its_gradient_bound():
    """The root cause mended: each non-private local step of ``deepfm`` is bounded (``max_grad_norm``): at lr 1 a
    step whose gradient is larger moves the parameters by exactly the bound, and ten steps by at most ten times it."""
    import torch

    rng = np.random.default_rng(0)
    feats = np.eye(6, dtype=np.float32)[rng.integers(0, 6, 50)]
    batch = (torch.zeros(64, dtype=torch.long), torch.from_numpy(rng.integers(0, 50, (64, 2))))

    def moved(bound: float | None, steps: int) -> float:
        model = build_model("deepfm", 50, 8, features=feats, init_scale=6.0)
        model.max_grad_norm = bound
        before = torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
        model.train_local(batch, torch.ones(64), steps=steps, sample_rate=1.0, lr_global=1.0, lr_local=1.0,
                          generator=torch.Generator().manual_seed(0))
        return float((torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before).norm())

    assert moved(None, 1) > 3.5  # the unbounded step is larger than the bound ...
    assert moved(3.0, 1) == pytest.approx(3.0, rel=1e-4)  # ... so the bounded one is exactly at it
    assert moved(3.0, 10) <= 30.0 + 1e-3


def test_a_run_whose_every_device_diverges_ends_in_one_sentence(tmp_path, capsys):
    from fedrec.cli import main

    rc = main(["simulate", "--world-users", "30", "--world-items", "30", "--rounds", "2", "--cohort", "10", "--model",
               "deepfm", "--lr", "1e6", "--privacy", "none", "--engine", "local", "--nodes", "1", "--no-progress",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("fedrec: Every device failed in round 1; first reason: DivergedUpdate: its local steps")
