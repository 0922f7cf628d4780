"""Sweeps: a grid of independent cells (approach x seed x grid point x site order), run in parallel.

A paper table is many independent simulations. A *cell* is one of them: one approach, one
seed, one point of the hyper-parameter grid (dotted config keys, e.g. loss.lambda_d) and one
site order, fully resolved into an `ExperimentConfig`. Its identity is the hash of that
resolved configuration, so a rerun of the same sweep (or of a larger one sharing cells)
reuses every finished cell and only runs what is missing.

Where cells run: each cell is a Ray task with `federated.num_cpus` / `federated.num_gpus` of
the configuration (GPU fractions pack several cells on one GPU; `federated.ray_address`
joins an existing cluster, whose nodes must see the same output folder), so Ray's scheduler
runs as many at once as the resources allow. A cell runs the *centralized* runner (the
simulator's schedule, step and evaluation in one process; its R matrix equals the
simulator's, `tests/integration/test_simulation.py::test_matches_centralized`): a federated
simulation inside a Ray task would start (or join) a second Ray runtime for its own client
actors from inside a worker, competing with the sweep for the same CPUs and GPUs and
deadlocking when the cells hold every slot. Ray tasks rather than a process pool: the same
code uses a laptop's cores, a GPU's fractions and a cluster, and a failed cell comes back as
an error of that cell only. `parallel=False` runs the same cells one after another in this
process (the baseline of `python -m ted_fl.bench sweep`; same numbers: a seed fixes a cell).

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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ted_fl.config import ExperimentConfig, set_key, split_seed_of, to_dict
from ted_fl.errors import TedFlError
from ted_fl.results import RunDir

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
                    cfg.approaches, cfg.seeds, cfg.data.order = [approach], [int(seed)], list(order)
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
    """Run one cell's schedule (resuming its last round if interrupted) and write its tables."""
    from ted_fl.data import load_sites
    from ted_fl.engine import run_schedule, summarize
    from ted_fl.local import LocalExecutor

    run = RunDir(path)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    sites = load_sites(cfg.data, split_seed_of(cfg))
    approach, seed = cfg.approaches[0], cfg.seeds[0]
    st = run_schedule(cfg, approach, seed, LocalExecutor(cfg, sites), run, progress)
    metrics = run.write_metrics(st.rows)
    summary = summarize(metrics, {(approach, seed): {"bytes_sent": st.bytes_sent,
                                                    "bytes_received": st.bytes_received, "wall_s": st.wall}})
    summary["val_score"] = val_score(metrics, [s.name for s in sites])
    run.write_summary(summary)
    return {"wall_s": float(st.wall)}


def _ray_cell(cfg_dict: dict[str, Any], path: str, counter: Any) -> dict[str, Any]:
    """The Ray task: rebuild the config, run the cell, report every round to the driver's counter."""
    from ted_fl.config import from_dict

    cfg = from_dict(ExperimentConfig, cfg_dict, "sweep cell")
    return run_cell(cfg, path, lambda info: counter.add.remote(1))


class _Counter:
    """Rounds finished across all running cells (a zero-CPU Ray actor the cells tell)."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def get(self) -> int:
        return self.n


def rounds_of(cell: Cell) -> int:
    """Rounds the cell's schedule runs (joint trains joint_rounds_factor times longer)."""
    from ted_fl.continual.approaches import get_approach
    from ted_fl.data import load_site_set_spec, ordered_sites

    spec = load_site_set_spec(cell.cfg.data.sites)
    n_sites = len(ordered_sites(spec, cell.cfg.data.order))
    factor = cell.cfg.train.joint_rounds_factor if get_approach(cell.approach, cell.cfg.loss).joint else 1.0
    return n_sites * max(1, round(cell.cfg.train.rounds * factor))


class Progress:
    """Rounds and cells over the whole grid, printed as plain lines (at most every `every` s)."""

    def __init__(self, total_rounds: int, total_cells: int, quiet: bool = False, every: float = 5.0) -> None:
        self.total, self.cells, self.quiet, self.every = total_rounds, total_cells, quiet, every
        self.rounds = self.done = 0
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
        frac = self.rounds / self.total if self.total else 1.0
        left = f", ~{el / frac - el:.0f} s left" if 0 < frac < 1 else ""
        print(f"[sweep] rounds {self.rounds}/{self.total}, cells {self.done}/{self.cells} done, "
              f"{el:.0f} s{left}" + (f" | {note}" if note else ""), flush=True)


