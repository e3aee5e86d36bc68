"""A real Flower Deployment Engine federation on 127.0.0.1: one SuperLink, one SuperNode per device.

Every part is a real process started from Flower's own executables: ``flower-superlink`` (with
our ServerApp, which it launches per run), ``flower-supernode`` per device (``--node-config
"store='…/device-<i>.sqlite'"``: the ClientApp trains from that device's store), and the ``flwr``
CLI to submit the run. Registering node keys, listing the nodes, a run's status, stopping a run and its ServerApp's log
go to the SuperLink's Control API from this process (:mod:`fedrec.deploy.control`: the requests the ``flwr`` commands
of those names send, without a ``flwr`` process of about 1.7 s of CPU each). Read as a script, it is what a platform
engineer runs by hand (docs/deploy.md).

All processes carry an environment tag; :meth:`LocalFederation.stop` SIGTERMs them (SuperNodes
first, so they sign off), SIGKILLs whatever is left (process groups and orphans found by the
tag) and checks that none survives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..config import dump_toml
from . import control
from .control import DeployError
from .pki import Pki, make_pki, node_key_pair

CONNECTION = "fedrec-local"
STATUS_EVERY = 1.0  #: seconds between asks for the run's status (see _follow_run)


def _bin(name: str) -> str:
    """Flower's executables next to this interpreter (the venv fedrec is installed in)."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _json(out: str) -> dict:
    i = out.find("{")
    if i < 0:
        raise DeployError(f"flwr printed no JSON: {out[-500:]!r}")
    return json.loads(out[i:])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class LocalFederation:
    """One SuperLink and its SuperNodes under ``work`` (logs, keys, the SuperLink database)."""

    work: Path
    tls: bool = True
    tag: str = field(default_factory=lambda: f"fedrec-{uuid.uuid4().hex[:12]}")
    link: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)
    pki: Pki | None = None
    port: int = 0  #: the SuperLink's, on 127.0.0.1: the operator's (flwr CLI) and its app processes'
    fleet_port: int = 0  #: the Fleet front's, where the devices connect (fedrec.deploy.front)
    front: Proc | None = None
    #: each SuperNode with short waits (fedrec.deploy.supernode) in ``--isolation process``, beside a long-lived
    #: ClientApp process that keeps its imports (fedrec.deploy.clientapp_host); False: Flower's stock SuperNode,
    #: which starts a fresh flwr-clientapp per message and polls every 3 s
    warm: bool = True
    hosts: dict[str, Proc] = field(default_factory=dict)  #: warm: each SuperNode's ClientApp process

    def __post_init__(self) -> None:
        self.work = Path(self.work).resolve()
        for d in ("logs", "home"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        (self.work / "keys").mkdir(mode=0o700, exist_ok=True)  # make_pki narrows an older one
        self.port = self.port or free_port()
        self.fleet_port = self.fleet_port or free_port()
        self._procs: list[Proc] = []

    # ---- processes ------------------------------------------------------------------------------
    def env(self, home: str) -> dict[str, str]:
        e = dict(os.environ)
        # the SuperLink and SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp from PATH
        e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
        e["FLWR_HOME"] = str(self.work / "home" / home)
        e["FEDREC_DEPLOY_TAG"] = self.tag
        e["PYTHONUNBUFFERED"] = "1"
        e["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # the apps are installed; never `uv sync`
        e.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # start app processes promptly (the ServerApp's)
        return e

    def _start(self, name: str, argv: list[str], home: str) -> Proc:
        log = self.work / "logs" / f"{name}.log"
        fh = open(log, "ab")
        try:
            p = subprocess.Popen(argv, env=self.env(home), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        finally:
            fh.close()
        proc = Proc(name, p, log)
        self._procs.append(proc)
        return proc

    def make_keys(self, nodes: int) -> Pki:
        self.pki = make_pki(self.work / "keys", nodes if self.tls else 0)
        return self.pki

    def start_superlink(self, timeout: float = 90.0) -> None:
        """Start the SuperLink (on its database: a restart continues it, and stops the runs it orphaned)."""
        db = self.work / "superlink.db"
        restart = db.exists()
        argv = [_bin("flower-superlink"), "--database", str(db), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls:
            assert self.pki is not None, "make_keys() first"
            argv += ["--ssl-ca-certfile", str(self.pki.ca), "--ssl-certfile", str(self.pki.server_cert),
                     "--ssl-keyfile", str(self.pki.server_key), "--enable-supernode-auth"]
        else:
            argv += ["--insecure"]
        self.link = self._start(f"superlink-{len(self._procs)}", argv, "superlink")
        _await_listening(self.link, self.port, "The SuperLink", timeout, ready="Uvicorn running")
        self._write_cli_config()
        if self.front is None or not self.front.alive():
            self.start_front(timeout)
        if restart:
            self.stop_orphaned_runs()

    def stop_orphaned_runs(self) -> list[int]:
        """Stop the runs a restarted SuperLink still lists as starting or running: their ServerApp died with it.

        Until that ServerApp's heartbeat lapses (about 45 s) the SuperLink keeps such a run running, and a SuperNode
        that was taking one of its messages waits for it meanwhile, its ClientApp process with it: the resubmitted
        run waits for that device. A stopped run's messages are refused at once (:mod:`fedrec.deploy.supernode`).
        """
        runs = control.runs(self.cli_home, CONNECTION)
        stale = [int(r["run-id"]) for r in runs if str(r.get("status", "")).split(":")[0] in ("starting", "running")]
        stopped = []
        for run_id in stale:
            try:
                control.stop(self.cli_home, CONNECTION, run_id)
                stopped.append(run_id)
            except DeployError:  # it finished (or was stopped) since it was listed: nothing left to stop
                continue
        return stopped

    def start_front(self, timeout: float = 90.0) -> None:
        """The Fleet front on 127.0.0.1:``fleet_port``: the devices' only door, forwarding the Fleet API alone."""
        argv = [sys.executable, "-m", "fedrec.deploy.front", "--listen", f"127.0.0.1:{self.fleet_port}",
                "--superlink", f"127.0.0.1:{self.port}"]
        if self.tls:
            assert self.pki is not None
            argv += ["--ssl-certfile", str(self.pki.server_cert), "--ssl-keyfile", str(self.pki.server_key),
                     "--ssl-ca-certfile", str(self.pki.ca)]
        else:
            argv += ["--insecure"]
        self.front = self._start("front", argv, "front")
        _await_listening(self.front, self.fleet_port, "The Fleet front", timeout)

    @property
    def cli_home(self) -> Path:
        """The ``FLWR_HOME`` of the ``flwr`` CLI (and of :mod:`fedrec.deploy.control`): the connection file is there."""
        return self.work / "home" / "cli"

    def _write_cli_config(self) -> None:
        cfg = self.cli_home / "config.toml"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        conn = f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
        conn += f'root-certificates = "{self.pki.ca}"\n' if self.tls and self.pki else "insecure = true\n"
        cfg.write_text(conn)

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run the ``flwr`` CLI against this SuperLink; its stdout."""
        r = subprocess.run([_bin("flwr"), *args], env=self.env("cli"), capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise DeployError(f"`flwr {' '.join(args[:2])}` failed (exit {r.returncode}): "
                              f"{(r.stdout + r.stderr).strip()[-800:]}")
        return r.stdout

    def register(self, public_key: Path, name: str) -> int:
        """Register a SuperNode's public key (node authentication): only registered nodes may join."""
        return control.register(self.cli_home, CONNECTION, public_key, name)

    def start_supernode(self, name: str, node_config: str, private_key: Path | None = None) -> Proc:
        """A SuperNode (warm: with its ClientApp process, :meth:`start_host`)."""
        runtime = free_port()  # its Runtime API, where its ClientApp processes take their tasks
        node = [sys.executable, "-m", "fedrec.deploy.supernode", "--isolation", "process"] if self.warm else \
            [_bin("flower-supernode")]
        argv = [*node, "--superlink", f"127.0.0.1:{self.fleet_port}", "--node-config", node_config,
                "--host", "127.0.0.1", "--port", str(runtime)]
        if self.tls:
            assert self.pki is not None
            argv += ["--root-certificates", str(self.pki.ca)]
            if private_key is not None:
                argv += ["--auth-supernode-private-key", str(private_key)]
        else:
            argv += ["--insecure"]
        proc = self._start(name, argv, name)
        self.nodes[name] = proc
        if self.warm:
            self.start_host(name, proc, runtime)
        return proc

    def start_host(self, name: str, node: Proc, runtime: int) -> Proc:
        """The long-lived ClientApp process of SuperNode ``name``, on its Runtime API (loopback); it exits with
        the node."""
        argv = [sys.executable, "-m", "fedrec.deploy.clientapp_host", "--runtime-api-address", f"127.0.0.1:{runtime}",
                "--insecure", "--parent-pid", str(node.popen.pid)]
        self.hosts[name] = self._start(f"{name}-clientapp", argv, name)
        return self.hosts[name]

    def start_devices(self, stores: list[Path]) -> None:
        """One SuperNode per device store; with TLS each gets its own registered key."""
        for i, store in enumerate(stores):
            key = None
            if self.tls:
                assert self.pki is not None
                key, pub = self.pki.node_keys[i] if i < len(self.pki.node_keys) else \
                    node_key_pair(self.work / "keys", f"node-{i}")
                self.register(pub, f"device-{i}")
            self.start_supernode(f"device-{i}", f"device-id={i} store='{Path(store).resolve()}'", key)

    def wait_online(self, n: int, timeout: float = 120.0) -> None:
        """Until ``n`` SuperNodes are online (with TLS: as the SuperLink's node list says)."""
        t0 = time.time()
        while True:
            dead = [p for p in [*self.nodes.values(), *self.hosts.values()] if not p.alive()]
            if dead:
                raise DeployError(f"The process {dead[0].name} exited (log {dead[0].log}): "
                                  f"{_last_error(dead[0].text())}")
            if self.tls:
                nodes = control.nodes(self.cli_home, CONNECTION)
                if sum(x["status"] == "online" for x in nodes) >= n:
                    return
            elif all("Connection successful" in p.text() or "Starting Flower SuperNode" in p.text()
                     for p in self.nodes.values()) and time.time() - t0 > 3:
                return
            if time.time() - t0 > timeout:
                raise DeployError(f"Only some of the {n} SuperNodes came online within {timeout:.0f} s "
                                  f"(logs in {self.work / 'logs'}).")
            time.sleep(0.5)

    # ---- runs ---------------------------------------------------------------------------------
    def submit(self, app_dir: Path) -> int:
        out = _json(self.flwr("run", str(app_dir), CONNECTION, "--format", "json"))
        if not out.get("success"):
            raise DeployError(f"Submitting the run failed: {out}")
        return int(out["run-id"])

    def status(self, run_id: int) -> dict:
        runs = control.runs(self.cli_home, CONNECTION, run_id)
        if not runs:
            raise DeployError(f"The SuperLink does not know run {run_id}.")
        return runs[0]

    def serverapp_log(self, run_id: int) -> str:
        try:
            txt = control.logs(self.cli_home, CONNECTION, run_id)
        except DeployError as e:
            txt = f"(no ServerApp log: {e})"
        (self.work / "logs" / f"serverapp-{run_id}.log").write_text(txt)
        return txt

    # ---- stopping -----------------------------------------------------------------------------
    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink's process group (a crash, for tests); its ServerApp dies with it."""
        if self.link is not None and self.link.alive():
            os.killpg(self.link.popen.pid, signal.SIGKILL)
            self.link.popen.wait(10)
        for pid, cmd in self.tagged().items():  # the ServerApp and SuperExec run in sessions of their own
            if "flwr-serverapp" in cmd or ("superexec" in cmd and f"127.0.0.1:{self.port}" in cmd):
                _kill(pid)

    def kill_supernode(self, name: str) -> None:
        """SIGKILL SuperNode ``name`` and its ClientApp process (a crash, for tests and tools/soak.py)."""
        for proc in (self.nodes.get(name), self.hosts.get(name)):
            if proc is not None and proc.alive():
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)

    def tagged(self) -> dict[int, str]:
        """Live processes (not zombies) carrying this federation's tag: pid -> command line."""
        found = {}
        needle = f"FEDREC_DEPLOY_TAG={self.tag}".encode()
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if needle not in (p / "environ").read_bytes().split(b"\0"):
                    continue
                stat = (p / "stat").read_text()
                if stat[stat.rfind(")") + 2] == "Z":
                    continue
                found[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
        return found

    def stop(self, grace: float = 10.0) -> list[str]:
        """Stop every process this federation started; what could not be stopped (empty = all gone).

        The SuperNodes get SIGTERM first and a moment to sign off through the front and the SuperLink,
        which are stopped after them."""
        last = [p for p in self._procs if p.name == "front" or p.name.startswith("superlink")]
        first = [p for p in self._procs if p not in last]
        t0 = time.time()
        for group in (first, last):
            for p in group:  # one SIGTERM to the main process: Flower's exit handlers sign the node off
                if p.alive():
                    try:
                        p.popen.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            while any(p.alive() for p in group) and time.time() - t0 < grace:
                time.sleep(0.1)
        order = first + last
        for p in order:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(20):  # orphans in sessions of their own (SuperExec, app processes)
            left = self.tagged()
            if not left:
                return []
            for pid in left:
                _kill(pid)
            time.sleep(0.25)
        return [f"{pid} {cmd[:120]}" for pid, cmd in self.tagged().items()]


def _await_listening(proc: Proc, port: int, what: str, timeout: float, ready: str = "") -> None:
    """Until ``proc`` listens on 127.0.0.1:``port`` (and its log says ``ready``); DeployError if it exits or
    ``timeout`` passes first."""
    t0 = time.time()
    while not (_port_open(port) and ready in proc.text()):
        if not proc.alive():
            raise DeployError(f"{what} exited at start (log {proc.log}):\n{proc.text()[-1500:]}")
        if time.time() - t0 > timeout:
            raise DeployError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s (log {proc.log}).")
        time.sleep(0.1)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_error(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    keep = [x for x in lines if "Failed" in x or "rror" in x or "Exit Code" in x]
    return " ".join((keep or lines)[-3:])[:600]


def write_app(dir_: Path, config: dict) -> Path:
    """The app bundle ``flwr run`` ships: our installed Server/ClientApp and this run's config.

    It holds no code: the SuperLink's ServerApp and every device's ClientApp import the installed
    ``fedrec`` package (as a device ships the SDK), so the bundle is a few hundred bytes.
    """
    dir_.mkdir(parents=True, exist_ok=True)
    lines = ['[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
             '[project]', 'name = "fedrec-deployment"', 'version = "1.0.0"',
             'description = "fedrec: federated DP recommender (ServerApp and ClientApp from the installed package)"',
             'license = "Apache-2.0"', 'dependencies = ["fedrec"]', '',
             '[tool.flwr.app]', 'publisher = "fedrec"', '',
             '[tool.flwr.app.components]', 'serverapp = "fedrec.server.app:app"', 'clientapp = "fedrec.clients.app:app"',
             '', '[tool.flwr.app.config]']
    (dir_ / "pyproject.toml").write_text("\n".join(lines) + "\n" + dump_toml(config))
    return dir_


def run_local(cfg, devices: int, *, tls: bool, on_round=None, on_status=None, timeout: float = 3600.0,
              warm: bool = True) -> dict:
    """``fedrec deploy local``: fill the stores, start the federation, run ``cfg.rounds`` rounds, stop.

    Writes into ``cfg.out`` what ``fedrec simulate`` writes, plus ``devices/`` (one SQLite store
    per device) and ``deploy/`` (keys, logs, the SuperLink database, the app bundle). Every
    process started is stopped before this returns, also on error or Ctrl-C.
    """
    from .stores import fill_stores

    out = Path(cfg.out).resolve()
    say = on_status or (lambda msg: None)
    stores = fill_stores(cfg, devices, out / "devices")
    say(f"{devices} device stores in {out / 'devices'}")
    work = out / "deploy"
    if (work / "superlink.db").exists():  # a new federation each invocation; stores and checkpoint carry on
        for f in work.glob("superlink.db*"):
            f.unlink()
    fed = LocalFederation(work, tls=tls, warm=warm)
    # absolute paths: the ServerApp runs in a process of the SuperLink's, from another folder
    app = write_app(work / "app", {**cfg.to_flat(), "out": str(out),
                                   "data": str(Path(cfg.data).resolve()) if cfg.data else ""})
    try:
        if tls:
            fed.make_keys(devices)
        fed.start_superlink()
        say(f"SuperLink on 127.0.0.1:{fed.port} ({'TLS, SuperNode authentication' if tls else 'insecure'}); "
            f"devices reach only its Fleet API, through the front on 127.0.0.1:{fed.fleet_port}")
        fed.start_devices(stores)
        fed.wait_online(devices)
        say(f"{devices} SuperNodes online; submitting the run")
        t_submit = time.time()
        run_id = fed.submit(app)
        _follow_run(fed, run_id, out, work, t_submit, timeout, on_round)
        fed.serverapp_log(run_id)
    finally:
        left = fed.stop()
        if left:
            raise DeployError(f"Could not stop {len(left)} process(es): {left[:3]}")
    return json.loads((out / "summary.json").read_text())


def _follow_run(fed: LocalFederation, run_id: int, out: Path, work: Path, t_submit: float, timeout: float,
                on_round=None) -> None:
    """Hand each new metrics row to ``on_round`` until the run finishes.

    Raises :class:`DeployError` when the run ends other than completed, when the SuperLink exits,
    or when ``timeout`` seconds pass.
    """
    summary_file = out / "summary.json"
    rows_seen = 0
    last_check = time.time()
    while True:
        rows = _rows(out / "metrics.jsonl", t_submit)
        for row in rows[rows_seen:]:
            if on_round:
                on_round(row)
        rows_seen = max(rows_seen, len(rows))
        wrote = summary_file.exists() and summary_file.stat().st_mtime >= t_submit  # its outputs are all written
        if wrote or time.time() - last_check > STATUS_EVERY:  # one Control API request (fedrec.deploy.control)
            last_check = time.time()
            st = fed.status(run_id)
            if st["status"].startswith("finished"):
                if st["status"] != "finished:completed" and not wrote:
                    log = fed.serverapp_log(run_id)
                    raise DeployError(f"The run ended {st['status']}: {st.get('status-details') or ''} "
                                      f"{_last_error(log)} (ServerApp log: {work / 'logs'}/serverapp-{run_id}.log)")
                return
        if not fed.link or not fed.link.alive():
            raise DeployError(f"The SuperLink exited mid-run (log {fed.link.log if fed.link else work})")
        if time.time() - t_submit > timeout:
            raise DeployError(f"The run did not finish within {timeout:.0f} s (logs in {work / 'logs'}).")
        time.sleep(0.3)


def _rows(path: Path, since: float) -> list[dict]:
    """The metrics lines written by this run (the file may be mid-write: whole lines only)."""
    try:
        if path.stat().st_mtime < since - 1:
            return []
        text = path.read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows
