"""The append-only privacy ledger: persistence across restarts, crash damage, composition.

ε is checked against Opacus's PRV accountant called directly on the full (uncompressed)
history, so neither the ledger's bookkeeping nor :mod:`fedrec.privacy.accounting`'s merging of
records is trusted by these tests.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
from opacus.accountants import create_accountant

from fedrec.privacy.accounting import epsilon
from fedrec.privacy.ledger import Ledger, LedgerError, Release, line_hash

DELTA = 1e-5


@functools.cache
def _opacus_eps(history: tuple[tuple[float, float, int], ...], delta: float = DELTA) -> float:
    acc = create_accountant("prv")
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def opacus_eps(history, delta: float = DELTA, *, merge: bool = True) -> float:
    """PRV ε of ``history``; ``merge`` sums the steps of equal (z, q) first (each record costs ~0.3 s)."""
    h = [(float(z), float(q), int(n)) for z, q, n in history if n > 0]
    if merge:
        steps: Counter[tuple[float, float]] = Counter()
        for z, q, n in h:
            steps[(z, q)] += n
        h = [(z, q, n) for (z, q), n in steps.items()]
    return _opacus_eps(tuple(h), delta) if h else 0.0


def server(round_: int, z: float = 1.0, q: float = 0.1, *, steps: int = 1, period: int = 0, **kw) -> Release:
    return Release(kind="server-gaussian", unit="user", round=round_, noise_multiplier=z, sample_rate=q,
                   steps=steps, clip=1.0, period=period, **kw)


def device(round_: int, dev: int, max_steps: int, *, z: float = 1.1, q: float = 0.25, steps: int = 5) -> Release:
    return Release(kind="device-dpsgd", unit="event", round=round_, noise_multiplier=z, sample_rate=q, steps=steps,
                   clip=1.0, subject=f"device-{dev}", max_steps_per_event=max_steps)


def _lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ----------------------------------------------------------------------------------------------
# persistence


def test_reopen_gives_same_records_and_epsilon(tmp_path):
    path = tmp_path / "sub" / "privacy_ledger.jsonl"  # the parent is created on the first append
    recs = [server(1), server(2, z=1.3, q=0.2, extra={"note": "x", "n": 3}), device(2, 7, 10), server(3)]
    a = Ledger(path)
    assert a.records == [] and not a.torn_tail
    a.append(*recs[:2])
    a.append(recs[2])
    a.append(recs[3])
    a.append()  # nothing: no empty line
    assert len(_lines(path)) == 4

    b = Ledger(path)
    assert b.records == a.records == recs
    assert not b.torn_tail
    assert b.user_epsilon(DELTA) == a.user_epsilon(DELTA)
    raw = [(1.0, 0.1, 1), (1.3, 0.2, 1), (1.0, 0.1, 1)]  # uncompressed, as the records came
    assert b.user_epsilon(DELTA) == pytest.approx(opacus_eps(raw, merge=False), rel=1e-6)
    assert b.event_epsilons(DELTA) == a.event_epsilons(DELTA)
    assert b.last_round() == 3


def test_epsilon_continues_over_restarts(tmp_path):
    """Each "process" opens the same file, appends, and goes away: ε never resets or drops."""
    path = tmp_path / "privacy_ledger.jsonl"
    batches = [
        [server(1), server(2)],
        [server(3)],
        [device(4, 1, 10), server(4)],  # a device record does not count towards user-level ε
        [server(5, steps=2), server(6)],
        [server(7, z=1.3, q=0.2)],
    ]
    full: list[tuple[float, float, int]] = []
    eps_seen = [0.0]
    for batch in batches:
        led = Ledger(path)
        assert led.user_epsilon(DELTA) == pytest.approx(eps_seen[-1], rel=1e-9, abs=0)  # reopened: same ε
        led.append(*batch)
        full += [(r.noise_multiplier, r.sample_rate, r.steps) for r in batch if r.kind == "server-gaussian"]
        eps = led.user_epsilon(DELTA)
        assert eps >= eps_seen[-1]
        assert eps == pytest.approx(opacus_eps(full), rel=1e-6)
        assert eps == pytest.approx(epsilon(full, DELTA), rel=1e-9)
        eps_seen.append(eps)
    assert all(b > a for a, b in zip(eps_seen, eps_seen[1:], strict=False)), eps_seen
    final = Ledger(path)
    assert len(final.records) == sum(len(b) for b in batches)
    assert final.user_epsilon(DELTA) == pytest.approx(eps_seen[-1], rel=1e-12)
    # the `extra` argument composes one more release without writing it
    more = final.user_epsilon(DELTA, extra=(1.0, 0.1, 1))
    assert more == pytest.approx(opacus_eps(full + [(1.0, 0.1, 1)]), rel=1e-6)
    assert more > eps_seen[-1]
    assert len(Ledger(path).records) == len(final.records)


def test_in_memory_ledger_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    led = Ledger(None)
    led.append(server(1), server(2))
    assert len(led.records) == 2
    assert list(tmp_path.iterdir()) == []
    assert led.user_epsilon(DELTA) == pytest.approx(opacus_eps([(1.0, 0.1, 2)]), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# crash damage


@pytest.mark.parametrize("cut", [1, 10, 60, -20, -6])
def test_torn_final_line_is_dropped_and_next_append_works(tmp_path, cut):
    path = tmp_path / "privacy_ledger.jsonl"
    Ledger(path).append(server(1), server(2))
    whole = json.dumps(asdict(server(3)))
    with open(path, "a") as f:  # a crash mid-write: part of a line, no newline
        f.write(whole[:cut])

    before = path.read_bytes()
    led = Ledger(path)
    assert led.torn_tail
    assert led.records == [server(1), server(2)]
    assert path.read_bytes() == before  # reading changes nothing: the torn record is cut by the next write
    led.append(server(4))
    assert [d["round"] for d in _lines(path)] == [1, 2, 4]
    again = Ledger(path)
    assert not again.torn_tail
    assert again.records == [server(1), server(2), server(4)]
    assert again.user_epsilon(DELTA) == pytest.approx(opacus_eps([(1.0, 0.1, 3)]), rel=1e-6)


def test_torn_line_ending_in_brace_is_dropped(tmp_path):
    path = tmp_path / "privacy_ledger.jsonl"
    Ledger(path).append(server(1))
    whole = json.dumps(asdict(server(2)))
    assert whole.endswith("{}}")
    with open(path, "a") as f:
        f.write(whole[:-1])  # ends with "{}" : the record's own closing brace never made it
    led = Ledger(path)
    assert led.torn_tail and led.records == [server(1)]


def test_final_record_without_newline_then_append(tmp_path):
    path = tmp_path / "privacy_ledger.jsonl"
    Ledger(path).append(server(1))
    prev = line_hash(path.read_bytes().rstrip(b"\n"))
    with open(path, "a") as f:
        f.write(json.dumps({**asdict(server(2)), "prev": prev}))  # whole record, newline lost
    led = Ledger(path)
    assert led.records == [server(1), server(2)] and not led.torn_tail
    led.append(server(3))
    assert Ledger(path).records == [server(1), server(2), server(3)]


@pytest.mark.parametrize("bad", [
    "this is not json",
    '{"kind": "server-gaussian"}',  # missing fields
    json.dumps({**asdict(server(2)), "kind": "bogus"}),  # invalid kind
    json.dumps({**asdict(server(2)), "sample_rate": 0.0}),  # invalid value
    json.dumps({**asdict(server(2)), "colour": "red"}),  # unknown field
    '{"kind": "server-gaussian", "unit": "user"',  # truncated, but not the final line
])
def test_malformed_middle_line_raises_with_path_and_line(tmp_path, bad):
    path = tmp_path / "privacy_ledger.jsonl"
    good = json.dumps(asdict(server(1)))
    path.write_text(f"{good}\n{bad}\n{good}\n")
    with pytest.raises(LedgerError) as e:
        Ledger(path)
    msg = str(e.value)
    assert f"{path}:2" in msg, msg
    before = path.read_text()
    assert before == f"{good}\n{bad}\n{good}\n"  # nothing was "repaired"


def test_malformed_final_line_with_newline_is_not_torn(tmp_path):
    """A complete (newline-terminated) bad last line is corruption, not a torn write."""
    path = tmp_path / "privacy_ledger.jsonl"
    good = json.dumps(asdict(server(1)))
    path.write_text(f"{good}\n{good}\n{good[:30]}\n")
    with pytest.raises(LedgerError, match=f"{path}:3"):
        Ledger(path)


def test_blank_lines_are_ignored(tmp_path):
    path = tmp_path / "privacy_ledger.jsonl"
    good = json.dumps(asdict(server(1)))
    path.write_text(f"\n{good}\n\n{good}\n")
    led = Ledger(path)
    assert len(led.records) == 2 and not led.torn_tail


# ----------------------------------------------------------------------------------------------
# composition


def test_user_epsilon_per_period(tmp_path):
    led = Ledger(tmp_path / "l.jsonl")
    led.append(server(1, period=0), server(2, period=0), server(3, period=0),
               server(4, period=1), server(5, steps=3, period=1), device(5, 3, 20), server(6, period=2))
    e0 = led.user_epsilon(DELTA, period=0)
    e1 = led.user_epsilon(DELTA, period=1)
    e2 = led.user_epsilon(DELTA, period=2)
    assert e0 == pytest.approx(opacus_eps([(1.0, 0.1, 3)]), rel=1e-6)
    assert e1 == pytest.approx(opacus_eps([(1.0, 0.1, 4)]), rel=1e-6)
    assert e2 == pytest.approx(opacus_eps([(1.0, 0.1, 1)]), rel=1e-6)
    assert led.user_epsilon(DELTA, period=7) == 0.0
    everything = led.user_epsilon(DELTA)
    assert everything == pytest.approx(opacus_eps([(1.0, 0.1, 8)]), rel=1e-6)
    assert everything > max(e0, e1, e2)
    assert e1 > e0 > e2  # 4, 3 and 1 steps
    assert led.server_history(period=1) == [(1.0, 0.1, 1), (1.0, 0.1, 3)]
    assert len(led.server_history()) == 6
    # with one more release in period 2
    assert led.user_epsilon(DELTA, period=2, extra=(1.0, 0.1, 1)) == pytest.approx(
        opacus_eps([(1.0, 0.1, 2)]), rel=1e-6)
    # RDP is selectable and is an upper bound of the same order
    rdp = led.user_epsilon(DELTA, accountant="rdp", period=0)
    assert rdp >= e0 * 0.99 and math.isfinite(rdp)


def test_event_epsilons_use_each_devices_latest_record(tmp_path):
    led = Ledger(tmp_path / "l.jsonl")
    led.append(device(1, 1, 5), device(1, 2, 15), server(1))
    led.append(device(2, 1, 10), device(2, 2, 15, z=1.5), device(3, 3, 0, steps=0))
    led.append(device(3, 1, 10))  # latest for device 1: 10 steps (not its max 15 of round 2)
    got = Ledger(led.path).event_epsilons(DELTA)
    assert got == led.event_epsilons(DELTA)
    assert set(got) == {"device-1", "device-2", "device-3"}
    assert got["device-1"] == pytest.approx(opacus_eps([(1.1, 0.25, 10)]), rel=1e-6)
    assert got["device-2"] == pytest.approx(opacus_eps([(1.5, 0.25, 15)]), rel=1e-6)
    assert got["device-3"] == 0.0  # no step used any of its events
    assert got["device-1"] < opacus_eps([(1.1, 0.25, 15)])
    assert Ledger(None).event_epsilons(DELTA) == {}


# ----------------------------------------------------------------------------------------------
# validation of one record


@pytest.mark.parametrize("kw", [
    {"kind": "bogus"},
    {"kind": "server-gausian"},
    {"sample_rate": 0.0},
    {"sample_rate": -0.1},
    {"sample_rate": 1.0000001},
    {"sample_rate": 2.0},
    {"noise_multiplier": -0.5},
    {"noise_multiplier": -1e-12},
    {"steps": -1},
])
def test_release_rejects_bad_values(kw):
    base = dict(kind="server-gaussian", unit="user", round=1, noise_multiplier=1.0, sample_rate=0.1)
    with pytest.raises(ValueError) as e:
        Release(**{**base, **kw})
    assert str(e.value).endswith(".")


def test_release_accepts_edges_and_is_frozen():
    r = Release(kind="device-dpsgd", unit="event", round=1, noise_multiplier=0.0, sample_rate=1.0, steps=0)
    assert r.sample_rate == 1.0 and r.noise_multiplier == 0.0
    with pytest.raises(AttributeError):
        r.round = 2  # type: ignore[misc]
    # a noiseless release makes ε infinite, it does not crash the composition
    led = Ledger(None)
    led.append(Release(kind="server-gaussian", unit="user", round=1, noise_multiplier=0.0, sample_rate=0.5))
    assert math.isinf(led.user_epsilon(DELTA))


def test_release_rejects_nan_noise():
    with pytest.raises(ValueError):
        Release(kind="server-gaussian", unit="user", round=1, noise_multiplier=float("nan"), sample_rate=0.1)
