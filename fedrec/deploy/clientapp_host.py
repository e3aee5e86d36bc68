"""A long-lived ClientApp process for one SuperNode: Flower's ``--isolation process``, kept warm.

Flower 1.42's SuperNode hands each message to a *task*. In ``--isolation subprocess`` (its default) the
SuperNode's own SuperExec starts a fresh ``flwr-clientapp`` process per task, which spends about 2 s on
imports (torch, numpy, Flower) before it reads the message: most of a deployment round. In
``--isolation process`` the SuperNode only serves its Runtime API and waits for an outside process to take
the tasks. This module is that process, for fedrec's ClientApp, as a loop that keeps its imports:

1. ask the SuperNode's Runtime API for a ClientApp task (``AcquireTask``, as ``flower-superexec`` does),
   every ``poll`` s while there is none;
2. run the task exactly as ``flwr-clientapp`` would (Flower's own ``pull_task_input``, ``push_message``,
   ``push_task_output`` and task heartbeat, with the task's one-time token), but in this process, with the
   ClientApp loaded once per FAB;
3. a task that fails (the app raised, the message was bad) ends as ``flwr-clientapp`` ends it: an error reply
   and a failed task status; the loop goes on to the next.

What a task sees is the same as in a fresh process: its message, its node's context (pulled per task and
pushed back after it, so SecAgg+'s per-stage state and fedrec's device state travel as before), its run's
config. Nothing but code is kept between tasks. It exits when the SuperNode whose id ``--parent-pid`` names
is gone, or on SIGTERM/SIGINT between tasks.

``python -m fedrec.deploy.clientapp_host --runtime-api-address 127.0.0.1:PORT --insecure [--parent-pid PID]``
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from logging import ERROR, INFO

import httpx
from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from .quick import CLIENTAPP_PATIENCE, quick_pulls

POLL = 0.05  #: seconds between asks for a task just after one (a loopback request; Flower's SuperExec: 1 s) ...
MAX_POLL = 0.1  #: ... growing by half each ask while there is none, to this (an idle node asks 10 times a second)


class _Stop(Exception):
    """A second SIGTERM/SIGINT: stop now, even inside a task."""


def _client(address: str, insecure: bool, certificates: bytes | None, *extra, task: bool = False
            ) -> RuntimeHttpClient:
    """A Runtime API client; ``task``: one task's, whose 401 fails the task instead of stopping this process."""
    invoker = make_simple_http_retry_invoker()
    if task:
        invoker.should_giveup = _task_gone_or(invoker.should_giveup)
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[*extra], retry_invoker=invoker)


def _task_gone_or(should_giveup: Callable[[Exception], bool] | None) -> Callable[[Exception], bool]:
    """Flower's give-up rule, except for a 401: there the SuperNode revoked the task's token (it finished the task:
    its run stopped, :mod:`fedrec.deploy.supernode`), so the task fails and the host takes the next one. Flower's
    rule sends SIGINT to its own process on a 401, right for a ``flwr-clientapp`` that runs one task and exits,
    not for a host that serves its SuperNode all run long."""
    def rule(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return should_giveup(exc) if should_giveup is not None else False

    return rule


class Host:
    """Takes the SuperNode's ClientApp tasks one after another and runs each in this process."""

    def __init__(self, address: str, insecure: bool, certificates: bytes | None) -> None:
        self.address, self.insecure, self.certificates = address, insecure, certificates
        self.apps: dict[str, ClientApp] = {}  # FAB hash -> its ClientApp, loaded once
        self.load: Callable[[str, str, str], ClientApp] = get_load_client_app_fn("", None, multi_app=True)
        self.tasks = 0
        self.stopping = False  #: a signal came: finish the task in hand, take no other

    def stop(self, _signum: int, _frame: object) -> None:
        """The first SIGTERM/SIGINT: no new task; the second: now."""
        if self.stopping:
            raise _Stop
        self.stopping = True

    def serve(self, poll: float = POLL) -> None:
        """Until stopped: take a task when there is one, else wait ``poll`` s, growing to :data:`MAX_POLL`."""
        acquire = _client(self.address, self.insecure, self.certificates,
                          RuntimeVersionHttpInterceptor(component_name="SuperExec"))
        wait = poll
        try:
            while not self.stopping:
                res = acquire.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                    wait = poll
                else:
                    time.sleep(wait)
                    wait = min(max(poll, MAX_POLL), wait * 1.5)
        finally:
            acquire.close()

    def _app(self, run, fab) -> ClientApp:  # noqa: ANN001 (Flower's Run and Fab)
        if fab.hash_str not in self.apps:
            install_from_fab(fab.content, skip_prompt=True)
            self.apps[fab.hash_str] = self.load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]

    def run_task(self, token: str) -> None:
        """One task, as ``flwr-clientapp`` runs it (:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`),
        without leaving the process at its end."""
        client = _client(self.address, self.insecure, self.certificates,
                         RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                         RuntimeTokenHttpInterceptor(token), task=True)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            reply = self._app(run, fab)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - a failed task is an error reply, as in flwr-clientapp
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) else \
                ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            reply = Message(Error(code=code, reason=details), reply_to=message) if message is not None else None
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001 - the task's status still goes back
                log(ERROR, "Failed to push the reply message", exc_info=ex)
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            self.tasks += 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedrec.deploy.clientapp_host",
                                description="A long-lived ClientApp process for a SuperNode in --isolation process.")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (its --host:--port)")
    p.add_argument("--insecure", action="store_true", help="reach the Runtime API without TLS (loopback)")
    p.add_argument("--root-certificates", default=None, help="CA of the Runtime API's TLS certificate")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) is gone")
    p.add_argument("--poll", type=float, default=POLL, help=f"seconds between asks for a task (default {POLL})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not 0.001 <= args.poll <= 60:
        print(f"--poll {args.poll} is outside 0.001..60 seconds.", file=sys.stderr)
        return 2
    quick_pulls(max_time=CLIENTAPP_PATIENCE)  # its message's objects arrive from the SuperNode within milliseconds
    import fedrec.clients.app  # noqa: F401, PLC0415 - fedrec's ClientApp and torch, imported before the first task
    host = Host(args.runtime_api_address, args.insecure,
                validate_and_resolve_root_certificates(args.root_certificates, args.insecure))
    signal.signal(signal.SIGTERM, host.stop)
    signal.signal(signal.SIGINT, host.stop)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)  # SIGINT to this process when the SuperNode is gone
    log(INFO, "fedrec ClientApp host: taking tasks from %s", args.runtime_api_address)
    try:
        host.serve(args.poll)
    except _Stop:
        pass
    log(INFO, "fedrec ClientApp host: stopped after %d tasks", host.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
