"""`sweep`: a small grid run by `ted_fl.studies.grid` in parallel (Ray tasks) against one cell after another.

The same cells run twice, in fresh folders: one after another in this process (what `bench
accuracy` did before), then as Ray tasks (federated.num_cpus = 1 each, so as many at once as
the machine has cores; Ray's start-up is inside the measured time). Then the parallel sweep
runs a third time on its own folder: every cell is reused. The tables must agree to the last
digit (a seed fixes a cell wherever it runs); the command says whether they do.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from ted_fl.bench import common as C
from ted_fl.config import ExperimentConfig, load_experiment
from ted_fl.data import site_order
from ted_fl.studies.grid import expand, run_cells, write_outputs


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sweep", help="a grid in parallel on Ray vs its cells one after another")
    C.add_arguments(p, quick="two tiny cells (the test suite's)", out="folder for the sweep folders")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all cores)")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> tuple[ExperimentConfig, dict[str, list[Any]], list[str], list[int]]:
    """The base config, the grid, the approaches and the seeds."""
    cfg = load_experiment(args.config)
    cfg.data.order = ["RUNMC", "BMC", "I2CVB"]
    cfg.federated.num_cpus, cfg.train.threads = 1.0, 1
    if args.quick:
        C.tiny(cfg, ["RUNMC", "BMC"], rounds=2, steps=3, batch=4)
        return cfg, {"loss.lambda_d": [0.1]}, ["seq", "kd"], [0]
    cfg.train.rounds, cfg.train.steps_per_round = 3, 10
    return cfg, {"loss.lambda_d": [0.01, 0.1]}, ["kd", "ted_gugf"], [0, 1]


def comparable(folder: Path) -> pd.DataFrame:
    """Every metric of every cell except the wall times."""
    m = pd.read_csv(folder / "metrics.csv")
    m = m[m["split"] != "time"]
    return m.sort_values(["cell", "stage", "round", "site", "split", "metric"]).reset_index(drop=True)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    base, grid, approaches, seeds = workload(args)
    cells = expand(base, grid, approaches, seeds)
    work = Path(args.out) / time.strftime("sweep-%Y%m%d-%H%M%S")
    load = os.getloadavg()[0]
    rows = []
    for mode, folder in (("one after another (in-process)", work / "serial"), ("parallel (Ray tasks)", work / "ray"),
                         ("parallel, rerun (cells reused)", work / "ray")):
        stats = run_cells(cells, folder, parallel=mode != "one after another (in-process)", quiet=True,
                          num_cpus=args.cpus)
        write_outputs(cells, folder, title="bench sweep")
        rows.append(dict(mode=mode, cells_run=stats["ran"], cells_reused=stats["reused"], wall_s=stats["wall_s"]))
        print(f"  {mode}: {stats['wall_s']:.1f} s", flush=True)
    a, b = comparable(work / "serial"), comparable(work / "ray")
    identical = len(a) == len(b) and bool((a["value"].to_numpy() == b["value"].to_numpy()).all())
    df = pd.DataFrame(rows)
    serial, par = rows[0]["wall_s"], rows[1]["wall_s"]
    df["speedup"] = [serial / r["wall_s"] if r["cells_run"] else float("nan") for r in rows]
    C.print_table(f"sweep: {len(cells)} cells", df)
    cell_s = float(pd.read_csv(work / "serial" / "summary.csv")["wall_s"].sum())
    cpus = args.cpus or os.cpu_count()
    line = (f"sweep: {len(cells)} cells, parallel {par:.1f} s vs one after another {serial:.1f} s "
            f"(speedup {serial / par:.2f} on {cpus} cores), results identical: {'yes' if identical else 'NO'}")

    body = (
        f"{C.section_head('sweep', argv)}\n\n"
        f"Grid: approaches {approaches} x seeds {seeds} x {grid} = {len(cells)} cells, each the centralized "
        f"runner on `{args.config}` ({' -> '.join(site_order(base.data))}, {base.data.size} px, "
        f"{base.train.rounds} rounds x {base.train.steps_per_round} steps of batch {base.train.batch_size} a "
        f"site, 1 torch thread). Run one after another in one process, then as Ray tasks of 1 CPU each "
        f"(`python -m ted_fl.sweep`'s runner, `ted_fl.studies.grid.run_cells`; Ray's start-up included), then "
        f"again on the parallel sweep's folder, where every cell is reused. The cells' own schedule wall "
        f"times sum to {cell_s:.0f} s in the serial run. The machine is shared with other work (load average "
        f"{load:.1f} on {cpus} cores when the command started), so the speedup is a lower bound of what "
        f"{cpus} idle cores give.\n\n"
        f"{C.md_table(df)}\n\nEvery metric of every cell (wall times aside) is identical between the serial "
        f"and the parallel runs: **{'yes' if identical else 'no'}**. Folders: `{work}`.\n\n`{line}`"
    )
    C.finish(args, "sweep", line, body)
    return 0 if identical else 1
