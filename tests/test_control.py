"""fedrec asks the SuperLink's Control API from its own process (fedrec.deploy.control): a bad key or a SuperLink that
does not answer ends in one line naming the request, never by ending the process (Flower's key loader would).

The answers of a live SuperLink are read beside the ``flwr`` CLI's own listing in tests/test_deploy.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedrec.deploy import control
from fedrec.deploy.local import CONNECTION, DeployError, LocalFederation


def _ssh(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


@pytest.mark.parametrize("content, says", [
    (b"not a key at all\n", "not a readable OpenSSH public key"),
    (_ssh(ed25519.Ed25519PrivateKey.generate()), "not an EC public key on a NIST curve"),
])
def test_a_bad_node_key_is_refused_in_one_line_before_anything_is_sent(tmp_path, content, says):
    path = tmp_path / "node.pub"
    path.write_bytes(content)
    with pytest.raises(DeployError) as e:
        control.register(tmp_path, CONNECTION, path, "node")  # no connection file: the key is read first
    assert says in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_good_key_reads_as_flower_reads_it(tmp_path):
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    key = ec.generate_private_key(ec.SECP384R1())
    path = tmp_path / "node.pub"
    path.write_bytes(_ssh(key))
    assert control._node_key(path) == public_key_to_bytes(key.public_key())


def test_a_superlink_that_does_not_answer_is_one_line_naming_the_request(tmp_path):
    fed = LocalFederation(tmp_path / "fed", tls=False)  # a free port: nothing listens there
    fed._write_cli_config()
    for ask, what in ((lambda: control.runs(fed.cli_home, CONNECTION), "`ls`"),
                      (lambda: control.nodes(fed.cli_home, CONNECTION), "`supernode list`"),
                      (lambda: control.logs(fed.cli_home, CONNECTION, 7, timeout=30), "`log`")):
        with pytest.raises(DeployError) as e:
            ask()
        assert what in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_bad_key_leaves_the_process_alive(tmp_path):
    """Flower's own loader calls flwr_exit, whose thread ends the process 5 s later; fedrec's does not."""
    path = tmp_path / "node.pub"
    path.write_text("garbage\n")
    code = ("import sys, time; from pathlib import Path; from fedrec.deploy import control\n"
            f"try:\n    control.register(Path({str(tmp_path)!r}), 'x', Path({str(path)!r}), 'n')\n"
            "except control.DeployError:\n    pass\ntime.sleep(6); print('alive')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "alive" in r.stdout, r.stdout + r.stderr
