"""Generated docs: the results page and the README block are computed from a run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from ted_fl.commands.shared import run_command
from ted_fl.config import dump_toml, to_dict
from ted_fl.results_doc import main
from ted_fl.run.directory import RunDir
from tests.conftest import tiny_config

pytestmark = pytest.mark.xdist_group("test_results_doc")  # one shared run per module under -n


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
    assert "Findings (paired by seed" in text and "kd - seq: forgetting" in text  # the paired findings
    assert "beyond one standard deviation" not in text  # no unpaired verdicts on a page


def test_readme_block_replaces_only_its_section(run: RunDir, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:default-run:start -->\nold\n<!-- results:default-run:end -->\n\nkeep\n")
    assert main([str(run.path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and "keep" in text and "| seq |" in text
    assert text.count("<!-- results:default-run:start -->") == 1
    from ted_fl.run.directory import site_learning, verdict

    assert "specific to the machine above" in text and "another CPU" in text
    for line in verdict(run.summary(), site_learning(run.metrics())):  # the verdict, and any budget warning
        assert f"- {line}" in text


def test_bad_run_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--out", str(tmp_path / "x.md")]) == 2
    assert "not a ted-fl run directory" in capsys.readouterr().err


def test_eval_bn_diagnostic(run: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    """Every stage checkpoint rescored under both eval.bn modes; the batch mode's scores are the
    ones the batch-mode evaluation gives, and a wrong approach is a one-line error."""
    import pandas as pd

    from ted_fl.continual.evaluation import evaluate
    from ted_fl.continual.networks import build_model
    from ted_fl.data import load_sites
    from ted_fl.diagnose import main as diagnose
    from ted_fl.schedule.engine import load_weights

    assert diagnose(["eval-bn", str(run.path), "--approach", "seq"]) == 0
    df = pd.read_csv(run.path / "diagnostics" / "eval_bn-seq-seed0.csv")
    assert set(df["mode"]) == {"running", "batch"} and sorted(df["stage"].unique()) == [0, 1, 2]
    assert list(df["site"].drop_duplicates()) == ["RUNMC", "BMC", "I2CVB"]
    assert df["value"].between(0, 1).all()
    cfg = run.read_config()
    site = load_sites(cfg.data, cfg.data.split_seed)[0]
    model = load_weights(build_model(cfg.model), run.load_checkpoint("seq", 0, "stage2")["weights"])
    got = df[(df["mode"] == "batch") & (df["stage"] == 2) & (df["site"] == site.name)]["value"].item()
    assert got == pytest.approx(evaluate(model, site.test, per_volume=site.per_volume, bn="batch",
                                         labels=site.labels.labels())["dice"])
    from ted_fl.run.directory import select_label

    running = select_label(run.metrics())
    running = running[(running["split"] == "test") & (running["metric"] == "dice") & (running["approach"] == "seq")
                      & (running["stage"] == 2) & (running["site"] == site.name)]["value"].item()
    assert df[(df["mode"] == cfg.eval.bn) & (df["stage"] == 2) & (df["site"] == site.name)]["value"].item() == (
        pytest.approx(running))  # the run itself was scored with its own eval.bn
    out = capsys.readouterr().out
    assert "eval-bn: seq seed 0" in out and "| running |" in out and "| batch |" in out
    assert diagnose(["eval-bn", str(run.path), "--approach", "nope"]) == 2


def test_mean_std_shown() -> None:
    """Several seeds print mean ± std (the ordering is judged by paired findings, tested below)."""
    import pandas as pd

    from ted_fl.run.results_page import shown

    summary = pd.DataFrame([{"approach": "kd", "seeds": 3, "avg": 0.5, "avg_sd": 0.01, "bwt": -0.3, "bwt_sd": 0.02,
                             "forgetting": 0.3, "forgetting_sd": 0.02, "plasticity": 0.8,
                             "plasticity_sd": 0.0}]).set_index("approach")
    assert shown(summary).loc["kd", "forgetting"] == "0.300 ± 0.020"


def test_pooled_runs_of_one_configuration(run: RunDir, tmp_path: Path) -> None:
    """RUN+RUN pools seeds of one configuration (mean ± std); other differences are refused."""
    import shutil

    import pandas as pd

    from ted_fl.run.results_page import open_run, run_tables

    def copy(seed: int, name: str, **change: object) -> Path:
        dst = tmp_path / name
        shutil.copytree(run.path, dst, ignore=shutil.ignore_patterns("checkpoints", "client_state"))
        cfg = RunDir(dst).read_config()
        cfg.seeds = [seed]
        for k, v in change.items():
            setattr(cfg.train, k, v)
        RunDir(dst).write_config(cfg)
        for f in ("metrics.csv", "summary.csv"):
            df = pd.read_csv(dst / f)
            df["seed"] = seed
            df.to_csv(dst / f, index=False)
        return dst

    other = copy(1, "seed1")
    pooled = open_run(f"{run.path}+{other}")
    assert pooled.read_config().seeds == [0, 1]
    _, summary = run_tables(pooled)
    assert (summary["seeds"] == 2).all() and (summary["bwt_sd"] == 0.0).all()  # a copy: no spread
    out = tmp_path / "r.md"
    assert main([f"{run.path}+{other}", "--out", str(out)]) == 0
    assert "± 0.000" in out.read_text()
    assert main([f"{run.path}+{copy(2, 'lr', lr_first=0.5)}", "--out", str(out)]) == 2


def test_terminal_verdict_and_budget_warning(run: RunDir, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny budget (2 rounds x 3 steps): the summary's verdict says it cannot separate the approaches."""
    from ted_fl.commands.shared import print_verdict
    from ted_fl.run.directory import budget_check, site_learning, verdict

    print_verdict(run.summary(), run)
    out = capsys.readouterr().out.splitlines()
    lines = verdict(run.summary(), site_learning(run.metrics()))
    warnings = budget_check(run.summary(), site_learning(run.metrics()))
    assert out == [("warning: " if x in warnings else "verdict: ") + x for x in lines]
    assert any(x.startswith("warning: ") and "cannot separate the approaches" in x for x in out)
    assert out[0].startswith("verdict: ") and "seq" in out[0]


