"""A multi-class run end to end: the mnms twin (LV, MYO, RV) through the centralized runner.

metrics.csv carries every class and the mean; the summary, results_doc and the report are
computed on the mean and show each label; a binary set keeps its numbers (class = mean).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ted_fl.commands.shared import run_command
from ted_fl.config import dump_toml, to_dict
from ted_fl.continual.metrics import continual_summary, r_matrix
from ted_fl.report import main as report_main
from ted_fl.results_doc import main as doc_main
from ted_fl.run.directory import RunDir, labels_of
from tests.conftest import tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_multiclass")]


def _run(tmp: Path, sites: str, order: list[str], approaches: list[str]) -> RunDir:
    cfg = tiny_config(tmp, approaches)
    cfg.data.sites, cfg.data.order = sites, order
    cfg.model.out_channels = 0  # follows the site set
    config = tmp / "exp.toml"
    config.write_text(dump_toml(to_dict(cfg)))
    assert run_command("centralized", ["--config", str(config), "--quiet"]) == 0
    (path,) = [p for p in (tmp / "runs").iterdir() if p.is_dir()]
    return RunDir(path)


@pytest.fixture(scope="module")
def mnms(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    return _run(tmp_path_factory.mktemp("mnms"), "mnms", ["Siemens", "GE"], ["seq", "ted_gugf"])


def test_metrics_have_every_class_and_the_mean(mnms: RunDir) -> None:
    assert mnms.read_config().model.out_channels == 4  # 3 classes + background, from the site set
    m = mnms.metrics()
    assert labels_of(m) == ["LV", "MYO", "RV", "mean"]
    test = m[(m["split"] == "test") & (m["metric"] == "dice")]
    wide = test.pivot_table(index=["approach", "stage", "site"], columns="label", values="value")
    np.testing.assert_allclose(wide["mean"], wide[["LV", "MYO", "RV"]].mean(axis=1))
    assert set(m.loc[m["split"] == "train", "label"]) == {""}


def test_summary_is_the_mean_label_with_per_label_columns(mnms: RunDir) -> None:
    m, summary = mnms.metrics(), mnms.summary().set_index("approach")
    test = m[(m["split"] == "test") & (m["stage"] >= 0) & (m["approach"] == "seq")]
    for label, col in (("mean", "avg"), ("LV", "avg[LV]"), ("RV", "avg[RV]")):
        expected = continual_summary(r_matrix(test, "dice", label=label))["avg"]
        assert summary.loc["seq", col] == pytest.approx(expected)
    assert summary.loc["seq", "bwt[MYO]"] == pytest.approx(
        continual_summary(r_matrix(test, "dice", label="MYO"))["bwt"])


def test_results_doc_and_report_show_each_label(mnms: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    assert doc_main([str(mnms.path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Per class and region" in text and "Dice R matrices of MYO" in text
    summary = mnms.summary().set_index("approach")
    assert f"{summary.loc['seq', 'avg']:.3f}" in text
    page = tmp_path / "rv.html"
    assert report_main([str(mnms.path), "--no-samples", "--label", "RV", "--out", str(page)]) == 0
    html = page.read_text()
    assert "Per class and region" in html and "Dice of RV (label <b>RV</b>)" in html
    assert html.count("Dice of RV") >= 4  # the page and every figure title name the label shown
    assert report_main([str(mnms.path), "--no-samples", "--label", "LVV", "--out", str(page)]) == 2


def test_binary_set_label_is_its_class_and_equals_the_mean(tmp_path: Path) -> None:
    run = _run(tmp_path, "prostate", ["RUNMC", "BMC"], ["seq"])
    m = run.metrics()
    assert labels_of(m) == ["prostate", "mean"]
    test = m[m["split"].isin(["test", "val"])]
    wide = test.pivot_table(index=["split", "stage", "round", "site", "metric"], columns="label", values="value")
    pd.testing.assert_series_equal(wide["prostate"], wide["mean"], check_names=False)
    assert not any(c.startswith("avg[") for c in run.summary().columns)
