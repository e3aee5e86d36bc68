"""``flower-supernode`` with shorter waits: ``python -m fedrec.deploy.supernode [flower-supernode's arguments]``.

Flower 1.42's SuperNode, with nothing to do, waits a fixed 3 s before it asks the SuperLink again for a
message, and 0.5 s between looks for its ClientApp's reply (``flwr.supernode.start_client_internal``). Each
message of a round, and each of SecAgg+'s four stages, pays the first wait: on loopback it is most of a round.
This entry point is Flower's own ``flower-supernode`` (same arguments, same code, same protocol), with every
such wait capped at ``FEDREC_NODE_POLL`` seconds (default :data:`POLL`), and the retries of its object pulls
started at 0.02 s instead of 1 s (:mod:`fedrec.deploy.quick`). The price is one small request to the
SuperLink per node and ``POLL`` s while idle: right for a loopback federation and a few hundred nodes, where
a round should take seconds; a fleet of many thousands of devices keeps Flower's 3 s (plain ``flower-supernode``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

POLL = 0.1  #: the longest wait, in seconds, between a SuperNode's asks for a message (Flower: 3 s)
ENV = "FEDREC_NODE_POLL"


class _Clock(ModuleType):
    """``time``, with ``sleep`` capped."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def poll() -> float:
    """``FEDREC_NODE_POLL``, or :data:`POLL`; a value outside 0.01..3 s ends in one sentence."""
    raw = os.environ.get(ENV, str(POLL))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 3.0:
        print(f"{ENV}={raw!r} should be a number of seconds from 0.01 to 3.", file=sys.stderr)
        sys.exit(2)
    return value


def _dropping_stopped_runs(pull_objects: Callable[..., dict[str, bytes]]) -> Callable[..., dict[str, bytes]]:
    """Flower's ``pull_objects`` for the SuperNode's message pulls, with a run that stopped meanwhile a failure.

    Flower 1.42 creates the ClientApp's task, and registers the message's objects as not there yet, before it
    pulls them from the SuperLink. When the SuperLink answers that the run is no longer running (stopped, or
    orphaned by a restart: :meth:`fedrec.deploy.local.LocalFederation.stop_orphaned_runs`),
    ``RunNotRunningException`` (a ``BaseException``) passes the cleanup of a failed pull, and the task and its
    empty objects stay: the ClientApp process waits for them for :data:`fedrec.deploy.quick.CLIENTAPP_PATIENCE`
    (60 s) and takes no other task meanwhile. As an ordinary error it takes Flower's path for a failed pull: the
    message and its objects are deleted and the task finished as failed, so the ClientApp's next pull is refused
    (401) and it drops the task at once (:mod:`fedrec.deploy.clientapp_host`).
    """
    from flwr.supercore.run import RunNotRunningException  # noqa: PLC0415 - only where deployed

    def pull(*args: Any, **kwargs: Any) -> dict[str, bytes]:
        try:
            return pull_objects(*args, **kwargs)
        except RunNotRunningException as e:
            raise RuntimeError("the run is no longer running") from e

    return pull


def main() -> None:
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415 - patched before the SuperNode starts
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    from .quick import quick_pulls  # noqa: PLC0415

    loop.time = _Clock(poll())
    loop.pull_objects = _dropping_stopped_runs(loop.pull_objects)
    quick_pulls()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
