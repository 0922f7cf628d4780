"""End to end: simulations of their own (faults, several clients a site, signals).

Unlike test_simulation's tests these share no run, so they carry no xdist group and spread over
the workers instead of queueing behind the shared run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ted_fl.run.processes import cmdline, is_gone
from tests.integration.simulation_helpers import dice_rows, faulty, run_dir_of, simulate, write_config

pytestmark = pytest.mark.slow


def test_client_fault_abort_names_site_and_round(tmp_path: Path) -> None:
    cfg_path, env = faulty(tmp_path, "I2CVB:0:hang:1", federated__on_failure="abort", federated__timeout=20.0)
    proc = simulate("--config", str(cfg_path), "--approach", "seq", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: site I2CVB failed in stage 2 round 0"), last
    assert "no reply within 20 s" in last


def test_several_clients_per_site_and_retention(tmp_path: Path) -> None:
    """k = 2 clients a site (FedAvg inside the stage) and one earlier site retained for training."""
    cfg_path = write_config(tmp_path, federated__clients_per_site=2, federated__retention=1, train__rounds=1)
    proc = simulate("--config", str(cfg_path), "--approach", "seq")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = run_dir_of(proc.stdout).metrics()
    train = m[(m["split"] == "train") & (m["metric"] == "total")]
    by_stage = {s: sorted(g["site"]) for s, g in train.groupby("stage")}
    assert by_stage[0] == ["RUNMC/0", "RUNMC/1"]
    assert by_stage[2] == ["BMC/0", "BMC/1", "I2CVB/0", "I2CVB/1"]
    dice = dice_rows(run_dir_of(proc.stdout))
    assert len(dice) == 4 * 3 and dice["value"].notna().all()


def test_audit_stops_a_client_that_leaks_images(tmp_path: Path) -> None:
    """The privacy audit sits on the real client path: a reply carrying images never arrives."""
    cfg_path, env = faulty(tmp_path, "BMC:0:leak:9", federated__on_failure="abort")
    proc = simulate("--config", str(cfg_path), "--approach", "seq", env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: site BMC failed in stage 1 round 0"), last
    assert "privacy audit" in last and "shaped like the site's images" in last


@pytest.mark.parametrize(("sig", "word"), [(signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupted")])
def test_signal_leaves_no_process_behind(tmp_path: Path, sig: signal.Signals, word: str) -> None:
    """SIGTERM or SIGINT (Ctrl-C) to a running simulation: it exits 130 (resumable) and every process
    it started (Ray's GCS, raylet, dashboard and runtime-env agents, the client workers) is gone."""
    import psutil

    cfg_path = write_config(tmp_path, train__rounds=20)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ted_fl.simulate", "--quiet", "--config", str(cfg_path), "--approach", "seq",
         "--out", str(tmp_path / "runs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        # Wait until the clients train (a first round checkpointed): Ray and its workers are all up.
        while proc.poll() is None and not list(tmp_path.glob("runs/*/checkpoints/*/last.pt")):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(cmdline(c)) for c in children)
        proc.send_signal(sig)  # the driver only: its own clean-up must end the rest
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert f"{word}; resume with --resume" in err
    left = [c for c in children if not is_gone(c)]  # a zombie has ended
    assert not left, [" ".join(cmdline(c))[:120] for c in left]
    (run_path,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert not (run_path / "processes.json").exists()
