"""Stop the SuperLink that `flwr run` started once its last run has ended (finished or failed).

`flwr run .` (no SuperLink named) starts a "managed local SuperLink" in the background
(`flower-superlink --simulation`, logging to $FLWR_HOME/local-superlink/superlink.log), which
starts a `flower-superexec`, which starts `flwr-simulation` for each run (the ServerApp, the
simulated ClientApps and Ray). Flower keeps the SuperLink and SuperExec running after the
command ends. The ServerApp (`ted_fl.federated.flwr_app`) starts this small detached process.

It first waits until its run is over: the `flwr run --stream` command that started the SuperLink
has exited (the run ended, or the user pressed Ctrl-C), or else the run's process has ended. An
ended process that its parent has not collected yet (a zombie, as the SuperExec leaves
`flwr-simulation`) counts as ended. It then ends the SuperLink and every process under it, unless
another run still uses it: another live `flwr-simulation`, or a run Flower lists as pending or
starting (about to get one). A run Flower still calls "running" with no process running it does
not count: Flower's status is stale then. While another run uses it, it keeps watching, and ends
the SuperLink after the last one. Every decision is one line in
$FLWR_HOME/local-superlink/ted-fl-reaper.log. A SuperLink the user started (any other command
line) is never touched. Run config `keep_superlink = true` turns it off.

    python -m ted_fl.federated.reaper SUPERLINK_PID:START RUN_PID:START [CLI_PID:START] [--run-id ID]
    python -m ted_fl.federated.reaper --stop-idle   # end this FLWR_HOME's local SuperLink if no run uses it

`--stop-idle` is for what no ServerApp sees: a submission Flower refuses before a run exists (an
invalid `--run-config`) leaves the SuperLink it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ted_fl.run.processes import _alive, cmdline, is_gone, terminate

GRACE_S = 10.0  # after the run ends: time for `flwr run --stream` to fetch the last lines and exit
POLL_S = 0.5  # while the run runs
RECHECK_S = 5.0  # while another run uses the SuperLink (each check may ask Flower for its runs)
STALE_PENDING_S = 300.0  # a run pending / starting for longer, with no process, is not coming
WAITING = ("pending", "starting")  # Flower's statuses of a run that has no process yet


def is_managed_superlink(cmdline: list[str]) -> bool:
    """The SuperLink `flwr run` starts for a local simulation (flwr.cli.local_superlink)."""
    exe = " ".join(cmdline[:2])
    return ("flower-superlink" in exe and "--simulation" in cmdline
            and any(c.replace("\\", "/").endswith("local-superlink/superlink.log") for c in cmdline))


def is_flwr_run(cmdline: list[str]) -> bool:
    words = [c.rsplit("/", 1)[-1] for c in cmdline[:3]]
    return "flwr" in words and "run" in cmdline[1:4]


def is_run_process(cmdline: list[str]) -> bool:
    """The process of one run (the SuperExec starts one per run)."""
    return "flwr-simulation" in " ".join(cmdline[:2])


def managed_superlink() -> tuple[Any, Any] | None:
    """(the managed local SuperLink above this process, the `flwr run` command that started it or
    None), or None when this process does not run under one."""
    import psutil

    for anc in psutil.Process().parents():
        if is_managed_superlink(cmdline(anc)):
            try:
                parent = anc.parent()
            except psutil.Error:
                parent = None
            cli = parent if parent is not None and is_flwr_run(cmdline(parent)) else None
            return anc, cli
    return None


def start(run_pid: int, run_id: int | str = "") -> bool:
    """Start the detached reaper for the run process `run_pid` (Flower run `run_id`); False when
    no managed SuperLink runs this process."""
    import psutil

    found = managed_superlink()
    if found is None:
        return False
    superlink, cli = found
    args = [f"{superlink.pid}:{superlink.create_time()}", f"{run_pid}:{psutil.Process(run_pid).create_time()}"]
    if cli is not None and "--stream" in cli.cmdline():  # without --stream the command returns at once
        args.append(f"{cli.pid}:{cli.create_time()}")
    if run_id != "":
        args += ["--run-id", str(run_id)]
    subprocess.Popen([sys.executable, "-m", "ted_fl.federated.reaper", *args], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     env=dict(os.environ))
    return True


def in_use(runs: list[dict[str, Any]] | None, own_run_id: str, other_processes: int, now: float) -> str:
    """Why the SuperLink must stay up for another run ("" when no other run uses it).

    `runs`: Flower's runs (`flwr ls --format json`: run-id, status, pending-at), None when Flower
    did not answer; `other_processes`: live, non-zombie run processes other than this run's. A
    process is the evidence that a run runs, whatever its status says; a run without one counts
    only while Flower is about to start it (pending / starting, for less than STALE_PENDING_S)."""
    if other_processes:
        return f"{other_processes} other run(s) still run (live flwr-simulation process(es))"
    waiting = []
    for run in runs or []:
        rid, status = str(run.get("run-id", "")), str(run.get("status", ""))
        if rid == str(own_run_id) or status.split(":", 1)[0] not in WAITING:
            continue
        since = _utc(str(run.get("pending-at", "")))
        if since is None or now - since < STALE_PENDING_S:
            waiting.append(f"{rid} ({status})")
    return f"run(s) {', '.join(waiting)} wait for Flower to start them" if waiting else ""


def _utc(text: str) -> float | None:
    """Flower's time stamps ("2026-12-04 15:49:04Z") as seconds since the epoch."""
    try:
        return datetime.strptime(text, "%Y-%m-%d %H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def flower_runs(superlink: Any) -> list[dict[str, Any]] | None:
    """Flower's runs on this SuperLink (`flwr ls --format json`), None when it does not answer.

    The CLI is pointed at the SuperLink's address through a throw-away FLWR_HOME naming it
    explicitly: with the default ("local") connection, `flwr ls` would start a new SuperLink
    when this one has just ended."""
    cmd = cmdline(superlink)
    try:
        address = f"{cmd[cmd.index('--host') + 1]}:{cmd[cmd.index('--port') + 1]}"
    except (ValueError, IndexError):
        return None
    flwr = Path(sys.executable).parent / "flwr"
    exe = str(flwr) if flwr.is_file() else shutil.which("flwr")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory(prefix="ted-fl-flwr-ls-") as home:
        Path(home, "config.toml").write_text(
            f'[superlink]\ndefault = "reaper"\n\n[superlink.reaper]\naddress = "{address}"\ninsecure = true\n')
        env = {**os.environ, "FLWR_HOME": home, "FLWR_DISABLE_UPDATE_CHECK": "1"}
        try:
            out = subprocess.run([exe, "ls", "--format", "json"], capture_output=True, text=True, env=env,
                                 timeout=60, stdin=subprocess.DEVNULL)
            data = json.loads(out.stdout)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            return None
    runs = data.get("runs") if isinstance(data, dict) and data.get("success") else None
    return runs if isinstance(runs, list) else None


def _proc(spec: str) -> Any:
    pid, start_time = spec.split(":", 1)
    return _alive({"pid": int(pid), "start": float(start_time)})


def _tree(superlink: Any) -> list[Any]:
    """Every live process under the SuperLink but this one (which may hang below the run it watched)."""
    import psutil

    try:
        return [p for p in superlink.children(recursive=True) if p.pid != os.getpid() and not is_gone(p)]
    except psutil.Error:
        return []


class Log:
    """One line per decision beside the SuperLink's own log ($FLWR_HOME/local-superlink/ted-fl-reaper.log)."""

    def __init__(self, superlink: Any) -> None:
        cmd = cmdline(superlink)
        self.path = (Path(cmd[cmd.index("--log-file") + 1]).parent / "ted-fl-reaper.log"
                     if "--log-file" in cmd[:-1] else None)
        self.last = ""

    def __call__(self, text: str) -> None:
        self.last = text
        if self.path is None:
            return
        with contextlib.suppress(OSError), open(self.path, "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{_pid()}] {text}\n")


def _pid() -> int:
    return os.getpid()


def stop_when_unused(superlink: Any, log: Log, own_run_id: str = "", own_pid: int = -1, wait: bool = True) -> bool:
    """End the SuperLink and its tree as soon as no other run uses it (at once, or never when
    not `wait`); log each decision. True when it has ended."""
    while not is_gone(superlink):
        tree = _tree(superlink)
        others = sum(1 for p in tree if p.pid != own_pid and is_run_process(cmdline(p)))
        runs = None if others else flower_runs(superlink)
        if is_gone(superlink):
            break
        reason = in_use(runs, own_run_id, others, time.time())
        if not reason:
            status = "Flower did not list its runs" if runs is None and not others else \
                f"Flower lists {len(runs or [])} run(s), none other running or about to start"
            log(f"stopping the SuperLink {superlink.pid} and {len(tree)} process(es) under it "
                f"(no other run uses it: {status})")
            terminate([*tree, superlink])
            left = [p for p in [*tree, superlink] if not is_gone(p)]
            log(f"stopped: {len(left)} process(es) left" + (f" ({[p.pid for p in left]})" if left else ""))
            return not left
        if not wait:
            log(f"left the SuperLink {superlink.pid} running: {reason}")
            return False
        text = f"left the SuperLink {superlink.pid} running for now: {reason}; checking again every {RECHECK_S:.0f} s"
        if text != log.last:
            log(text)
        time.sleep(RECHECK_S)
    log(f"the SuperLink {superlink.pid} has ended by itself")
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ted_fl.federated.reaper")
    parser.add_argument("specs", nargs="*", help="SUPERLINK_PID:START RUN_PID:START [CLI_PID:START]")
    parser.add_argument("--run-id", default="", help="Flower's id of the watched run")
    parser.add_argument("--stop-idle", action="store_true", help="end this FLWR_HOME's local SuperLink if unused")
    args = parser.parse_args(argv)
    if args.stop_idle:
        return stop_idle()
    if len(args.specs) < 2:
        parser.error("expected SUPERLINK_PID:START RUN_PID:START [CLI_PID:START]")
    superlink, run = _proc(args.specs[0]), _proc(args.specs[1])
    if superlink is None:
        return 0
    log = Log(superlink)
    cli_spec = args.specs[2] if len(args.specs) > 2 else ""
    run_pid = int(args.specs[1].split(":", 1)[0])
    log(f"watching run {args.run_id or '?'} (process {run_pid}) on the SuperLink {superlink.pid}; "
        + ("the `flwr run --stream` command that started it is " + cli_spec.split(":", 1)[0] if cli_spec
           else "no `flwr run --stream` command to wait for"))
    ended_at: float | None = None
    while not is_gone(superlink):
        if cli_spec and _proc(cli_spec) is None:
            log(f"the `flwr run` command {cli_spec.split(':', 1)[0]} has ended")
            until = time.monotonic() + GRACE_S  # the stream ends just before the run's process does
            while not is_gone(run) and time.monotonic() < until:
                time.sleep(POLL_S)
            log(f"run process {run_pid} has ended" if is_gone(run) else
                f"run process {run_pid} still runs {GRACE_S:.0f} s after the command ended (interrupted): "
                "it ends with the SuperLink")
            break
        if is_gone(run):
            if ended_at is None:
                ended_at = time.monotonic()
                log(f"run process {run_pid} has ended" + (" (a zombie counts as ended)" if run is not None else ""))
            if not cli_spec or time.monotonic() - ended_at > GRACE_S:
                if cli_spec:
                    log(f"the `flwr run` command is still up {GRACE_S:.0f} s after the run ended: not waiting for it")
                break
        time.sleep(POLL_S)
    else:
        log(f"the SuperLink {superlink.pid} has ended by itself")
        return 0
    stop_when_unused(superlink, log, args.run_id, run_pid)
    return 0


def stop_idle() -> int:
    """End this FLWR_HOME's managed local SuperLink(s) when no run uses them (exit 0), say so."""
    import psutil

    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()  # Flower's rule
    log_file = str(home / "local-superlink" / "superlink.log")
    found = [p for p in psutil.process_iter() if is_managed_superlink(c := cmdline(p)) and log_file in c]
    if not found:
        print(f"no local SuperLink of {home} runs")
    for link in found:
        log = Log(link)
        log("--stop-idle asked")
        stop_when_unused(link, log, wait=False)
        print(log.last)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
