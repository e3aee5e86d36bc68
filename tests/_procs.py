"""A ``fedrec`` command started as a user starts it: a subprocess of its own process group (so that stopping it stops
whatever it started, its Ray too), its output in files. The end-to-end tests start, wait for and stop their runs
through this one class."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class Fedrec:
    """``python -m fedrec.cli ARGS`` in ``cwd``, stdout to ``log`` (stderr too, unless ``stderr`` names a file)."""

    def __init__(self, log: Path, *args: str, cwd: Path | None = None, stderr: Path | None = None) -> None:
        self.log, self.err = log, stderr
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out, open(stderr if stderr is not None else os.devnull, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "fedrec.cli", *args], cwd=cwd, env=env, stdout=out,
                                         stderr=err if stderr is not None else subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self, timeout: float, grace: float = 0.0) -> int:
        """Its exit status; when it runs past ``timeout`` s, stopped (:meth:`stop` with ``grace``) and AssertionError
        with the end of its output."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(grace)
            err = self.err.read_text()[-2000:] if self.err is not None else ""
            raise AssertionError(f"`fedrec {' '.join(self.proc.args[3:5])}` ran past {timeout:.0f} s:\n"
                                 f"{self.text()[-3000:]}{err}") from None

    def stop(self, grace: float = 0.0) -> None:
        """Stop its process group: SIGTERM, then SIGKILL after ``grace`` seconds (0: SIGKILL at once)."""
        if self.proc.poll() is not None:
            return
        if grace > 0:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this test started, nothing else
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(60)

    def text(self) -> str:
        """Its stdout so far (with its stderr, unless that went to a file of its own)."""
        return self.log.read_text()
