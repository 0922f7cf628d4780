"""One runner for every command: independent schedules ("cells") run at the same time.

A cell is one schedule that shares nothing with the others: one (approach, seed) of `centralized`
and `simulate`, one (approach, seed, grid point, order) of `sweep` and `study`. Each writes only its
own files (its checkpoints in the run directory, or a run directory of its own), so cells may run in
any order and at once. `run_jobs` runs them, `cell_slots` says how many at once
(`train.cells_in_parallel`: "auto" or a number), and the caller's progress display is told every
round of every cell (`ted_fl.schedule.lifecycle.Progress` counts them all, from what a resumed run had done).

Where cells run:

- one at a time (1 slot): here, one after another, as before this runner existed;
- several in-process schedules (`centralized`, `sweep`, `study` without --federated): one Ray task
  per cell with `train.threads` CPUs and, where a GPU is visible, a share of it
  (`federated.num_gpus`, else 1 / GPU_CELLS), on this machine or on the cluster of
  `federated.ray_address`. A process per cell, not a thread: a schedule seeds the global generators of
  torch, numpy and Python and pins torch's thread count, all of which are per process;
- several federated schedules (`simulate`, `study --federated`): threads of one ServerApp in one Flower
  simulation, each driving its schedule over its own block of simulated SuperNodes
  (`ted_fl.federated.simulation` says why).

Numbers: what a cell computes depends on its configuration and seed only. Every round reseeds its
generators from (seed, stage, round, site), and the thread count a cell trains with is
`train.threads`, part of its configuration and set in every process that trains: running cells at
the same time never changes it (tests/integration/test_cells.py compares both ways, exactly).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ted_fl.config import ExperimentConfig, for_seed, from_dict, split_seed_of
from ted_fl.errors import TedFlError

GPU_CELLS = 8  # cells sharing one GPU under "auto" without federated.num_gpus (issue 22: 8 processes ~7x one)
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class Job:
    """One cell: `fn(*args, progress=..., slot=...)` runs it and returns its result.

    `fn` is a module-level function (it travels by name into a Ray task); `progress` is called with
    every finished round's info; `slot` is which of the runner's slots runs it (0 .. slots - 1; the
    federated runner gives each slot its own SuperNodes)."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


