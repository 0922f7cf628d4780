"""Stop the SuperLink that `flwr run` started, once the command ends or is interrupted.

`flwr run .` (no SuperLink named) starts a "managed local SuperLink" in the background
(`flower-superlink --simulation`, logging to $FLWR_HOME/local-superlink/superlink.log), which
starts a `flower-superexec`, which starts `flwr-simulation` for each run (the ServerApp, the
simulated ClientApps and Ray). Flower keeps the SuperLink and SuperExec running after the
command ends. The ServerApp (`ted_fl.federated.flwr_app`) starts this small detached process;
it waits until the `flwr run` command that started the SuperLink exits (with `--stream`: when
the run has ended or the user pressed Ctrl-C), or else until the run itself ends, then ends the
SuperLink and every process under it, unless another run is still using it. A SuperLink the user
started (any other command line) is never touched. Run config `keep_superlink = true` turns it off.

    python -m ted_fl.federated.reaper SUPERLINK_PID:START RUN_PID:START [CLI_PID:START]
"""

from __future__ import annotations

import sys
import time
from typing import Any

GRACE_S = 10.0  # after the run ends: time for `flwr run --stream` to fetch the last lines and exit


def is_managed_superlink(cmdline: list[str]) -> bool:
    """The SuperLink `flwr run` starts for a local simulation (flwr.cli.local_superlink)."""
    exe = " ".join(cmdline[:2])
    return ("flower-superlink" in exe and "--simulation" in cmdline
            and any(c.replace("\\", "/").endswith("local-superlink/superlink.log") for c in cmdline))


def is_flwr_run(cmdline: list[str]) -> bool:
    words = [c.rsplit("/", 1)[-1] for c in cmdline[:3]]
    return "flwr" in words and "run" in cmdline[1:4]


def managed_superlink() -> tuple[Any, Any] | None:
    """(the managed local SuperLink above this process, the `flwr run` command that started it or
    None), or None when this process does not run under one."""
    import psutil

    for anc in psutil.Process().parents():
        try:
            if is_managed_superlink(anc.cmdline()):
                parent = anc.parent()
                cli = parent if parent is not None and is_flwr_run(parent.cmdline()) else None
                return anc, cli
        except psutil.Error:
            continue
    return None


def start(run_pid: int) -> bool:
    """Start the detached reaper for the run process `run_pid`; False when no managed SuperLink."""
    import os
    import subprocess

    import psutil

    found = managed_superlink()
    if found is None:
        return False
    superlink, cli = found
    args = [f"{superlink.pid}:{superlink.create_time()}", f"{run_pid}:{psutil.Process(run_pid).create_time()}"]
    if cli is not None and "--stream" in cli.cmdline():  # without --stream the command returns at once
        args.append(f"{cli.pid}:{cli.create_time()}")
    env = dict(os.environ)
    subprocess.Popen([sys.executable, "-m", "ted_fl.federated.reaper", *args], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return True


def _proc(spec: str) -> Any:
    from ted_fl.processes import _alive

    pid, start_time = spec.split(":", 1)
    return _alive({"pid": int(pid), "start": float(start_time)})


def main(argv: list[str]) -> int:
    import psutil

    from ted_fl.processes import terminate

    superlink, run = _proc(argv[0]), _proc(argv[1])
    cli_spec = argv[2] if len(argv) > 2 else ""
    ended_at: float | None = None
    while superlink is not None and superlink.is_running():
        cli_gone = bool(cli_spec) and _proc(cli_spec) is None
        if cli_gone:
            break  # the command ended or was interrupted: nobody watches this run any more
        if run is None or not run.is_running():
            ended_at = ended_at or time.monotonic()
            if not cli_spec or time.monotonic() - ended_at > GRACE_S:
                break
        time.sleep(0.5)
    else:
        return 0
    import os

    try:  # this process may still hang below the run it watched: never end itself first
        tree = [p for p in superlink.children(recursive=True) if p.pid != os.getpid()]
        others = [p for p in tree if "flwr-simulation" in " ".join(p.cmdline()[:2])
                  and (run is None or p.pid != run.pid)]
    except psutil.Error:
        return 0
    if others:  # another run still uses this SuperLink: leave it
        _log(superlink, f"left the SuperLink {superlink.pid} running: {len(others)} other run(s) use it")
        return 0
    _log(superlink, f"stopping the SuperLink {superlink.pid} and {len(tree)} process(es) under it")
    terminate([*tree, superlink])
    return 0


def _log(superlink: Any, text: str) -> None:
    """One line beside the SuperLink's own log ($FLWR_HOME/local-superlink/ted-fl-reaper.log)."""
    import contextlib
    from pathlib import Path

    with contextlib.suppress(Exception):
        cmd = superlink.cmdline()
        folder = Path(cmd[cmd.index("--log-file") + 1]).parent
        with open(folder / "ted-fl-reaper.log", "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
