"""Continual metrics on a hand-made 3 x 3 R matrix with hand-computed values."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ted_fl.continual.metrics import continual_summary, curves, r_matrix
from ted_fl.errors import TedFlError

SITES = ["A", "B", "C"]
R_ROWS = [[0.8, 0.3, 0.2], [0.6, 0.9, 0.4], [0.5, 0.7, 0.85]]


def tidy() -> pd.DataFrame:
    rows = []
    for t, row in enumerate(R_ROWS):
        for site, v in zip(SITES, row, strict=True):
            rows.append(
                {"approach": "ted", "seed": 0, "stage": t, "site": site, "metric": "dice", "value": v}
            )
            rows.append(
                {"approach": "ted", "seed": 0, "stage": t, "site": site, "metric": "hd95", "value": 9.0}
            )
    df = pd.DataFrame(rows)
    # shuffle the stages but keep the sites' first appearance in arrival order
    return pd.concat([df[df.stage == 2], df[df.stage == 0], df[df.stage == 1]], ignore_index=True)


def test_r_matrix_rows_stages_cols_arrival_order() -> None:
    r = r_matrix(tidy(), "dice")
    assert list(r.columns) == SITES
    assert list(r.index) == [0, 1, 2]
    assert r.to_numpy().tolist() == R_ROWS
    assert list(r_matrix(tidy(), order=["C", "A", "B"]).columns) == ["C", "A", "B"]


def test_r_matrix_errors_name_the_problem() -> None:
    with pytest.raises(TedFlError, match="iou"):
        r_matrix(tidy(), "iou")
    with pytest.raises(TedFlError, match="value"):
        r_matrix(tidy().drop(columns="value"))


def test_summary_hand_computed() -> None:
    r = r_matrix(tidy())
    s = continual_summary(r)
    assert s["avg"] == pytest.approx((0.5 + 0.7 + 0.85) / 3)
    assert s["bwt"] == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25
    assert s["rbwt"] == pytest.approx((-0.3 / 0.8 - 0.2 / 0.9) / 2)
    assert s["fwt"] == pytest.approx((0.3 + 0.4) / 2)  # b_i = 0
    assert s["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)  # 0.25
    assert s["plasticity"] == pytest.approx((0.8 + 0.9 + 0.85) / 3)
    assert math.isnan(s["ravg"])

    joint = pd.Series({"C": 0.85, "A": 1.0, "B": 0.875})  # any order: matched by site
    initial = pd.Series({"A": 0.1, "B": 0.2, "C": 0.1})
    s = continual_summary(r, joint=joint, initial=initial)
    assert s["ravg"] == pytest.approx((0.5 / 1.0 + 0.7 / 0.875 + 0.85 / 0.85) / 3)
    assert s["fwt"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.1)) / 2)  # 0.2


def test_forgetting_uses_max_over_all_earlier_stages() -> None:
    r = pd.DataFrame([[0.5, 0.1], [0.9, 0.8]], columns=["A", "B"])  # A improves after B arrives
    s = continual_summary(r)
    assert s["forgetting"] == pytest.approx(0.5 - 0.9)  # negative forgetting: A got better
    assert s["bwt"] == pytest.approx(0.9 - 0.5)


def test_single_stage_is_nan_not_error() -> None:
    s = continual_summary(pd.DataFrame([[0.7, 0.2]], columns=["A", "B"]))
    assert s["avg"] == pytest.approx(0.7)
    assert math.isnan(s["bwt"]) and math.isnan(s["fwt"]) and math.isnan(s["forgetting"])


def test_curves_per_stage() -> None:
    c = curves(r_matrix(tidy()), joint=pd.Series({"A": 1.0, "B": 1.0, "C": 1.0}))
    assert c["avg"].tolist() == pytest.approx([0.8, 0.75, 2.05 / 3])
    assert math.isnan(c.loc[0, "bwt"]) and math.isnan(c.loc[0, "forgetting"])
    assert c.loc[1, "bwt"] == pytest.approx(-0.2)
    assert c.loc[2, "bwt"] == pytest.approx(-0.25)
    assert c.loc[2, "forgetting"] == pytest.approx(0.25)
    assert c["plasticity"].tolist() == pytest.approx([0.8, 0.9, 0.85])
    assert c["ravg"].tolist() == pytest.approx(c["avg"].tolist())
    assert c["site"].tolist() == SITES


def test_r_matrix_reads_one_label_the_mean_by_default() -> None:
    from ted_fl.run.directory import label_metric

    df = tidy()
    multi = pd.concat([df.assign(label="mean"), df.assign(label="LV", value=df["value"] / 2)])
    pd.testing.assert_frame_equal(r_matrix(multi), r_matrix(df))
    pd.testing.assert_frame_equal(r_matrix(multi, label="LV"), r_matrix(df) / 2)
    with pytest.raises(TedFlError, match="no rows for label 'RV'; the table has: LV, mean"):
        r_matrix(multi, label="RV")
    assert label_metric("LV/dice", "test") == ("LV", "dice")
    assert label_metric("dice", "val") == ("mean", "dice")
    assert label_metric("seg", "train") == ("", "seg")


def test_metrics_written_before_the_label_column_read_as_mean(tmp_path) -> None:  # noqa: ANN001
    from ted_fl.run.directory import RunDir

    (tmp_path / "config.toml").write_text("")
    pd.DataFrame([
        dict(approach="seq", seed=0, stage=0, stage_site="A", round=0, site="A", split="test", metric="dice", value=0.5),
        dict(approach="seq", seed=0, stage=0, stage_site="A", round=0, site="A", split="train", metric="seg", value=1.0),
    ]).to_csv(tmp_path / "metrics.csv", index=False)
    m = RunDir.open(tmp_path).metrics()
    assert list(m["label"]) == ["mean", ""]
    assert r_matrix(m[m["split"] == "test"]).iloc[0, 0] == 0.5
