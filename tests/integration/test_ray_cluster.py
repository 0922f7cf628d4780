"""Joining a Ray cluster: a local head started with `ray start --head` (loopback), a simulation
joined to it through `federated.ray_address`, the head stopped at the end (its own process
group only, never a machine-wide `ray stop` that would end other people's Ray sessions)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.simulation_helpers import dice_rows, run_dir_of, simulate, write_config

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("ray") is None, reason="ray CLI not installed")]


def test_simulation_joins_a_ray_head(tmp_path: Path) -> None:
    from tests.integration.test_deployment import free_port

    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", str(temp), "--disable-usage-stats"],
        stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        for _ in range(600):  # until the head has written its session (or has died)
            if list(temp.glob("session_*/logs/gcs_server.out")) or head.poll() is not None:
                break
            time.sleep(0.5)
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        cfg_path = write_config(tmp_path, federated__ray_address=f"127.0.0.1:{port}")
        proc = simulate("--config", str(cfg_path), "--approach", "seq", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(dice_rows(run_dir_of(proc.stdout), "seq")) == 4 * 3  # untrained + 3 stages, 3 sites
        drivers = list(temp.glob("session_*/logs/python-core-driver-*"))
        assert drivers, f"the simulation's driver never joined the head in {temp}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
