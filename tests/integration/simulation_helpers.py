"""Helpers shared by the end-to-end simulation tests: a tiny config, the command line, a run's Dice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from ted_fl.config import dump_toml, to_dict
from ted_fl.run.directory import RunDir
from tests.conftest import REPO, tiny_config

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
