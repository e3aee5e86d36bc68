"""``fedrec`` command line: simulate, deploy local, sweep, report."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, KeySpec, RunConfig, load_pyproject_defaults, toml_value
from .data.events import DataError

#: metavars of the flags by the key's type
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _flag_help(default: Any, spec: KeySpec) -> str:
    """A key's help, then its default and its choices or bounds: ``rounds of ... (default 30; at least 1)``."""
    rule = f"one of {', '.join(spec.choices)}" if spec.choices else spec.rule().removeprefix("must ")
    rule = rule.removeprefix("be ").removeprefix("lie ")
    text = f"{spec.help} (default {toml_value(default)}{'; ' + rule if rule else ''})"
    return text.replace("%", "%%")  # argparse formats help with %


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """``--config`` and one ``--kebab-key`` flag per RunConfig key (bools as ``--key/--no-key``).

    Every flag defaults to None, so a flag the user did not give leaves the TOML's value or the
    pyproject default alone (:func:`build_config`). Values are not checked against the choices
    here: RunConfig does that, with the sentence it gives everywhere else.
    """
    p.add_argument("--config", metavar="FILE", help="a TOML file of run config keys (kebab-case)")
    g = p.add_argument_group("run config keys", "each flag overrides --config, which overrides the defaults of "
                             "pyproject.toml [tool.flwr.app.config]")
    for key, (typ, default, spec) in RunConfig.specs().items():
        if typ is bool:
            g.add_argument(f"--{key}", action=argparse.BooleanOptionalAction, default=None,
                           help=_flag_help(default, spec))
        else:
            g.add_argument(f"--{key}", type=typ, default=None, metavar="NAME" if spec.choices else _METAVARS[typ],
                           help=_flag_help(default, spec))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrec", description="Federated, differentially private online recommenders.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="run a simulated federation (Flower Simulation Engine)")
    _add_config_flags(s)
    d = sub.add_parser("deploy", help="run a real Flower Deployment Engine federation")
    dsub = d.add_subparsers(dest="where", required=True)
    loc = dsub.add_parser("local", help="SuperLink + one SuperNode per device as processes on 127.0.0.1")
    loc.add_argument("--devices", type=int, default=4, metavar="N", help="devices, one SuperNode and one store each (default 4)")
    loc.add_argument("--tls", action="store_true", help="TLS with a throw-away CA, and SuperNode authentication")
    loc.add_argument("--stock-nodes", action="store_true",
                     help="Flower's stock SuperNodes: a fresh flwr-clientapp process per message and 3 s polls (slower; "
                          "default: each SuperNode keeps one ClientApp process and polls every 0.1 s)")
    _add_config_flags(loc)
    w = sub.add_parser("sweep", help="run every cell x seed of a sweep file (resumable), then the report")
    w.add_argument("file", help="a sweep TOML file, e.g. scenarios/freshness_vs_privacy.toml")
    w.add_argument("--out", help="output folder (default runs/<file name>)")
    w.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    w.add_argument("--cells", help="run only the cells whose names match this pattern (shell-style: '1m-*'); "
                                   "the report covers every cell with results")
    w.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="rebuild a sweep's tables, plots and report.md from its results.csv")
    r.add_argument("dir", help="a sweep output folder (holding results.csv)")
    return p


def build_config(args: argparse.Namespace) -> RunConfig:
    """pyproject defaults < --config TOML < flags."""
    cfg = RunConfig.from_mapping(load_pyproject_defaults(), where="pyproject.toml [tool.flwr.app.config]")
    if args.config:
        cfg = RunConfig.from_toml(args.config, base=cfg)
    flags = {key: getattr(args, key.replace("-", "_")) for key in RunConfig.keys()}
    return RunConfig.from_mapping({k: v for k, v in flags.items() if v is not None}, where="command line", base=cfg)


