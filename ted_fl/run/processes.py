"""Clean exits: no process of a run outlives it.

A run starts Ray (GCS, raylet, dashboard and runtime-env agents, one worker per client) and, under
`flwr run`, a SuperLink and a SuperExec. Three layers make sure none of them survives the run:

- `graceful_signals`: SIGTERM (and SIGHUP) become `Terminated` in the main thread, like SIGINT
  becomes KeyboardInterrupt, so every `finally` runs (Flower's simulation shuts Ray down there) and
  `STOP` tells the ServerApp thread to give up its wait for replies;
- `ProcessRecord`: the run directory's `processes.json` names the process that drives the run and
  every process it started (pid and start time, so a recycled pid is never mistaken for one of
  them). A clean end kills what is left of them and deletes the file; after SIGKILL the file
  stays, and the next run in the same output folder, or `--resume`, ends the orphans (`reap_stale`);
- `ted_fl.federated.reaper`: under `flwr run`, stops the SuperLink that `flwr run` started once
  its last run has ended (finished, failed or interrupted).

A zombie (a process that has exited but whose parent has not collected it) counts as ended
everywhere here (`is_gone`); psutil's own `is_running()` says True for it.

Imports only the standard library and psutil (lazily): the command lines import it before parsing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ted_fl.errors import TedFlError
from ted_fl.files import atomic_write_text

RECORD = "processes.json"
STOP = threading.Event()  # set on SIGINT / SIGTERM: the ServerApp thread stops waiting for replies


def stop_waiting() -> None:
    """Tell the run's threads to stop (sets `STOP`), and give the next run in this process a fresh
    event: threads of the ended run hold the old, set one."""
    global STOP
    STOP.set()
    STOP = threading.Event()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C (exit 130 after cleaning up, resumable)."""


@contextlib.contextmanager
def graceful_signals() -> Iterator[None]:
    """While inside (main thread only), SIGTERM / SIGHUP raise `Terminated` and SIGINT sets `STOP`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, _frame: Any) -> None:
        STOP.set()
        raise Terminated(signal.Signals(signum).name)

    def on_int(signum: int, frame: Any) -> None:
        STOP.set()
        signal.default_int_handler(signum, frame)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    signal.signal(signal.SIGINT, on_int)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _identity(proc: Any) -> dict[str, Any]:
    return {"pid": proc.pid, "start": proc.create_time(), "name": proc.name()}


def is_gone(proc: Any) -> bool:
    """Whether a process has ended: exited, never found, or a zombie (it has exited; only its parent
    has not collected its status yet, and it holds no resources). `psutil.Process.is_running()` is
    True for a zombie, and its `cmdline()` raises `psutil.ZombieProcess`: never use them alone."""
    import psutil

    if proc is None:
        return True
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # also psutil.ZombieProcess
        return True
    except psutil.AccessDenied:
        return False


def cmdline(proc: Any) -> list[str]:
    """A process's command line; [] for one that has ended or become a zombie, or is not ours to read."""
    import psutil

    try:
        return list(proc.cmdline())
    except psutil.Error:  # NoSuchProcess, ZombieProcess, AccessDenied
        return []


def _alive(entry: dict[str, Any]) -> Any:
    """The psutil.Process of a recorded entry if it still runs (same pid AND start time, not a
    zombie), else None."""
    import psutil

    try:
        proc = psutil.Process(int(entry["pid"]))
        if abs(proc.create_time() - float(entry["start"])) > 0.01 or is_gone(proc):
            return None
        return proc
    except (psutil.Error, KeyError, ValueError, TypeError):
        return None


def terminate(procs: Iterable[Any], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds; returns how many processes were ended. Zombies
    are skipped: they have ended already (waiting on one that is not our child would last `grace`)."""
    import psutil

    procs = [p for p in procs if not is_gone(p)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return len(procs)


class ProcessRecord:
    """`processes.json` of a run directory: the driver and the processes it started."""

    def __init__(self, run_path: str | Path) -> None:
        import psutil

        self.path = Path(run_path) / RECORD
        self.me = psutil.Process()
        self.before = {p.pid for p in self.me.children(recursive=True)}  # not ours: started earlier
        self.known: dict[int, dict[str, Any]] = {}  # every process recorded so far (pid -> identity)

    def children(self) -> list[Any]:
        import psutil

        out = []
        for p in self.me.children(recursive=True):
            if p.pid in self.before:
                continue
            with contextlib.suppress(psutil.Error):
                out.append(p)
        return out

    def update(self, note: str = "") -> None:
        """Write (or refresh) the record: call whenever the run may have started new processes."""
        import psutil

        for p in self.children():
            with contextlib.suppress(psutil.Error):
                self.known[p.pid] = _identity(p)
        entries = list(self.known.values())  # also those already orphaned (a worker whose raylet ended)
        data = {"driver": _identity(self.me), "processes": entries, "note": note,
                "ray_session": _ray_session()}
        atomic_write_text(self.path, json.dumps(data, indent=1))

    def close(self) -> int:
        """The run ended (cleanly, by a signal or an error): end what it left, drop the record."""
        left = {p.pid: p for p in self.children() if not is_gone(p)}
        for entry in self.known.values():  # reparented away from this process, e.g. a Ray worker
            proc = _alive(entry)
            if proc is not None:
                left.setdefault(proc.pid, proc)
        n = terminate(left.values()) if left else 0
        self.path.unlink(missing_ok=True)
        return n


def _ray_session() -> str:
    """The Ray session directory of this process, if Ray runs here (for the record, and a human)."""
    if "ray" not in sys.modules:
        return ""
    try:
        import ray

        node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001
        return str(node.get_session_dir_path()) if node is not None else ""
    except Exception:
        return ""


def reap_stale(run_path: str | Path) -> int:
    """End the processes a killed run left (its driver gone); returns how many. A run whose driver
    still runs is not stale: `TedFlError` says so (two drivers must not write one directory)."""
    path = Path(run_path) / RECORD
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(data, dict):
        path.unlink(missing_ok=True)
        return 0
    driver = data.get("driver") or {}
    if _alive(driver) is not None and int(driver["pid"]) != os.getpid():
        raise TedFlError(f"{Path(run_path)} is still being run by process {driver['pid']}; stop it first "
                         f"(kill {driver['pid']}) or wait for it to end")
    left = [p for p in (_alive(e) for e in data.get("processes") or [] if isinstance(e, dict)) if p is not None]
    n = terminate(left) if left else 0
    path.unlink(missing_ok=True)
    return n


def reap_folder(out: str | Path) -> int:
    """`reap_stale` for every run directory of an output folder (a new run cleans up after killed ones)."""
    total = 0
    folder = Path(out)
    if not folder.is_dir():
        return 0
    for record in folder.glob(f"*/{RECORD}"):
        with contextlib.suppress(TedFlError):  # still running: another live run, leave it alone
            total += reap_stale(record.parent)
    return total
