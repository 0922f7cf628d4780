"""End to end: the real Flower + Ray simulation on 3 tiny synthetic sites (32 px, 2 rounds).

One uninterrupted federated run is shared by the tests below: its outputs, its equivalence with
the centralized reference run, a resumed run killed half-way, and injected client faults.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ted_fl.run.directory import RunDir
from ted_fl.run.processes import cmdline, is_gone
from tests.conftest import mid_run
from tests.integration.simulation_helpers import (
    APPROACHES,
    dice_rows,
    faulty,
    run_dir_of,
    simulate,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_simulation")]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunDir]:
    tmp = tmp_path_factory.mktemp("fed")
    cfg_path = write_config(tmp)
    proc = simulate("--config", str(cfg_path), "--set", "federated.fast_polling=false")  # Flower's own path
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp / "stderr.txt").write_text(proc.stderr)  # for test_no_start_up_notices
    return cfg_path, run_dir_of(proc.stdout)


def test_no_start_up_notices(fed: tuple[Path, RunDir]) -> None:
    """Flower's run_simulation deprecation banner and Ray's accelerator FutureWarning are silenced
    at their source (ted_fl.federated.notices); nothing else is."""
    stderr = (fed[0].parent / "stderr.txt").read_text()
    assert "DEPRECATED FEATURE" not in stderr and "run_simulation" not in stderr, stderr[-3000:]
    assert "FutureWarning" not in stderr and "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO" not in stderr, stderr[-3000:]


def test_run_directory(fed: tuple[Path, RunDir]) -> None:
    _, run = fed
    for name in ("config.toml", "metrics.csv", "summary.csv", "run.log", "splits.json"):
        assert (run.path / name).is_file(), name
    m = run.metrics()
    assert {"approach", "seed", "stage", "round", "site", "split", "metric", "value"} <= set(m.columns)
    dice = dice_rows(run)
    # 3 approaches x (3 stages + the untrained model) x 3 sites
    assert len(dice) == 3 * 4 * 3
    assert dice["value"].notna().all()
    summary = run.summary()
    assert sorted(summary["approach"]) == sorted(APPROACHES)
    assert (summary["bytes_sent"] > 0).all() and (summary["bytes_received"] > 0).all()
    for a in APPROACHES:
        for k in range(3):
            assert (run.ckpt_dir(a, 0) / f"stage{k}.pt").is_file()


def test_teacher_and_probes_bytes(fed: tuple[Path, RunDir]) -> None:
    """The teacher travels once per stage; SKA probes only for approaches that use SKA."""
    _, run = fed
    s = run.summary().set_index("approach")
    # ted_gugf sends the teacher (once a stage) and probes every round on top of the weights.
    assert s.loc["ted_gugf", "bytes_sent"] > s.loc["seq", "bytes_sent"]
    st = run.load_checkpoint("ted_gugf", 0, "last")
    kinds = st["executor"]["bytes_by_kind"]
    assert kinds["train_down"] > kinds["train_up"]


def test_matches_centralized(fed: tuple[Path, RunDir], tmp_path: Path) -> None:
    """With one client per site and the same seed, the R matrices agree to 1e-4 Dice."""
    from ted_fl.commands.shared import run_command

    cfg_path, run = fed
    assert run_command("centralized", ["--config", str(cfg_path), "--quiet", "--out", str(tmp_path)]) == 0
    (central,) = [RunDir(p) for p in tmp_path.iterdir() if p.is_dir()]
    a, b = dice_rows(run), dice_rows(central)
    assert list(a["site"]) == list(b["site"])
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), atol=1e-4)


def test_resume_after_kill(fed: tuple[Path, RunDir], tmp_path: Path) -> None:
    """SIGKILL a real run's driver half-way through; --resume ends what it left (Ray's processes,
    named in processes.json) and ends with the uninterrupted run's numbers."""
    import psutil

    cfg_path, full = fed
    proc = subprocess.Popen(
        [sys.executable, "-m", "ted_fl.simulate", "--quiet", "--config", str(cfg_path), "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 300
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if mid_run(tmp_path):
            children = psutil.Process(proc.pid).children(recursive=True)
            os.kill(proc.pid, signal.SIGKILL)  # the driver only, as `kill -9 PID` does
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=600)
    assert killed, f"the run ended before it could be killed (exit {proc.returncode}): {proc.stderr.read()[-2000:]}"
    (run_path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert not (run_path / "summary.csv").exists()
    assert (run_path / "processes.json").is_file()  # what the killed run left, for the next one
    resumed = simulate("--resume", str(run_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    left = [c for c in children if not is_gone(c)]  # a zombie has ended
    assert not left, [" ".join(cmdline(c))[:120] for c in left]
    assert not (run_path / "processes.json").exists()
    a, b = dice_rows(full), dice_rows(RunDir(run_path))
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), atol=1e-5)


def test_client_fault_is_retried_and_reported(tmp_path: Path, fed: tuple[Path, RunDir]) -> None:
    """A client that raises is named by site and round, retried, and the results are complete.

    The recovered fault is one warning line on the terminal (Flower's traceback goes to run.log)
    and summary.csv counts it as seen and retried, not unrecovered, for its site only."""
    cfg_path, env = faulty(tmp_path, "BMC:1:raise:1")
    proc = simulate("--config", str(cfg_path), "--approach", "seq", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fault_lines = [ln for ln in proc.stderr.splitlines() if "injected fault" in ln]
    assert len(fault_lines) == 1 and fault_lines[0].startswith("warning: site BMC failed in stage 1 round 1"), \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    run = run_dir_of(proc.stdout)
    log = (run.path / "run.log").read_text()
    assert "site BMC failed in stage 1 round 1" in log
    assert "Traceback" in log and "injected fault" in log  # Flower's own record, routed here
    s = run.summary().iloc[0]
    assert (s["faults_seen"], s["faults_retried"], s["faults_unrecovered"]) == (1, 1, 0)
    assert (s["faults_seen[BMC]"], s["faults_seen[RUNMC]"], s["faults_seen[I2CVB]"]) == (1, 0, 0)
    a, b = dice_rows(fed[1], "seq"), dice_rows(run, "seq")
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), atol=1e-5)


def test_teacher_travels_once_per_stage(fed: tuple[Path, RunDir]) -> None:
    """Round 0 of a later stage carries the teacher on top of the weights; other rounds do not."""
    _, run = fed
    m = run.metrics()
    comm = m[(m["approach"] == "ted_gugf") & (m["split"] == "comm")]
    down = comm[comm["metric"] == "bytes_down"].set_index(["stage", "round"])["value"]
    up = comm[comm["metric"] == "bytes_up"].set_index(["stage", "round"])["value"]
    model_bytes = up.loc[(0, 0)]  # a reply: the weights (and a few metrics)
    assert down.loc[(0, 0)] == pytest.approx(down.loc[(0, 1)], rel=0.01)
    for stage in (1, 2):
        extra = down.loc[(stage, 0)] - down.loc[(stage, 1)]
        assert extra == pytest.approx(model_bytes, rel=0.05), (stage, extra, model_bytes)
