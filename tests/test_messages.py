"""User parameters never leave the device: every reply of a real Flower simulation is recorded.

A ClientApp with a Flower *mod* wraps the real handlers of :mod:`fedrec.clients.app`. The mod
runs inside the Ray actors, so it only uses what it closes over (a directory path) and the
standard library; each reply is written to its own JSON file there, together with every
device's user vector as the node kept it in ``context.state`` before and after the handler ran.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.clients import app as client_module
from fedrec.config import RunConfig


def _make_client_app(rec_dir: str):
    from flwr.clientapp import ClientApp

    def rec_mod(msg, context, call_next):
        import base64
        import hashlib
        import json as _json
        import os
        import uuid

        import numpy as _np

        def vectors():
            out = {}
            for skey in list(context.state.keys()):
                if str(skey).startswith("device-"):
                    st = context.state[skey]
                    if "local:user.weight" in st:
                        out[str(skey)] = {"b64": base64.b64encode(st["local:user.weight"]).decode(),
                                          "shape": list(st["shape:user.weight"])}
            return out

        before = vectors()
        reply = call_next(msg, context)
        seen = {"type": str(msg.metadata.message_type), "records": {}, "user_vectors": vectors(),
                "user_vectors_before": before}
        if reply.has_content():
            # our replies travel packed (fedrec.clients.records): record them as the records they unpack to,
            # and keep the packed bytes whole, so that nothing can hide in bytes no record names
            from fedrec.clients.records import LIST_BLOB, PACKED, PACKED_ARRAYS, from_records
            from fedrec.messages import record_type

            kinds = {"arrays": "ArrayRecord", "metrics": "MetricRecord", "config": "ConfigRecord"}
            plain = from_records(reply.content)
            head = reply.content[PACKED]
            blob = head["blob"] if "blob" in head else reply.content[PACKED_ARRAYS]["blob"].numpy().tobytes()
            # the arrays' bytes, and those of each long list of numbers (8 bytes a number)
            lists = [v for k, r in plain.items() if record_type(k) != "arrays" for v in r.values()
                     if isinstance(v, list) and len(v) >= LIST_BLOB and len({type(x) for x in v}) == 1
                     and type(v[0]) in (int, float)]
            seen["packed"] = {"records": sorted(reply.content.keys()), "blob_b64": base64.b64encode(blob).decode(),
                              "declared": sum(int(a.nbytes) for k, r in plain.items() if record_type(k) == "arrays"
                                              for a in r.values()) + 8 * sum(len(v) for v in lists)}
            for key, rec in plain.items():
                entry = {"kind": kinds[record_type(key)], "keys": list(rec.keys())}
                if entry["kind"] == "ArrayRecord":
                    arrays = {}
                    for name, a in rec.items():
                        raw = _np.ascontiguousarray(a).astype(_np.float32).tobytes()
                        arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype),
                                        "sha256": hashlib.sha256(raw).hexdigest(),
                                        "b64": base64.b64encode(raw).decode()}
                    entry["arrays"] = arrays
                else:
                    vals = {}
                    for k, v in rec.items():
                        if isinstance(v, bytes):
                            vals[k] = {"bytes_b64": base64.b64encode(v).decode()}
                        else:
                            vals[k] = v
                    entry["values"] = vals
                seen["records"][key] = entry
        else:
            seen["error"] = str(reply.error.reason)
        with open(os.path.join(rec_dir, f"{uuid.uuid4().hex}.json"), "w") as f:
            _json.dump(seen, f)
        return reply

    app2 = ClientApp(mods=[rec_mod])

    @app2.train()
    def train(msg, context):
        return client_module.train(msg, context)

    @app2.query()
    def query(msg, context):
        return client_module.query(msg, context)

    return app2


def _b64(s: str) -> bytes:
    import base64

    return base64.b64decode(s)


@pytest.mark.slow
def test_user_parameters_never_leave_the_device(tmp_path):
    from flwr.simulation import run_simulation

    from fedrec.server.app import make_server_app

    rec_dir = tmp_path / "sent"
    rec_dir.mkdir()
    cfg = RunConfig(privacy="event", world_users=20, world_items=80, world_topics=4, world_events_per_user=20, rounds=2, cohort=8,
                    nodes=2, dim=4, local_steps=2, out=str(tmp_path / "run"), progress=False)
    rows = []
    run_simulation(server_app=make_server_app(cfg, on_round=rows.append), client_app=_make_client_app(str(rec_dir)),
                   num_supernodes=cfg.nodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    assert len(rows) == 2 and all(r["devices"] == cfg.cohort and r["failed"] == 0 for r in rows)
    assert (tmp_path / "run" / "summary.json").is_file()

    seen = [json.loads(p.read_text()) for p in sorted(rec_dir.glob("*.json"))]
    assert all("error" not in s for s in seen)
    queries = [s for s in seen if s["type"] == "query"]
    trains = [s for s in seen if s["type"] == "train"]
    assert len(queries) == cfg.nodes
    assert len(trains) >= cfg.rounds  # one per node holding a sampled device, each round
    delta_devices = {k[len("delta-"):] for s in trains for k in s["records"] if k.startswith("delta-")}
    assert len(delta_devices) >= cfg.cohort
    all_vecs = user_vectors(seen, cfg.dim)
    # every device that sent a delta left a user vector on its node
    kept = {dev for s in seen for dev in s["user_vectors"]}
    assert {f"device-{d}" for d in delta_devices} <= kept
    n_arrays = check_sent(seen, all_vecs, cfg.dim, n_items=80)
    assert n_arrays >= cfg.cohort * cfg.rounds
    for s in seen:  # the packed bytes are exactly the arrays the records name, and hold no user vector
        blob = _b64(s["packed"]["blob_b64"])
        assert s["packed"]["records"] == ["fedrec-packed"] and len(blob) == s["packed"]["declared"]
        assert not any(uv in blob for uv in all_vecs)


def user_vectors(seen: list[dict], dim: int) -> list[bytes]:
    vecs = set()
    for s in seen:
        for uv in [*s["user_vectors"].values(), *s["user_vectors_before"].values()]:
            assert uv["shape"] == [1, dim]
            vecs.add(_b64(uv["b64"]))
    assert vecs and all(len(v) == 4 * dim for v in vecs)
    return sorted(vecs)


def check_sent(seen: list[dict], user_vecs: list[bytes], dim: int, n_items: int) -> int:
    """Fail if any recorded reply carries a user parameter; returns the number of arrays sent."""
    n_arrays = 0
    for s in seen:
        for key, rec in s["records"].items():
            assert "user" not in key.lower(), key
            if rec["kind"] == "ArrayRecord":
                assert key.startswith("delta-"), key
                assert list(rec["arrays"]) == ["item.weight"], list(rec["arrays"])
                for name, a in rec["arrays"].items():
                    n_arrays += 1
                    assert "user" not in name
                    assert a["shape"] != [1, dim]
                    assert a["shape"] == [n_items, dim + 1]
                    raw = _b64(a["b64"])
                    sent = np.frombuffer(raw, np.float32)
                    for uv in user_vecs:
                        assert uv not in raw, f"{key}/{name} contains a user vector"
                        assert not np.isin(np.frombuffer(uv, np.float32), sent).all(), f"{key}/{name} leaks a user vector"
            else:
                assert rec["kind"] in ("ConfigRecord", "MetricRecord"), rec["kind"]
                for k, v in rec.get("values", {}).items():
                    assert "user" not in k.lower() and not k.startswith("local:"), k
                    assert not (isinstance(v, dict) and "bytes_b64" in v), f"{key}/{k} sends raw bytes"
                if key.startswith("metrics-"):
                    assert set(rec["keys"]) == {"num-examples", "n-new", "eval-n", "eval-hits", "eval-ndcg",
                                                "epsilon", "steps", "max-exposure", "clipped", "preclip-norm",
                                                "skipped"}
                    floats = {float(v) for v in rec["values"].values()}
                    for uv in user_vecs:
                        assert not floats & {float(c) for c in np.frombuffer(uv, np.float32)}
    return n_arrays


def test_check_sent_catches_a_leak():
    """The checker itself must fail on a reply that carries a user vector (fast, no simulation)."""
    import base64

    dim, n_items = 4, 6
    rng = np.random.default_rng(0)
    uv = rng.normal(size=(1, dim)).astype(np.float32)
    item = rng.normal(size=(n_items, dim + 1)).astype(np.float32)

    def rec(arrays, key="delta-3"):
        return {"type": "train", "user_vectors": {}, "user_vectors_before": {}, "records": {key: {
            "kind": "ArrayRecord", "keys": list(arrays),
            "arrays": {n: {"shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}
                       for n, a in arrays.items()}}}}

    vecs = [uv.tobytes()]
    assert check_sent([rec({"item.weight": item})], vecs, dim, n_items) == 1
    leaked = item.copy()
    leaked[2, :dim] = uv[0]  # the user vector hidden inside the item table
    with pytest.raises(AssertionError):
        check_sent([rec({"item.weight": leaked})], vecs, dim, n_items)
    with pytest.raises(AssertionError):
        check_sent([rec({"item.weight": item, "user.weight": uv})], vecs, dim, n_items)
    with pytest.raises(AssertionError):
        check_sent([rec({"item.weight": item}, key="local-3")], vecs, dim, n_items)
    metrics = {"type": "train", "user_vectors": {}, "user_vectors_before": {}, "records": {"metrics-3": {
        "kind": "MetricRecord", "keys": ["num-examples"], "values": {"num-examples": 3}}}}
    with pytest.raises(AssertionError):
        check_sent([metrics], vecs, dim, n_items)  # unexpected metric key set
