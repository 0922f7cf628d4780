"""The command line shared by `ted_fl.simulate` and `ted_fl.centralized`.

Both parse the same options into the same `ExperimentConfig`, write the same run directory and
print the same summary; only the executor differs (Flower + Ray, or in-process).
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd

from ted_fl.config import ApproachName, ExperimentConfig, choices, load_experiment, parse_override, set_key
from ted_fl.errors import TedFlError
from ted_fl.results import RunDir
from ted_fl.run import (
    Execute,
    discard_if_empty,
    execute_centralized,
    finish_run,
    start_run,
    write_report_if_available,
)


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
    p.add_argument("--rounds", type=int, help="rounds (epochs) per stage")
    p.add_argument("--seed", type=int, nargs="+", help="one or more seeds")
    p.add_argument("--out", help="folder for run directories (default: runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.batch_size=8 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last round")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """Experiment file, then the dedicated options, then --set overrides: one schema for all."""
    cfg = load_experiment(args.config) if args.config else ExperimentConfig()
    options = {"data.sites": args.sites or None, "data.data_dir": args.data_dir, "approaches": args.approach,
               "train.rounds": args.rounds, "seeds": args.seed, "out": args.out or None}
    for key, value in options.items():
        if value is not None:
            set_key(cfg, key, value, f"--{key.rsplit('.', 1)[-1].replace('_', '-')}")
    for item in args.set:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    from ted_fl.data import resolve_out_channels

    resolve_out_channels(cfg)  # the network's outputs follow the site set's classes
    return cfg


def print_summary(summary: pd.DataFrame, run: RunDir) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [c for c in ("approach", "seed", "avg", "ravg", "bwt", "fwt", "forgetting", "plasticity",
                        "hd95", "epsilon", "bytes_sent", "bytes_received", "wall_s") if c in summary.columns]
    cols[3:3] = [c for c in summary.columns if c.startswith("avg[")]  # per class / region, when several
    table = Table(title=f"summary ({run.path / 'summary.csv'})")
    for c in cols:
        table.add_column(c, justify="left" if c == "approach" else "right")
    for _, row in summary.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if c.startswith("bytes"):
                cells.append(f"{v / 1e6:.1f} MB")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}")
            else:
                cells.append(str(v))
        table.add_row(*cells)
    Console(width=160).print(table)


def run_command(mode: str, argv: list[str] | None = None) -> int:
    """Entry point of both command lines; every TedFlError becomes one line on stderr, exit 2."""
    if mode == "simulate":
        desc = "Federated domain-continual simulation: sites arrive one by one as Flower clients on Ray."
    else:
        desc = "Centralized reference run: the same schedule and evaluation as the simulator, in one process."
    args = build_parser(f"python -m ted_fl.{mode}", desc).parse_args(argv)
    try:
        if args.resume:
            run = RunDir.open(args.resume)
            cfg = run.read_config()
        else:
            cfg = resolve_config(args)
            run = start_run(cfg, mode, sys.argv[1:] if argv is None else list(argv))
        execute: Execute
        if mode == "simulate":
            from ted_fl.federated.simulation import execute_federated as execute
        else:
            execute = execute_centralized
        run.log(f"{mode}: approaches {cfg.approaches}, seeds {cfg.seeds}, sites {cfg.data.sites}")
        t0 = time.perf_counter()
        extras = execute(cfg, run, args.quiet)
        summary = finish_run(cfg, run, extras)
        run.log(f"done in {time.perf_counter() - t0:.1f} s")
        print_summary(summary, run)
        report = write_report_if_available(run)
        if report:
            print(f"report: {report}")
        print(f"run directory: {run.path}")
        return 0
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not args.resume and "run" in locals():
            discard_if_empty(run)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; resume with --resume {run.path}" if "run" in locals() else "interrupted",
              file=sys.stderr)
        return 130
