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
import pandas as pd
import pytest

from ted_fl.config import dump_toml, to_dict
from ted_fl.run.directory import RunDir
from ted_fl.run.processes import cmdline, is_gone
from tests.conftest import REPO, mid_run, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_simulation")]

APPROACHES = ["seq", "ted_gugf", "ewc"]


def write_config(tmp: Path, **over: object) -> Path:
    cfg = tiny_config(tmp, APPROACHES)
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    path = tmp / "experiment.toml"
    path.write_text(dump_toml(to_dict(cfg)))
    return path


def simulate(*args: str, env: dict[str, str] | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    """The command line in a subprocess; the time-out only stops a hung run (a loaded machine is slow)."""
    return subprocess.run(
        [sys.executable, "-m", "ted_fl.simulate", "--quiet", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def faulty(tmp: Path, fault: str, **over: object) -> tuple[Path, dict[str, str]]:
    """A config running the test-only ClientApp with the fault mod (tests/faults.py), and its env."""
    cfg_path = write_config(tmp, federated__client_app="tests.faults:app", **over)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return cfg_path, {"TED_FL_INJECT_FAULT": fault, "PYTHONPATH": path}


def run_dir_of(out: str) -> RunDir:
    line = [ln for ln in out.splitlines() if ln.startswith("run directory: ")][-1]
    return RunDir(line.split(": ", 1)[1].strip())


def dice_rows(run: RunDir, approach: str | None = None) -> pd.DataFrame:
    m = run.metrics()
    m = m[(m["split"] == "test") & (m["metric"] == "dice") & (m["label"] == "mean")]  # the mean over classes
    if approach:
        m = m[m["approach"] == approach]
    return m.sort_values(["approach", "seed", "stage", "site"]).reset_index(drop=True)


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
