"""The SuperLink's Control API, asked from this process: what ``flwr ls``, ``flwr supernode list``, ``flwr supernode
register``, ``flwr stop`` and ``flwr log --show`` ask, without a ``flwr`` process each.

A ``flwr`` process costs about 1.7 s of CPU on a 2-core machine before it sends anything (it imports the whole CLI),
and a local federation asks the Control API 5 to 20 times (register each device's key, wait for the devices, follow
the run, fetch the ServerApp's log). Those processes took 30 s of wall time in a 48 s TLS deployment (3 devices, 2
rounds of SecAgg+), competing for the cores with the SuperNodes and the ServerApp starting up; asked from this process
the same deployment went from 64-66 s to 54-55 s (two runs each, the same hour). Each question is one HTTP request
through Flower's own client (:class:`flwr.supercore.control.ControlHttpClient`), built from the connection file the
``flwr`` CLI reads (``FLWR_HOME``), with the same interceptors (runtime version; account auth, whose credentials file
Flower fixes at import, under the user's home: the local SuperLink has no accounts), and its errors worded as the CLI
words them. Submitting a run stays a ``flwr run`` command (it builds and uploads the app bundle;
:mod:`fedrec.deploy.local`). Nothing here calls Flower's ``flwr_exit`` (its key loader does, and it ends the whole
process 5 s later): a node's key is read with ``cryptography`` here. Not thread-safe (``FLWR_HOME`` is set for each
call); :mod:`fedrec.deploy.local` asks from one thread.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOG_TIMEOUT = 60.0  #: seconds to wait for a run's log (Flower's log stream has no read timeout)


class DeployError(RuntimeError):
    """The local federation could not start or finish; the message says which part and why."""


@contextlib.contextmanager
def _client(home: Path, connection: str) -> Iterator[Any]:
    """A Control API client for ``connection`` as written under ``home`` (the ``FLWR_HOME`` of the ``flwr`` CLI);
    Flower reads ``FLWR_HOME`` from the environment, so it is set for the call and restored after."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    before = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    client = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the CLI's "Using SuperLink: ..." line
            client = init_http_client_from_connection(read_superlink_connection(connection))
        yield client
    finally:
        if client is not None:
            client.close()
        if before is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = before


def _ask(home: Path, connection: str, what: str, call: Callable[[Any], Any]) -> Any:
    """``call(client)``; any failure (unreachable, timed out, an error reply: worded as the ``flwr`` CLI words it) as a
    :class:`DeployError` of one line naming ``what``."""
    from flwr.cli.utils import flwr_cli_exc_handler

    try:
        with _client(home, connection) as client, flwr_cli_exc_handler():
            return call(client)
    except DeployError as e:
        raise DeployError(f"The SuperLink's Control API, asked `{what}`: {e}") from None
    except Exception as e:  # Flower's CLI helpers raise click exceptions, httpx its own
        reason = " ".join(str(getattr(e, "message", "") or e).split()) or type(e).__name__
        first = reason.split(". ")[0].rstrip(".")  # Flower adds advice for its own CLI's users
        raise DeployError(f"The SuperLink's Control API, asked `{what}`: {first}.") from None


def runs(home: Path, connection: str, run_id: int | None = None) -> list[dict[str, str]]:
    """The runs (or the one ``run_id``), each as ``flwr ls --format json`` gives it: ``run-id``, ``status`` (such as
    ``running`` or ``finished:completed``) and ``status-details``."""
    from flwr.cli.run_utils import format_runs
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    def call(client: Any) -> list[dict[str, str]]:
        res = client.ListRuns(ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest())
        rows = format_runs([run_from_proto(r) for r in res.run_dict.values()], res.now)
        return [{"run-id": str(r.run_id), "status": r.status_text, "status-details": r.details} for r in rows]

    return _ask(home, connection, "ls", call)


def nodes(home: Path, connection: str) -> list[dict[str, str]]:
    """The registered SuperNodes that are not deleted, as ``flwr supernode list --format json``: ``node-id``,
    ``status`` (``registered``, ``online``, ``offline``)."""
    from flwr.proto.control_pb2 import ListNodesRequest

    def call(client: Any) -> list[dict[str, str]]:
        res = client.ListNodes(ListNodesRequest())
        return [{"node-id": str(n.node_id), "status": n.status} for n in res.nodes_info if n.status != "deleted"]

    return _ask(home, connection, "supernode list", call)


def register(home: Path, connection: str, public_key: Path, name: str) -> int:
    """Register a SuperNode's public key (OpenSSH format, an EC key on a NIST curve) under ``name``; its node id."""
    from flwr.proto.control_pb2 import RegisterNodeRequest

    key = _node_key(public_key)

    def call(client: Any) -> int:
        res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
        if not res.node_id:
            raise DeployError("no node id in the reply")
        return int(res.node_id)

    return _ask(home, connection, f"supernode register {name}", call)


def stop(home: Path, connection: str, run_id: int) -> None:
    """Stop run ``run_id`` (``flwr stop``); DeployError if the SuperLink says it did not."""
    from flwr.proto.control_pb2 import StopRunRequest

    def call(client: Any) -> None:
        if not client.StopRun(request=StopRunRequest(run_id=run_id)).success:
            raise DeployError(f"run {run_id} was not stopped")

    _ask(home, connection, "stop", call)


def logs(home: Path, connection: str, run_id: int, timeout: float = LOG_TIMEOUT) -> str:
    """The log run ``run_id``'s ServerApp has sent so far (``flwr log RUN --show``). The stream stays open while an
    unfinished run has no log yet, so it is read in a thread of its own, given up after ``timeout`` s."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    def call(client: Any) -> str:
        for res in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            return str(res.log_output)
        return ""

    got: list[str | BaseException] = []

    def read() -> None:
        try:
            got.append(_ask(home, connection, "log", call))
        except DeployError as e:
            got.append(e)

    reader = threading.Thread(target=read, name=f"log-{run_id}", daemon=True)
    reader.start()
    reader.join(timeout)
    if not got:
        raise DeployError(f"The SuperLink's Control API, asked `log`: no log of run {run_id} within {timeout:.0f} s")
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


def _node_key(path: Path) -> bytes:
    """A SuperNode's public key as the Control API takes it; DeployError if the file is not one (Flower's own loader
    ends the process instead)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as e:
        raise DeployError(f"{path}: not a readable OpenSSH public key ({e}).") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise DeployError(f"{path}: not an EC public key on a NIST curve, which SuperNode authentication needs.")
    return bytes(public_key_to_bytes(key))
