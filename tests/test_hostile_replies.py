"""Every number a node sends is hostile until checked: a lying or malformed reply fails alone.

Two kinds of test: any garbage a node could put in a reply decodes to a reply or a
:class:`~fedrec.messages.MessageError`, never another exception (hypothesis); and a real in-process
federation in which one node lies in many ways keeps running, records each lie as a failure, and
publishes the model of the honest updates alone.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrec.clients.app import app as client_app
from fedrec.config import RunConfig
from fedrec.messages import MessageError, NodeReply, UpdateReport, decode_reply
from fedrec.server.app import run_federation
from fedrec.server.local_grid import LocalGrid

_values = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                    st.text(max_size=5), st.lists(st.one_of(st.integers(-5, 5), st.floats(), st.text(max_size=2)),
                                                  max_size=4))
_names = st.one_of(st.sampled_from(["metrics-3", "delta-3", "probe-3", "skip-3", "error-3", "inflight-3", "serve",
                                    "serve-probe", "metrics-²", "delta--1", "metrics-", "x"]),
                   st.text(max_size=12))
_keys = st.sampled_from(["num-examples", "n-new", "eval-n", "eval-hits", "eval-ndcg", "epsilon", "steps",
                         "max-exposure", "clipped", "preclip-norm", "skipped", "base-round", "due", "reason", "items",
                         "hits", "devices", "n", "ndcg", "item.weight"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_names, st.dictionaries(_keys, _values, max_size=8), max_size=5))
def test_any_reply_decodes_or_fails_with_a_message_error(records):
    try:
        out = decode_reply(records)
    except MessageError:
        return
    assert isinstance(out, NodeReply)
    for u in out.updates:  # whatever was accepted holds checked numbers
        r = u.report
        assert min(r.num_examples, r.n_new, r.steps, r.max_exposure, r.counts.n) >= 0
        assert 0 <= r.counts.hits <= r.counts.n and math.isfinite(r.preclip_norm)


@pytest.mark.parametrize("field,value", [("num-examples", math.inf), ("num-examples", -3), ("steps", -1),
                                         ("eval-hits", 99.0), ("eval-n", 2.5), ("preclip-norm", math.nan),
                                         ("clipped", 7), ("max-exposure", "a lot")])
def test_an_update_report_out_of_range_is_refused(field, value):
    good = UpdateReport.from_flat({"num-examples": 4, "n-new": 2, "eval-n": 2, "eval-hits": 1.0, "eval-ndcg": 0.5,
                                   "epsilon": 1.0, "steps": 3, "max-exposure": 3, "clipped": 0,
                                   "preclip-norm": 0.2}).to_flat()
    with pytest.raises(MessageError, match=field):
        UpdateReport.from_flat({**good, field: value})


def _liar(lies: set[str]):
    """Node 1001 runs the real ClientApp, then lies in its reply in each of the ways named (the other is honest)."""
    def node(msg: Message, ctx):
        rep = client_app(msg, ctx)
        if rep.has_error() or msg.metadata.message_type != "train" or ctx.node_id != 1001:
            return rep
        c = rep.content
        mine = sorted(int(k[len("metrics-"):]) for k in c.keys() if k.startswith("metrics-"))
        if not mine:
            return rep
        d = mine[0]
        if "drop" in lies:  # the honest counterpart of inf-weight: the device simply failed
            del c[f"delta-{d}"], c[f"metrics-{d}"]
            c[f"error-{d}"] = ConfigRecord({"reason": "gone"})
        if "inf-weight" in lies:  # an update whose event count is infinite
            c[f"metrics-{d}"] = MetricRecord({**dict(c[f"metrics-{d}"]), "num-examples": math.inf})
        if "foreign" in lies:  # an update for a device of another node (copied from its own)
            c["delta-9999"], c["metrics-9999"] = c[f"delta-{mine[-1]}"], c[f"metrics-{mine[-1]}"]
        if "inflight" in lies:  # a device it does not host "in flight"
            c["inflight-77777"] = ConfigRecord({"base-round": 1, "due": 2})
        if "bad-name" in lies:
            c["metrics-²"] = MetricRecord({"skipped": 0})
        return rep
    return node


def test_a_lying_node_fails_alone_and_the_model_is_that_of_the_honest_updates(tmp_path):
    kw = {"world_users": 40, "nodes": 2, "rounds": 2, "cohort": 40, "uptake_probe": False, "progress": False,
          "engine": "local", "privacy": "none"}
    cfg = RunConfig(**kw, out=str(tmp_path / "lies"))
    s = run_federation(LocalGrid(_liar({"inf-weight", "foreign", "inflight"}), cfg.nodes, cfg.to_flat()), cfg)
    assert s["rounds"] == 2
    rows = [json.loads(x) for x in (tmp_path / "lies" / "metrics.jsonl").read_text().splitlines()]
    reasons = " | ".join(f for r in rows for f in r["failures"])
    for why in ("num-examples", "does not host", "in flight"):
        assert why in reasons
    assert all(r["late"] == 0 for r in rows)  # the lie about a device in flight changed nothing
    # a node whose reply names no device fails whole, and the run goes on without it
    cfg2 = RunConfig(**kw, out=str(tmp_path / "garbled"))
    s2 = run_federation(LocalGrid(_liar({"bad-name"}), cfg2.nodes, cfg2.to_flat()), cfg2)
    assert s2["rounds"] == 2
    rows2 = [json.loads(x) for x in (tmp_path / "garbled" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["failed"] == 1 and any("names no device" in f for f in r["failures"]) for r in rows2)
    # the honest updates alone: the same model as a run in which the lying entries were never sent
    cfg3 = RunConfig(**kw, out=str(tmp_path / "honest"))
    run_federation(LocalGrid(_liar({"drop"}), cfg3.nodes, cfg3.to_flat()), cfg3)
    lied, honest = (np.load(tmp_path / n / "global_model.npz")["item.weight"] for n in ("lies", "honest"))
    np.testing.assert_allclose(lied, honest, rtol=1e-5, atol=1e-6)