def simulate(cfg: RunConfig) -> dict:
    """Run one simulated federation with Flower's Simulation Engine; returns the summary."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .data.source import load_stream

    console = Console(stderr=False)
    stream = load_stream(cfg)  # fail fast on bad data, before any process starts
    check_run(cfg, stream.n_devices, stream.log.n_items, stream.log)
    cohort = cfg.cohort_for(stream.n_devices)
    if cfg.data and cohort > stream.n_devices:
        console.print(f"[yellow]cohort {cohort} > {stream.n_devices} devices: every device joins each round")
    console.print(f"fedrec simulate: {len(stream.log)} events, {stream.n_devices} devices, {stream.log.n_items} items, "
                  f"{cfg.rounds} rounds, cohort {min(cohort, stream.n_devices)}{' (auto)' if not cfg.cohort else ''}, "
                  f"privacy {cfg.privacy}, model {cfg.model}, "
                  f"{cfg.nodes} Flower nodes -> {cfg.out}")
    k = cfg.k
    progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, disable=not cfg.progress)

    def on_round(row: dict) -> None:
        hr = row[f"hr@{k}"]
        eps = row.get("epsilon") or 0.0
        line = (f"round {row['round']:>3}  HR@{k} {hr if hr is not None else float('nan'):.3f}  "
                f"eps {eps:.2f}  devices {row['devices']}  failed {row['failed']}  {row['wall_s']:.1f}s"
                + (f"  skipped: {row['skipped']}" if row.get("skipped") else ""))
        progress.update(task, advance=1, description=line)
        progress.console.print(line) if cfg.progress else print(line, flush=True)

    _quiet()
    with progress:
        task = progress.add_task("", total=cfg.rounds)
        _run_engine(cfg, on_round)
    summ = Path(cfg.out) / "summary.json"
    if not summ.is_file():
        raise RuntimeError(f"The simulation ended without writing {summ}; see the log above.")
    import json

    summary = json.loads(summ.read_text())
    _print_summary(console, summary, k)
    return summary


def check_run(cfg: RunConfig, n_devices: int, n_items: int, log: Any = None) -> None:
    """What only the loaded data and this machine can tell, checked before anything is written.

    The keys bounded by a data file's catalogue, the item-features file (with the events ``log``), the torch
    device, and the privacy accounting of the noise the run will use: each failure is a :class:`ConfigError`
    or :class:`~fedrec.data.events.DataError` of one sentence.
    """
    if log is not None:
        from .data.source import load_features

        load_features(cfg, log)
        if cfg.rounds > len(log.item):
            raise ConfigError(f"Config key 'rounds' = {cfg.rounds} is more than the {len(log.item)} events of "
                              f"{cfg.data or 'the synthetic world'}: most rounds would be empty; use at most that many.")
    if cfg.data:
        cfg.check_catalogue(n_items, cfg.data)  # its sentences name the data file
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"Config key 'device' asks for {cfg.device!r} but CUDA is not available on this "
                              "machine; use auto or cpu.")
    if cfg.method == "federated" and cfg.privacy != "none":
        _check_accounting(cfg, n_devices)


def _check_accounting(cfg: RunConfig, n_devices: int) -> None:
    """Calibrate the noise and account one run's worth of it, as the run will; a numeric failure is one sentence."""
    from .federation.run import event_noise, user_noise
    from .privacy.accounting import epsilon, event_accountant

    q = min(1.0, cfg.cohort_for(n_devices) / max(n_devices, 1))
    try:
        z_event, z_user = event_noise(cfg), user_noise(cfg, q)
        if z_event > 0:
            steps = cfg.steps * (cfg.replay_rounds + 1)
            epsilon([(z_event, cfg.sample_rate, steps)], cfg.delta, event_accountant(cfg.model, cfg.accountant))
        if z_user > 0:
            epsilon([(z_user, q, cfg.rounds)], cfg.delta, cfg.accountant)
    except (ValueError, ArithmeticError) as e:
        why = str(e).strip().rstrip(".").replace(". I", "; i")
        if isinstance(e, ArithmeticError) or not why:  # the accountant's own arithmetic: not the user's words
            why = "the accountant's arithmetic overflows: the noise multiplier is too small or too large"
        why = why[:1].lower() + why[1:]
        given = f"epsilon = {cfg.epsilon:g}" if cfg.epsilon > 0 and cfg.calibrate else \
            f"noise-multiplier = {cfg.noise_multiplier:g}"
        raise ConfigError(f"The privacy accounting fails for {given}, delta = {cfg.delta:g} and accountant = "
                          f"{cfg.accountant} ({why}).") from None


