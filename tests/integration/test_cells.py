"""Cells at the same time give the numbers of cells one after another, exactly (ted_fl.schedule.cells):
`centralized` (a Ray task per cell) and `simulate` (schedules as threads of one ServerApp, a block of
SuperNodes each), a killed concurrent run resumed, and the audit per cell."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ted_fl.config import dump_toml, to_dict
from ted_fl.run.directory import RunDir
from tests.conftest import mid_run, tiny_config

pytestmark = pytest.mark.slow  # no xdist group: the module shares only a config file, so its runs spread over both workers


def write_config(tmp: Path) -> Path:
    cfg = tiny_config(tmp, ["seq", "ted_gugf"])
    cfg.seeds = [0, 1]
    cfg.train.rounds = 1
    cfg.train.steps_per_round = 2
    path = tmp / "experiment.toml"
    path.write_text(dump_toml(to_dict(cfg)))
    return path


def command(mode: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", f"ted_fl.{mode}", "--quiet", *args],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_dir_of(out: str) -> RunDir:
    line = [ln for ln in out.splitlines() if ln.startswith("run directory: ")][-1]
    return RunDir(line.split(": ", 1)[1].strip())


def numbers(run: RunDir) -> pd.DataFrame:
    """Every metric but the wall times, in a fixed order."""
    m = run.metrics()
    m = m[m["split"] != "time"].drop(columns=["stage_site"])
    return m.sort_values(["approach", "seed", "stage", "round", "site", "split", "label", "metric"]).reset_index(drop=True)


def same(a: RunDir, b: RunDir) -> None:
    pd.testing.assert_frame_equal(numbers(a), numbers(b), check_exact=True)
    cols = [c for c in a.summary().columns if c != "wall_s"]
    pd.testing.assert_frame_equal(a.summary()[cols], b.summary()[cols], check_exact=True)


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("cells"))


def test_simulate_cells_at_once_equal_one_after_another(cfg_path: Path, tmp_path: Path) -> None:
    """Also what travelled: the bytes of every message and the audit, per cell."""
    one = command("simulate", "--config", str(cfg_path), "--out", str(tmp_path / "one"),
                  "--set", "train.cells_in_parallel=1")
    two = command("simulate", "--config", str(cfg_path), "--out", str(tmp_path / "two"),
                  "--set", "train.cells_in_parallel=2")
    a, b = run_dir_of(one.stdout), run_dir_of(two.stdout)
    assert "2 at once" in (b.path / "run.log").read_text()
    assert "6 SuperNodes serve 3 sites x clients for 2 schedules at once" in two.stdout
    same(a, b)
    key = ["approach", "seed", "site", "kind", "direction", "record"]
    audit_a = pd.read_csv(a.path / "audit.csv").sort_values(key).reset_index(drop=True)
    audit_b = pd.read_csv(b.path / "audit.csv").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(audit_a, audit_b, check_exact=True)


def test_a_killed_concurrent_run_resumes_every_cell(cfg_path: Path, tmp_path: Path) -> None:
    """SIGKILL the run (its driver and Ray's processes) while two cells run as Ray tasks; --resume
    continues each from its last round and ends with the numbers of the run one cell after another."""
    whole = command("centralized", "--config", str(cfg_path), "--out", str(tmp_path / "whole"),
                    "--set", "train.cells_in_parallel=1")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ted_fl.centralized", "--quiet", "--config", str(cfg_path),
                             "--out", str(out), "--set", "train.cells_in_parallel=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    killed = False
    while time.monotonic() < deadline and proc.poll() is None and not killed:
        if mid_run(out):
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes of its session
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=600)
    assert killed, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    (run_path,) = [p for p in out.iterdir() if p.is_dir()]
    assert not (run_path / "summary.csv").exists()
    resumed = command("centralized", "--resume", str(run_path))
    assert "resumed at stage" in (run_path / "run.log").read_text()
    assert (run_path / "summary.csv").is_file()
    same(run_dir_of(whole.stdout), run_dir_of(resumed.stdout))


def test_bench_cells_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m ted_fl.bench cells --quick`: `centralized` with its cells one at a time, then 2 at once
    (Ray tasks); every metric identical (the bench compares them exactly and exits 1 if not)."""
    from ted_fl.bench import main

    rc = main(["cells", "--quick", "--mode", "centralized", "--cells", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("cells: centralized ") and "2 at once" in last and "numbers identical: yes" in last, last
