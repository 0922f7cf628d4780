"""The command line shared by `ted_fl.simulate` and `ted_fl.centralized`.

Both parse the same options into the same `ExperimentConfig`, write the same run directory and
print the same summary; only the executor differs (Flower + Ray, or in-process).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from ted_fl.config import ExperimentConfig, load_experiment, parse_override, set_key
from ted_fl.errors import TedFlError
from ted_fl.results import RunDir


def _site_sets() -> str:
    """The site sets found in sites/ (not a fixed list), for --help."""
    from ted_fl.data.spec import list_site_sets

    return ", ".join(list_site_sets()) or "none found in sites/"


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--sites", help=f"site set: {_site_sets()}, or a path to a sites TOML (docs/sites.md)")
    p.add_argument("--data-dir", help="root of the real data (omit for the embedded synthetic twin)")
    p.add_argument("--approach", nargs="+", help="approaches to compare, e.g. seq kd ted ted_gugf joint")
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
    if args.sites:
        cfg.data.sites = args.sites
    if args.data_dir is not None:
        cfg.data.data_dir = args.data_dir
    if args.approach:
        cfg.approaches = list(args.approach)
    if args.rounds is not None:
        cfg.train.rounds = args.rounds
    if args.seed:
        cfg.seeds = list(args.seed)
    if args.out:
        cfg.out = args.out
    for item in args.set:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    validate(cfg)
    from ted_fl.data import resolve_out_channels

    resolve_out_channels(cfg)  # the network's outputs follow the site set's classes
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    from ted_fl.continual.approaches import get_approach

    for name in cfg.approaches:
        get_approach(name, cfg.loss)
    if cfg.train.rounds < 1:
        raise TedFlError(f"train.rounds must be at least 1, got {cfg.train.rounds}")
    if cfg.train.batch_size < 1:
        raise TedFlError(f"train.batch_size must be at least 1, got {cfg.train.batch_size}")
    if cfg.federated.clients_per_site < 1:
        raise TedFlError(f"federated.clients_per_site must be at least 1, got {cfg.federated.clients_per_site}")
    choices = {
        "federated.probes": (cfg.federated.probes, ("pixels", "seed")),
        "federated.on_failure": (cfg.federated.on_failure, ("retry", "skip", "abort")),
        "loss.teacher_mode": (cfg.loss.teacher_mode, ("eval", "train")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
        "loss.gugf": (cfg.loss.gugf, ("batch", "normalized")),
        "loss.ska_distribution": (cfg.loss.ska_distribution, ("normal", "uniform")),
        "loss.baseline_variant": (cfg.loss.baseline_variant, ("paper", "reference")),
        "loss.kd_reduce": (cfg.loss.kd_reduce, ("class", "reference")),
        "eval.bn": (cfg.eval.bn, ("running", "batch")),
        "protocol": (cfg.protocol, ("ted-fl", "reference")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise TedFlError(f"{key} = '{value}' is not one of {', '.join(allowed)}")


class Progress:
    """Stage, round, site, loss and time left, on a rich progress bar (or plain lines)."""

    def __init__(self, total_rounds: int, quiet: bool = False):
        self.quiet = quiet
        self.bar: Any = None
        if not quiet:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self.bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("starting", total=total_rounds)
            self.bar.start()

    def __call__(self, info: dict[str, Any]) -> None:
        if self.bar is None:
            return
        desc = (
            f"{info['approach']} s{info['seed']} | stage {info['stage'] + 1}/{info['stages']} "
            f"{info['site']} | round {info['round'] + 1}/{info['rounds']} | loss {info['loss']:.3f}"
        )
        self.bar.update(self.task, advance=1, description=desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def total_rounds(cfg: ExperimentConfig, n_sites: int) -> int:
    from ted_fl.continual.approaches import get_approach

    total = 0
    for name in cfg.approaches:
        joint = get_approach(name, cfg.loss).joint
        factor = cfg.train.joint_rounds_factor if joint else 1.0
        stages = 1 if joint and cfg.protocol == "reference" else n_sites
        total += stages * max(1, round(cfg.train.rounds * factor))
    return total * len(cfg.seeds)


def print_summary(summary: pd.DataFrame, run: RunDir) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [c for c in ("approach", "seed", "avg", "ravg", "bwt", "fwt", "forgetting", "plasticity",
                        "hd95", "bytes_sent", "bytes_received", "wall_s") if c in summary.columns]
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


Execute = Callable[[ExperimentConfig, RunDir, Progress], dict[tuple[str, int], dict[str, Any]]]


def finish_run(cfg: ExperimentConfig, run: RunDir, extras: dict[tuple[str, int], dict[str, Any]]) -> pd.DataFrame:
    """Gather every (approach, seed) checkpoint's rows into metrics.csv and summary.csv."""
    from ted_fl.engine import summarize

    rows: list[dict[str, Any]] = []
    for approach in cfg.approaches:
        for seed in cfg.seeds:
            st = run.load_checkpoint(approach, seed, "last")
            if st:
                rows.extend(st["rows"])
                extras.setdefault((approach, seed), {}).update(
                    bytes_sent=st["bytes_sent"], bytes_received=st["bytes_received"], wall_s=st["wall"]
                )
    metrics = run.write_metrics(rows)
    summary = summarize(metrics, extras)
    run.write_summary(summary)
    return summary


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
            run = RunDir.create(cfg.out, f"{cfg.name}-{mode}")
            run.write_config(cfg)
            # The exact command, so reports and docs can say how the numbers were made.
            argv_used = sys.argv[1:] if argv is None else list(argv)
            (run.path / "command.txt").write_text(shlex.join(["python", "-m", f"ted_fl.{mode}", *argv_used]) + "\n")
            run.write_json("machine.json", machine_info())
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


