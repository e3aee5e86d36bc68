"""Delta encodings on the wire: exact round trips, modes per privacy unit, and the server's checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedrec.server_aggregate import server_aggregate
from fedrec.wire import decode_delta, encode_delta, wire_mode


def _delta() -> dict[str, np.ndarray]:
    d = np.zeros((10, 3), np.float32)
    d[[2, 7]] = [[0.5, -1.0, 0.25], [1e-3, 0.0, 2.0]]
    return {"item.weight": d}


def test_sparse_round_trip_is_exact_and_small():
    enc = encode_delta(_delta(), "sparse")
    assert enc["item.weight.ids"].tolist() == [2, 7]
    assert sum(v.nbytes for v in enc.values()) == 2 * 8 + 2 * 3 * 4  # against 10 * 3 * 4 dense
    ids, rows = decode_delta(enc)["item.weight"]
    full = np.zeros((10, 3), np.float32)
    full[ids] = rows
    assert np.array_equal(full, _delta()["item.weight"])


def test_fp16_halves_the_bytes_within_rounding():
    enc = encode_delta(_delta(), "fp16")
    assert enc["item.weight"].dtype == np.float16 and enc["item.weight"].nbytes == 10 * 3 * 2
    assert np.allclose(decode_delta(enc)["item.weight"], _delta()["item.weight"], rtol=1e-3, atol=1e-4)


def test_modes_follow_the_trust_model():
    assert wire_mode("auto", "none") == wire_mode("auto", "user") == "sparse"
    assert wire_mode("auto", "event") == "fp16" and wire_mode("auto", "both") == "dense"
    with pytest.raises(ValueError, match="reveal"):
        wire_mode("sparse", "event")


def test_aggregating_sparse_wire_deltas_equals_dense():
    rng = np.random.default_rng(0)
    deltas = []
    for _ in range(4):
        d = np.zeros((10, 3), np.float32)
        rows = rng.choice(10, 3, replace=False)
        d[rows] = rng.normal(size=(3, 3))
        deltas.append({"item.weight": d})
    import torch

    g = {"item.weight": torch.ones(10, 3)}
    dense, _ = server_aggregate(g, deltas, [1, 2, 3, 4], server_lr=2.0)
    sparse, _ = server_aggregate(g, [decode_delta(encode_delta(d, "sparse")) for d in deltas], [1, 2, 3, 4],
                                 server_lr=2.0)
    assert torch.allclose(dense["item.weight"], sparse["item.weight"], atol=1e-6)


@pytest.mark.parametrize("bad, words", [
    ({"item.weight.ids": np.array([2, 2]), "item.weight.rows": np.zeros((2, 3), np.float32)}, "repeated"),
    ({"item.weight.ids": np.array([2, 10]), "item.weight.rows": np.zeros((2, 3), np.float32)}, "out of range"),
    ({"item.weight.ids": np.array([2]), "item.weight.rows": np.zeros((2, 3), np.float32)}, "expected rows"),
    ({"item.weight.ids": np.array([1]), "item.weight.rows": np.full((1, 3), np.nan, np.float32)}, "non-finite"),
])
def test_server_refuses_malformed_sparse_deltas(bad, words):
    import torch

    from fedrec.federation.replies import validate

    problem = validate(decode_delta(bad), {"item.weight": torch.zeros(10, 3)})
    assert problem and words in problem


def test_rows_without_ids_fail_to_decode():
    with pytest.raises(ValueError, match="no ids"):
        decode_delta({"item.weight.rows": np.zeros((1, 3), np.float32)})
