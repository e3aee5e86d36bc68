"""The baselines of a run, measured round by round: after the rounds, or alongside them in a process of their own.

Every baseline (:mod:`fedrec.eval.baselines`) yields a round's counts as the schedule gives it the round's scored
devices, so :func:`measure` drives them all together, one round at a time. :class:`Alongside` runs that in a child
process fed each round's scored devices as the run ends the round: a simulation's rounds keep one core busy, and
the baselines (whose own cost grows with the whole population's events, a million devices' in minutes) take the
next one instead of adding their minutes after the last round. Both give the same numbers: each baseline seeds its
own generators and runs on one thread either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

#: a baseline to measure: its name, its function in :mod:`fedrec.eval.baselines`, that function's keywords
Run = tuple[str, str, dict]
ALONGSIDE_EVENTS = 1_000_000  #: ``baselines = "auto"``: alongside from streams of this many events
WAIT_S = 1.0  #: how often the run, waiting for the child's results, checks that the child still lives


def wanted(timing: str, n_events: int) -> bool:
    """Whether a run measures its baselines alongside its rounds (``timing``: the ``baselines`` key): ``auto``
    where it pays: a second core to run them on, and a stream large enough that they take minutes (a child
    process costs a few seconds to start)."""
    if timing != "auto":
        return timing == "alongside"
    return len(os.sched_getaffinity(0)) > 1 and n_events >= ALONGSIDE_EVENTS


def measure(stream: Any, schedule: Iterable[Sequence[int]], k: int, runs: Sequence[Run]) -> dict[str, list | str]:
    """Every baseline of ``runs`` over ``schedule``, one round at a time (each one's round ``r`` before any one's
    round ``r + 1``): per name, its per-round counts, or why it failed (``"TypeError: ..."``; the others go on).
    Torch runs on one thread meanwhile: small torch work on threads contending for shared cores costs 10x here."""
    import torch

    from . import baselines

    rows: list[Sequence[int]] = []
    out: dict[str, list | str] = {name: [] for name, _, _ in runs}
    live: dict[str, Iterator] = {}
    for name, fn, kw in runs:
        try:
            live[name] = getattr(baselines, fn)(stream, _follow(rows), k, **kw)
        except Exception as e:  # a baseline that cannot be measured is said, never fatal
            out[name] = _why(e)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for row in schedule:
            rows.append(row)
            for name, gen in list(live.items()):
                try:
                    out[name].append(next(gen))  # type: ignore[union-attr]
                except Exception as e:
                    out[name] = _why(e)
                    live.pop(name)
    finally:
        torch.set_num_threads(threads)
    return out


def _why(e: Exception) -> str:
    if isinstance(e, StopIteration):
        return "RuntimeError: it ended before the run's rounds did"
    return f"{type(e).__name__}: {e}"


def _follow(rows: list[Sequence[int]]) -> Iterator[Sequence[int]]:
    """The rows of a schedule that grows as :func:`measure` reads it (a baseline asks for a round's row only after
    :func:`measure` appended it)."""
    i = 0
    while i < len(rows):
        yield rows[i]
        i += 1


class Alongside:
    """:func:`measure` in a child process (spawned: nothing of the run's threads, Ray's or gRPC's, is copied),
    fed each round's scored devices as the run ends the round; :meth:`results` waits for its counts. Feeding never
    blocks a round: a thread of the run's sends. A child that dies gives ``None``: the run measures them itself.
    The child is stopped when the run ends (:meth:`close`, at exit too), and ends on its own when the run's process
    is gone (killed): it holds only the reading end of the pipe its rows come through, so it reads the end of it."""

    def __init__(self, stream: Any, runs: Sequence[Run], k: int) -> None:
        import atexit
        import multiprocessing
        import queue
        import threading

        ctx = multiprocessing.get_context("spawn")
        rows, self._rows = ctx.Pipe(duplex=False)
        self._conn, results = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(rows, results, list(runs), k), daemon=True,
                                 name="fedrec-baselines")
        self._proc.start()
        rows.close()
        results.close()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._pump = threading.Thread(target=self._send, daemon=True, name="fedrec-baselines-feed")
        self._pump.start()
        self._out.put(("stream", stream))
        self._closed = False
        atexit.register(self.close)

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._proc.pid

    def feed(self, row: Sequence[int]) -> None:
        """The scored devices of the round the run just ended."""
        import numpy as np

        self._out.put(("row", np.asarray(row, np.int64)))

    def results(self) -> dict[str, list | str] | None:
        """Every baseline's per-round counts (as :func:`measure`), once the child has the last round; ``None``
        where the child died without them."""
        self._out.put(("end", None))
        try:
            while not self._conn.poll(WAIT_S):
                if not self._proc.is_alive() and not self._conn.poll(0):
                    return None
            return self._conn.recv()
        except (EOFError, OSError):
            return None
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child (if it still runs) and the thread that feeds it; a second call does nothing."""
        import atexit

        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout=10)
        self._out.put(None)
        self._pump.join(timeout=10)
        self._rows.close()
        self._conn.close()

    def _send(self) -> None:
        """The feeding thread: each message in order, until ``None`` or a child that reads no more."""
        try:
            while (msg := self._out.get()) is not None:
                self._rows.send(msg)
        except Exception:  # the child is gone, or a message could not be sent: it reads the end and stops, and
            self._rows.close()  # results() says so


def _child(rows: Any, conn: Any, runs: list[Run], k: int) -> None:
    """The child's whole life: the stream first, then a round's scored devices at a time until the end. The end of
    the pipe (the run's process gone) ends it, mid-message too."""
    try:
        tag, stream = rows.recv()
        if tag != "stream":  # the stream never came: no results, the run measures them after its rounds
            return
        conn.send(measure(stream, _rows_until_end(rows), k, runs))
    except (EOFError, OSError):
        return
    finally:
        conn.close()


def _rows_until_end(rows: Any) -> Iterator[Sequence[int]]:
    """The rows the run sends, until its end."""
    while (msg := rows.recv())[0] == "row":
        yield msg[1]
