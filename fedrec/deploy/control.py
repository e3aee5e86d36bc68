"""The SuperLink's Control API, asked from this process: what ``flwr ls``, ``flwr supernode list``, ``flwr supernode
register``, ``flwr stop`` and ``flwr log --show`` ask, without a ``flwr`` process each.

A ``flwr`` process costs about 1.7 s of CPU on a 2-core machine before it sends anything (it imports the whole CLI),
and a local federation asks the Control API 5 to 20 times (register each device's key, wait for the devices, follow
the run, fetch the ServerApp's log). Those processes took 30 s of wall time in a 48 s TLS deployment (3 devices, 2
rounds of SecAgg+), competing for the cores with the SuperNodes and the ServerApp starting up; asked from this process
the same deployment went from 64-66 s to 54-55 s (two runs each, the same hour). Each question is one HTTP request
through Flower's own client (:class:`flwr.supercore.control.ControlHttpClient`), built from the connection file the
``flwr`` CLI reads (``FLWR_HOME``), with the same interceptors (runtime version, account auth). Submitting a run stays
a ``flwr run`` command (it builds and uploads the app bundle; :mod:`fedrec.deploy.local`).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def _ask(home: Path, connection: str, what: str, call) -> Any:
    """``call(client)``; any failure (refused, timed out, an error reply) as a :class:`DeployError` naming ``what``."""
    try:
        with _client(home, connection) as client:
            return call(client)
    except (Exception, SystemExit) as e:  # Flower's CLI helpers exit on a bad connection file
        raise DeployError(f"The SuperLink's Control API did not answer `{what}`: {type(e).__name__}: {e}") from None


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
    """Register a SuperNode's public key (PEM, a NIST curve) under ``name``; its node id."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest

    def call(client: Any) -> int:
        res = client.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(public_key), name=name))
        if not res.node_id:
            raise DeployError("no node id in the reply")
        return int(res.node_id)

    return _ask(home, connection, "supernode register", call)


def stop(home: Path, connection: str, run_id: int) -> None:
    """Stop run ``run_id`` (``flwr stop``); DeployError if the SuperLink says it did not."""
    from flwr.proto.control_pb2 import StopRunRequest

    def call(client: Any) -> None:
        if not client.StopRun(request=StopRunRequest(run_id=run_id)).success:
            raise DeployError(f"run {run_id} was not stopped")

    _ask(home, connection, "stop", call)


def logs(home: Path, connection: str, run_id: int) -> str:
    """The log run ``run_id``'s ServerApp has sent so far (``flwr log RUN --show``)."""
    from flwr.proto.control_pb2 import StreamLogsRequest

    def call(client: Any) -> str:
        for res in client.StreamLogs(StreamLogsRequest(run_id=run_id, after_timestamp=0.0)):
            return str(res.log_output)
        return ""

    return _ask(home, connection, "log", call)
