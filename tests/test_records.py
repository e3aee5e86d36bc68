"""The packed wire form of our messages (fedrec.clients.records): exact round trips, few Flower objects.

Hostile packed records (a garbled manifest, arrays outside the blob, ...) are in test_hostile_replies.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedrec.clients.records import INLINE_MAX, LIST_BLOB, PACKED, PACKED_ARRAYS, from_records, to_records, values_of


def _plain() -> dict:
    rng = np.random.default_rng(0)
    return {
        "delta-3": {"item.weight.rows": rng.integers(0, 99, 7).astype(np.int64),
                    "item.weight.values": rng.normal(size=(7, 5)).astype(np.float16),
                    "empty": np.zeros((0, 5), np.float32), "scalar": np.array(2.5), "flags": np.array([True, False]),
                    "fortran": np.asfortranarray(rng.normal(size=(3, 4)))},
        "metrics-3": {"num-examples": 4, "eval-ndcg": 0.25, "epsilon": math.inf, "preclip-norm": np.float32(0.5),
                      "n-new": np.int64(2)},
        "error-4": {"reason": "gone", "trace": "line 1\nline 2"},
        "serve": {"devices": [3, 4], "hits": [1.0, math.nan]},
        "round": {"round": 2, "devices": [], "flag": True},
    }


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert list(a[name]) == list(b[name])
        for k, v in a[name].items():
            if isinstance(v, np.ndarray):
                assert b[name][k].dtype == v.dtype and b[name][k].shape == v.shape
                np.testing.assert_array_equal(b[name][k], v)
            else:
                w = b[name][k]
                assert type(w) is type(v.item() if isinstance(v, np.generic) else v)
                assert w == v or (isinstance(v, list) and str(w) == str(v)) or (isinstance(v, float) and math.isnan(v))


def test_a_message_round_trips_exactly_in_three_flower_objects():
    plain = _plain()
    rd = to_records(plain)
    assert list(rd) == [PACKED]
    _same(plain, from_records(rd))
    # the RecordDict and its one ConfigRecord (the Message adds one): 18 objects for such a reply before packing
    assert len(get_all_nested_objects(rd)) == 2


def test_a_blob_over_the_inline_limit_travels_as_one_chunked_array():
    big = {"arrays": {"item.weight": np.arange(INLINE_MAX // 4 + 10, dtype=np.float32)}, "config": {"a": 1}}
    rd = to_records(big)
    assert set(rd) == {PACKED, PACKED_ARRAYS} and "blob" not in rd[PACKED]
    _same(big, from_records(rd))


def test_the_unpacked_form_is_still_read():
    rd = RecordDict({"delta-1": ArrayRecord({"w": Array(np.ones((2, 3), np.float32))}),
                     "metrics-1": MetricRecord({"num-examples": 3}), "error-2": ConfigRecord({"reason": "x"})})
    got = from_records(rd)
    np.testing.assert_array_equal(got["delta-1"]["w"], np.ones((2, 3), np.float32))
    assert got["metrics-1"] == {"num-examples": 3} and got["error-2"] == {"reason": "x"}
    assert values_of(rd, "metrics-1") == {"num-examples": 3} and values_of(rd, "nothing") is None


def test_values_of_reads_one_record_without_the_arrays():
    rd = to_records(_plain())
    assert values_of(rd, "round") == {"round": 2, "devices": [], "flag": True}
    assert values_of(rd, "delta-3") is None and values_of(rd, "nothing") is None


@pytest.mark.parametrize("value", [object(), {"nested": 1}, b"raw bytes", np.array([1, 2])])
def test_a_value_a_record_cannot_hold_is_refused_when_sending(value):
    with pytest.raises(TypeError):
        to_records({"config": {"x": value}})


def test_long_lists_of_numbers_travel_in_the_blob_and_round_trip_exactly():
    """A node's serving report lists every device it served: at population scale, megabytes of numbers. They travel
    as int64 / float64 bytes, not as manifest text, and come back as the same Python lists."""
    n = 200_000
    plain = {"serve": {"devices": list(range(n)), "hits": [0.1 * i for i in range(n - 1)] + [math.nan],
                       "short": [1, 2, 3], "big": [2**70] * LIST_BLOB, "mixed": [1, 2.5] * LIST_BLOB},
             "round": {"devices": list(range(5, 5 + LIST_BLOB)), "names": ["a"] * LIST_BLOB, "flags": [True] * 99}}
    rd = to_records(plain)
    assert len(rd[PACKED]["manifest"]) < 10_000
    got = from_records(rd)
    assert all(set(got[name]) == set(plain[name]) for name in plain)  # (the blob's lists come after the values)
    _same(plain, {name: {k: got[name][k] for k in plain[name]} for name in got})
    assert all(type(x) is int for x in got["serve"]["devices"]) and all(type(x) is float for x in got["serve"]["hits"])
    assert values_of(rd, "round") == plain["round"]
