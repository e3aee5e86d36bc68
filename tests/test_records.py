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


def _version(used: float, seed: int = 0) -> dict[str, np.ndarray]:
    """A global version with a neighbour table whose share ``used`` of slots is used (an unused slot: item 0, score
    0; some used slots hold item 0 or score 0 themselves, as the table allows)."""
    rng = np.random.default_rng(seed)
    ids, sim = np.zeros((300, 20), np.int32), np.zeros((300, 20), np.float32)
    take = rng.random((300, 20)) < used
    ids[take], sim[take] = rng.integers(0, 300, take.sum()), rng.random(take.sum()).astype(np.float32)
    sim[take & (rng.random((300, 20)) < 0.05)] = 0.0
    return {"item.weight": rng.normal(size=(300, 5)).astype(np.float32), "graph.ids": ids, "graph.sim": sim,
            "graph.prior": rng.random(300).astype(np.float32)}


@pytest.mark.parametrize("used", [0.0, 0.01, 0.08])
def test_a_sparse_neighbour_table_travels_as_its_used_slots_and_comes_back_whole(used):
    """Under DP almost no slot of the neighbour table is used: a ``train`` request carries the used ones (fewer
    bytes; ``bytes_down`` counts them) and the node rebuilds the same table, bit for bit, through the packed
    Flower records."""
    from fedrec.messages import NEIGHBOURS, SLOTS, RoundInstruction, decode_train, encode_train, wire_arrays

    version = _version(used)
    sent = encode_train(version, {"a": 1}, RoundInstruction(3, (1, 2)))
    assert set(SLOTS) <= set(sent["arrays"]) and not set(NEIGHBOURS) & set(sent["arrays"])
    assert sum(a.nbytes for a in wire_arrays(version).values()) < sum(a.nbytes for a in version.values())
    got = decode_train(from_records(to_records(sent))).global_state
    assert sorted(got) == sorted(version)
    for k, v in version.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)


def test_a_dense_neighbour_table_travels_as_it_is():
    from fedrec.messages import NEIGHBOURS, RoundInstruction, encode_train, wire_arrays

    version = _version(0.3)
    assert set(NEIGHBOURS) <= set(encode_train(version, {}, RoundInstruction(1))["arrays"])
    assert sum(a.nbytes for a in wire_arrays(version).values()) == sum(a.nbytes for a in version.values())
    assert set(wire_arrays({"item.weight": np.zeros((3, 2))})) == {"item.weight"}  # no graph: nothing to pack


@pytest.mark.parametrize("garble", ["out of range", "negative", "twice", "unordered", "short ids", "float slots",
                                    "no shape", "huge", "more rows than items", "no prior"])
def test_slots_that_make_no_table_end_in_a_message_error(garble):
    from fedrec.messages import MessageError, RoundInstruction, decode_train, encode_train

    arrays = encode_train(_version(0.01), {}, RoundInstruction(1))["arrays"]
    slots = arrays["graph.slots"]
    arrays.update({"out of range": {"graph.slots": np.append(slots[:-1], 300 * 20)},
                   "negative": {"graph.slots": np.append(slots[:-1], -1)},
                   "twice": {"graph.slots": np.append(slots[:-1], slots[-2])},
                   "unordered": {"graph.slots": slots[::-1].copy()},
                   "short ids": {"graph.slot_ids": arrays["graph.slot_ids"][:-1]},
                   "float slots": {"graph.slots": slots.astype(np.float64)},
                   "no shape": {"graph.table_shape": np.zeros(0, np.int64)},
                   "huge": {"graph.table_shape": np.asarray([300, 2**30])},
                   "more rows than items": {"graph.table_shape": np.asarray([600, 20])}}.get(garble, {}))
    if garble == "no prior":
        del arrays["graph.prior"]
    with pytest.raises(MessageError):
        decode_train({"arrays": arrays, "config": {}, "round": RoundInstruction(1).to_flat()})
