"""A run's life, shared by every runner below the command lines: creating and finishing a run
directory, progress, machine information, the report, and the in-process (centralized) execution.

`ted_fl.federated`, `ted_fl.studies`, `ted_fl.bench` and the command lines import this module; it
imports nothing from them (the Flower layer calls down into it, never up).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Callable
from importlib import import_module, metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ted_fl.config import ExperimentConfig, for_seed, split_seed_of, to_dict
from ted_fl.data import check_splits, load_sites, size_note
from ted_fl.files import atomic_write_text
from ted_fl.run.directory import RunDir
from ted_fl.schedule.cells import Job, cell_resources, cell_slots, local_schedule, remember_sites, run_jobs
from ted_fl.schedule.experiment import ResolvedExperiment

if TYPE_CHECKING:
    import pandas as pd


def start_run(exp: ResolvedExperiment, mode: str, argv: list[str], command: list[str] | None = None) -> RunDir:
    """A new run directory with the resolved config (what runs: out channels, the network under DP),
    the notes of its resolution, the exact command and the machine it runs on."""
    cfg = exp.cfg
    run = RunDir.create(cfg.out, f"{cfg.name}-{mode}")
    run.write_config(cfg)
    for note in exp.notes:
        print(note, file=sys.stderr)
        run.log(note)
    # The exact command, so reports and docs can say how the numbers were made.
    words = command if command is not None else ["python", "-m", f"ted_fl.{mode}", *argv]
    atomic_write_text(run.path / "command.txt", shlex.join(words) + "\n")
    run.write_json("machine.json", machine_info())
    return run


class Progress:
    """Stage, round, site, loss and time left, on a rich progress bar (or plain lines), over every
    schedule of a run, also those running at the same time (ted_fl.schedule.cells: it is called from several
    threads). `done`: rounds a resumed run had already finished; the counter starts there and the
    time left is estimated from this session's rounds only."""

    def __init__(self, total_rounds: int, quiet: bool = False, lines: bool | None = None, done: int = 0):
        """`lines`: one printed line per round instead of a bar (default: when stdout is no terminal,
        e.g. the log stream of `flwr run`, where a bar would only appear at the end)."""
        self.quiet = quiet
        self.bar: Any = None
        self.total, self.done, self.t0 = total_rounds, done, time.monotonic()
        self.start = done  # rounds done before this session (a resume)
        self.lock = threading.Lock()
        self.lines = (not sys.stdout.isatty()) if lines is None else lines
        if not quiet and not self.lines:
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
            # `completed` is no progress sample: rich's time left comes from this session's rounds
            self.task = self.bar.add_task("starting" if not done else f"resumed at {done}/{total_rounds}",
                                          total=total_rounds, completed=done)
            self.bar.start()

    def left(self) -> float:
        """Seconds left, from this session's rounds (what a resume had done is not this session's speed)."""
        ran = self.done - self.start
        if ran <= 0:
            return float("nan")
        return (time.monotonic() - self.t0) / ran * max(self.total - self.done, 0)

    def __call__(self, info: dict[str, Any]) -> None:
        desc = (
            f"{info['approach']} s{info['seed']} | stage {info['stage'] + 1}/{info['stages']} "
            f"{info['site']} | round {info['round'] + 1}/{info['rounds']} | loss {info['loss']:.3f}"
        )
        with self.lock:
            self.done += 1
            if self.bar is not None:
                self.bar.update(self.task, advance=1, description=desc)
            elif self.lines and not self.quiet:
                spent = time.monotonic() - self.t0
                print(f"progress: {self.done}/{self.total} | {desc} | {spent:.0f} s, ~{self.left():.0f} s left",
                      flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def schedule_rounds(cfg: ExperimentConfig, approach: str, n_sites: int) -> tuple[int, int]:
    """(stages, rounds a stage) of one approach's schedule (joint trains joint_rounds_factor longer;
    the one-run joint of protocol "reference" is one stage)."""
    from ted_fl.continual.approaches import get_approach

    joint = get_approach(approach, cfg.loss).joint
    factor = cfg.train.joint_rounds_factor if joint else 1.0
    stages = 1 if joint and cfg.protocol == "reference" else n_sites  # one-run joint
    return stages, max(1, round(cfg.train.rounds * factor))


def rounds_done(run: RunDir, cfg: ExperimentConfig, approach: str, seed: int, n_sites: int) -> int:
    """Rounds of one schedule its last checkpoint holds (0 for a fresh one): where a resume starts."""
    st = run.load_checkpoint(approach, seed, "last")
    if not st:
        return 0
    stages, rounds = schedule_rounds(cfg, approach, n_sites)
    if st.get("done"):
        return stages * rounds
    return min(int(st.get("stage", 0)), stages) * rounds + int(st.get("round", 0))


def total_rounds(cfg: ExperimentConfig, n_sites: int) -> int:
    total = 0
    for name in cfg.approaches:
        stages, rounds = schedule_rounds(cfg, name, n_sites)
        total += stages * rounds
    return total * len(cfg.seeds)


Execute = Callable[[ResolvedExperiment, RunDir, bool], dict[tuple[str, int], dict[str, Any]]]


def finish_run(cfg: ExperimentConfig, run: RunDir, extras: dict[tuple[str, int], dict[str, Any]]) -> pd.DataFrame:
    """Gather every (approach, seed) checkpoint's rows into metrics.csv and summary.csv."""
    from ted_fl.schedule.engine import summarize

    rows: list[dict[str, Any]] = []
    audit_logs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for approach in cfg.approaches:
        for seed in cfg.seeds:
            st = run.load_checkpoint(approach, seed, "last")
            if st:
                rows.extend(st["rows"])
                ex = st.get("executor") or {}
                if ex.get("audit"):  # a federated run: what travelled, per site and kind
                    audit_logs[(approach, seed)] = [ex.get("audit_hello", {}), ex["audit"]]
                extras.setdefault((approach, seed), {}).update(
                    bytes_sent=st["bytes_sent"], bytes_received=st["bytes_received"], wall_s=st["wall"]
                )
    if audit_logs:
        from ted_fl.privacy.leakage import audit_frame, leaks

        audit = audit_frame(audit_logs, (cfg.data.size, cfg.data.size))
        atomic_write_text(run.path / "audit.csv", audit.to_csv(index=False))
        bad = leaks(audit)
        if len(bad):  # the audit mod refuses such replies: this would be a bug, said loudly
            run.log(f"warning: audit: {len(bad)} image-shaped record(s) left a site: {bad.to_dict('records')}")
    metrics = run.write_metrics(rows)
    summary = summarize(metrics, extras)
    run.write_summary(summary)
    return summary


def machine_info() -> dict[str, Any]:
    """Where a run ran (CPU, cores, OS, library versions): wall times mean little without it."""
    import psutil
    import torch

    return {
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor(), "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__,
        "flwr": package_version("flwr"), "ray": package_version("ray"),
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
    }


def package_version(name: str) -> str:
    """A package's version from its installed metadata, else its module's `__version__`, else
    "unknown": a run never dies for want of a dist-info folder (a vendored or copied Ray, a zipapp)."""
    try:
        return metadata.version(name)
    except (metadata.PackageNotFoundError, ValueError, OSError):
        pass
    try:
        return str(getattr(import_module(name), "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - any import failure: the version is simply not known
        return "unknown"


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
    if not list(run.path.glob("checkpoints/*/last.pt")):
        shutil.rmtree(run.path, ignore_errors=True)


def mark_run_failed(run: RunDir, error: str, resume: str, new: bool = True) -> bool:
    """A run that stopped on an error: a new one that completed no round is removed; otherwise it is
    marked FAILED (no metrics.csv or summary.csv: nothing that reads as a result), resumable with
    `resume`. The command line and `flwr run` share this rule. True when the directory is kept."""
    if new:
        discard_if_empty(run)
        if not run.path.exists():
            return False
    run.mark_failed(error.splitlines()[0] if error else "error", resume)
    return True


def write_report_if_available(run: RunDir) -> Path | None:
    try:
        from ted_fl.run.html_report import shared_plotlyjs, write_report
    except ImportError:
        return None
    try:  # plotly.js once per output folder, beside the run directories
        return write_report([run.path], run.path / "report.html", plotlyjs=shared_plotlyjs(run.path.parent))
    except Exception as exc:  # the run is already written: a report failure must not lose it
        msg = f"report not written ({type(exc).__name__}: {exc}); retry with python -m ted_fl.report {run.path}"
        print(f"warning: {msg}", file=sys.stderr)
        run.log(f"warning: {msg}")
        return None


_CHECKED: dict[str, list] = {}  # the sites `check_data` loaded, so a run does not load them twice


def check_data(cfg: ExperimentConfig) -> list:
    """Load (or generate) the sites and check the splits a run needs: the data half of validation,
    shared by every entry point (before a run directory, torch, Flower or Ray)."""
    if cfg.data.split_seed == "seed" and len(cfg.seeds) > 1:  # each seed's own split: check them all
        per_seed = [check_data(for_seed(cfg, seed)) for seed in cfg.seeds]
        return per_seed[0]
    key = repr((cfg.data, cfg.seeds if cfg.data.split_seed == "seed" else None, cfg.train.select_best,
                cfg.train.eval_val_all))
    if key not in _CHECKED:
        sites = load_sites(cfg.data, split_seed_of(cfg))
        # Before Ray or any training starts: a split a run needs but a site lacks is one clear error.
        check_splits(sites, need_val=cfg.train.select_best or cfg.train.eval_val_all)
        _CHECKED.clear()  # one entry: the arrays are not kept beyond the run they were checked for
        _CHECKED[key] = sites
    return _CHECKED[key]


def data_warnings(cfg: ExperimentConfig, sites: list) -> list[str]:
    """What the data deserves a word about (a missing mask, a replaced site size): one line each, the
    same lines for --check and the run."""
    lines = [f"warning: {s.name}: {w}" for s in sites for w in s.warnings]
    note = size_note(cfg.data)
    return [*lines, f"note: {note}"] if note else lines


def load_and_record_sites(cfg: ExperimentConfig, run: RunDir) -> list:
    """Load (or generate) the sites once, record the splits and warnings with the run."""
    sites = check_data(cfg)
    if cfg.data.split_seed == "seed" and len(cfg.seeds) > 1:  # one split per run seed: {"seed<k>": {site: ...}}
        run.write_json("splits.json", {f"seed{seed}": {s.name: s.manifest for s in check_data(for_seed(cfg, seed))}
                                       for seed in cfg.seeds})
    else:
        run.write_json("splits.json", {s.name: s.manifest for s in sites})
    for line in data_warnings(cfg, sites):
        if not (line.startswith("note:") and line in _NOTED):  # a study's cells share one note
            print(line, file=sys.stderr)
        _NOTED.add(line)
        run.log(line)
    return sites


_NOTED: set[str] = set()  # the notes this process has printed

def execute_centralized(exp: ResolvedExperiment, run: RunDir, quiet: bool) -> dict[tuple[str, int], dict[str, Any]]:
    """Every (approach, seed) of the resolved experiment in-process, `train.cells_in_parallel` of them at once
    (ted_fl.schedule.cells; each cell gets the resolved config and checks nothing again)."""
    cfg = exp.cfg
    sites = load_and_record_sites(cfg, run)
    cells = [(a, s) for a in cfg.approaches for s in cfg.seeds]
    slots = cell_slots(cfg, len(cells))
    remember_sites(cfg, sites)  # a cell run here (one slot) reuses the checked sites
    data = to_dict(cfg)
    jobs = [Job(f"{a} seed {s}", local_schedule, (data, str(run.path), a, s)) for a, s in cells]
    if slots > 1:
        run.log(f"{len(jobs)} cells, {slots} at once (train.cells_in_parallel = {cfg.train.cells_in_parallel})")
    record = run.record  # Ray's processes, once it runs
    progress = Progress(total_rounds(cfg, len(sites)), quiet, done=run_rounds_done(cfg, run, len(sites)))

    def on_round(info: dict[str, Any]) -> None:
        progress(info)
        if record is not None and slots > 1:  # Ray's workers start with the cells: keep processes.json current
            record.update(f"{info['approach']} seed {info['seed']} stage {info['stage']} round {info['round']}")

    try:
        _, failures = run_jobs(jobs, slots, on_round, resources=cell_resources(cfg),
                               ray_address=cfg.federated.ray_address,
                               on_start=(lambda: record.update("cells on Ray")) if record is not None else None)
    finally:
        progress.close()
    failures.raise_first()
    return {}


def run_rounds_done(cfg: ExperimentConfig, run: RunDir, n_sites: int) -> int:
    """Rounds every (approach, seed) of a run had finished before this session (a resume starts there)."""
    return sum(rounds_done(run, cfg, a, s, n_sites) for a in cfg.approaches for s in cfg.seeds)


def prune_run(cfg: ExperimentConfig, run: RunDir) -> None:
    """Keep what `output.checkpoints` asks for once the run has ended (see OutputConfig): the slim
    resume file (its rows and counters, no weights), the stage models, and no client state."""
    policy = cfg.output.checkpoints
    if policy == "all":
        return
    shutil.rmtree(run.client_state_dir, ignore_errors=True)  # optimizer moments: only a resume needs them
    for approach in cfg.approaches:
        for seed in cfg.seeds:
            st = run.load_checkpoint(approach, seed, "last")
            if not st or not st.get("done"):
                continue
            if st.get("weights") is not None:
                st.update(weights=None, teacher=None, best_weights=None, aux={})
                run.save_checkpoint(approach, seed, "last", st)
            if policy == "resume":
                stages = sorted(run.ckpt_dir(approach, seed).glob("stage*.pt"), key=lambda p: int(p.stem[5:]))
                for p in stages[:-1]:  # the final model stays
                    p.unlink()


def disk_use(path: Path) -> str:
    """The run directory's size, in words ('12.3 MB in 25 files')."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return f"{size / 1e6:.1f} MB in {len(files)} files"