def machine_info() -> dict[str, Any]:
    """Where a run ran (CPU, cores, OS, library versions): wall times mean little without it."""
    import os
    import platform
    from importlib.metadata import version

    import psutil
    import torch

    return {
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor(), "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "flwr": version("flwr"), "ray": version("ray"),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def discard_if_empty(run: RunDir) -> None:
    """A run that failed before completing a single round leaves no directory behind."""
    import shutil

    if not list(run.path.glob("checkpoints/*/last.pt")):
        shutil.rmtree(run.path, ignore_errors=True)


def write_report_if_available(run: RunDir) -> Path | None:
    try:
        from ted_fl.report import write_report
    except ImportError:
        return None
    try:
        return write_report([run.path], run.path / "report.html")
    except Exception as exc:  # the run is already written: a report failure must not lose it
        msg = f"report not written ({type(exc).__name__}: {exc}); retry with python -m ted_fl.report {run.path}"
        print(f"warning: {msg}", file=sys.stderr)
        run.log(f"warning: {msg}")
        return None


def load_and_record_sites(cfg: ExperimentConfig, run: RunDir) -> list:
    """Load (or generate) the sites once, record the splits and warnings with the run."""
    from ted_fl.data import check_splits, load_sites

    sites = load_sites(cfg.data, cfg.data.split_seed)
    # Before Ray or any training starts: a split a run needs but a site lacks is one clear error.
    check_splits(sites, need_val=cfg.train.select_best or cfg.train.eval_val_all)
    run.write_json("splits.json", {s.name: s.manifest for s in sites})
    for s in sites:
        for w in s.warnings:
            print(f"warning: {s.name}: {w}", file=sys.stderr)
            run.log(f"warning: {s.name}: {w}")
    return sites


def execute_centralized(cfg: ExperimentConfig, run: RunDir, quiet: bool) -> dict[tuple[str, int], dict[str, Any]]:
    from ted_fl.centralized import LocalExecutor
    from ted_fl.engine import run_schedule

    sites = load_and_record_sites(cfg, run)
    progress = Progress(total_rounds(cfg, len(sites)), quiet)
    try:
        for approach in cfg.approaches:
            for seed in cfg.seeds:
                run_schedule(cfg, approach, seed, LocalExecutor(cfg, sites), run, progress)
    finally:
        progress.close()
    return {}
