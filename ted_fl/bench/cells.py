"""`cells`: the default command with its cells one after another against N at once (`ted_fl.schedule.cells`).

`centralized` and `simulate` each run the workload twice in fresh processes, timed end to end (imports,
Ray's start-up, the report): with train.cells_in_parallel = 1, then with N ("auto" by default: 2 on a
2-core CPU, up to 8 per GPU). Every metric but the wall times must be identical between the two; the
command says whether it is, and exits 1 if not. Without --quick the workload is the bare default
command (`--sites prostate`: seq, kd, ted_gugf x 3 seeds); the target on an idle 2-core CPU is 1.6x.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from ted_fl.bench import common as C
from ted_fl.config import ExperimentConfig, load_experiment, parse_override, set_key
from ted_fl.data import resolve_out_channels
from ted_fl.federated.simulation import federated_slots
from ted_fl.schedule.cells import cell_slots

TARGET = 1.6  # speedup of the default command on an idle 2-core CPU (issue 22)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cells", help="the default command with 1 vs N cells at once: wall time, identical numbers")
    C.add_arguments(p, quick="the test suite's tiny workload (2 approaches x 2 seeds)", config="",
                    config_help="workload: an experiment file (default: the bare default command)")
    p.add_argument("--cells", default="auto", help="cells at once in the second run: auto or a number (default auto)")
    p.add_argument("--mode", nargs="+", default=["centralized", "simulate"], choices=["centralized", "simulate"],
                   help="which commands to measure (default both)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the workload, e.g. train.rounds=1 for a shorter run")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_experiment(args.config) if args.config else ExperimentConfig()
    if args.quick:
        C.tiny(cfg, ["RUNMC", "BMC", "I2CVB"], rounds=1, steps=2, batch=4)
        cfg.approaches, cfg.seeds = ["seq", "ted_gugf"], [0, 1]
    for item in args.set:
        set_key(cfg, *parse_override(item))
    resolve_out_channels(cfg)
    return cfg


def numbers(run: Any) -> pd.DataFrame:
    m = run.metrics()
    m = m[m["split"] != "time"]
    return m.sort_values(["approach", "seed", "stage", "round", "site", "split", "label", "metric"]
                         ).reset_index(drop=True)


def identical(a: Any, b: Any) -> bool:
    x, y = numbers(a), numbers(b)
    if len(x) != len(y) or not (x.drop(columns="value").astype(str).to_numpy() ==
                                y.drop(columns="value").astype(str).to_numpy()).all():
        return False
    u, v = x["value"].to_numpy(), y["value"].to_numpy()
    return bool(((u == v) | (pd.isna(u) & pd.isna(v))).all())


def run(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = workload(args)
    work = Path(args.out) / time.strftime("cells-%Y%m%d-%H%M%S")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n_cells = len(cfg.approaches) * len(cfg.seeds)
    rows, same = [], True
    for mode in args.mode:
        many = copy.deepcopy(cfg)
        set_key(many, "train.cells_in_parallel", args.cells)
        n = federated_slots(many, n_cells) if mode == "simulate" else cell_slots(many, n_cells)
        measured = {}
        for label, value in (("one at a time", 1), (f"{n} at once", n)):
            set_key(cfg, "train.cells_in_parallel", value)
            m = C.run_cli(mode, cfg, work / mode, f"cells{value}")
            measured[label] = m
            print(f"  {mode}, {label}: {m.wall_s:.1f} s", flush=True)
        m1, mn = measured.values()
        ok = identical(m1.run, mn.run)
        same &= ok
        rows.append(dict(command=mode, cells=n_cells, at_once=n, one_at_a_time_s=m1.wall_s, at_once_s=mn.wall_s,
                         speedup=m1.wall_s / mn.wall_s, peak_rss_mib=C.mib(mn.peak_rss), identical="yes" if ok else "NO"))
    df = pd.DataFrame(rows)
    C.print_table(f"cells: {n_cells} cells, one at a time vs at once", df)
    cpus = os.cpu_count()
    head = "; ".join(f"{r['command']} {r['speedup']:.2f}x ({r['one_at_a_time_s']:.0f} -> {r['at_once_s']:.0f} s, "
                     f"{r['at_once']} at once)" for r in rows)
    line = (f"cells: {head}; numbers identical: {'yes' if same else 'NO'} (target {TARGET}x for the default "
            f"command on an idle 2-core CPU; load average {load:.1f} on {cpus} cores)")
    body = (
        f"{C.section_head('cells', argv)}\n\n"
        f"Workload: {'the tiny test workload' if args.quick else args.config or 'the bare default command'} "
        f"({len(cfg.approaches)} approaches x {len(cfg.seeds)} seeds = {n_cells} cells), each command run end to "
        f"end in a fresh process with `train.cells_in_parallel = 1`, then with {args.cells} "
        f"(`ted_fl.schedule.cells`: Ray tasks for `centralized`, schedules of one ServerApp on their own SuperNodes for "
        f"`simulate`). Load average {load:.1f} on {cpus} cores when the command started.\n\n"
        f"{C.md_table(df)}\n\nEvery metric (wall times aside) identical between the two runs: "
        f"**{'yes' if same else 'no'}**. Folders: `{work}`.\n\n`{line}`"
    )
    C.finish(args, "cells", line, body)
    return 0 if same else 1
