"""End to end: client-level DP (Flower's DP strategy and clipping mod, TED's teacher and probes in the
same train message) and sample-level DP-SGD (Opacus in the Flower clients) reach summary.csv."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.integration.test_simulation import run_dir_of, simulate, write_config

pytestmark = pytest.mark.slow


def test_dp_client_and_sample_reach_summary(tmp_path: Path) -> None:
    for level, extra in (("client", ["--set", "federated.clients_per_site=2", "--set", "train.rounds=2"]),
                         ("sample", ["--set", "train.rounds=1", "--set", 'loss.gugf="sample"'])):
        (tmp_path / level).mkdir()
        cfg_path = write_config(tmp_path / level)
        proc = simulate("--config", str(cfg_path), "--approach", "ted_gugf", "--set", f'privacy.dp="{level}"',
                        "--set", "privacy.epsilon=8", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = run_dir_of(proc.stdout)
        summary = run.summary()
        eps = float(summary["epsilon"].iloc[0])
        assert math.isfinite(eps) and 7.5 < eps <= 8.1, (level, eps)
        assert float(summary["delta"].iloc[0]) == pytest.approx(1e-5)
        m = run.metrics()
        priv = m[(m["split"] == "privacy") & (m["metric"] == "epsilon")]
        sites = {"client": 3 * 2, "sample": 3}[level]  # every site (client) and stage has its epsilon
        assert len(priv) == sites and priv["value"].between(0, 8.1).all()
        dice = m[(m["split"] == "test") & (m["metric"] == "dice")]
        assert dice["value"].notna().all()
        log = (run.path / "run.log").read_text()
        assert "model.norm 'batch' -> 'group'" in log and "privacy: ted_gugf seed 0 stage 2" in log
        assert 'norm = "group"' in (run.path / "config.toml").read_text()
