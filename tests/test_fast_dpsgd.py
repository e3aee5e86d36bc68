"""MF's closed-form local update against torch autograd (and, under DP, Opacus), and the lazily drawn
DP noise against the variance of the step-by-step mechanism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.client_update import _fit_local, _local_sgd
from fedrec.config import RunConfig
from fedrec.models import build_model
from fedrec.privacy.fast_dpsgd import dpsgd_mf


def _events(pos):
    """``pos`` as a device's events of one window, all trained on (``_local_sgd``'s arguments)."""
    items = pos.numpy() if hasattr(pos, "numpy") else np.asarray(pos)
    return items, np.ones(len(items), np.int64), np.ones(len(items), bool)



def _setup(n_items: int, n_pos: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pos = torch.from_numpy(rng.choice(n_items, size=n_pos, replace=False).astype(np.int64))
    seen = np.zeros(n_items, bool)
    seen[pos.numpy()] = True
    return pos, seen


@pytest.mark.parametrize("negatives,clip", [(1, 10.0), (3, 0.05), (2, 0.3)])
def test_without_noise_it_takes_the_same_steps_as_opacus_ghost_clipping(negatives, clip):
    # 12 items, 9 positives: 3 candidates for up to 3 negatives, so events hold a row twice
    pos, seen = _setup(12, 9)
    cfg = dataclasses.replace(RunConfig(), dim=4, local_steps=6, sample_rate=0.6, negatives=negatives,
                              event_clip=clip, lr=0.7, user_lr=0.3, privacy="event")
    got = {}
    for backend in ("autograd", "auto"):
        model = build_model("mf", 12, 4, seed=1, init_scale=0.5)
        g = torch.Generator().manual_seed(5)
        _local_sgd(model, *_events(pos), seen, dataclasses.replace(cfg, update_backend=backend), g, 0.0, True)
        got[backend] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    start = build_model("mf", 12, 4, seed=1, init_scale=0.5).state_dict()
    assert not torch.allclose(got["auto"]["item.weight"], start["item.weight"])  # it did train
    for k in got["autograd"]:
        torch.testing.assert_close(got["auto"][k], got["autograd"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("negatives", [1, 3])
def test_non_private_steps_and_the_user_fit_equal_autograd(negatives):
    pos, seen = _setup(40, 9)
    cfg = dataclasses.replace(RunConfig(), dim=5, local_steps=7, sample_rate=0.5, negatives=negatives, lr=0.9,
                              user_lr=0.4, user_fit_steps=12, privacy="none")
    got = {}
    for backend in ("autograd", "auto"):
        c = dataclasses.replace(cfg, update_backend=backend)
        model = build_model("mf", 40, 5, seed=2, init_scale=0.5)
        g = torch.Generator().manual_seed(3)
        _fit_local(model, pos, seen, c, g)
        fitted = model.user.weight.detach().clone()
        _local_sgd(model, *_events(pos), seen, c, g, 0.0, False)
        got[backend] = (fitted, {k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.testing.assert_close(got["auto"][0], got["autograd"][0], rtol=1e-5, atol=1e-6)
    for k in got["autograd"][1]:
        torch.testing.assert_close(got["auto"][1][k], got["autograd"][1][k], rtol=1e-5, atol=1e-6)


def test_the_released_noise_has_the_variance_of_the_step_by_step_mechanism():
    """Every coordinate of the released item table carries ``steps`` steps of N(0, (zC lr / qn)^2):
    rows no event touched (pure noise), and rows events read mid-update (noise paid lazily)."""
    n_items, n, steps, q, z, clip, lr = 60, 6, 8, 0.5, 200.0, 0.1, 0.5
    pos, _ = _setup(n_items, n)
    neg = torch.arange(n_items - n, n_items).reshape(n, 1)  # fixed negatives: rows 54..59
    items = torch.cat([pos.unsqueeze(1), neg], dim=1)
    touched = torch.unique(items)
    untouched = torch.from_numpy(np.setdiff1d(np.arange(n_items), touched.numpy()))
    want = steps * (z * clip * lr / (q * n)) ** 2
    deltas = []
    for rep in range(300):
        model = build_model("mf", n_items, 4, seed=0)
        w0 = model.item.weight.detach().clone()
        dpsgd_mf(model.item.weight.data, model.user.weight.data, items, steps=steps, sample_rate=q, lr_item=lr,
                 lr_user=lr, clip=clip, noise_multiplier=z, generator=torch.Generator().manual_seed(rep))
        deltas.append(model.item.weight.detach() - w0)
    d = torch.stack(deltas)  # (reps, rows, dim+1)
    for rows in (untouched, touched):
        var = d[:, rows].var(dim=0).mean().item()  # the gradients (<= clip) are 1/z of the noise's size
        assert abs(var / want - 1) < 0.05, (var, want)
    # and independent across rows: no shared draw
    a, b = d[:, untouched[0], 0], d[:, untouched[1], 0]
    assert abs(float(np.corrcoef(a, b)[0, 1])) < 0.2


def test_an_empty_step_still_adds_noise():
    pos, _ = _setup(10, 2)
    items = torch.stack([pos, (pos + 1) % 10], dim=1)
    model = build_model("mf", 10, 3, seed=0)
    w0, u0 = model.item.weight.detach().clone(), model.user.weight.detach().clone()
    dpsgd_mf(model.item.weight.data, model.user.weight.data, items, steps=3, sample_rate=1e-9, lr_item=1.0,
             lr_user=1.0, clip=1.0, noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    assert (model.item.weight.detach() != w0).all() and (model.user.weight.detach() != u0).all()
