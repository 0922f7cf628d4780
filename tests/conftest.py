"""Shared fixtures: tiny experiments (3 synthetic sites, 32 px, a tiny U-Net, few steps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ted_fl.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def mid_run(out: Path) -> bool:
    """Whether a run under `out` is well inside its schedule (a cell has finished a stage and is not
    done): the moment the kill-and-resume tests kill it, whatever the machine's speed."""
    import torch

    for ckpt in out.glob("*/checkpoints/*/last.pt"):
        try:
            st = torch.load(ckpt, weights_only=False)
        except Exception:  # being replaced right now
            continue
        if st["stage"] >= 1 and not st["done"]:
            return True
    return False


def tiny_config(tmp: Path, approaches: list[str] | None = None) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.name = "tiny"
    cfg.approaches = approaches or ["seq", "ted_gugf"]
    cfg.seeds = [0]
    cfg.out = str(tmp / "runs")
    cfg.data.sites = "prostate"
    cfg.data.order = ["RUNMC", "BMC", "I2CVB"]
    cfg.data.size = 32
    cfg.data.synthetic_volumes = 4
    cfg.data.cache_dir = str(tmp / "cache")
    cfg.model.channels = [4, 8, 16]
    cfg.model.strides = [2, 2]
    cfg.train.rounds = 2
    cfg.train.steps_per_round = 3
    cfg.train.batch_size = 4
    cfg.train.lr_first = 1e-3
    cfg.train.lr_later = 5e-4
    cfg.loss.lambda_d = 1.0
    cfg.federated.timeout = 120.0
    # The suite's many tiny runs skip Flower's 0.1 s polling (the latency patch); the shared `fed`
    # run of test_simulation keeps Flower's own message path, the default.
    cfg.federated.fast_polling = True
    # The suite already runs 2 xdist workers on 2 cores: its tiny runs take their cells one at a time
    # (no Ray start per centralized run); tests/integration/test_cells.py runs cells at once.
    cfg.train.cells_in_parallel = 1
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> ExperimentConfig:
    return tiny_config(tmp_path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
