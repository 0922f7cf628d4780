"""Generated docs: the results page and the README block are computed from a run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from ted_fl.cli import run_command
from ted_fl.config import dump_toml, to_dict
from ted_fl.results import RunDir
from ted_fl.results_doc import main
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    tmp = tmp_path_factory.mktemp("doc")
    cfg = tiny_config(tmp, ["seq", "kd"])
    (tmp / "exp.toml").write_text(dump_toml(to_dict(cfg)))
    assert run_command("centralized", ["--config", str(tmp / "exp.toml"), "--quiet"]) == 0
    (path,) = [p for p in (tmp / "runs").iterdir() if p.is_dir()]
    return RunDir(path)


def test_results_page(run: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    assert main([str(run.path), "--out", str(out), "--title", "T"]) == 0
    text = out.read_text()
    summary = run.summary().set_index("approach")
    assert f"{summary.loc['seq', 'avg']:.3f}" in text  # the numbers are the run's own
    assert "**seq**" in text and "**kd**" in text and "after RUNMC" in text
    assert "python -m ted_fl.centralized" in text  # the command that made the run


def test_readme_block_replaces_only_its_section(run: RunDir, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:default-run:start -->\nold\n<!-- results:default-run:end -->\n\nkeep\n")
    assert main([str(run.path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "keep" in text and "| seq |" in text
    assert text.count("<!-- results:default-run:start -->") == 1


def test_bad_run_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--out", str(tmp_path / "x.md")]) == 2
    assert "not a ted-fl run directory" in capsys.readouterr().err


def test_bn_stats_diagnostic(run: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-estimating BN statistics per site leaves the weights alone and scores every site."""
    from ted_fl.diagnose import main as diagnose

    assert diagnose(["bn-stats", str(run.path), "--approach", "seq"]) == 0
    import pandas as pd

    df = pd.read_csv(run.path / "diagnostics" / "bn_stats-seq-seed0.csv")
    assert list(df["site"]) == ["RUNMC", "BMC", "I2CVB"]
    assert df[["dice_final_stats", "dice_own_stats"]].stack().between(0, 1).all()
    assert "bn-stats: mean test Dice" in capsys.readouterr().out
    assert diagnose(["bn-stats", str(run.path), "--approach", "nope"]) == 2
