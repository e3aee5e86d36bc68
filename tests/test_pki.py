"""Deployment credentials: private keys 0600 in a 0700 folder, whatever was there before."""

from __future__ import annotations

import os
import stat

from fedrec.deploy.pki import make_pki, node_key_pair


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_private_keys_are_0600_in_a_0700_folder_even_over_older_open_files(tmp_path):
    d = tmp_path / "keys"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    for name in ("server.key", "node-0"):  # left by an earlier run, world-readable
        (d / name).write_bytes(b"old")
        os.chmod(d / name, 0o644)
    old = os.umask(0)  # a permissive umask must not open them either
    try:
        pki = make_pki(d, 2)
        priv, pub = node_key_pair(d, "extra")
    finally:
        os.umask(old)
    assert _mode(d) == 0o700
    for p in (pki.server_key, priv, *(k for k, _ in pki.node_keys)):
        assert _mode(p) == 0o600, p
        assert p.read_bytes() != b"old"
    assert pub.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    assert pki.ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
