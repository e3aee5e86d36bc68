"""The server learning-rate schedules on hand-made HR sequences."""

from __future__ import annotations

import pytest

from fedrec.eval.metrics import PrequentialCounts
from fedrec.server_lr import ServerLR


def _c(hr: float, n: int = 100) -> PrequentialCounts:
    return PrequentialCounts(n=n, hits=hr * n)


def test_fixed_is_fixed():
    s = ServerLR(5.0)
    assert [s.step(_c(h)) for h in (0.1, 0.5, 0.0, 0.3)] == [5.0] * 4


def test_adaptive_boosts_on_a_drop_and_relaxes_back():
    s = ServerLR(10.0, adaptive=True, drop=0.1, boost=2.0, max_factor=4.0, relax=0.5, alpha=0.5)
    assert s.step(_c(0.20)) == 10.0  # first round only sets the level
    assert s.step(_c(0.20)) == 10.0
    assert s.step(_c(0.10)) == 20.0  # 0.10 < 0.9 * 0.20: drift, boost
    # level is now 0.15; 0.12 < 0.135: boost again, capped at 4x
    assert s.step(_c(0.12)) == 40.0
    assert s.step(_c(0.05)) == 40.0  # capped
    lr = s.step(_c(0.30))  # recovered: relax half way back to the base
    assert lr == pytest.approx(25.0)
    assert s.state_dict()["lr"] == pytest.approx(25.0)


def test_rounds_without_events_change_nothing():
    s = ServerLR(10.0, adaptive=True)
    s.step(_c(0.2))
    assert s.step(PrequentialCounts()) == 10.0 and s.level == pytest.approx(0.2)


@pytest.mark.parametrize("kw", [dict(base=0.0), dict(base=1.0, drop=1.5), dict(base=1.0, boost=0.5)])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        ServerLR(**kw)
