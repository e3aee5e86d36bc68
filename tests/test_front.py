"""Only the operator controls the server (issue 19, part 0): the devices' door forwards the Fleet API alone.

A real SuperLink (TLS, SuperNode authentication) bound to 127.0.0.1 behind the real front process, as
``fedrec deploy local`` starts them. The outsider holds what every device holds, ``ca.crt`` and the
devices' address, and uses Flower's own ``flwr`` CLI, as an attacker would.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from _sockets import listening, off_loopback, tagged

from fedrec.deploy.front import FLEET_ROUTES, FleetFront, allowed
from fedrec.deploy.local import LocalFederation, write_app
from fedrec.deploy.pki import node_key_pair

pytestmark = pytest.mark.slow


def _outsider(fed: LocalFederation, home: Path, port: int, *args: str) -> subprocess.CompletedProcess:
    """``flwr`` with its own home: a connection to 127.0.0.1:``port`` trusting the run's CA, nothing else."""
    (home / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "127.0.0.1:{port}"\n'
                                      f'root-certificates = "{fed.pki.ca}"\n')
    env = {**fed.env("cli"), "FLWR_HOME": str(home)}
    return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _listed(out: str) -> dict:
    return json.loads(out[out.find("{"):])


def test_an_outsider_with_the_ca_can_neither_register_nor_list_nor_submit(tmp_path):
    fed = LocalFederation(tmp_path / "fed", tls=True)
    app = write_app(tmp_path / "app", {"rounds": 1, "world-users": 2, "out": str(tmp_path / "run")})
    home = tmp_path / "outsider"
    try:
        fed.make_keys(1)
        fed.start_superlink()
        fed.start_devices([tmp_path / "unused.sqlite"])  # a registered device joins through the front
        fed.wait_online(1, timeout=120)
        socks = listening(tagged(fed.tag))
        assert {fed.port, fed.fleet_port} <= {p for _, p in socks} and off_loopback(socks) == set(), socks
        _key, pub = node_key_pair(tmp_path, "intruder")

        # the door without the front is wide open: what the test would see without it
        assert _outsider(fed, home, fed.port, "ls", "x", "--format", "json").returncode == 0

        ls = _outsider(fed, home, fed.fleet_port, "ls", "x", "--format", "json")
        reg = _outsider(fed, home, fed.fleet_port, "supernode", "register", str(pub), "x", "--format", "json")
        run = _outsider(fed, home, fed.fleet_port, "run", str(app), "x", "--format", "json")
        for r in (ls, reg, run):
            assert '"success": false' in r.stdout and "404 Not Found" in r.stdout, r.stdout + r.stderr
        nodes = _listed(fed.flwr("supernode", "list", "fedrec-local", "--format", "json"))["nodes"]
        runs = _listed(fed.flwr("ls", "fedrec-local", "--format", "json")).get("runs") or []
        assert len(nodes) == 1 and nodes[0]["status"] == "online"  # the device's key only, still online
        assert runs == []
        assert not (tmp_path / "run").exists()
    finally:
        left = fed.stop()
    assert left == []


def test_the_front_answers_only_known_fleet_posts(tmp_path):
    fed = LocalFederation(tmp_path / "fed", tls=True)
    try:
        fed.make_keys(0)
        fed.start_superlink()
        ctx = ssl.create_default_context(cafile=str(fed.pki.ca))
        with httpx.Client(base_url=f"https://127.0.0.1:{fed.fleet_port}", verify=ctx) as c:
            for method, path in [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                                 ("POST", "/v1/control/start-run"), ("POST", "/v1/fleet/../control/list-runs"),
                                 ("POST", "/v1/fleet/%2e%2e/control/list-runs"), ("POST", "/v1/fleet/list-runs"),
                                 ("GET", "/v1/fleet/pull-messages"), ("POST", "/v1/fleet/pull-messages?x=1"),
                                 ("GET", "/health"), ("POST", "/v1/fleet//pull-messages")]:
                r = c.request(method, path, content=b"")
                assert r.status_code == 404 and r.text.startswith("Not a Fleet API route"), (method, path)
            # a Fleet route reaches the SuperLink, which answers the empty request itself
            r = c.post("/v1/fleet/get-run", content=b"")
            assert not r.text.startswith("Not a Fleet API route")
    finally:
        assert fed.stop() == []


def test_allowed_is_an_exact_list():
    base = {"type": "http", "method": "POST", "query_string": b""}
    assert all(allowed({**base, "path": f"/v1/fleet/{r}"}) for r in FLEET_ROUTES)
    assert not allowed({**base, "path": "/v1/fleet/pull-messages", "raw_path": b"/v1/fleet/pull%2dmessages"})
    assert not allowed({**base, "type": "websocket", "path": "/v1/fleet/pull-messages"})
    assert FleetFront("https://127.0.0.1:1").upstream == "https://127.0.0.1:1"


def test_a_bad_front_argument_is_one_sentence(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fedrec.deploy.front", "--listen", "nowhere", "--superlink", "127.0.0.1:1",
                        "--insecure"], capture_output=True, text=True, timeout=60, env=os.environ)
    assert r.returncode == 2 and r.stderr.strip() == "fedrec front: --listen should be host:port (got 'nowhere')."
    r = subprocess.run([sys.executable, "-m", "fedrec.deploy.front", "--listen", "127.0.0.1:1", "--superlink",
                        "127.0.0.1:2", "--ssl-certfile", str(tmp_path / "x"), "--ssl-keyfile", "y",
                        "--ssl-ca-certfile", "z"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not a readable file" in r.stderr
