"""Launch the ServerApp and one ClientApp per site (and client) on Flower's Ray simulation backend."""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ted_fl.config import ExperimentConfig
from ted_fl.data import site_order
from ted_fl.errors import TedFlError
from ted_fl.federated.notices import silence
from ted_fl.run import processes
from ted_fl.run.directory import RunDir
from ted_fl.run.processes import Terminated
from ted_fl.schedule.cells import Failures, Job, cell_slots, run_jobs
from ted_fl.schedule.experiment import ResolvedExperiment
from ted_fl.schedule.lifecycle import Progress, load_and_record_sites, run_rounds_done, total_rounds

T = TypeVar("T")


def backend_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """Client resources (CPUs, GPU fractions) and Ray's init arguments from the configuration."""
    fed = cfg.federated
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if fed.ray_address:
        init_args["address"] = fed.ray_address
    return {
        "client_resources": {"num_cpus": fed.num_cpus, "num_gpus": fed.num_gpus},
        "init_args": init_args,
    }


POLL_S = 0.1  # fallback period of the hand-over (as Flower), which a push wakes at once; polling N nodes costs CPU
PULL_S = 0.001  # how often the ServerApp's grid checks for replies (Flower: 0.1 s)
_PUSHED = threading.Event()  # set when the ServerApp pushes messages: hand them over at once
_HANDOVER_PARAMS = ["state", "queue", "nodes_mapping", "f_stop"]  # vce_api.add_messages_to_queue in flwr 1.41


def polling_patch_problem() -> str:
    """Why the latency patch cannot apply to the installed Flower ('' when it can)."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError as exc:
        return f"Flower's simulation internals moved ({exc})"
    original = getattr(vce_api, "add_messages_to_queue", None)
    if original is None:
        return "flwr's vce_api.add_messages_to_queue is gone"
    if list(inspect.signature(original).parameters) != _HANDOVER_PARAMS:
        return f"flwr's vce_api.add_messages_to_queue changed shape {inspect.signature(original)}"
    if "target=add_messages_to_queue" not in inspect.getsource(vce_api.run_api):
        return "flwr's vce_api.run_api no longer starts add_messages_to_queue"
    if "pull_interval" not in inspect.signature(InMemoryGrid).parameters:
        return "flwr's InMemoryGrid has no pull_interval"
    return ""


@contextlib.contextmanager
def fast_message_polling(wanted: bool) -> Iterator[bool]:
    """While inside, cut Flower's simulation message latency from ~0.1 s to ~1 ms per exchange.

    Flower 1.41's simulation runtime moves messages to the Ray backend from a thread that
    polls the link state every 0.1 s (`vce_api.add_messages_to_queue`), and the server's
    `InMemoryGrid` polls for replies every 0.1 s: ~0.1 s of idle latency per round on top of
    the training (measured by `python -m ted_fl.bench overhead`). With `federated.fast_polling`
    the hand-over thread wakes as soon as the ServerApp pushes (`fast_grid` sets `_PUSHED`),
    else every POLL_S, and the grid polls for replies every PULL_S. It replaces a private
    Flower function, so it is off by default; when asked for and Flower has changed, one
    warning line says so and Flower's own path runs. Yields whether the patch is in place.
    """
    if not wanted:
        yield False
        return
    problem = polling_patch_problem()
    if problem:
        warnings.warn(f"federated.fast_polling: not applied, {problem}; Flower's own polling is used",
                      RuntimeWarning, stacklevel=3)
        yield False
        return
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue

    def add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
        while not f_stop.is_set():
            _PUSHED.clear()
            for node_id in list(nodes_mapping):
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            _PUSHED.wait(POLL_S)

    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original


def fast_grid(grid: Any) -> None:
    """The ServerApp's side of `fast_message_polling`: wake the hand-over on push, poll replies often."""
    if getattr(grid, "_ted_fl", False):
        return
    grid.pull_interval = PULL_S
    push = grid.push_messages

    def push_messages(messages: Any) -> Any:
        ids = push(messages)
        _PUSHED.set()
        return ids

    grid.push_messages = push_messages
    grid._ted_fl = True


def _client_error(record: Any) -> bool:
    """A record Flower logs when a ClientApp call fails (its message and its traceback): the
    server already prints one warning line for it and retries, skips or aborts as configured."""
    path = record.pathname.replace("\\", "/")
    return record.levelno >= logging.ERROR and (
        (path.endswith("fleet/vce/vce_api.py") and record.funcName == "worker") or "/ray_transport/" in path)