def _run_engine(cfg: RunConfig, on_round) -> None:
    """The run itself: the centralised ceiling, the in-process engine, or Flower's Simulation Engine (Ray):
    a local Ray on 127.0.0.1, or the existing cluster ``ray-address`` (or ``RAY_ADDRESS``) names."""
    if cfg.method == "centralised":
        from .centralised import run_centralised

        run_centralised(cfg, on_round=on_round)
        return
    from .clients.app import app as client_app

    if cfg.engine == "local":
        from .server.app import run_federation
        from .server.local_grid import LocalGrid

        run_federation(LocalGrid(client_app, cfg.nodes, cfg.to_flat()), cfg, on_round=on_round)
        return
    from .ray_cluster import backend_config, check_reachable, cluster_address, node_gpus, pin_node_ip

    address = cluster_address(cfg.ray_address)
    try:
        check_reachable(address)
    except ConnectionError as e:
        raise ConfigError(str(e)) from None
    pin_node_ip(address)  # before Flower's ray.init: a local Ray listens on 127.0.0.1 only
    from flwr.simulation import run_simulation

    from .server.app import make_server_app

    errors: list[BaseException] = []
    run_simulation(server_app=make_server_app(cfg, on_round=on_round, errors=errors), client_app=client_app,
                   num_supernodes=cfg.nodes, backend_config=backend_config(cfg.nodes, address, node_gpus(cfg.device)))
    if errors:  # the ServerApp ran in Flower's thread: its error is ours to report
        raise errors[0]


def deploy_local(cfg: RunConfig, devices: int, tls: bool, world_users_given: bool, *, warm: bool = True) -> dict:
    """``fedrec deploy local``: real SuperLink and SuperNode processes on loopback (fedrec.deploy.local)."""
    import dataclasses
    import signal
    from contextlib import nullcontext

    from rich.console import Console

    from .deploy.local import run_local

    if devices < 1:
        raise ConfigError(f"--devices must be at least 1 (got {devices}).")
    if not cfg.data and not world_users_given:
        cfg = dataclasses.replace(cfg, world_users=devices)  # the synthetic world: one user per device
    # one SuperNode per device; uptake probes need the future of the stream, which devices never have
    cfg = dataclasses.replace(cfg, nodes=devices, uptake_probe=False)
    from .data.source import load_stream

    stream = load_stream(cfg)  # fail fast (bad data, a budget no noise reaches) before any process starts
    check_run(cfg, stream.n_devices, stream.log.n_items, stream.log)
    console = Console()
    console.print(f"fedrec deploy local: {devices} devices, {cfg.rounds} rounds, privacy {cfg.privacy}, "
                  f"{'TLS + node authentication' if tls else 'no TLS'} -> {cfg.out}")
    k = cfg.k

    def on_round(row: dict) -> None:
        hr = row.get(f"hr@{k}")
        console.print(f"round {row['round']:>3}  HR@{k} {hr if hr is not None else float('nan'):.3f}  "
                      f"eps {row.get('epsilon') or 0.0:.2f}  devices {row['devices']}  failed {row['failed']}  "
                      f"{row['wall_s']:.1f}s")

    def on_term(signum, frame):  # `kill` of this command: stop the federation like Ctrl-C does
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with console.status("starting the federation…", spinner="dots") if cfg.progress else nullcontext() as st:
            def status(msg: str) -> None:
                console.print(msg)
                if st is not None:
                    st.update(msg)
            summary = run_local(cfg, devices, tls=tls, on_round=on_round, on_status=status, warm=warm)
    finally:
        signal.signal(signal.SIGTERM, old)
    _print_summary(console, summary, k)
    console.print(f"device stores: {Path(cfg.out) / 'devices'}; logs: {Path(cfg.out) / 'deploy' / 'logs'}")
    return summary


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _print_summary(console, s: dict, k: int) -> None:
    from rich.table import Table

    t = Table(title="fedrec run summary")
    t.add_column("what")
    t.add_column(f"HR@{k}", justify="right")
    t.add_column(f"NDCG@{k}", justify="right")
    m, method = s["metrics"], s["config"].get("method", "federated")
    t.add_row(f"{method}, per event (the headline)", _num(m.get(f"hr@{k}")), _num(m.get(f"ndcg@{k}")))
    if m.get(f"start_hr@{k}") is not None and m.get("blends"):
        t.add_row(f"{method}, at the round's start", _num(m[f"start_hr@{k}"]), _num(m.get(f"start_ndcg@{k}")))
    for name, b in s["baselines"].items():
        if f"hr@{k}" in b:  # None when no round ran (a budget spent before the first release)
            t.add_row(name, _num(b[f"hr@{k}"]), _num(b.get(f"ndcg@{k}")))
    console.print(t)
    p = s["privacy"]
    if p["unit"] == "none":
        console.print("privacy: none (no differential privacy)")
    for unit in ("user", "event"):
        if unit in p:
            u = p[unit]
            extra = f" (max over devices; median {u['epsilon_median_device']:.3f})" if unit == "event" else ""
            console.print(f"privacy ({unit} level): epsilon={u['epsilon']:.3f}{extra}  delta={u['delta']}  "
                          f"accountant={u['accountant']}  noise_multiplier={u['noise_multiplier']:.3f}  "
                          f"clip={u['clip']}  sample_rate={u['sample_rate']:.4g}")
            console.print(f"  sampling: {u['sampling']}" + (f"; releases: {u['releases']}" if "releases" in u else ""))
            if u.get("trust"):
                console.print(f"  noise: {u.get('noise', '?')}; trust model: {u['trust']}")
    for n in s.get("notes", []):
        console.print(f"note: {n}")
    console.print(f"outputs: {s['config']['out']}/metrics.jsonl, summary.json, hr_epsilon.png")


