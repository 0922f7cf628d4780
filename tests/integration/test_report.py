"""The run report and the notebooks, on one tiny centralized run (2 approaches x 2 seeds).

The report is opened in headless Chromium (skipped when none is installed): it must render
every figure with no script error. The notebooks are executed with nbclient and must run
every cell without error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ted_fl.commands.report import main
from ted_fl.commands.shared import run_command
from ted_fl.config import dump_toml, to_dict
from ted_fl.run.directory import RunDir
from ted_fl.run.html_report import find_chromium, write_report
from ted_fl.schedule.lifecycle import write_report_if_available
from tests.conftest import REPO, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_report")]  # a real centralized run, notebooks and a browser

APPROACHES = ["seq", "ted_gugf"]
FIGURES = ["fig-avg", "fig-bwt", "fig-sites", "fig-r-0", "fig-r-1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file, run directory) of one centralized run; the CLI writes its report."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = tiny_config(tmp, APPROACHES)
    cfg.seeds = [0, 1]
    config = tmp / "tiny.toml"
    config.write_text(dump_toml(to_dict(cfg)))
    out = tmp / "runs"
    assert run_command("centralized", ["--config", str(config), "--quiet", "--out", str(out)]) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]  # beside it: the shared plotly-*.min.js
    return config, run


def figure_ids(page: str) -> list[str]:
    return re.findall(r'<div id="(fig-[^"]+)"', page)


def test_run_writes_report(tiny: tuple[Path, Path]) -> None:
    _, run = tiny
    page = (run / "report.html").read_text()
    assert figure_ids(page) == FIGURES
    assert page.count("<script") >= len(FIGURES)
    assert "src=\"https://cdn" not in page  # plotly.js is local: the page works offline
    assert '<script src="../plotly-' in page and list(run.parent.glob("plotly-*.min.js"))  # one per folder
    assert "±" in page  # two seeds: mean ± std in the final table
    # the answer first: the verdict (paired against seq) before the tables, figures, privacy and audit
    order = [page.index(h) for h in ("<h2>Verdict", "<h2>Final table", "<h2>Mean Dice", "<h2>R matrices",
                                      "<h2>Sample predictions", "<h2>Privacy")]
    assert order == sorted(order)
    assert "ted_gugf - seq" in page and "95% CI" in page
    assert "Budget check:" in page  # 2 rounds x 2 steps: fine-tuning does not forget
    assert "<details><summary>" in page and "<th>metric</th>" not in page  # the attack's table, collapsed
    for approach in APPROACHES:
        assert f"R matrix: {approach}" in page
    # every figure's title names its label (plotly's JSON escapes the <sup> around it), and the page once
    assert page.count("Dice of the mean over classes and regions") == len(FIGURES) + 1
    # samples: 3 sites x 2 slices per approach, image + GT + 3 stages each
    assert page.count('alt="prediction"') == len(APPROACHES) * 3 * 2 * 3


def test_report_cli_compares_runs(tiny: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, run = tiny
    other = tmp_path / "copy-of-run"
    shutil.copytree(run, other)
    out = tmp_path / "cmp.html"
    assert main([str(run), str(other), "--out", str(out), "--no-samples"]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    assert len(figure_ids(page)) == 3 + 2 * len(APPROACHES)
    assert f"seq [{other.name}]" in page  # the same approach from two runs stays apart
    assert 'alt="prediction"' not in page and "--no-samples" in page


def test_samples_skipped_when_data_is_gone(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = tiny
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    cfg = RunDir(moved).read_config()
    cfg.data.data_dir = str(tmp_path / "no-such-data")
    RunDir(moved).write_config(cfg)
    page = write_report([moved], moved / "report.html").read_text()
    assert "not reachable" in page and len(figure_ids(page)) == len(FIGURES)


def test_bad_run_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "config.toml" in err and "\n" not in err


def test_report_failure_does_not_lose_the_run(tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import ted_fl.run.html_report as html_report

    def boom(*_: object, **__: object) -> Path:
        raise RuntimeError("disk full")

    monkeypatch.setattr(html_report, "write_report", boom)
    _, run = tiny
    assert write_report_if_available(RunDir(run)) is None
    assert "disk full" in capsys.readouterr().err
    assert "report not written" in (run / "run.log").read_text()


# ------------------------------------------------------------------- headless Chromium
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    return exe


def headless(exe: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp / 'chrome-profile'}", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=1800,
    )


def test_report_renders_in_chromium(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    exe = chromium()
    _, run = tiny
    done = headless(exe, tmp_path, "--window-size=1280,2000", "--dump-dom", (run / "report.html").as_uri())
    dom = done.stdout
    assert "<html" in dom, done.stderr[-2000:]
    errors = re.search(r'<html[^>]*data-errors="([^"]*)"', dom)
    assert errors is None, f"script errors: {errors.group(1) if errors else ''}"
    widths = re.search(r'<html[^>]*data-widths="(\d+) (\d+)"', dom)
    assert widths, "the page did not record its widths"
    scroll, client = map(int, widths.groups())
    assert scroll <= client, f"the page overflows sideways at 1280 px: {scroll} > {client}"
    starts = [(m.start(), m.group(1), m.group(0)) for m in re.finditer(r'<div[^>]*\bid="(fig-[^"]+)"[^>]*>', dom)]
    assert [name for _, name, _ in starts] == FIGURES
    ends = [s for s, _, _ in starts[1:]] + [len(dom)]
    for (start, name, tag), end in zip(starts, ends, strict=True):
        assert "js-plotly-plot" in tag, f"{name} was not drawn by plotly"
        assert 'class="main-svg"' in dom[start:end], f"{name} has no rendered SVG"


def test_png_export(tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSER_PATH", chromium())
    _, run = tiny
    page = write_report([run], tmp_path / "r.html", samples=False, png=True).read_text()
    pngs = sorted(p.stem for p in (tmp_path / "r-figures").glob("*.png"))
    assert pngs == sorted(FIGURES) and "PNG figures" in page
    assert all((tmp_path / "r-figures" / f"{n}.png").read_bytes()[:4] == b"\x89PNG" for n in pngs)


def test_png_export_without_chromium_is_a_note(tiny: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on PATH
    _, run = tiny
    page = write_report([run], tmp_path / "r.html", samples=False, png=True).read_text()
    assert "PNG export skipped" in page and "PNG export skipped" in capsys.readouterr().err


# ------------------------------------------------------------------------- notebooks
def execute_notebook(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the .ipynb from the jupytext .py and run it in a `python3` kernel of this venv."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype")  # figure JSON only, no plotly.js
    nb = jupytext.read(REPO / "notebooks" / f"{name}.py")
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=1800,
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs), "no figure shown"


def test_notebook_forgetting_curves(tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, run = tiny
    execute_notebook("forgetting_curves", {"TED_FL_RUN_DIR": str(run)}, monkeypatch)


def test_notebook_compare_approaches(tiny: tuple[Path, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = tiny
    out = tmp_path / "runs"
    execute_notebook("compare_approaches", {
        "TED_FL_CONFIG": str(config), "TED_FL_APPROACHES": "seq kd", "TED_FL_SEEDS": "0",
        "TED_FL_OUT": str(out),
    }, monkeypatch)
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert (run / "summary.csv").is_file() and (run / "report.html").is_file()


def test_module_entry_point(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = tiny
    done = subprocess.run([sys.executable, "-m", "ted_fl.report", str(run), "--no-samples",
                           "--out", str(tmp_path / "x.html")], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.html").is_file() and "MB)" in done.stdout
