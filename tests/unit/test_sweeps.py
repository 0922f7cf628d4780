"""The sweep runner's pieces: cells and their identity, reuse of finished cells, selection on validation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ted_fl.config import ExperimentConfig
from ted_fl.errors import TedFlError
from ted_fl.studies.grid import config_hash, expand, parse_grid, run_cells, select, sweep


def tiny() -> ExperimentConfig:
    cfg = ExperimentConfig(name="tiny")
    cfg.data.order, cfg.data.size, cfg.data.synthetic_volumes = ["RUNMC", "BMC"], 32, 4
    cfg.model.channels, cfg.model.strides = [4, 8, 16], [2, 2]
    cfg.train.rounds, cfg.train.steps_per_round, cfg.train.batch_size = 1, 2, 4
    return cfg


def test_expand_is_the_full_product_with_resolved_configs() -> None:
    cells = expand(tiny(), {"loss.lambda_d": [0.1, 1.0], "train.lr_first": [1e-3]}, ["seq", "kd"], [0, 1],
                   [["RUNMC", "BMC"], ["BMC", "RUNMC"]])
    assert len(cells) == 2 * 2 * 2 * 2
    c = next(c for c in cells if c.approach == "kd" and c.seed == 1 and c.point["loss.lambda_d"] == 1.0
             and c.order == ["BMC", "RUNMC"])
    assert c.cfg.approaches == ["kd"] and c.cfg.seeds == [1] and c.cfg.loss.lambda_d == 1.0
    assert c.cfg.data.order == ["BMC", "RUNMC"] and c.cfg.train.eval_val_all
    assert len({x.key for x in cells}) == len(cells)


def test_cell_identity_is_the_resolved_config_not_its_name() -> None:
    a, b = tiny(), tiny()
    b.name, b.out = "other", "elsewhere"
    assert config_hash(a) == config_hash(b)
    b.loss.w_akt = 0.5
    assert config_hash(a) != config_hash(b)


def test_bad_grid_input_is_a_clear_error() -> None:
    with pytest.raises(TedFlError, match="unknown key 'lamda_d'.*lambda_d"):
        expand(tiny(), {"loss.lamda_d": [0.1]})
    with pytest.raises(TedFlError, match="KEY=V1,V2"):
        parse_grid(["loss.lambda_d"])
    with pytest.raises(TedFlError, match="approach"):
        expand(tiny(), {}, ["tedd"])
    assert parse_grid(["loss.lambda_d=0.01, 0.1", "model.norm=batch,instance"]) == {
        "loss.lambda_d": [0.01, 0.1], "model.norm": ["batch", "instance"]}


def test_select_takes_the_best_mean_validation_point_and_reports_its_test() -> None:
    summary = pd.DataFrame([
        dict(approach="kd", seed=0, **{"loss.lambda_d": 0.1}, val_score=0.5, avg=0.9),
        dict(approach="kd", seed=1, **{"loss.lambda_d": 0.1}, val_score=0.7, avg=0.7),
        dict(approach="kd", seed=0, **{"loss.lambda_d": 1.0}, val_score=0.65, avg=0.1),
        dict(approach="kd", seed=1, **{"loss.lambda_d": 1.0}, val_score=0.6, avg=0.3),
    ])
    selection, test = select(summary, ["loss.lambda_d"])
    assert selection[selection["selected"] == "yes"]["loss.lambda_d"].tolist() == [1.0]  # 0.625 > 0.6
    assert test.loc[0, "avg"] == "0.200 ± 0.141" and test.loc[0, "cells"] == 2


@pytest.mark.slow
def test_serial_sweep_writes_tables_and_reuses_finished_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.unit.test_privacy_checks import count_checks

    counted = count_checks(monkeypatch)
    out = sweep(tiny(), {"loss.lambda_d": [0.1, 1.0]}, tmp_path / "s", approaches=["kd"], seeds=[0],
                parallel=False, quiet=True)
    assert out["ran"] == 2 and out["reused"] == 0
    summary = pd.read_csv(tmp_path / "s" / "summary.csv")
    assert len(summary) == 2 and {"cell", "loss.lambda_d", "val_score", "avg"} <= set(summary.columns)
    metrics = pd.read_csv(tmp_path / "s" / "metrics.csv")
    assert set(metrics["cell"]) == set(summary["cell"]) and "val_stage" in set(metrics["split"])
    assert "Selection on validation" in (tmp_path / "s" / "report.md").read_text()
    again = run_cells(out["cells"], tmp_path / "s", parallel=False, quiet=True)
    assert again["ran"] == 0 and again["reused"] == 2
    more = sweep(tiny(), {"loss.lambda_d": [0.1, 1.0, 10.0]}, tmp_path / "s", approaches=["kd"], seeds=[0],
                 parallel=False, quiet=True)
    assert more["ran"] == 1 and more["reused"] == 2
    assert len(counted["check"]) == 3  # resolved (so checked) once per cell run, never for a reused cell


def test_command_line_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ted_fl.sweep import main

    assert main(["--grid", "loss.lamda_d=0.1", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "unknown key 'lamda_d'" in err[0]
    assert main(["--order", "RUNMC,NOPE", "--approach", "seq", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "NOPE" in capsys.readouterr().err
    assert not (tmp_path / "s" / "summary.csv").exists()
