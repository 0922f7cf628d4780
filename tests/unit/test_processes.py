"""Clean exits: the record of a run's processes, the clean-up of what a killed run left, signals,
and the reaper that stops the SuperLink `flwr run` started (real processes, no Ray)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ted_fl.errors import TedFlError
from ted_fl.federated.reaper import is_flwr_run, is_managed_superlink
from ted_fl.federated.reaper import main as reaper_main
from ted_fl.processes import (
    RECORD,
    ProcessRecord,
    Terminated,
    graceful_signals,
    reap_folder,
    reap_stale,
)


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "120"], start_new_session=True)


def ident(p: subprocess.Popen) -> dict:
    return {"pid": p.pid, "start": psutil.Process(p.pid).create_time(), "name": "sleep"}


def gone(p: subprocess.Popen) -> bool:
    try:
        p.wait(timeout=10)
        return True
    except subprocess.TimeoutExpired:
        return False


def write_record(run: Path, driver: dict, procs: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / RECORD).write_text(json.dumps({"driver": driver, "processes": procs}))


DEAD_DRIVER = {"pid": 2**22 + 7, "start": 1.0, "name": "python"}  # above pid_max on most systems: never alive


def test_a_killed_runs_processes_are_ended_and_the_record_dropped(tmp_path: Path) -> None:
    left, bystander = sleeper(), sleeper()
    try:
        write_record(tmp_path / "run", DEAD_DRIVER, [ident(left)])
        assert reap_stale(tmp_path / "run") == 1
        assert gone(left)
        assert bystander.poll() is None  # not in the record: untouched
        assert not (tmp_path / "run" / RECORD).exists()
    finally:
        for p in (left, bystander):
            p.kill()
            p.wait()


def test_a_recycled_pid_is_not_ended(tmp_path: Path) -> None:
    p = sleeper()
    try:
        entry = dict(ident(p), start=ident(p)["start"] - 1000)  # same pid, another process's start time
        write_record(tmp_path / "run", DEAD_DRIVER, [entry])
        assert reap_stale(tmp_path / "run") == 0
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_a_run_whose_driver_lives_is_not_stale(tmp_path: Path) -> None:
    driver, child = sleeper(), sleeper()
    try:
        write_record(tmp_path / "out" / "run-a", ident(driver), [ident(child)])
        with pytest.raises(TedFlError, match=f"still being run by process {driver.pid}"):
            reap_stale(tmp_path / "out" / "run-a")
        assert reap_folder(tmp_path / "out") == 0  # a new run leaves a live run alone
        assert child.poll() is None
    finally:
        for p in (driver, child):
            p.kill()
            p.wait()


def test_the_next_run_in_the_folder_cleans_up(tmp_path: Path) -> None:
    a, b = sleeper(), sleeper()
    try:
        write_record(tmp_path / "out" / "run-a", DEAD_DRIVER, [ident(a)])
        write_record(tmp_path / "out" / "run-b", DEAD_DRIVER, [ident(b)])
        assert reap_folder(tmp_path / "out") == 2
        assert gone(a) and gone(b)
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_record_lists_and_ends_only_what_the_run_started(tmp_path: Path) -> None:
    before = sleeper()
    try:
        record = ProcessRecord(tmp_path)
        during = subprocess.Popen(["sleep", "120"])  # a child of this process, like Ray's
        record.update("test")
        data = json.loads((tmp_path / RECORD).read_text())
        assert data["driver"]["pid"] == os.getpid()
        pids = {e["pid"] for e in data["processes"]}
        assert during.pid in pids and before.pid not in pids
        assert record.close() == 1
        assert gone(during) and before.poll() is None
        assert not (tmp_path / RECORD).exists()
    finally:
        before.kill()
        before.wait()


def test_record_ends_a_recorded_process_that_was_reparented(tmp_path: Path) -> None:
    """A Ray worker whose raylet ended is no longer this process's descendant: the record, which
    listed it earlier, still ends it. (Stand-in: a process outside `children()`, recorded by hand.)"""
    outside = sleeper()  # started before the record: never one of its children()
    try:
        record = ProcessRecord(tmp_path)
        assert outside.pid not in {p.pid for p in record.children()}
        record.known[outside.pid] = ident(outside)  # what update() wrote while it was a descendant
        assert record.close() == 1
        assert gone(outside)
    finally:
        if outside.poll() is None:
            outside.kill()
            outside.wait()


def test_sigterm_becomes_an_exception_that_runs_finally_blocks() -> None:
    import threading

    import ted_fl.processes as P

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed in the main thread")
    cleaned = []
    with pytest.raises(Terminated, match="SIGTERM"), graceful_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        finally:
            cleaned.append(True)
    assert cleaned and P.STOP.is_set()
    P.stop_waiting()
    assert not P.STOP.is_set()  # the next run in this process starts with a fresh event
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_reaper_recognises_only_the_managed_local_superlink() -> None:
    managed = ["/usr/bin/python3", "/usr/bin/flower-superlink", "--insecure", "--simulation", "--isolation",
               "subprocess", "--log-file", "/home/u/.flwr/local-superlink/superlink.log"]
    assert is_managed_superlink(managed)
    assert not is_managed_superlink(["/usr/bin/python3", "/usr/bin/flower-superlink", "--insecure",
                                     "--port", "9093"])  # one the user started: never touched
    assert is_flwr_run(["/usr/bin/python3", "/usr/bin/flwr", "run", ".", "--stream"])
    assert not is_flwr_run(["/usr/bin/python3", "/usr/bin/flwr", "ls"])


def test_reaper_ends_the_superlink_tree_once_the_run_is_over() -> None:
    # A stand-in SuperLink (a shell with a child, like flower-superexec) and a run that has ended.
    link = subprocess.Popen(["sh", "-c", "sleep 120 & wait"], start_new_session=True)
    time.sleep(0.3)
    child = psutil.Process(link.pid).children()[0]
    link_spec = f"{link.pid}:{psutil.Process(link.pid).create_time()}"
    try:
        assert reaper_main([link_spec, f"{DEAD_DRIVER['pid']}:1.0"]) == 0
        assert gone(link)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        if link.poll() is None:
            link.kill()
            link.wait()


def test_reaper_script_runs_detached() -> None:
    """The module runs as a script (the ServerApp starts it with `python -m`)."""
    proc = subprocess.run([sys.executable, "-m", "ted_fl.federated.reaper", f"{DEAD_DRIVER['pid']}:1.0",
                           f"{DEAD_DRIVER['pid']}:1.0"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr


def test_reaper_ends_a_running_run_once_its_flwr_run_command_is_gone() -> None:
    """Ctrl-C on `flwr run --stream`: the command is gone while the run still runs below the
    SuperLink; the reaper ends the SuperLink and the run."""
    link = subprocess.Popen(["sh", "-c", "sleep 120 & wait"], start_new_session=True)
    time.sleep(0.3)
    run = psutil.Process(link.pid).children()[0]  # stands for flwr-simulation, below the SuperLink
    spec = lambda p: f"{p.pid}:{p.create_time()}"  # noqa: E731
    try:
        assert reaper_main([spec(psutil.Process(link.pid)), spec(run), f"{DEAD_DRIVER['pid']}:1.0"]) == 0
        assert gone(link)
        assert not run.is_running() or run.status() == psutil.STATUS_ZOMBIE
    finally:
        if link.poll() is None:
            link.kill()
            link.wait()
