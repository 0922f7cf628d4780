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
from ted_fl.federated.reaper import in_use, is_flwr_run, is_managed_superlink
from ted_fl.federated.reaper import main as reaper_main
from ted_fl.run.processes import (
    RECORD,
    ProcessRecord,
    Terminated,
    _alive,
    cmdline,
    graceful_signals,
    is_gone,
    reap_folder,
    reap_stale,
    terminate,
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

    import ted_fl.run.processes as P

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


def test_reaper_ends_a_running_run_once_its_flwr_run_command_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C on `flwr run --stream`: the command is gone while the run still runs below the
    SuperLink; the reaper ends the SuperLink and the run."""
    link = subprocess.Popen(["sh", "-c", "sleep 120 & wait"], start_new_session=True)
    time.sleep(0.3)
    run = psutil.Process(link.pid).children()[0]  # stands for flwr-simulation, below the SuperLink
    monkeypatch.setattr("ted_fl.federated.reaper.GRACE_S", 1.0)  # how long the run may take to end by itself
    spec = lambda p: f"{p.pid}:{p.create_time()}"  # noqa: E731
    try:
        assert reaper_main([spec(psutil.Process(link.pid)), spec(run), f"{DEAD_DRIVER['pid']}:1.0"]) == 0
        assert gone(link)
        assert not run.is_running() or run.status() == psutil.STATUS_ZOMBIE
    finally:
        if link.poll() is None:
            link.kill()
            link.wait()


def with_zombie_child() -> tuple[subprocess.Popen, psutil.Process]:
    """A stand-in SuperLink whose child has exited and was never collected (a zombie), as the
    SuperExec leaves `flwr-simulation` after a run: `sh` forks the child, then becomes `sleep`,
    which never waits for it."""
    link = subprocess.Popen(["sh", "-c", "sleep 0.1 & exec sleep 120"], start_new_session=True)
    for _ in range(200):  # until the child has exited (normally at once)
        kids = psutil.Process(link.pid).children()
        if kids and kids[0].status() == psutil.STATUS_ZOMBIE:
            return link, kids[0]
        time.sleep(0.05)
    raise AssertionError("no zombie child appeared")


def test_a_zombie_counts_as_gone_everywhere() -> None:
    link, zombie = with_zombie_child()
    try:
        assert zombie.is_running()  # psutil's own answer: why it must not be used alone
        assert is_gone(zombie) and cmdline(zombie) == []
        assert _alive({"pid": zombie.pid, "start": zombie.create_time()}) is None
        t0 = time.monotonic()
        assert terminate([zombie], grace=30) == 0  # skipped, not waited on for the grace period
        assert time.monotonic() - t0 < 20
        assert not is_gone(psutil.Process(link.pid))
    finally:
        link.kill()
        link.wait()


def test_reaper_stops_the_superlink_when_its_run_is_a_zombie() -> None:
    """The run process ended but its parent has not collected it: the run is over. (The old reaper
    waited for a zombie forever, or gave up silently on its command line.) The script runs in a
    subprocess: its bound stops a reaper that never returns."""
    link, zombie = with_zombie_child()
    spec = lambda p: f"{p.pid}:{p.create_time()}"  # noqa: E731
    try:
        proc = subprocess.run([sys.executable, "-m", "ted_fl.federated.reaper", spec(psutil.Process(link.pid)),
                               spec(zombie)], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
        assert proc.returncode == 0, proc.stderr
        assert gone(link)
    finally:
        if link.poll() is None:
            link.kill()
            link.wait()


def test_reaper_decides_with_flowers_run_statuses() -> None:
    """Another run uses the SuperLink when a live process runs it, or Flower is about to start it;
    Flower's "running" alone (no process left) is stale, and the watched run never counts."""
    now = 1_800_000_000.0
    fresh = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now - 5))
    old = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now - 3600))

    def run(rid: str, status: str, at: str = fresh) -> dict:
        return {"run-id": rid, "status": status, "pending-at": at}

    finished = [run("1", "finished:completed"), run("2", "finished:failed"), run("3", "finished:stopped")]
    assert in_use(finished + [run("9", "running")], "9", 0, now) == ""  # the watched run itself
    assert in_use(finished + [run("4", "running")], "9", 0, now) == ""  # no process: a stale status
    assert in_use(None, "9", 0, now) == ""  # Flower did not answer: the processes decide
    assert "1 other run(s)" in in_use(finished, "9", 1, now)  # a live flwr-simulation
    assert "4 (pending)" in in_use(finished + [run("4", "pending")], "9", 0, now)
    assert "4 (starting)" in in_use(finished + [run("4", "starting")], "9", 0, now)
    assert in_use([run("4", "pending", old)], "9", 0, now) == ""  # pending for an hour: not coming