def usable_cpus() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_count(cfg: ExperimentConfig) -> int:
    """GPUs the cells may use: none when train.device = "cpu"."""
    if cfg.train.device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cell_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one in-process cell holds on Ray: train.threads CPUs, and a GPU share where one is visible
    (Ray hides the GPUs from a task given none, and the in-process run would have used one)."""
    gpus = 0.0
    if gpu_count(cfg):
        gpus = cfg.federated.num_gpus or 1.0 / GPU_CELLS
    return {"num_cpus": float(max(1, cfg.train.threads)), "num_gpus": float(gpus)}


def cell_slots(cfg: ExperimentConfig, n_cells: int, federated: bool = False) -> int:
    """How many cells run at once: train.cells_in_parallel, or under "auto" as many as the machine holds.

    "auto": CPU cores / CPUs per cell (train.threads; a federated cell's client holds federated.num_cpus),
    at most GPU_CELLS (or 1 / federated.num_gpus) per visible GPU; with federated.ray_address every
    cell is handed to the cluster, whose scheduler runs what its resources allow.
    """
    want = cfg.train.cells_in_parallel
    if n_cells <= 1:
        return 1
    if want != "auto":
        return min(int(want), n_cells)
    if cfg.federated.ray_address and not federated:
        return n_cells
    per_cell = cfg.federated.num_cpus if federated else max(1, cfg.train.threads)
    slots = max(1, int(usable_cpus() // max(per_cell, 1e-9)))
    gpus = gpu_count(cfg)
    if gpus and (cfg.federated.num_gpus or not federated):
        share = cfg.federated.num_gpus or 1.0 / GPU_CELLS
        slots = min(slots, max(1, int(gpus / share + 1e-9)))
    return max(1, min(slots, n_cells))


class Failures(dict[str, BaseException]):
    """The cells that failed, by name, in the order they failed."""

    def raise_first(self, what: str = "cell") -> None:
        """One error for the caller: the only failure as it was, or one line naming every failed cell."""
        if not self:
            return
        errors = list(self.values())
        for exc in errors:
            if isinstance(exc, KeyboardInterrupt):
                raise exc
        if len(errors) == 1:
            raise errors[0]
        raise TedFlError(f"{len(errors)} {what}s failed: "
                         + "; ".join(f"{name}: {_line(exc)}" for name, exc in self.items()))


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}" if not isinstance(exc, TedFlError) else str(exc)


def run_jobs(jobs: list[Job], slots: int, progress: ProgressFn | None = None, *, where: str = "process",
             resources: dict[str, float] | None = None, ray_address: str = "", keep_going: bool = False,
             on_done: Callable[[Job, Any], None] | None = None, on_start: Callable[[], None] | None = None,
             ) -> tuple[dict[str, Any], Failures]:
    """Run every job, `slots` at a time: here one after another (1 slot), as Ray tasks (`where`
    "process") or as threads of this process ("thread", for jobs that only wait on others, e.g. a
    ServerApp's schedules). Returns (results by name, failures by name).

    A failure stops new jobs from starting unless `keep_going` (what is running finishes, and its
    checkpoints stay for a resume); Ctrl-C or SIGTERM stops everything. `on_done(job, result)` is
    called here as each job succeeds; `on_start()` once Ray runs (to record its processes).
    """
    results: dict[str, Any] = {}
    failures = Failures()
    if not jobs:
        return results, failures
    say = progress or (lambda info: None)
    if slots <= 1:
        for job in jobs:
            try:
                results[job.name] = job.fn(*job.args, progress=say, slot=0)
            except TedFlError as exc:
                failures[job.name] = exc
                if not keep_going:
                    break
                continue
            if on_done:
                on_done(job, results[job.name])
        return results, failures
    if where == "thread":
        _thread_jobs(jobs, slots, say, keep_going, on_done, results, failures)
    else:
        _ray_jobs(jobs, slots, say, resources or {"num_cpus": 1.0, "num_gpus": 0.0}, ray_address, keep_going,
                  on_done, on_start, results, failures)
    return results, failures


def _thread_jobs(jobs: list[Job], slots: int, say: ProgressFn, keep_going: bool,
                 on_done: Callable[[Job, Any], None] | None, results: dict[str, Any], failures: Failures) -> None:
    queue = list(jobs)
    lock = threading.Lock()
    stop = threading.Event()

    def work(slot: int) -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            try:
                out = job.fn(*job.args, progress=say, slot=slot)
            except BaseException as exc:  # noqa: BLE001  (handed to the caller with the cell named)
                with lock:
                    failures[job.name] = exc
                if isinstance(exc, KeyboardInterrupt) or not keep_going:
                    stop.set()
                continue
            with lock:
                results[job.name] = out
                if on_done:
                    on_done(job, out)

    threads = [threading.Thread(target=work, args=(k,), name=f"ted-fl-cell-{k}", daemon=True)
               for k in range(min(slots, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class _Inbox:
    """A zero-CPU Ray actor: the cells' round infos, until the driver collects them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def put(self, info: dict[str, Any]) -> None:
        self.items.append(info)

    def drain(self) -> list[dict[str, Any]]:
        out, self.items = self.items, []
        return out


def _remote(fn: Callable[..., Any], args: tuple[Any, ...], slot: int, inbox: Any) -> Any:
    """The Ray task: run the cell, tell the driver every round."""
    return fn(*args, progress=lambda info: inbox.put.remote(dict(info)), slot=slot)


def _ray_jobs(jobs: list[Job], slots: int, say: ProgressFn, resources: dict[str, float], ray_address: str,
              keep_going: bool, on_done: Callable[[Job, Any], None] | None, on_start: Callable[[], None] | None,
              results: dict[str, Any], failures: Failures) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if ray_address:
            init["address"] = ray_address
        else:  # room for `slots` cells even where it is more than the cores (an explicit number)
            init["num_cpus"] = max(usable_cpus(), int(slots * resources["num_cpus"] + 0.999))
        # Ray's driver would install absl's failure handler for SIGTERM over ted_fl.run.processes.graceful_signals
        os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        with warnings.catch_warnings():  # Ray's notice about CUDA_VISIBLE_DEVICES for 0-GPU tasks
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(**init)
    try:
        if on_start:
            on_start()
        inbox: Any = ray.remote(num_cpus=0)(_Inbox).remote()  # an actor handle
        task: Any = ray.remote(_remote).options(num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"],
                                           max_retries=0)
        queue = list(enumerate(jobs))
        running: dict[Any, tuple[int, Job]] = {}
        free = list(range(slots))
        while queue or running:
            while queue and free and (keep_going or not failures):
                k, job = queue.pop(0)
                slot = free.pop(0)
                running[task.remote(job.fn, job.args, slot, inbox)] = (slot, job)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for info in ray.get(inbox.drain.remote()):
                say(info)
            for ref in ready:
                slot, job = running.pop(ref)
                free.append(slot)
                try:
                    results[job.name] = ray.get(ref)
                except Exception as exc:  # the cell's own error, with the cell named by the caller
                    failures[job.name] = getattr(exc, "cause", None) or exc
                    continue
                if on_done:
                    on_done(job, results[job.name])
        for info in ray.get(inbox.drain.remote()):
            say(info)
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------- the cells
_SITES: dict[str, Any] = {}  # per process: the sites a cell loaded, for the next cell with the same data


def local_schedule(cfg_dict: dict[str, Any], path: str, approach: str, seed: int, *,
                   progress: ProgressFn, slot: int) -> dict[str, Any]:
    """One (approach, seed) of a run, in-process (`ted_fl.schedule.in_process.LocalExecutor`), into the run directory
    at `path` (its own checkpoints only: several run at once). Returns the schedule's cost columns."""
    from ted_fl.run.directory import RunDir
    from ted_fl.schedule.engine import run_schedule
    from ted_fl.schedule.in_process import LocalExecutor

    cfg = for_seed(from_dict(ExperimentConfig, cfg_dict, "cell"), seed)  # data.split_seed = "seed": its own split
    st = run_schedule(cfg, approach, seed, LocalExecutor(cfg, sites_of(cfg)), RunDir(path), progress)
    return {"bytes_sent": st.bytes_sent, "bytes_received": st.bytes_received, "wall_s": st.wall}


def sites_of(cfg: ExperimentConfig) -> list[Any]:
    """The sites of `cfg` (loaded once per process and data configuration; one seed's split under
    data.split_seed = "seed")."""
    from ted_fl.data import load_sites

    key = repr(cfg.data)
    if key not in _SITES:
        _SITES.clear()
        _SITES[key] = load_sites(cfg.data, split_seed_of(cfg))
    return _SITES[key]


def remember_sites(cfg: ExperimentConfig, sites: list[Any]) -> None:
    """Sites already loaded here (the run's data check): a cell that runs in this process reuses them
    (not under data.split_seed = "seed", where every seed loads its own split)."""
    if cfg.data.split_seed != "seed":
        _SITES.clear()
        _SITES[repr(cfg.data)] = sites