@contextlib.contextmanager
def client_errors_to_log(run: RunDir | None) -> Iterator[None]:
    """Route Flower's own logging of a failing client (a 75-line traceback) to `run.log`, off the
    terminal; every other Flower record (and a crash of the runtime itself) still shows."""
    from flwr.common.logger import FLOWER_LOGGER

    class Divert(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not _client_error(record):
                return True
            if run is not None:
                run.log(f"flower: {record.getMessage()}")
            return False

    divert = Divert()
    FLOWER_LOGGER.addFilter(divert)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(divert)


def load_app(reference: str) -> Any:
    """The object named by 'module:attribute' (Flower's own way of naming an app)."""
    module, _, attr = reference.partition(":")
    try:
        return getattr(importlib.import_module(module), attr or "app")
    except (ImportError, AttributeError) as exc:
        raise TedFlError(f"federated.client_app = '{reference}' cannot be loaded ({exc}); "
                         "name a ClientApp as module:attribute") from None


def launch(cfg: ExperimentConfig, client_app: Any, num_nodes: int, serve: Callable[[Any], T],
           run: RunDir | None = None) -> T:
    """Run `serve(grid)` as the ServerApp of one Flower simulation on Ray (Ray starts once), with
    `client_app` on `num_nodes` nodes and the config's resources and polling; an error raised in
    `serve` is raised here, after the simulation has shut down. Flower's record of a failing
    client goes to `run`'s run.log (client_errors_to_log); a signal stops the ServerApp's waits."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    silence()  # Flower's run_simulation banner and Ray's accelerator tip (see ted_fl.federated.notices)
    out: list[T] = []
    error: list[BaseException] = []
    server = ServerApp()
    fast = {"on": False}

    @server.main()
    def _main(grid: Grid, context: Any) -> None:
        if fast["on"]:
            fast_grid(grid)
        stoppable_grid(grid)
        try:
            out.append(serve(grid))
        except BaseException as exc:  # surfaced after the simulation shuts down
            error.append(exc)

    # Ray's driver would install absl's failure handler for SIGTERM (abort, exit -6, nothing cleaned
    # up) over ted_fl.run.processes.graceful_signals; without it SIGTERM shuts Ray down cleanly.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    with fast_message_polling(cfg.federated.fast_polling) as fast["on"], client_errors_to_log(run):
        run_simulation(server_app=server, client_app=client_app, num_supernodes=num_nodes,
                       backend_config=backend_config(cfg))
    if error:
        raise error[0]
    if not out:
        raise TedFlError("the Flower simulation ended before its ServerApp returned")
    return out[0]


def simulate_groups(
    groups: list[tuple[ExperimentConfig, RunDir]],
    num_nodes: int,
    progress: Any = None,
) -> list[dict[tuple[str, int], dict[str, Any]]]:
    """Serve every (config, run directory) in turn inside ONE Flower simulation (Ray starts once).

    Every configuration must use the same client nodes (same sites and clients per site); each
    gets its own FlowerExecutor, whose hello carries that configuration to the clients.
    """
    from ted_fl.federated.server_app import serve

    first = groups[0][0]
    return launch(first, load_app(first.federated.client_app), num_nodes,
                  lambda grid: [serve(grid, cfg, run, progress, simulated=True) for cfg, run in groups],
                  run=groups[0][1])


def stoppable_grid(grid: Any) -> None:
    """Make the ServerApp thread give up waiting for replies once a signal set `processes.STOP`
    (else Python waits for it at exit, up to federated.timeout, with Ray already gone)."""
    stop = processes.STOP  # this run's event (the next run in this process gets a fresh one)
    pull = grid.pull_messages

    def pull_messages(*args: Any, **kwargs: Any) -> Any:
        if stop.is_set():
            raise Terminated("stopped")
        return pull(*args, **kwargs)

    grid.pull_messages = pull_messages


def federated_slots(cfg: ExperimentConfig, n_cells: int, run: RunDir | None = None) -> int:
    """Schedules at once in one simulation (`ted_fl.schedule.cells.cell_slots` for federated cells), but one under
    client-level DP: Flower's DP strategies draw the server's noise from numpy's global generator,
    which schedules running as threads of one process would share."""
    slots = cell_slots(cfg, n_cells, federated=True)
    if slots > 1 and cfg.privacy.dp == "client":
        if run is not None:
            run.log("privacy.dp = 'client': the schedules run one after another (the server's DP noise comes "
                    "from numpy's global generator, shared by schedules running at once)")
        return 1
    return slots


FedCell = tuple[str, ExperimentConfig, RunDir, str, int]  # (name, config, run directory, approach, seed)


def simulate_cells(cells: list[FedCell], slots: int, progress: Any = None, keep_going: bool = False,
                   on_done: Callable[[Any, Any], None] | None = None) -> tuple[dict[str, Any], Any]:
    """Every federated cell in ONE Flower simulation, `slots` schedules at once.

    Why one simulation: Ray and Flower start once, and the client actors (as many as
    `federated.num_cpus` / `num_gpus` let Ray place) serve every schedule, so a second schedule uses
    the CPU or GPU share the first leaves idle while the server aggregates, evaluates or waits.
    Why a block of SuperNodes per schedule rather than all schedules over the same nodes: a simulated
    SuperNode is only a partition id and a `Context` (the actors do the work), and Flower's simulation
    hands a node's context to whichever message of that node runs, with no lock: two schedules on one
    node at once would overwrite each other's node state (the frozen teacher, the audit's counters).
    With one block each, every node keeps today's invariant (one message in flight, one schedule's
    state), its hello carries its own schedule's configuration, and what travels and the audit stay per
    cell, byte for byte as one cell alone. A cell's numbers do not depend on the actor that serves a
    round: every round reseeds its generators, and the optimizer state is kept per schedule on the
    site's disk (`client_app._state_file`).

    `cells` must share [data] and clients_per_site (one site set, served by every block). Returns
    (fault columns by cell name, ted_fl.schedule.cells.Failures).
    """
    from ted_fl.federated.server_app import node_blocks

    first, run0 = cells[0][1], cells[0][2]
    for _, cfg, _, _, _ in cells:
        if cfg.data != first.data or cfg.federated.clients_per_site != first.federated.clients_per_site:
            raise TedFlError("cells of one simulation must share [data] and federated.clients_per_site "
                             "(one set of client nodes); drop those keys from --grid")

    per = len(site_order(first.data)) * first.federated.clients_per_site
    slots = max(1, min(slots, len(cells)))

    def main(grid: Any) -> tuple[dict[str, Any], Failures]:
        blocks: list[list[int] | None] = list(node_blocks(grid, first, slots, run0)) if slots > 1 else [None]
        jobs = [Job(name, _serve_cell, (grid, copy.deepcopy(cfg), run, approach, seed, blocks))
                for name, cfg, run, approach, seed in cells]
        return run_jobs(jobs, slots, progress, where="thread", keep_going=keep_going, on_done=on_done)

    return launch(first, load_app(first.federated.client_app), per * slots, main, run=run0)


def _serve_cell(grid: Any, cfg: ExperimentConfig, run: RunDir, approach: str, seed: int,
                blocks: list[list[int] | None], *, progress: Any, slot: int) -> dict[str, Any]:
    from ted_fl.federated.server_app import serve_one

    return serve_one(grid, cfg, run, approach, seed, progress, simulated=True, nodes=blocks[slot])


def execute_federated(exp: ResolvedExperiment, run: RunDir, quiet: bool) -> dict[tuple[str, int], dict[str, Any]]:
    """Every approach and seed of the resolved experiment in one Flower simulation (Ray starts once),
    train.cells_in_parallel schedules at once (`simulate_cells`; the server checks nothing again)."""
    cfg = exp.cfg
    # The launcher checks the data and writes the synthetic twin's files once; the server never
    # sees the arrays (each client loads its own site).
    sites = load_and_record_sites(cfg, run)
    cells: list[FedCell] = [(f"{a} seed {s}", cfg, run, a, s) for a in cfg.approaches for s in cfg.seeds]
    slots = federated_slots(cfg, len(cells), run)
    if slots > 1:
        run.log(f"{len(cells)} cells, {slots} at once (train.cells_in_parallel = {cfg.train.cells_in_parallel})")
    progress = Progress(total_rounds(cfg, len(sites)), quiet, done=run_rounds_done(cfg, run, len(sites)))
    record = run.record  # when a command line runs this
    lock = threading.Lock()

    def on_round(info: dict[str, Any]) -> None:
        progress(info)
        if record is not None:  # Ray may have started workers since: keep processes.json current
            with lock:
                record.update(f"{info['approach']} seed {info['seed']} stage {info['stage']} round {info['round']}")

    try:
        results, failures = simulate_cells(cells, slots, on_round)
    finally:
        progress.close()
    failures.raise_first()
    return {(a, s): results[name] for name, _, _, a, s in cells}