def _quiet() -> None:
    """Warnings and errors only from Flower and Ray, less Flower's routine notices
    (:func:`~fedrec.ray_cluster.quiet_flower`). Flower's logger is imported first: importing it sets its level to
    DEBUG, which would undo a level set before."""
    import flwr.common.logger  # noqa: F401

    from .ray_cluster import quiet_flower

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_flower()


def _run_errors() -> tuple[type[Exception], ...]:
    """Errors a user's setup causes mid-run (checkpoint, ledger, device store, federation): one sentence each."""
    from .checkpoint import CheckpointError
    from .clients.store import StoreError
    from .deploy.local import DeployError
    from .federation.state import FederationError
    from .privacy.ledger import LedgerError

    return CheckpointError, LedgerError, StoreError, FederationError, DeployError


def main(argv: list[str] | None = None) -> int:
    """``fedrec``: a Ctrl-C anywhere, also outside the command's own handling (before it, or in the moment it
    returns), ends in exit 130 without a traceback."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "simulate":
            simulate(build_config(args))
        elif args.cmd == "deploy":
            deploy_local(build_config(args), args.devices, args.tls, args.world_users is not None,
                         warm=not args.stock_nodes)
        elif args.cmd == "sweep":
            from .sweep.runner import run_sweep

            if args.jobs < 1:
                raise ConfigError(f"--jobs must be at least 1 (got {args.jobs}).")
            out = run_sweep(args.file, args.out, jobs=args.jobs, progress=not args.no_progress, cells=args.cells)
            print(f"fedrec sweep: report in {out / 'report.md'} (results.csv, tables.md, PNG plots beside it)")
        elif args.cmd == "report":
            from .sweep.runner import build_report

            d = Path(args.dir)
            if not (d / "results.csv").is_file():
                raise ConfigError(f"No results.csv in {d}; run `fedrec sweep FILE --out {d}` first.")
            print(f"fedrec report: {build_report(d)}")
        return 0
    except (ConfigError, DataError, *_run_errors()) as e:  # type: ignore[misc]  # a tuple built at run time
        print(f"fedrec: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"fedrec: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if args.cmd == "simulate":
            raise
        print(f"fedrec: {e}", file=sys.stderr)  # a malformed results.csv or metrics file: it names its place
        return 2
    except KeyboardInterrupt:
        print("fedrec: interrupted; every process it started is stopped; finished rounds are in metrics.jsonl.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
