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


def main() -> None:
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415 - patched before the SuperNode starts
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    from .quick import quick_pulls  # noqa: PLC0415

    loop.time = _Clock(poll())
    quick_pulls()
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