def test_default_page_goes_into_the_run_directory(run: RunDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Without --out the page is the run's own results.md, never ./docs/results.md of wherever the
    command runs (a checkout's page); several runs must name their page."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    assert main([str(run.path)]) == 0
    assert (run.path / "results.md").is_file() and not list((tmp_path / "docs").iterdir())
    (run.path / "results.md").unlink()
    assert main([str(run.path), str(run.path)]) == 2
    assert "name the page with --out FILE" in capsys.readouterr().err


def test_seeds_to_detect_matches_the_paired_t_tables() -> None:
    """A paired t-test at 5 %, power 0.8: effect size delta / sd = 1 needs 10 seeds, 0.5 needs 34
    (the one-sample t-test's textbook sample sizes); no spread needs the minimum, none measured: unknown."""
    from ted_fl.run.headline import seeds_to_detect

    assert seeds_to_detect(0.02, 0.02) == 10
    assert seeds_to_detect(0.04, 0.02) == 34
    assert seeds_to_detect(0.0) == 2 and seeds_to_detect(float("nan")) is None


def test_headline_findings_are_paired_by_seed() -> None:
    """Each finding carries the paired mean difference and its 95 % t-interval, computed by hand here:
    d = ted - seq = (-0.05, -0.06, -0.04) has mean -0.05 and sd 0.01, so the interval is
    -0.05 ± t(0.975, 2) * 0.01 / sqrt(3) = [-0.075, -0.025]; seq's and kd's seeds shifted alike
    give a difference of exactly +0.02 with no spread, which 2 seeds detect."""
    import pandas as pd

    from ted_fl.run.headline import headline_findings

    f = {"seq": [0.10, 0.12, 0.14], "ted": [0.05, 0.06, 0.10], "kd": [0.12, 0.14, 0.16]}
    rows = pd.DataFrame([{"approach": a, "seed": s, "avg": 0.5, "bwt": -v, "forgetting": v, "plasticity": 0.7}
                         for a, vs in f.items() for s, v in enumerate(vs)])
    lines = headline_findings(rows)
    assert lines[0] == "Fine-tuning (seq): BWT -0.120 [95% CI -0.170, -0.070] over 3 seed(s) (it forgets)."
    ted_kd = next(x for x in lines if "ted - kd" in x)
    assert ted_kd.startswith("Paper's ordering: ted forgets less than kd")
    ted_seq = next(x for x in lines if "ted - seq" in x)
    assert "ted - seq = -0.050 [95% CI -0.075, -0.025] (n=3)" in ted_seq
    assert "seeds to detect 0.02 at this spread: 5" in ted_seq  # sd 0.01: effect size 2
    kd_seq = next(x for x in lines if "kd - seq" in x)
    assert "+0.020" in kd_seq and "kd forgets more than seq" in kd_seq and "at this spread: 2" in kd_seq


def test_headline_block_from_a_sweep_folder(run: RunDir, tmp_path: Path) -> None:
    """A sweep folder's finished cells (one approach each) read as one run give the same table as the
    run they were cut from; the headline block replaces only itself in the page."""
    import json
    import shutil

    import pandas as pd

    from ted_fl.run.results_page import SweepRun, open_run, run_tables

    sweep = tmp_path / "sweep"
    for a in ("seq", "kd"):
        cell = sweep / "cells" / f"{a}-s0-x"
        shutil.copytree(run.path, cell, ignore=shutil.ignore_patterns("checkpoints", "client_state", "*.parquet"))
        cfg = RunDir(cell).read_config()
        cfg.approaches = [a]
        RunDir(cell).write_config(cfg)
        for f in ("metrics.csv", "summary.csv"):
            df = pd.read_csv(cell / f)
            df[df["approach"] == a].to_csv(cell / f, index=False)
        (cell / "cell.json").write_text(json.dumps({"approach": a, "seed": 0}))
    (sweep / "cells" / "kd-s1-y").mkdir()  # a cell still running: left out, counted
    pooled = open_run(sweep)
    assert isinstance(pooled, SweepRun) and pooled.missing == 1 and pooled.read_config().approaches == ["seq", "kd"]
    cols = ["avg", "bwt", "forgetting", "plasticity"]
    pd.testing.assert_frame_equal(run_tables(pooled)[1][cols].sort_index(), run_tables(run)[1][cols].sort_index())
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nkept\n\n<!-- headline:twin:start -->\nSTALE\n<!-- headline:twin:end -->\n")
    assert main([str(sweep), "--headline", "twin", "--out", str(page)]) == 0
    text = page.read_text()
    assert "kept" in text and "STALE" not in text and text.count("<!-- headline:twin:start -->") == 1
    summary = run.summary().set_index("approach")
    assert f"{summary.loc['kd', 'avg']:.3f}" in text and "| kd | 1 |" in text
    assert "1 cell(s) of this sweep had not finished" in text
    assert f"--headline twin --out {page}" in text  # the command that regenerates the block
    assert main([str(sweep), "--headline", "twin"]) == 2  # --out is required


def test_sweep_of_a_grid_is_refused(run: RunDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    for name, lam in (("a", 1.0), ("b", 0.5)):
        cell = tmp_path / "cells" / name
        shutil.copytree(run.path, cell, ignore=shutil.ignore_patterns("checkpoints", "client_state"))
        cfg = RunDir(cell).read_config()
        cfg.loss.lambda_d = lam
        RunDir(cell).write_config(cfg)
        (cell / "cell.json").write_text(json.dumps({}))
    assert main([str(tmp_path), "--headline", "x", "--out", str(tmp_path / "p.md")]) == 2
    err = capsys.readouterr().err
    assert "differs" in err and "in loss" in err


def test_headline_says_when_seq_improves_rather_than_forgets() -> None:
    """A BWT interval wholly above 0 is not 'forgetting not established': seq improved on earlier
    sites, which the line must say (the retina CPU sweep's case)."""
    import pandas as pd

    from ted_fl.run.headline import headline_findings

    rows = pd.DataFrame([{"approach": "seq", "seed": s, "avg": 0.5, "bwt": b, "forgetting": -b, "plasticity": 0.3}
                         for s, b in enumerate([0.25, 0.28, 0.30])])
    assert "no forgetting at this budget" in headline_findings(rows)[0]
    rows["bwt"] = [-0.05, 0.0, 0.08]
    assert "the interval holds 0" in headline_findings(rows)[0]
