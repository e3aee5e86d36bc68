"""Throw-away credentials for one deployment run: a CA, the SuperLink's TLS certificate, node keys.

``make_pki(dir, nodes)`` writes, under ``dir``:

* ``ca.crt``: the run's certificate authority (every SuperNode trusts it: ``--root-certificates``);
* ``server.pem`` / ``server.key``: the SuperLink's certificate for ``127.0.0.1``, ``::1`` and
  ``localhost``, signed by the CA;
* ``node-<i>`` / ``node-<i>.pub``: SuperNode ``i``'s authentication key pair (ECDSA P-384; the
  private key in OpenSSH PEM, the public key in OpenSSH form), which is what Flower's SuperNode
  authentication reads. Only public keys registered with the SuperLink may join.

Private keys are created with mode 0600 (from their first byte) in a folder of mode 0700. They are valid for two days: they belong to one run, not to a
fleet; a production deployment brings its own CA and key management.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[tuple[Path, Path], ...]  #: (private, public) per node


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write ``data``; a private file is created 0600 from its first byte (``os.open`` with the mode, never a
    chmod after the fact) and a file left by an earlier run is replaced, not reopened with its old mode."""
    if private:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def _private_dir(path: Path) -> Path:
    """The keys' folder, 0700: created so, or narrowed if it existed."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def node_key_pair(dir_: Path, name: str) -> tuple[Path, Path]:
    """One SuperNode authentication key pair: ``dir_/name`` (private) and ``dir_/name.pub``."""
    k = ec.generate_private_key(ec.SECP384R1())
    pem = serialization.Encoding.PEM
    _private_dir(dir_)
    priv = _write(dir_ / name, k.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
                  private=True)
    pub = _write(dir_ / f"{name}.pub", k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                   serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


def make_pki(dir_: str | Path, nodes: int) -> Pki:
    d = _private_dir(Path(dir_))
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec deploy local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(start).not_valid_after(end)
           .add_extension(x509.SubjectAlternativeName([
               x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
               x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
           .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    ca_path = _write(d / "ca.crt", ca.public_bytes(pem))
    cert = _write(d / "server.pem", srv.public_bytes(pem))
    key = _write(d / "server.key", srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()), private=True)
    return Pki(ca=ca_path, server_cert=cert, server_key=key,
               node_keys=tuple(node_key_pair(d, f"node-{i}") for i in range(nodes)))
