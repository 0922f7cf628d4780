"""`python -m ted_fl.study privacy` end to end on the tiny config: two epsilons (DP-SGD at 4, none
at inf), one approach, one seed; the table, the report, and a rerun that reuses both cells."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from ted_fl.config import dump_toml, to_dict
from ted_fl.study import main
from tests.conftest import tiny_config


@pytest.mark.slow
def test_privacy_study_writes_the_table_and_reuses_cells(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config(tmp_path, ["kd"])
    cfg.train.rounds, cfg.train.steps_per_round = 1, 2
    toml = tmp_path / "tiny.toml"
    toml.write_text(dump_toml(to_dict(cfg)))
    out, doc = tmp_path / "study", tmp_path / "results.md"
    argv = ["privacy", "--config", str(toml), "--epsilon", "4", "inf", "--approach", "kd", "--seed", "0",
            "--out", str(out), "--serial", "--quiet", "--doc", str(doc)]
    assert main(argv) == 0
    table = pd.read_csv(out / "study.csv")
    assert sorted(table["target_epsilon"]) == [4.0, math.inf] and set(table["approach"]) == {"kd"}
    for col in ("avg", "bwt", "mia_auc", "mia_auc_cal", "epsilon", "mia_auc@RUNMC"):
        assert table[col].notna().all(), col
    dp = table[table["target_epsilon"] == 4.0].iloc[0]
    assert 0 < dp["epsilon"] <= 4.0 + 1e-6  # the accountant's spent epsilon, read from the cell's summary
    assert math.isinf(table[table["target_epsilon"] == math.inf].iloc[0]["epsilon"])
    assert all(0.0 <= v <= 1.0 for v in table["mia_auc"])
    mean = pd.read_csv(out / "study_mean.csv")
    assert {"avg", "avg_std", "bwt_std", "mia_auc_std", "seeds"} <= set(mean.columns)
    html = (out / "report.html").read_text()
    assert html.count('class="plotly-graph-div"') >= 3 and "attack AUC" in html
    assert "<!-- section:privacy-prostate:start -->" in doc.read_text()
    capsys.readouterr()
    # a rerun reuses both cells (same configuration hash) and rewrites the same table
    assert main(argv) == 0
    assert "2 cells (0 run, 2 reused)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out / "study.csv"), table)
    # bad input: one line, exit 2, nothing written
    assert main(["privacy", "--config", str(toml), "--epsilon", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "epsilon must be > 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()
