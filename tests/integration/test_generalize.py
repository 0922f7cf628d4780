"""End to end: `python -m ted_fl.generalize` on Flower + Ray with two tiny synthetic sites (32 px)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY = ["--sites", "prostate", "--source", "RUNMC", "--size", "32", "--teacher", "basic_unet",
        "--student", "small_unet", "--set", 'data.order=["RUNMC", "BMC"]', "--set", "data.synthetic_volumes=4",
        "--set", "gkd.teacher_channels=[4, 4, 8, 8, 16, 4]", "--set", "gkd.psae_channels=[4, 4, 4, 32]",
        "--set", "gkd.code_dim=32", "--set", "gkd.code_side=4", "--set", "gkd.steps_teacher=2",
        "--set", "gkd.steps_student=2", "--set", "gkd.steps_psae=1", "--set", "gkd.steps_act=1",
        "--set", "gkd.views=2", "--set", "gkd.batch_size=2", "--set", "gkd.latency_repeats=1"]


def generalize(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ted_fl.generalize", *TINY, "--set", f'data.cache_dir="{tmp / "cache"}"',
           "--out", str(tmp / "runs"), "--quiet", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_generalize_end_to_end(tmp_path: Path) -> None:
    proc = generalize(tmp_path, "--approach", "student", "kd", "gkd", "--seed", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    df = pd.read_csv(run / "metrics.csv")
    from ted_fl.run.directory import METRIC_COLUMNS

    assert list(df.columns) == METRIC_COLUMNS
    assert set(df["approach"]) == {"teacher", "student", "kd", "gkd"}
    for site in ("RUNMC", "BMC"):
        got = set(df[(df["site"] == site) & (df["approach"] == "gkd")]["metric"])
        assert {"dice", "se", "sp", "acc", "auc", "miou", "fsd_teacher", "fsd_source"} <= got
    sizes = df[df["site"] == "all"].pivot_table(index="approach", columns="metric", values="value")
    assert sizes.loc["teacher", "macs"] > sizes.loc["gkd", "macs"] > 0
    assert (df[df["metric"].isin(["dice", "auc"])]["value"].between(0, 1)).all()
    assert "Generalizable distillation" in (run / "report.md").read_text()
    assert (run / "summary.csv").is_file() and (run / "splits.json").is_file()
    # the teacher checkpoint feeds the continual combination
    from ted_fl.continual.combined import load_fixed_teacher

    teacher = load_fixed_teacher(run / "checkpoints" / "teacher-seed0" / "teacher.pt")
    assert sum(p.numel() for p in teacher.parameters()) > 0


def test_generalize_bad_source_is_one_line_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "ted_fl.generalize", "--sites", "prostate", "--source", "NOWHERE",
                           "--out", str(tmp_path / "runs")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown source site 'NOWHERE'") and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
