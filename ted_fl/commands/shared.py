"""The command line shared by `ted_fl.simulate` and `ted_fl.centralized`.

Both parse the same options into the same `ExperimentConfig`, write the same run directory and
print the same summary; only the executor differs (Flower + Ray, or in-process).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from ted_fl.config import (
    ApproachName,
    ExperimentConfig,
    choices,
    load_experiment,
    parse_override,
    set_key,
)
from ted_fl.errors import TedFlError
from ted_fl.run.processes import graceful_signals, stop_waiting

if TYPE_CHECKING:  # pandas, torch, Flower and Ray load after the input is parsed and checked
    import pandas as pd

    from ted_fl.run.directory import RunDir
    from ted_fl.run.processes import ProcessRecord
    from ted_fl.schedule.experiment import ResolvedExperiment


def _site_sets() -> str:
    """The site sets found in sites/ (not a fixed list), for --help."""
    from ted_fl.data.spec import list_site_sets

    return ", ".join(list_site_sets()) or "none found in sites/"


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--sites", help=f"site set: {_site_sets()}, or a path to a sites TOML (docs/sites.md)")
    p.add_argument("--data-dir", help="root of the real data (omit for the embedded synthetic twin)")
    p.add_argument("--approach", nargs="+", choices=choices(ApproachName), metavar="APPROACH",
                   help=f"approaches to compare: {', '.join(choices(ApproachName))}")
    p.add_argument("--config", help="experiment file: simulations/NAME.toml or NAME")
    p.add_argument("--rounds", type=int,
                   help="Flower rounds per stage (site); each round trains train.steps_per_round steps "
                        "(0: one pass over the site's training split)")
    p.add_argument("--seed", type=int, nargs="+", help="one or more seeds")
    p.add_argument("--out", help="folder for run directories (default: runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.batch_size=8 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last round")
    p.add_argument("--check", action="store_true",
                   help="check the configuration and the data, say what would run, and stop (no training)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """Experiment file, then the dedicated options, then --set overrides: one schema for all (as the
    user wrote it; `ted_fl.schedule.experiment.resolve` derives and checks the rest)."""
    cfg = load_experiment(args.config) if args.config else ExperimentConfig()
    options = {"data.sites": ("--sites", args.sites or None), "data.data_dir": ("--data-dir", args.data_dir),
               "approaches": ("--approach", args.approach), "train.rounds": ("--rounds", args.rounds),
               "seeds": ("--seed", args.seed), "out": ("--out", args.out or None)}
    for key, (flag, value) in options.items():
        if value is not None:
            set_key(cfg, key, value, flag)
    for item in args.set:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    return cfg


def print_summary(summary: pd.DataFrame, run: RunDir) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ted_fl.run.directory import format_cell

    cols = [c for c in ("approach", "seed", "avg", "ravg", "bwt", "fwt", "forgetting", "plasticity",
                        "hd95", "epsilon", "bytes_sent", "bytes_received", "wall_s") if c in summary.columns]
    cols[3:3] = [c for c in summary.columns if c.startswith("avg[")]  # per class / region, when several
    if "faults_seen" in summary.columns and summary["faults_seen"].fillna(0).sum() > 0:
        cols += ["faults_seen", "faults_retried", "faults_unrecovered"]
    table = Table(title=escape(f"summary ({run.path / 'summary.csv'})"))
    for c in cols:  # escaped: rich reads a label column's "[cup]" in avg[cup] as markup and shows "avg"
        table.add_column(escape(c), justify="left" if c == "approach" else "right")
    for _, row in summary.iterrows():
        table.add_row(*[escape(format_cell(c, row[c])) for c in cols])
    Console(width=160).print(table)
    print_verdict(summary, run)


def print_verdict(summary: pd.DataFrame, run: RunDir) -> None:
    """The run's answer under its table: which approach forgets least, at what plasticity, paired
    by seed against seq, and whether this budget can separate the approaches at all."""
    from ted_fl.run.directory import budget_check, site_learning, verdict

    sites = site_learning(run.metrics())
    warnings = budget_check(summary, sites)
    for line in verdict(summary, sites):
        print(("warning: " if line in warnings else "verdict: ") + line)


def check_inputs(mode: str, cfg: ExperimentConfig) -> tuple[ResolvedExperiment, list]:
    """Everything a run checks before it starts, the same for `--check`, a run and `--resume`: the
    experiment resolved once (`resolve`: out channels, every [privacy] rule, the network under DP;
    nothing below checks it again), then its data (the sites load, the splits it needs exist)."""
    from ted_fl.schedule.experiment import resolve
    from ted_fl.schedule.lifecycle import check_data

    exp = resolve(cfg, federated=mode == "simulate")
    return exp, check_data(exp.cfg)


def describe(cfg: ExperimentConfig, sites: list, mode: str, warnings: int = 0) -> str:
    """What a run of `cfg` would do, in one line (for --check)."""
    names = [s.name for s in sites]
    nodes = len(names) * cfg.federated.clients_per_site
    where = cfg.data.data_dir or "synthetic twin"
    fed = f", {nodes} Flower client node(s)" if mode == "simulate" else ""
    return (f"ok: {len(cfg.approaches)} approach(es) {' '.join(cfg.approaches)} x {len(cfg.seeds)} seed(s), "
            f"sites {' -> '.join(names)} ({where}), {cfg.train.rounds} round(s) a stage{fed}; "
            f"outputs in {cfg.out}/" + (f"; {warnings} data warning(s)/note(s) above" if warnings else ""))


def _finished(run: RunDir) -> bool:
    return (run.path / "summary.csv").is_file()


def run_command(mode: str, argv: list[str] | None = None) -> int:
    """Entry point of both command lines; every TedFlError becomes one line on stderr, exit 2.

    Interrupted (Ctrl-C, SIGTERM) as the program itself (`argv` None), it ends with `os._exit`
    once Ray is down and every process of the run has ended: a Flower worker thread caught in a
    `ray.get` of the shut-down Ray would otherwise hold the interpreter's exit forever.
    """
    code = _run_command(mode, argv)
    if code == 130 and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_command(mode: str, argv: list[str] | None = None) -> int:
    """The body of `run_command`.

    Order matters for the first answer: parse, read the config, check the data, and only then
    import torch, Flower and Ray (`--help` and every input error come back in well under a second).
    """
    if mode == "simulate":
        desc = "Federated domain-continual simulation: sites arrive one by one as Flower clients on Ray."
    else:
        desc = "Centralized reference run: the same schedule and evaluation as the simulator, in one process."
    args = build_parser(f"python -m ted_fl.{mode}", desc).parse_args(argv)

    run = None
    record: ProcessRecord | None = None
    started = False  # the run itself (not its input checks) is under way: a failure marks it
    try:
        with graceful_signals():
            from ted_fl.run.directory import RunDir
            from ted_fl.run.processes import ProcessRecord, reap_folder, reap_stale

            if args.resume:
                run = RunDir.open(args.resume)
                cfg = run.read_config()
                reaped = reap_stale(run.path)  # what a killed run left (Ray agents, workers)
                if _finished(run):
                    report = run.path / "report.html"
                    print(f"{run.path} is already finished; nothing to resume"
                          + (f" (report: {report})" if report.is_file() else
                             f" (write its report: python -m ted_fl.report {run.path})"))
                    return 0
                exp, _ = check_inputs(mode, cfg)
                failed = run.failure()
                if failed:
                    print(f"note: resuming a run that failed ({failed})", file=sys.stderr)
                    run.log(f"resumed after a failure: {failed}")
                    run.clear_failed()
            else:
                cfg = resolve_config(args)
                from ted_fl.files import check_creatable

                check_creatable(cfg.out, "--out / out")  # before the data and torch load
                exp, sites = check_inputs(mode, cfg)
                if args.check:
                    from ted_fl.schedule.lifecycle import data_warnings

                    lines = data_warnings(exp.cfg, sites)  # the lines the run would print
                    for line in lines:
                        print(line, file=sys.stderr)
                    print(describe(exp.cfg, sites, mode, len(lines)))
                    return 0
                reaped = reap_folder(exp.cfg.out)
                from ted_fl.schedule.lifecycle import start_run

                run = start_run(exp, mode, sys.argv[1:] if argv is None else list(argv))
            if reaped:
                msg = f"ended {reaped} process(es) left by a killed run (Ray, Flower)"
                print(f"note: {msg}", file=sys.stderr)
                run.log(f"note: {msg}")
            record = ProcessRecord(run.path)
            record.update("starting")
            started = True
            return _execute(mode, exp, run, args, record)
    except TedFlError as exc:
        if run is not None and (started or not args.resume):
            _failed(run, str(exc), mode, bool(args.resume))
        print(f"error: {exc}", file=sys.stderr)  # last: the line a user reads first
        return 2
    except (KeyboardInterrupt, SystemExit) as exc:
        # ray.init replaces the SIGTERM handler with sys.exit(15): the same signal, the same answer.
        if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
            raise
        why = "interrupted" if type(exc) is KeyboardInterrupt else "terminated"
        if run is not None:
            run.log(f"{why} ({exc or 'SIGINT'})")
        print(f"{why}; resume with --resume {run.path}" if run is not None else why, file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not an input: its traceback follows, the run is marked first
        if run is not None and started:
            _failed(run, f"{type(exc).__name__}: {exc}", mode, bool(args.resume))
        raise
    finally:
        _shutdown(record)


def _failed(run: RunDir, error: str, mode: str, resumed: bool) -> None:
    """`run.mark_run_failed`, and one line saying where the marked run is and how to resume it."""
    from ted_fl.schedule.lifecycle import mark_run_failed

    resume = f"python -m ted_fl.{mode} --resume {run.path}"
    if mark_run_failed(run, error, resume, new=not resumed) and not (run.path / "summary.csv").is_file():
        print(f"{run.path}: marked failed (FAILED; no results written); resume with {resume}", file=sys.stderr)


def _shutdown(record: ProcessRecord | None) -> None:
    """Whatever happened: the ServerApp thread stops waiting, Ray shut down, and no process this run
    started left running."""
    stop_waiting()
    if "ray" in sys.modules:
        ray = sys.modules["ray"]
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                ray.shutdown()
    if record is not None:
        record.close()


def _execute(mode: str, exp: ResolvedExperiment, run: RunDir, args: argparse.Namespace,
             record: ProcessRecord | None) -> int:
    """Run the resolved experiment (the executors receive it as resolved), then its summary and report."""
    from ted_fl.schedule.lifecycle import (
        Execute,
        disk_use,
        execute_centralized,
        finish_run,
        prune_run,
        write_report_if_available,
    )

    execute: Execute
    if mode == "simulate":
        from ted_fl.federated.simulation import execute_federated as execute
    else:
        execute = execute_centralized
    cfg = exp.cfg
    run.log(f"{mode}: approaches {cfg.approaches}, seeds {cfg.seeds}, sites {cfg.data.sites}")
    t0 = time.perf_counter()
    run.record = record  # the executors refresh it once Ray runs
    extras = execute(exp, run, args.quiet)
    summary = finish_run(cfg, run, extras)
    run.log(f"done in {time.perf_counter() - t0:.1f} s")
    print_summary(summary, run)
    report = write_report_if_available(run)
    if report:
        print(f"report: {report}")
    prune_run(cfg, run)
    print(f"disk use: {disk_use(run.path)} (output.checkpoints = {cfg.output.checkpoints})")
    print(f"run directory: {run.path}")
    return 0
