"""A single-machine run listens on loopback only (issue 19, part 0): `fedrec simulate` on its own Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from _sockets import listening, off_loopback, tagged

pytestmark = pytest.mark.slow


def test_a_ray_simulation_opens_ports_on_loopback_only(tmp_path):
    tag = f"fedrec-loopback-{uuid.uuid4().hex}"
    env = {**os.environ, "FEDREC_TEST_TAG": tag}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([str(Path(sys.executable).parent / "fedrec"), "simulate", "--world-users", "60", "--world-items", "40",
                          "--rounds", "6", "--cohort", "10", "--engine", "ray", "--no-progress",
                          "--out", str(tmp_path / "run")], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)
    seen: set[tuple[str, int]] = set()
    try:
        while p.poll() is None:
            seen |= listening(tagged(tag))
            time.sleep(0.3)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(60)
    assert p.returncode == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
    assert len(seen) >= 3, seen  # Ray's GCS, raylet, object manager...: the test saw the run's servers
    assert off_loopback(seen) == set(), seen
