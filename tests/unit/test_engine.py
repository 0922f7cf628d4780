"""The shared schedule: who trains when, FedAvg, seeds, determinism and resume (in-process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ted_fl.commands.shared import run_command
from ted_fl.config import dump_toml, to_dict
from ted_fl.run.directory import RunDir
from ted_fl.schedule.engine import active_sites, derive_seed, fedavg
from tests.conftest import tiny_config

ORDER = ["A", "B", "C", "D"]


def test_active_sites_strict_retention_and_joint() -> None:
    assert active_sites(ORDER, 2, 0, False) == ["C"]
    assert active_sites(ORDER, 2, 1, False) == ["B", "C"]
    assert active_sites(ORDER, 3, -1, False) == ORDER
    assert active_sites(ORDER, 1, 0, True) == ["A", "B"]


def test_fedavg_weights_by_examples_and_keeps_int_buffers() -> None:
    a = {"w": np.array([0.0, 2.0], np.float32), "n": np.array(3)}
    b = {"w": np.array([4.0, 6.0], np.float32), "n": np.array(5)}
    out = fedavg([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [3.0, 5.0])
    assert out["w"].dtype == np.float32 and int(out["n"]) == 5


def test_derive_seed_is_stable_and_distinct() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, s, r) for s in range(5) for r in range(5)}) == 25


def _run(tmp: Path, argv: list[str]) -> RunDir:
    assert run_command("centralized", argv) == 0
    return RunDir(max((p for p in (tmp / "runs").iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime))


def _dice(run: RunDir) -> pd.DataFrame:
    m = run.metrics()
    return m[(m["split"] == "test") & (m["metric"] == "dice")].sort_values(["approach", "stage", "site"])


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    cfg = tiny_config(tmp_path, ["seq", "ted_gugf"])
    path = tmp_path / "exp.toml"
    path.write_text(dump_toml(to_dict(cfg)))
    return path


def test_same_seed_same_numbers_and_resume(cfg_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--config", str(cfg_file), "--quiet"]
    first = _run(tmp_path, base)
    second = _run(tmp_path, base)
    np.testing.assert_array_equal(_dice(first)["value"], _dice(second)["value"])

    # Interrupt a third run after a few rounds, then resume it: the same numbers again.
    import ted_fl.schedule.engine as engine

    real = engine.run_schedule
    calls = {"n": 0}

    def interrupting(*args, **kwargs):  # type: ignore[no-untyped-def]
        def progress(info: dict) -> None:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt

        return real(*args[:5], progress=progress)

    monkeypatch.setattr(engine, "run_schedule", interrupting)
    assert run_command("centralized", base) == 130
    monkeypatch.setattr(engine, "run_schedule", real)
    (partial,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir() and p not in (first.path, second.path)]
    assert not (partial / "summary.csv").exists()
    resumed = _run(tmp_path, ["--resume", str(partial), "--quiet"])
    assert resumed.path == partial
    np.testing.assert_array_equal(_dice(first)["value"], _dice(resumed)["value"])


def test_bad_config_key_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command("centralized", ["--set", "train.round=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'rounds'" in err


def test_a_failed_run_is_marked_and_resumable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A run that dies mid-way (here a RuntimeError as torch raises) leaves FAILED and a status line,
    no metrics.csv or summary.csv; the report refuses it naming the resume command; --resume says it
    resumes a failed run, finishes it, and drops the marker."""
    import ted_fl.schedule.engine as engine
    from ted_fl.commands.report import check_runs
    from ted_fl.errors import TedFlError

    cfg = tiny_config(tmp_path, ["seq"])
    path = tmp_path / "exp.toml"
    path.write_text(dump_toml(to_dict(cfg)))
    real = engine.run_schedule
    calls = {"n": 0}

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        def progress(info: dict) -> None:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("all elements of input should be between 0 and 1")

        return real(*args[:5], progress=progress)

    monkeypatch.setattr(engine, "run_schedule", failing)
    with pytest.raises(RuntimeError):
        run_command("centralized", ["--config", str(path), "--quiet"])
    monkeypatch.setattr(engine, "run_schedule", real)
    (failed,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert (failed / "FAILED").read_text().startswith("failed: RuntimeError: all elements of input")
    assert "status: failed: RuntimeError" in (failed / "run.log").read_text()
    assert not (failed / "summary.csv").exists() and not (failed / "metrics.csv").exists()
    assert f"{failed}: marked failed" in capsys.readouterr().err
    with pytest.raises(TedFlError, match=rf"this run failed \(RuntimeError: .*\) and has no results; resume it: "
                                         rf"python -m ted_fl.centralized --resume {failed}"):
        check_runs([failed])
    resumed = _run(tmp_path, ["--resume", str(failed), "--quiet"])
    assert resumed.path == failed and (failed / "summary.csv").is_file() and not (failed / "FAILED").exists()
    assert "note: resuming a run that failed (RuntimeError: all elements" in capsys.readouterr().err
    check_runs([failed])
