"""Flower's deployment engine, for real: a SuperLink and one SuperNode per site as local processes
(loopback, --insecure), the app submitted with `flwr run`, its R matrix equal to the simulation's.

docs/deployment.md, "For real hospitals", gives the same steps with TLS and node authentication.
Every process is stopped at the end, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.integration.simulation_helpers import dice_rows, run_dir_of, simulate, write_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("flower-superlink") is None, reason="flower-superlink not installed"),
]

SITES = ["RUNMC", "BMC", "I2CVB"]  # tests.conftest.tiny_config's arrival order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def processes(log_dir: Path) -> Iterator[list[subprocess.Popen]]:
    """Started processes (each in its own session, with its own log), all stopped on exit."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def listening(port: int, proc: subprocess.Popen) -> bool:
    """Whether `port` accepts connections, waiting while `proc` is alive (no deadline: a loaded
    machine is slow, and a dead process ends the wait)."""
    while proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.5)
    return False


def start(procs: list[subprocess.Popen], name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
    log = (log_dir / f"{name}.log").open("w")
    procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=log_dir,
                                  start_new_session=True))


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(log_dir.glob("*.log")))


def test_deployment_engine_matches_the_simulation(tmp_path: Path) -> None:
    # One round a stage: every deployed message starts a ClientApp process (torch, MONAI), so rounds
    # are what this test pays for; parity needs one.
    cfg_path = write_config(tmp_path, federated__connect_timeout=900.0, train__rounds=1)
    # The simulation first: it also writes the synthetic twin the SuperNodes then read.
    sim = simulate("--config", str(cfg_path), "--approach", "seq")
    assert sim.returncode == 0, sim.stderr[-3000:]

    home, log_dir, out = tmp_path / "flwr-home", tmp_path / "logs", tmp_path / "deployed"
    home.mkdir()
    log_dir.mkdir()
    link = free_port()  # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": path,
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    bin_dir = Path(sys.executable).parent
    with processes(log_dir) as procs:
        start(procs, "superlink", [
            str(bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
        ], env, log_dir)
        assert listening(link, procs[0]), logs(log_dir)
        for site in SITES:
            start(procs, f"supernode-{site}", [
                str(bin_dir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f'site="{site}" client=0 state-dir="{tmp_path / "state" / site}"',
            ], env, log_dir)
        run_config = (f'experiment="{cfg_path}" approaches="seq" seeds="0" out="{out}"')
        proc = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(REPO), "local-test", "--run-config", run_config, "--stream"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=3600,
        )
        finished = [p for p in out.glob("*-flwr-*") if (p / "metrics.csv").is_file()] if out.is_dir() else []
        assert proc.returncode == 0 and finished, (
            f"flwr run rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{logs(log_dir)}")
    for p in procs:
        assert p.poll() is not None, f"{p.args[0]} still running"
    # Parity with python -m ted_fl.simulate: the same run directory, progress in the stream.
    for name in ("report.html", "run.log", "splits.json", "command.txt", "machine.json", "summary.csv"):
        assert (finished[0] / name).is_file(), name
    assert not (finished[0] / "processes.json").exists()
    stream = proc.stdout + proc.stderr
    assert "federation: 3 SuperNodes serve 3 sites x 1 client(s)" in stream, stream[-3000:]
    assert stream.count("progress: ") == 3 * 1, stream[-3000:]  # 3 stages x 1 round of seq
    deployed = run_dir_of(f"run directory: {finished[0]}")
    a, b = dice_rows(run_dir_of(sim.stdout), "seq"), dice_rows(deployed, "seq")
    assert len(a) == len(b) == 4 * 3  # the untrained model, then after each of the 3 stages, on 3 sites
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), atol=1e-5)


def flwr_processes(home: Path) -> list:
    """Live processes of the local SuperLink `flwr run` starts under FLWR_HOME=home, and those below
    it (a zombie, ended but not yet collected by its parent, counts as gone)."""
    import psutil

    from ted_fl.run.processes import cmdline, is_gone

    found = []
    for p in psutil.process_iter():
        cmd = " ".join(cmdline(p))
        if str(home) in cmd and ("flower-superlink" in cmd or "flower-superexec" in cmd):
            found.append(p)
            with contextlib.suppress(psutil.Error):
                found += p.children(recursive=True)
    return [p for p in found if not is_gone(p)]


def describe(procs: list) -> list[str]:
    from ted_fl.run.processes import cmdline

    return [f"{p.pid} {' '.join(cmdline(p))[:150]}" for p in procs]


RUN_BOUND_S = 900  # a hang guard for the tiny run (about a minute; several on a loaded machine)
CLEANUP_BOUND_S = 180  # the reaper ends the SuperLink seconds after the command: a hang guard, not a timing


def test_flwr_run_local_simulation_parity_and_no_process_left(tmp_path: Path) -> None:
    """`flwr run . --stream` on Flower's local simulation: the simulate command's run directory and
    stream, the federation size said (an extra node idle), no start-up notices, and no SuperLink /
    SuperExec / flwr-simulation left after (each wait bounded, failing with what is left)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 39093)) == 0:
            pytest.skip("a local SuperLink already runs on Flower's fixed port: not ours to stop")
    cfg_path = write_config(tmp_path)
    home, out = tmp_path / "flwr-home", tmp_path / "runs"
    home.mkdir()
    reaper_log = home / "local-superlink" / "ted-fl-reaper.log"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": path,
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        try:
            proc = subprocess.run(
                [flwr, "run", str(REPO), "--stream", "--federation-config", "num-supernodes=4",
                 "--run-config", f'experiment="{cfg_path}" approaches="seq" seeds="0" out="{out}"'],
                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=RUN_BOUND_S,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"`flwr run` did not end within {RUN_BOUND_S} s; still up: {describe(flwr_processes(home))}\n"
                        f"{str(exc.stdout or '')[-2000:]}\n{str(exc.stderr or '')[-2000:]}")
        stream = proc.stdout + proc.stderr
        assert proc.returncode == 0, stream[-3000:]
        runs = [p for p in out.glob("*-flwr-*") if (p / "summary.csv").is_file()]
        assert len(runs) == 1, stream[-4000:]
        run = runs[0]
        for name in ("report.html", "run.log", "splits.json", "command.txt", "machine.json", "metrics.csv"):
            assert (run / name).is_file(), name
        assert "federation: 3 SuperNodes serve 3 sites x 1 client(s); 1 more stay idle" in stream, stream[-3000:]
        assert stream.count("progress: ") == 3 * 2, stream[-3000:]
        assert f"run directory: {run.resolve()}" in stream
        assert "Traceback" not in stream, stream[-3000:]
        assert "DEPRECATED FEATURE" not in stream and "FutureWarning" not in stream, stream[-3000:]
        # The SuperLink `flwr run` started is stopped once the command has ended (by ted_fl.federated.reaper).
        deadline = time.monotonic() + CLEANUP_BOUND_S
        while flwr_processes(home) and time.monotonic() < deadline:
            time.sleep(1)
        log = reaper_log.read_text() if reaper_log.is_file() else "(no reaper log)"
        left = describe(flwr_processes(home))
        assert not left, f"still up {CLEANUP_BOUND_S} s after `flwr run` ended: {left}\nreaper log:\n{log}"
        assert "stopping the SuperLink" in log, log
    finally:
        for p in flwr_processes(home):
            with contextlib.suppress(Exception):
                p.kill()
