"""DeepFM: public item features as a model input, from the published version to the device, and cold start."""

from __future__ import annotations

import calendar
import json

import numpy as np
import pytest
import torch

from clients.device import shared_model
from fedrec.cli import main
from fedrec.config import RunConfig
from fedrec.data.features import AGE_EDGES, ModelFeatures, load_item_features
from fedrec.data.loaders import load_events
from fedrec.federation.state import init_state
from fedrec.itemgraph import MODEL_FEATURES, split
from fedrec.models import build_model, published_features
from tests.test_features import _ml

V, F = 40, 4


def _features() -> np.ndarray:
    """Items 0-19 have feature 0, items 20-35 one of features 1-3; items 36 and 37 (never trained) features 0 and 1."""
    x = np.zeros((V, F), np.float32)
    x[:20, 0] = 1.0
    x[np.arange(20, 36), 1 + np.arange(16) % 3] = 1.0
    x[36, 0] = x[37, 1] = x[38, 2] = x[39, 3] = 1.0
    return published_features(x)


def _train(name: str, seed: int) -> torch.Tensor:
    """A device that has items 0-9 only, trained against negatives 20-35; its scores of every item."""
    model = build_model(name, V, 8, seed=seed, features=_features())
    g = torch.Generator().manual_seed(seed)
    items = np.tile(np.arange(10), 3)
    batch, w = model.samples(items, np.ones(len(items), int), np.ones(len(items), bool), torch.arange(20, 36),
                             negatives=3, generator=g)
    model.train_local(batch, w, steps=60, sample_rate=1.0, lr_global=0.3, lr_local=0.3, generator=g)
    return model.score_all()


def test_a_new_item_is_scored_by_its_features():
    """Items 36 and 37 were never trained on: deepfm ranks the one that shares the user's items' feature above the
    other, for every seed; MF, which sees ids only, has no reason to (its gap is init noise, of either sign)."""
    gaps = {name: [float(s[36] - s[37]) for s in (_train(name, seed) for seed in range(6))] for name in ("deepfm", "mf")}
    assert min(gaps["deepfm"]) > 1.0, gaps
    assert abs(np.mean(gaps["mf"])) < 0.2 and max(abs(x) for x in gaps["mf"]) < 0.5, gaps


def test_the_device_builds_the_servers_model_from_the_published_version():
    """The server publishes the features with every version from the first, with each item's age bucket in that
    version's round (float16, as sent); a device's model built from a version scores exactly as the server's model
    with the same rows."""
    cfg = RunConfig(model="deepfm", dim=6, seed=2)
    x = np.random.default_rng(0).random((V, F)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    launch = np.r_[np.ones(30), np.full(5, 4.0), np.full(5, np.nan)]  # items 30-34 launch in round 4, 35-39 unknown
    state = init_state(cfg, V, x, ModelFeatures(x, launch), z_user=1.0)  # user-level DP, the default
    v1, v5 = state.host_state(1), state.host_state(5)
    width = F + len(AGE_EDGES) + 1
    assert v1[MODEL_FEATURES].dtype == np.float16 and v1[MODEL_FEATURES].shape == (V, width)
    ages1, ages5 = (v[MODEL_FEATURES][:, F:].astype(np.float32) for v in (v1, v5))
    assert ages1[30].argmax() == 0 and ages5[30].argmax() == 2  # not launched yet; one round old
    assert ages1[0].argmax() == 1 and ages5[0].argmax() == 4  # launched in round 1: age 0, then age 4 (3-4)
    assert not ages5[35:].any()  # no launch date, no age
    device = shared_model(cfg, V, v5)
    assert device.n_features == width
    assert torch.equal(device.features, torch.from_numpy(v5[MODEL_FEATURES].astype(np.float32)))
    params, graph = split(v5)
    assert MODEL_FEATURES not in params and graph is None
    device.load({k: torch.from_numpy(v) for k, v in params.items()})
    server = build_model("deepfm", V, 6, seed=2, features=v5[MODEL_FEATURES])
    assert all(torch.equal(server.global_state()[k], torch.from_numpy(v5[k])) for k in server.global_names)
    assert torch.equal(server.score_all(), device.score_all())
    with pytest.raises(ValueError, match=rf"item features of shape \(40, 3\), the model was built for \(40, {width}\)"):
        device.set_features(v5[MODEL_FEATURES][:, :3])
    # MF reads no features, so its versions carry none; deepfm without features has a zero row per item
    assert MODEL_FEATURES not in init_state(RunConfig(model="mf"), V, x, ModelFeatures(x, launch), z_user=1.0).host_state(1)
    assert build_model("deepfm", V, 6).n_features == 1


def test_movielens_titles_give_launch_dates(tmp_path):
    ratings = _ml(tmp_path)
    log = load_events(str(ratings))
    f = load_item_features(ratings.parent / "movies.csv", log)
    at = {str(x): i for i, x in enumerate(log.item_ids)}
    assert f.launch[at["1"]] == calendar.timegm((1995, 1, 1, 0, 0, 0))
    assert f.launch[at["2"]] == calendar.timegm((1996, 1, 1, 0, 0, 0))  # "B, the (1996)"
    assert np.isnan(f.launch[at["3"]]) and np.isnan(f.launch[at["5"]])  # titles without a year
    assert f.info()["items_with_launch_dates"] == 2 and "\x00launch" not in f.names


@pytest.mark.parametrize("privacy", ["none", "event"])
def test_deepfm_reads_the_genres_beside_ratings_and_says_so(tmp_path, privacy):
    """A real run on MovieLens-format files: movies.csv beside ratings.csv is found, read by the model and reported;
    under event-level DP it trains through Opacus."""
    ratings = _ml(tmp_path)
    out = tmp_path / privacy
    rc = main(["simulate", "--data", str(ratings), "--model", "deepfm", "--rounds", "3", "--cohort", "8", "--nodes",
               "1", "--engine", "local", "--privacy", privacy, "--k", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    info = s["data"]["item_features"]
    assert info["features"] == 3 and info["model_reads_them"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["failed"] == 0 for r in rows)
    from fedrec.checkpoint import load_checkpoint

    # one column per genre, and the age buckets (the titles' years are launch dates)
    assert load_checkpoint(out / "checkpoint.npz")["global"]["feat.weight"].shape == \
        (s["config"]["dim"] + 1, 3 + len(AGE_EDGES) + 1)


def test_the_batched_serving_fit_is_the_per_device_fit():
    """deepfm fits every device of a serving batch at once; each device's scores and vector are those of the
    per-device autograd fit (RecModel's), with the same draws from its own generator."""
    from fedrec.models.base import RecModel

    model = build_model("deepfm", V, 8, seed=3, features=_features())
    glob = {k: v.numpy() for k, v in model.global_state().items()}
    hist = [np.array([0, 1, 2, 3]), np.array([], np.int64), np.array([20, 21]), np.arange(V)]
    vecs = [None, None, np.full(8, 0.05, np.float32), None]

    def run(fn):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7, 8)]
        return fn(model, glob, hist, vecs, gens, fit_steps=6, negatives=2, lr=0.5)

    batched, alone = run(type(model).fit_and_score), run(RecModel.fit_and_score)
    for (s1, v1), (s2, v2) in zip(batched, alone, strict=True):
        assert np.allclose(v1, v2, atol=1e-5) and np.allclose(s1, s2, atol=1e-4)
    assert not np.allclose(batched[0][1], batched[2][1])  # devices differ
