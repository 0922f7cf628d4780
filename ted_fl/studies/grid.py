"""Sweeps: a grid of independent cells (approach x seed x grid point x site order), run in parallel.

A paper table is many independent simulations. A *cell* is one of them: one approach, one
seed, one point of the hyper-parameter grid (dotted config keys, e.g. loss.lambda_d) and one
site order, fully resolved into an `ExperimentConfig`. Its identity is the hash of that
resolved configuration, so a rerun of the same sweep (or of a larger one sharing cells)
reuses every finished cell and only runs what is missing.

Where cells run: `ted_fl.schedule.cells`, the runner of every command: train.cells_in_parallel cells at once
("auto": as many as the cores, GPU shares or a cluster hold), each a Ray task with train.threads
CPUs and, on a GPU, a share of it (`federated.ray_address` joins an existing cluster, whose nodes
must see the same output folder). A cell runs the *centralized* runner (the simulator's schedule,
step and evaluation in one process; its R matrix equals the simulator's,
`tests/integration/test_simulation.py::test_matches_centralized`): a federated simulation inside a
Ray task would start (or join) a second Ray runtime for its own client actors from inside a worker,
competing with the sweep for the same CPUs and GPUs and deadlocking when the cells hold every slot.
`parallel=False` runs the same cells one after another in this process (the baseline of
`python -m ted_fl.bench sweep`; same numbers: a seed fixes a cell).

Outputs (`SWEEP_DIR`): cells/<cell>/ (a run directory each: config.toml, metrics.csv,
summary.csv, cell.json), and across cells metrics.csv (tidy, plus the cell, its grid values
and its order), summary.csv (one row per cell, with its validation score) and report.md
(selection on validation, results on test).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from ted_fl.config import ApproachName, ExperimentConfig, from_dict, parse_override, set_key, to_dict
from ted_fl.data import load_site_set_spec, ordered_sites
from ted_fl.errors import TedFlError
from ted_fl.run.directory import RunDir, atomic_write_bytes
from ted_fl.run.markdown import md_table
from ted_fl.schedule.cells import Job, cell_resources, cell_slots, run_jobs, sites_of
from ted_fl.schedule.experiment import ResolvedExperiment, resolve
from ted_fl.schedule.lifecycle import rounds_done, schedule_rounds

TEST_METRICS = ("avg", "bwt", "fwt", "forgetting", "plasticity", "hd95")


@dataclass
class Cell:
    """One independent simulation of the grid, fully resolved."""

    approach: str
    seed: int
    point: dict[str, Any]  # dotted key -> value
    order: list[str]  # [] = the site set's own order
    cfg: ExperimentConfig = field(repr=False)
    key: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.key = config_hash(self.cfg)  # fixed here: running a cell must not rename it

    @property
    def label(self) -> str:
        parts = [f"{k.split('.')[-1]}{_fmt(v)}" for k, v in self.point.items()]
        return "-".join([self.approach, f"s{self.seed}", *parts])

    @property
    def name(self) -> str:
        """Folder name: readable, unique by the hash of the resolved configuration."""
        return f"{self.label}-{self.key[:10]}"

    @property
    def order_text(self) -> str:
        return ">".join(self.order)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def config_hash(cfg: ExperimentConfig) -> str:
    """sha256 of the resolved configuration, without what does not change the numbers (name, out)."""
    data = to_dict(cfg)
    data.pop("name", None)
    data.pop("out", None)
    data["train"].pop("cells_in_parallel", None)  # how many cells run at once changes no cell's numbers
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def expand(base: ExperimentConfig, grid: dict[str, list[Any]], approaches: list[str] | None = None,
           seeds: list[int] | None = None, orders: list[list[str]] | None = None) -> list[Cell]:
    """Every cell of approaches x seeds x grid points x orders (defaults: the config's own)."""
    from ted_fl.continual.approaches import get_approach

    approaches = list(approaches or base.approaches)
    seeds = list(seeds if seeds is not None else base.seeds)
    orders = [list(o) for o in (orders or [list(base.data.order)])]
    keys = list(grid)
    for k in keys:
        if not grid[k]:
            raise TedFlError(f"sweep grid key {k} has no values; give KEY=V1,V2")
    cells = []
    for approach in approaches:
        get_approach(approach, base.loss)  # unknown names fail before anything runs
        for values in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            for order in orders:
                for seed in seeds:
                    cfg = copy.deepcopy(base)
                    for k, v in point.items():
                        set_key(cfg, k, v)
                    cfg.approaches, cfg.seeds, cfg.data.order = [cast(ApproachName, approach)], [int(seed)], list(order)
                    cfg.train.eval_val_all = True  # the validation R matrix: selection on val
                    cells.append(Cell(approach, int(seed), point, list(order), cfg))
    return cells


def val_score(rows: pd.DataFrame | list[dict[str, Any]], order: list[str]) -> float:
    """Mean over stages of the mean validation Dice of the sites seen so far ("val mean-seen Dice")."""
    from ted_fl.continual.metrics import curves, r_matrix

    df = pd.DataFrame(rows)
    return float(curves(r_matrix(df[df["split"] == "val_stage"], "dice", order))["avg"].mean())


def cell_done(path: Path, cell: Cell) -> bool:
    """A finished cell: its summary is written and its recorded hash is this cell's."""
    meta = path / "cell.json"
    if not (path / "summary.csv").is_file() or not meta.is_file():
        return False
    return json.loads(meta.read_text()).get("key") == cell.key


def run_cell(cfg: ExperimentConfig, path: str, progress: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
    """Run one cell's schedule (resuming its last round if interrupted) and write its tables (`cfg`: the
    cell's resolved config, `run_cells`)."""
    from ted_fl.schedule.engine import run_schedule, summarize
    from ted_fl.schedule.in_process import LocalExecutor

    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    sites = sites_of(cfg)
    approach, seed = cfg.approaches[0], cfg.seeds[0]
    st = run_schedule(cfg, approach, seed, LocalExecutor(cfg, sites), run, progress)
    metrics = run.write_metrics(st.rows)
    summary = summarize(metrics, {(approach, seed): {"bytes_sent": st.bytes_sent,
                                                    "bytes_received": st.bytes_received, "wall_s": st.wall}})
    summary["val_score"] = val_score(metrics, [s.name for s in sites])
    run.write_summary(summary)
    return {"wall_s": float(st.wall)}


def sweep_cell(cfg_dict: dict[str, Any], path: str, *, progress: Callable[[dict[str, Any]], None],
               slot: int) -> dict[str, Any]:
    """A sweep's cell for `ted_fl.schedule.cells.run_jobs` (here, or in a Ray task): rebuild the config, run it."""
    return run_cell(from_dict(ExperimentConfig, cfg_dict, "sweep cell"), path, progress)


def n_sites(cfg: ExperimentConfig) -> int:
    return len(ordered_sites(load_site_set_spec(cfg.data.sites), cfg.data.order))


def rounds_of(cell: Cell) -> int:
    """Rounds the cell's schedule runs (joint trains joint_rounds_factor times longer)."""
    stages, rounds = schedule_rounds(cell.cfg, cell.approach, n_sites(cell.cfg))
    return stages * rounds


def rounds_done_of(cell: Cell, folder: Path) -> int:
    """Rounds an unfinished cell's checkpoint holds (a killed sweep resumes there)."""
    path = folder / "cells" / cell.name
    if not path.is_dir():
        return 0
    return rounds_done(RunDir(path), cell.cfg, cell.approach, cell.seed, n_sites(cell.cfg))


class Progress:
    """Rounds and cells over the whole grid, printed as plain lines (at most every `every` s); the
    time left counts this session's rounds only (a rerun reuses cells and resumes unfinished ones)."""

    def __init__(self, total_rounds: int, total_cells: int, quiet: bool = False, every: float = 5.0) -> None:
        self.total, self.cells, self.quiet, self.every = total_rounds, total_cells, quiet, every
        self.rounds = self.done = self.start = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, rounds: int | None = None, done: int | None = None, note: str = "", force: bool = False
               ) -> None:
        self.rounds = self.rounds if rounds is None else rounds
        self.done = self.done if done is None else done
        now = time.perf_counter()
        if self.quiet or not (force or note or now - self.last >= self.every):
            return
        self.last = now
        el = now - self.t0
        ran = self.rounds - self.start
        left = f", ~{el / ran * (self.total - self.rounds):.0f} s left" if ran > 0 and self.rounds < self.total else ""
        print(f"[sweep] rounds {self.rounds}/{self.total}, cells {self.done}/{self.cells} done, "
              f"{el:.0f} s{left}" + (f" | {note}" if note else ""), flush=True)


def resolve_cells(cells: list[Cell]) -> dict[str, ResolvedExperiment]:
    """Each cell's experiment resolved once, by cell name: a cell is an entry point (its own
    experiment); its runner receives the resolved config and checks nothing again. The cell's own
    `cfg` is left as expanded, so its hash (its folder name) is what it always was."""
    return {c.name: resolve(c.cfg) for c in cells}


def run_cells(cells: list[Cell], folder: str | Path, *, parallel: bool = True, quiet: bool = False,
              num_cpus: int | None = None) -> dict[str, Any]:
    """Run every unfinished cell (`train.cells_in_parallel` at once on Ray, `ted_fl.schedule.cells`, or one
    after another here); reuse the rest. `num_cpus`: at most this many CPUs' worth of cells at once.

    Raises TedFlError naming the failed cells after the others have finished (those stay
    reusable); returns {"ran": n, "reused": n, "wall_s": s}.
    """
    folder = Path(folder)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise TedFlError("sweep: two cells resolve to the same configuration; remove the duplicate grid values")
    todo = [c for c in cells if not cell_done(folder / "cells" / c.name, c)]
    resolved = resolve_cells(todo)  # every bad cell is one line before any cell runs
    reused = len(cells) - len(todo)
    total = sum(rounds_of(c) for c in cells)
    prog = Progress(total, len(cells), quiet)
    prog.start = total - sum(rounds_of(c) for c in todo) + sum(rounds_done_of(c, folder) for c in todo)
    prog.update(rounds=prog.start, done=reused, force=True, note=f"{reused} cell(s) reused" if reused else "")
    for c in todo:
        path = folder / "cells" / c.name
        path.mkdir(parents=True, exist_ok=True)
        (path / "cell.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    slots = 1
    if todo and parallel:
        slots = cell_slots(todo[0].cfg, len(todo))
        if num_cpus:
            slots = max(1, min(slots, int(num_cpus // max(1, todo[0].cfg.train.threads))))
    by_name = {c.name: c for c in todo}
    jobs = [Job(c.name, sweep_cell, (to_dict(resolved[c.name].cfg), str(folder / "cells" / c.name))) for c in todo]

    def done(job: Job, _: Any) -> None:
        _mark_done(folder, by_name[job.name])
        prog.update(done=prog.done + 1, note=f"{job.name} done")

    resources = cell_resources(todo[0].cfg) if todo else {}
    _, failures = run_jobs(jobs, slots, lambda info: prog.update(rounds=prog.rounds + 1), keep_going=True,
                           resources=resources, ray_address=todo[0].cfg.federated.ray_address if todo else "",
                           on_done=done)
    for name, exc in failures.items():
        if isinstance(exc, KeyboardInterrupt):
            raise exc
        prog.update(note=f"{name} FAILED")
    wall = time.perf_counter() - t0
    prog.update(rounds=total - sum(rounds_of(c) for c in todo if not cell_done(folder / "cells" / c.name, c)),
                force=bool(todo))
    if failures:
        text = "; ".join(f"{n}: {exc}" if isinstance(exc, TedFlError) else
                         f"{n}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"
                         for n, exc in failures.items())
        raise TedFlError(f"sweep: {len(failures)} cell(s) failed ({text}); the finished "
                         f"cells are kept under {folder / 'cells'}, rerun to retry the rest")
    return {"ran": len(todo), "reused": reused, "wall_s": wall}


def _mark_done(folder: Path, c: Cell) -> None:
    RunDir(folder / "cells" / c.name).write_json(
        "cell.json", {"key": c.key, "approach": c.approach, "seed": c.seed, "point": c.point, "order": c.order})


def collect(cells: list[Cell], folder: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy metrics and the per-cell summary across all cells, with the grid columns added."""
    folder = Path(folder)
    keys = list(cells[0].point) if cells else []
    metrics, summary = [], []
    for c in cells:
        run = RunDir(folder / "cells" / c.name)
        extra = {"cell": c.name, **c.point, "order": c.order_text}
        m = run.metrics()
        metrics.append(m.assign(**extra))
        s = run.summary()
        summary.append(s.assign(**extra))
    m_all = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame()
    s_all = pd.concat(summary, ignore_index=True) if summary else pd.DataFrame()
    first = ["cell", "approach", "seed", *keys, "order"]
    if len(s_all):
        s_all = s_all[first + [c for c in s_all.columns if c not in first]]
    return m_all, s_all


def select(summary: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per approach, the grid point with the best mean validation score over its seeds and orders,
    and that point's test figures as mean and std over those cells."""
    sel_rows, test_rows = [], []
    for approach, g in summary.groupby("approach", sort=False):
        by = g.groupby(keys, sort=False, dropna=False) if keys else [((), g)]
        scores = []
        for point, h in by:
            point = point if isinstance(point, tuple) else (point,)
            scores.append((dict(zip(keys, point, strict=True)), float(h["val_score"].mean()),
                           float(h["val_score"].std(ddof=1)) if len(h) > 1 else 0.0, h))
        best = int(np.nanargmax([s[1] for s in scores])) if any(np.isfinite(s[1]) for s in scores) else 0
        for i, (point, mean, sd, h) in enumerate(scores):
            sel_rows.append(dict(approach=approach, **point, val_score=mean, val_sd=sd, cells=len(h),
                                 selected="yes" if i == best else ""))
        point, _, _, h = scores[best]
        row: dict[str, Any] = dict(approach=approach, **point, cells=len(h))
        for k in TEST_METRICS:
            if k in h:
                sd = float(h[k].std(ddof=1)) if len(h) > 1 else 0.0
                row[k] = f"{h[k].mean():.3f} ± {sd:.3f}"
        test_rows.append(row)
    return pd.DataFrame(sel_rows), pd.DataFrame(test_rows)


def write_outputs(cells: list[Cell], folder: str | Path, title: str = "sweep", command: str = "") -> dict[str, Any]:
    """metrics.csv, summary.csv and report.md across the cells (written atomically)."""
    folder = Path(folder)
    metrics, summary = collect(cells, folder)
    keys = list(cells[0].point) if cells else []
    selection, test = select(summary, keys)
    atomic_write_bytes(folder / "metrics.csv", metrics.to_csv(index=False).encode())
    atomic_write_bytes(folder / "summary.csv", summary.to_csv(index=False).encode())
    orders = sorted({c.order_text or "(the set's order)" for c in cells})
    seeds = sorted({c.seed for c in cells})
    text = (
        f"# {title}\n\n" + (f"Command: `{command}`\n\n" if command else "")
        + f"{len(cells)} cells: approaches {sorted({c.approach for c in cells})}, seeds {seeds}, "
        f"grid {({k: sorted({c.point[k] for c in cells}) for k in keys}) or '-'}, orders {orders}.\n\n"
        "## Selection on validation\n\nCriterion: mean over stages of the validation Dice of the sites "
        "seen so far, averaged over the cells (seeds, orders) of each grid point; the best point per "
        f"approach is selected.\n\n{md_table(selection)}\n\n"
        "## Test, at the selected point\n\nMean ± std over the selected point's cells. Avg = mean final "
        "test Dice over all sites; BWT, FWT, forgetting and plasticity as in "
        f"`ted_fl.continual.metrics.continual_summary`.\n\n{md_table(test)}\n\n"
        "Per-cell figures: `summary.csv`; every metric of every cell: `metrics.csv` (tidy).\n"
    )
    atomic_write_bytes(folder / "report.md", text.encode())
    return {"summary": summary, "selection": selection, "test": test, "report": folder / "report.md"}


def sweep(base: ExperimentConfig, grid: dict[str, list[Any]], folder: str | Path, *,
          approaches: list[str] | None = None, seeds: list[int] | None = None,
          orders: list[list[str]] | None = None, parallel: bool = True, quiet: bool = False,
          command: str = "", num_cpus: int | None = None) -> dict[str, Any]:
    """Expand, run (reusing finished cells), and write the tables and the report."""
    cells = expand(base, grid, approaches, seeds, orders)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stats = run_cells(cells, folder, parallel=parallel, quiet=quiet, num_cpus=num_cpus)
    out = write_outputs(cells, folder, title=f"sweep {base.name}", command=command)
    out.update(stats, cells=cells)
    return out


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """['loss.lambda_d=0.01,0.1', ...] -> {'loss.lambda_d': [0.01, 0.1]} (TOML value syntax each)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise TedFlError(f"--grid expects KEY=V1,V2 (e.g. loss.lambda_d=0.01,0.1), got '{item}'")
        key, raw = item.split("=", 1)
        grid[key.strip()] = [parse_override(f"{key}={v.strip()}")[1] for v in raw.split(",") if v.strip()]
    return grid
