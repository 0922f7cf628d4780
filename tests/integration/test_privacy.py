"""End to end: client-level DP (Flower's DP strategy and clipping mod, TED's teacher and probes in the
same train message) and sample-level DP-SGD (Opacus in the Flower clients) reach summary.csv; the
centralized runner's client-level DP (in-process, no Ray) composes a retained site's stages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ted_fl.commands.shared import run_command
from ted_fl.config import to_dict
from ted_fl.privacy.mechanisms import client_noise_multiplier, epsilon_spent
from ted_fl.run.directory import RunDir
from tests.integration.simulation_helpers import run_dir_of, simulate, write_config
from tests.unit.test_privacy_checks import count_checks

pytestmark = pytest.mark.slow


def test_dp_client_and_sample_reach_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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

    # centralized, retention 1, one round: a retained site releases in two stages (2 x sigma calibrated for 1)
    (tmp_path / "central").mkdir()
    cfg_path = write_config(tmp_path / "central", federated__retention=1)
    counted = count_checks(monkeypatch)
    assert run_command("centralized", ["--config", str(cfg_path), "--approach", "seq", "--quiet", "--set",
                                       'privacy.dp="client"', "--set", "privacy.epsilon=8", "--set",
                                       "train.rounds=1"]) == 0
    run = RunDir(next(p for p in (tmp_path / "central" / "runs").iterdir() if p.is_dir()))
    # resolved and checked once at the entry point; the executors, the schedule and the run directory
    # neither check again nor change the resolved config (config.toml is the resolved experiment)
    assert len(counted["check"]) == 1 and len(counted["resolve"]) == 1
    exp, as_resolved = counted["resolve"][0]
    assert to_dict(exp.cfg) == as_resolved == to_dict(run.read_config()) and exp.cfg.model.norm == "group"
    m = run.metrics()
    accounting = m["metric"].isin(["epsilon", "epsilon_total", "delta", "noise_multiplier", "steps"])
    priv = m[(m["split"] == "privacy") & accounting].pivot_table(index=["stage", "site"], columns="metric", values="value")
    assert len(priv) == 5 and priv["epsilon"].between(7.5, 8.1).all()  # 3 arrivals + 2 retained sites
    two = epsilon_spent([(client_noise_multiplier(8.0, 1e-5, 1), 1.0, 2)], 1e-5)
    assert priv.loc[(1, "RUNMC"), "epsilon_total"] == pytest.approx(two)
    assert float(run.summary()["epsilon"].iloc[0]) == pytest.approx(two)
