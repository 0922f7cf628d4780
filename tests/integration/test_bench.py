"""`python -m ted_fl.bench SUBCOMMAND --quick`: each runs, prints a table and a headline line.

Figures are not asserted (speed targets live in the benchmark's output, not in tests); what is
checked is that every subcommand runs end to end, ends with its headline, and writes only its
own section of the doc it is pointed at.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ted_fl.bench.common import write_section

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ted_fl.bench", *args, "--quick", "--out", str(tmp / "runs")],
        capture_output=True, text=True, timeout=3600, cwd=REPO, env={**os.environ},
    )


def test_write_section_keeps_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "b.md"
    write_section("probes", "## probes\n\np1", doc)
    write_section("accuracy", "## accuracy\n\na1", doc)
    write_section("probes", "## probes\n\np2", doc)
    text = doc.read_text()
    assert "a1" in text and "p2" in text and "p1" not in text
    assert text.index("## accuracy") < text.index("## probes")  # canonical order


@pytest.mark.slow
@pytest.mark.parametrize("command", ["accuracy", "sweep", "overhead", "scaling", "probes", "step", "protocol"])  # gpu: below
def test_quick(command: str, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    extra = {"accuracy": ["--seeds", "1", "--lambdas", "1.0"], "protocol": ["--config", "simulations/prostate-ted.toml"]}.get(command, [])
    proc = bench(command, *extra, "--doc", str(doc), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{command}: "), last
    assert "nan" not in last.lower(), last
    text = doc.read_text()
    assert f"<!-- bench:{command}:start -->" in text and f"## {command}" in text
    assert "Command: `python -m ted_fl.bench" in text


@pytest.mark.slow
def test_gpu_quick(tmp_path: Path) -> None:
    """`bench gpu --quick`: the GPU path on whatever device there is; without a GPU it says so."""
    import torch

    doc = tmp_path / "benchmarks.md"
    proc = bench("gpu", "--approach", "seq", "ted_gugf", "--doc", str(doc), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "simulator per-round overhead" in proc.stdout
    if not torch.cuda.is_available():
        assert "no GPU found" in proc.stdout and "No GPU was found" in doc.read_text()
        assert "absent: no GPU" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu: ") and "ted_gugf" in last and "nan" not in last.lower(), last
    text = doc.read_text()
    assert "<!-- bench:gpu:start -->" in text and "## gpu" in text and "Command: `python -m ted_fl.bench" in text


@pytest.mark.slow
def test_protocol_explains_its_extrapolation(tmp_path: Path) -> None:
    """(bench sweep exits 1 unless its parallel and serial results are identical: test_quick checks it.)"""
    proc = bench("protocol", "--config", "simulations/prostate-ted.toml", "--train-per-site", "100", tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Extrapolation: 6 sites" in proc.stdout and "RUNMC 100/" in proc.stdout
    assert "ceil(train images / 4)" in proc.stdout
    assert 'Joint under protocol "reference"' in proc.stdout and "one run over all sites" in proc.stdout
