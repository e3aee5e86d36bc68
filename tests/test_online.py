"""Online on the device: every event scored the moment before it, with the device's own newest state."""

from __future__ import annotations

import numpy as np

from fedrec.clients.device import Device
from fedrec.config import RunConfig
from fedrec.device_round import DeviceData, serve_input, shard_serve
from fedrec.eval.metrics import BLENDS
from fedrec.itemgraph import ItemGraph, device_pairs
from fedrec.messages import RoundInstruction
from fedrec.models import build_model
from fedrec.serving import ServeInput, serve

V = 12
GRAPH_LED = BLENDS.index("graph")  # the graph alone


def _graph(pairs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """A published table from devices whose sequences are the given item pairs (a then b)."""
    g = ItemGraph(V, neighbours=4)
    g.add([device_pairs(np.array([a, b]), np.array([False, True]), 5) for a, b in pairs])
    return g.table()


def _serve(history: list[int], new: list[int], graph: dict, k: int = 1):
    model = build_model("mf", V, 2, init_scale=0.1)
    state = {"item.weight": np.zeros((V, 3), np.float32)}  # a model that knows nothing: the graph decides
    (res,) = serve(model, state, [ServeInput(3, np.array(history), np.array(new))], {}, round_=2, seed=0, k=k,
                   fit_steps=0, lr=0.1, graph=graph, context=5)
    return res


def test_an_event_is_scored_before_the_device_has_it_and_never_with_a_later_one():
    # 0 -> 1 and 5 -> 6 co-occur; 6 -> 5 too (pairs are symmetric), so a leak of event "6" into the
    # context of event "5" would make 5 the top item
    graph = _graph([(0, 1), (0, 1), (5, 6), (5, 6), (5, 6)])
    res = _serve([0], [5, 6], graph)
    # event 5 (context [0]): the top item is 1, not 5 -> a miss; event 6 (context [5, 0]): 6 is top -> a hit
    assert res.counts.blends[GRAPH_LED].n == 2 and res.counts.blends[GRAPH_LED].hits == 1.0
    alone = _serve([0], [5], graph)  # the same event without the planted later one scores the same
    assert alone.counts.blends[GRAPH_LED].hits == 0.0
    # the round-start metric scores both events with the state before the round: the item-less model ties all
    assert res.counts.start.n == 2 and res.counts.start.hits == 0.0


def test_the_newest_event_changes_what_is_served_next():
    graph = _graph([(0, 1), (0, 1), (5, 6), (5, 6)])
    before = _serve([0], [], graph).next_scores
    after = _serve([0, 5], [], graph).next_scores
    assert before is not None and after is not None
    assert int(np.argmax(before)) == 1 and int(np.argmax(after)) == 6


def _cfg() -> RunConfig:
    return RunConfig(privacy="none", dim=2, user_fit_steps=3, session_len=5, k=3, seed=1)


def test_the_sdk_and_the_simulation_give_the_same_scores_for_the_same_state(tmp_path):
    cfg = _cfg()
    rng = np.random.default_rng(0)
    items = rng.integers(0, V, 9)
    table = rng.normal(size=(V, 3)).astype(np.float32)
    host = {"item.weight": table, **_graph([(0, 1), (2, 3), (3, 4), (4, 5), (6, 7)])}
    with Device(tmp_path / "d.sqlite", create=True, device_id=4, n_items=V) as dev:
        dev.record_many([(int(i), float(t), "click", 1.0) for t, i in enumerate(items[:5])])
        dev.run_round(host, cfg, 1, train=False)  # round 1 takes the first five events
        vec = dev.store.get_arrays("serve-vector")[1]["vector"]
        dev.record_many([(int(i), float(5 + t), "click", 1.0) for t, i in enumerate(items[5:])])
        sdk = dev.run_round(host, cfg, 2, train=False, blend=GRAPH_LED).served
        top = dev.recommend(3)
    model = build_model("mf", V, 2, init_scale=cfg.init_scale)
    data = DeviceData(4, items, np.array([1] * 5 + [2] * 4))
    inp = serve_input(data, 2)
    assert inp is not None
    (sim,), _ = shard_serve(model, host, [inp], {4: vec}, cfg, RoundInstruction(2, blend=GRAPH_LED))
    assert sdk is not None and sdk.counts == sim.counts and np.allclose(sdk.vector, sim.vector)
    # recommend(): the row after the last event of the same serving path, under the blend the server said
    (after,), _ = shard_serve(model, host, [ServeInput(4, items, items[:0])], {4: sdk.vector}, cfg,
                              RoundInstruction(3, blend=GRAPH_LED))
    assert after.next_scores is not None
    s = after.next_scores.copy()
    s[items] = -np.inf
    assert top == [int(i) for i in np.argsort(-s, kind="stable")[:3]]


def test_per_event_off_reports_the_round_start_metric_through_the_wire(tmp_path):
    from fedrec.eval.metrics import PrequentialCounts, ServeCounts
    from fedrec.messages import MessageError, NodeReply, ServeReport, decode_reply, encode_reply
    from fedrec.report import RunRecorder

    off = ServeCounts(start=PrequentialCounts(5, 2.0, 1.0))  # per-event scoring off: every blend empty
    got = decode_reply(encode_reply(NodeReply(served=ServeReport([(3, off)]))))
    assert got.served is not None
    (_, counts), = got.served.per_device
    assert counts == off
    rec = RunRecorder(RunConfig(out=str(tmp_path), per_event=False))
    row = rec.round(1, done=[3], counts=counts, failed=[], extra={})
    assert row["hr@10"] == row["start_hr@10"] == 0.4 and row["blend"] is None
    bad = encode_reply(NodeReply(served=ServeReport([(3, off)])))
    bad["serve"]["per-event-n"][0] = 3  # a blend that scored some of the device's events but not all
    try:
        decode_reply(bad)
    except MessageError as e:
        assert "3 of 5" in str(e)
    else:
        raise AssertionError("a partial blend count was accepted")


def test_ties_between_blends_go_first_to_the_graph_with_the_models_tie_break(tmp_path):
    from fedrec.config import RunConfig
    from fedrec.eval.metrics import BLENDS
    from fedrec.report import PREFER, RunRecorder

    assert sorted(PREFER) == sorted(BLENDS)
    with_graph = RunRecorder(RunConfig(privacy="none", out=str(tmp_path)))
    assert BLENDS[with_graph.leader()] == "graph+0.01"  # round 1: nothing scored, every blend ties
    without = RunRecorder(RunConfig(privacy="none", item_graph="off", out=str(tmp_path)))
    assert BLENDS[without.leader()] == "model"
