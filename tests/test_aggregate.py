"""Server aggregation: hand-checked numbers, sparse == dense, and invariants (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.server_aggregate import delta_nbytes, server_aggregate, weighted_sum


def _state():
    return {"item.weight": torch.zeros(4, 2), "item.bias": torch.zeros(4)}


def test_two_devices_hand_checked():
    d1 = {"item.weight": np.ones((4, 2), np.float32), "item.bias": np.full(4, 2.0, np.float32)}
    d2 = {"item.weight": np.full((4, 2), 3.0, np.float32), "item.bias": np.zeros(4, np.float32)}
    nxt, diag = server_aggregate(_state(), [d1, d2], [1.0, 3.0], server_lr=2.0)
    # weighted mean: weight (1*1 + 3*3)/4 = 2.5, bias (1*2 + 0)/4 = 0.5; times server lr 2
    assert torch.allclose(nxt["item.weight"], torch.full((4, 2), 5.0))
    assert torch.allclose(nxt["item.bias"], torch.full((4,), 1.0))
    assert diag["weight"] == 4.0
    assert diag["update_norm"] == pytest.approx(np.sqrt(8 * 5.0**2 + 4 * 1.0**2))


def test_sparse_rows_add_like_their_dense_equivalent():
    rng = np.random.default_rng(0)
    dense, sparse = [], []
    for _ in range(5):
        ids = np.sort(rng.choice(4, size=2, replace=False)).astype(np.int64)
        rows = rng.normal(size=(2, 2)).astype(np.float32)
        full = np.zeros((4, 2), np.float32)
        full[ids] = rows
        bias = rng.normal(size=4).astype(np.float32)
        dense.append({"item.weight": full, "item.bias": bias})
        sparse.append({"item.weight": (ids, rows), "item.bias": bias})
    w = [1.0, 2.0, 0.0, 4.0, 0.5]
    a, _ = server_aggregate(_state(), dense, w, server_lr=1.5)
    b, _ = server_aggregate(_state(), sparse, w, server_lr=1.5)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6)
    assert delta_nbytes(sparse[0]) == 2 * 8 + 2 * 2 * 4 + 4 * 4


def test_zero_total_weight_leaves_the_model_unchanged_and_inputs_untouched():
    state = {"item.weight": torch.arange(8.0).reshape(4, 2)}
    d = {"item.weight": np.ones((4, 2), np.float32)}
    nxt, diag = server_aggregate(state, [d], [0.0])
    assert torch.equal(nxt["item.weight"], state["item.weight"]) and diag["update_norm"] == 0.0
    nxt, _ = server_aggregate(state, [d], [1.0])
    assert torch.equal(state["item.weight"], torch.arange(8.0).reshape(4, 2))
    assert np.all(d["item.weight"] == 1.0)


@pytest.mark.parametrize("bad", [[-1.0], [float("nan")], [1.0, 1.0]])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ValueError):
        server_aggregate(_state(), [{"item.weight": np.zeros((4, 2), np.float32)}], bad)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 10.0, allow_subnormal=False), st.floats(-5, 5)), min_size=1, max_size=6))
def test_mean_of_constant_deltas_is_their_weighted_mean(pairs):
    """Each delta is a constant c_k: the aggregate is the weighted mean of the c_k (or nothing)."""
    deltas = [{"item.weight": np.full((4, 2), c, np.float32)} for _, c in pairs]
    w = [wk for wk, _ in pairs]
    nxt, _ = server_aggregate({"item.weight": torch.zeros(4, 2)}, deltas, w)
    want = sum(wk * c for wk, c in pairs) / sum(w) if sum(w) > 0 else 0.0
    assert torch.allclose(nxt["item.weight"], torch.full((4, 2), want, dtype=torch.float32), atol=1e-4)


def test_weighted_sum_is_linear_against_a_numpy_reference():
    rng = np.random.default_rng(1)
    deltas = [{"t": rng.normal(size=(6, 3)).astype(np.float32)} for _ in range(4)]
    c = rng.uniform(-2, 2, size=4)
    got = weighted_sum({"t": torch.zeros(6, 3)}, deltas, c.tolist())["t"].numpy()
    want = sum(ck * d["t"].astype(np.float64) for ck, d in zip(c, deltas, strict=True))
    assert np.allclose(got, want, atol=1e-5)
