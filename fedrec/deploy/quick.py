"""Shorter retry waits for Flower's object transfers, in the processes of a fedrec deployment.

Flower 1.42 sends a message as a tree of objects: the message is announced first and its objects are pushed
after it, so whoever pulls a message (a SuperNode from the SuperLink, a ClientApp from its SuperNode, the
ServerApp its replies) often asks for an object that is not there yet. It then waits 1 s, doubling to 10 s
(``PULL_INITIAL_BACKOFF``/``PULL_BACKOFF_CAP`` in ``flwr.supercore.constant``, bound as the keyword defaults of
``flwr.supercore.inflatable.inflatable_utils.pull_objects`` and ``pull_and_inflate_object_from_tree``). On a
loopback round of small messages the objects arrive within milliseconds, so each hop waited about 1 s for
nothing. :func:`quick_pulls` sets those two defaults to :data:`INITIAL` and :data:`CAP` in the process that calls
it: the fedrec SuperNode (:mod:`fedrec.deploy.supernode`), its ClientApp process
(:mod:`fedrec.deploy.clientapp_host`) and the deployed ServerApp (:mod:`fedrec.server.app`). Nothing else about
the transfer changes (the same tries, the same total time limit), except in the ClientApp process, which gives up
on a message after :data:`CLIENTAPP_PATIENCE` seconds (below).
"""

from __future__ import annotations

INITIAL = 0.02  #: seconds before the first retry of an object that is not there yet (Flower: 1 s) ...
CAP = 0.5  #: ... doubling up to this (Flower: 10 s)
#: seconds a ClientApp process waits for its task's message to be at its SuperNode (Flower: 500 tries or 7200 s).
#: With the quick waits, 500 tries took 250 s, and a message that never comes held the device that long: a
#: SuperLink that restarts mid-round loses its in-flight messages, the SuperNode is refused them (in 45 s on
#: loopback), and the device's ClientApp host, which runs one task at a time, took the resumed run's first
#: message only after that. A message's objects reach the SuperNode at the pace of its link: a minute is enough
#: for tens of megabytes on a slow one.
CLIENTAPP_PATIENCE = 60.0


def quick_pulls(initial: float = INITIAL, cap: float = CAP, max_time: float | None = None) -> None:
    """Set the retry waits of Flower's object pulls in this process (and, with ``max_time``, how long in all a
    pull may wait for objects that are not there)."""
    from flwr.supercore.inflatable import inflatable_utils as pulls  # noqa: PLC0415 - only where deployed

    for fn in (pulls.pull_objects, pulls.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if defaults is None or "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"{fn.__module__}.{fn.__name__} has no initial_backoff/backoff_cap keyword defaults "
                               "(another Flower version than 1.42?)")
        defaults.update(initial_backoff=initial, backoff_cap=cap)
        if max_time is not None:
            if "max_time" not in defaults:
                raise RuntimeError(f"{fn.__module__}.{fn.__name__} has no max_time keyword default")
            defaults.update(max_time=max_time)