def run_cells(cells: list[Cell], folder: str | Path, *, parallel: bool = True, quiet: bool = False,
              num_cpus: int | None = None) -> dict[str, Any]:
    """Run every unfinished cell (in parallel on Ray, or one after another here); reuse the rest.

    Raises TedFlError naming the failed cells after the others have finished (those stay
    reusable); returns {"ran": n, "reused": n, "wall_s": s}.
    """
    folder = Path(folder)
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise TedFlError("sweep: two cells resolve to the same configuration; remove the duplicate grid values")
    todo = [c for c in cells if not cell_done(folder / "cells" / c.name, c)]
    reused = len(cells) - len(todo)
    total = sum(rounds_of(c) for c in cells)
    prog = Progress(total, len(cells), quiet)
    prog.update(rounds=total - sum(rounds_of(c) for c in todo), done=reused, force=True,
                note=f"{reused} cell(s) reused" if reused else "")
    for c in todo:
        path = folder / "cells" / c.name
        path.mkdir(parents=True, exist_ok=True)
        (path / "cell.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    failures: list[str] = []
    if todo and parallel:
        failures = _run_on_ray(todo, folder, prog, num_cpus)
    else:
        for c in todo:
            base = prog.rounds
            try:
                run_cell(copy.deepcopy(c.cfg), str(folder / "cells" / c.name),
                         lambda info, base=base: prog.update(rounds=base + 1 + _round_index(info)))
            except TedFlError as exc:
                failures.append(f"{c.name}: {exc}")
                continue
            _mark_done(folder, c)
            prog.update(rounds=base + rounds_of(c), done=prog.done + 1, note=f"{c.name} done")
    wall = time.perf_counter() - t0
    prog.update(rounds=total - sum(rounds_of(c) for c in todo if not cell_done(folder / "cells" / c.name, c)),
                force=bool(todo))
    if failures:
        raise TedFlError(f"sweep: {len(failures)} cell(s) failed ({'; '.join(failures)}); the finished "
                         f"cells are kept under {folder / 'cells'}, rerun to retry the rest")
    return {"ran": len(todo), "reused": reused, "wall_s": wall}


def _round_index(info: dict[str, Any]) -> int:
    """Rounds done within the cell so far, from the schedule's progress callback."""
    return int(info["stage"]) * int(info["rounds"]) + int(info["round"])


def _mark_done(folder: Path, c: Cell) -> None:
    RunDir(folder / "cells" / c.name).write_json(
        "cell.json", {"key": c.key, "approach": c.approach, "seed": c.seed, "point": c.point, "order": c.order})


def _run_on_ray(todo: list[Cell], folder: Path, prog: Progress, num_cpus: int | None) -> list[str]:
    import ray

    fed = todo[0].cfg.federated
    started = not ray.is_initialized()
    if started:
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if fed.ray_address:
            init["address"] = fed.ray_address
        elif num_cpus:
            init["num_cpus"] = num_cpus
        with warnings.catch_warnings():  # Ray's notice about CUDA_VISIBLE_DEVICES for 0-GPU tasks
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(**init)
    failures: list[str] = []
    try:
        counter = ray.remote(num_cpus=0)(_Counter).remote()
        task = ray.remote(_ray_cell).options(num_cpus=fed.num_cpus, num_gpus=fed.num_gpus, max_retries=0)
        refs = {task.remote(to_dict(c.cfg), str(folder / "cells" / c.name), counter): c for c in todo}
        base = prog.rounds
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                c = refs[ref]
                try:
                    ray.get(ref)
                except Exception as exc:  # a cell's error, with the cell named
                    cause = getattr(exc, "cause", None) or exc
                    failures.append(f"{c.name}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}")
                    prog.update(note=f"{c.name} FAILED")
                    continue
                _mark_done(folder, c)
                prog.update(done=prog.done + 1, note=f"{c.name} done")
            prog.update(rounds=base + int(ray.get(counter.get.remote())))
    finally:
        if started:
            ray.shutdown()
    return failures


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
    from ted_fl.markdown import md_table
    from ted_fl.results import atomic_write_bytes

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
    from ted_fl.config import parse_override

    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise TedFlError(f"--grid expects KEY=V1,V2 (e.g. loss.lambda_d=0.01,0.1), got '{item}'")
        key, raw = item.split("=", 1)
        grid[key.strip()] = [parse_override(f"{key}={v.strip()}")[1] for v in raw.split(",") if v.strip()]
    return grid
