"""The run directory: the one writer (and reader) of everything a run produces.

Layout of `RUN_DIR`:
    config.toml        the resolved experiment configuration
    splits.json        per site, the volumes/images of each split
    metrics.csv        tidy: approach, seed, stage, stage_site, round, site, split, label, metric, value
                       (label: a class or region of the site set, or "mean" over them, on scored
                       splits; empty on train, time and comm rows)
    metrics.parquet    the same, when pyarrow is installed
    summary.csv        one row per approach and seed
    run.log            a plain-text log
    FAILED             only in a run that stopped on an error: the error and how to resume; such a
                       run has no metrics.csv / summary.csv (its results would be partial)
    checkpoints/       per (approach, seed): last.pt (resume point), stage<k>.pt (model after stage k)
    client_state/      what simulated sites keep on their own disk (optimizer moments)

Every table is written to a temporary file and renamed into place, so an interrupted run never
leaves a half-written table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ted_fl.config import ExperimentConfig, dump_toml, from_dict, to_dict
from ted_fl.data.spec import MEAN_LABEL  # the mean over a set's classes and regions: what R, Avg, BWT use
from ted_fl.errors import TedFlError
from ted_fl.files import atomic_torch_save, atomic_write_bytes  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # pandas and torch load on first use: the command lines answer before importing them
    import pandas as pd

FAILED = "FAILED"  # the marker a failed run leaves (RunDir.mark_failed)
METRIC_COLUMNS = ["approach", "seed", "stage", "stage_site", "round", "site", "split", "label", "metric", "value"]
SCORE_SPLITS = frozenset({"test", "val", "test_round", "val_stage"})  # rows that carry scores per label


# Summary columns that cannot always be computed, and the words shown instead of NaN.
MISSING = {"ravg": "needs joint"}  # rAvg divides by the joint run's scores: add --approach joint


def missing_reason(column: str, value: object) -> str:
    """'needs joint' (etc.) where `value` is NaN because something is missing, '' for a number.
    Per-label columns (`ravg[LV]`) share their base column's reason; other NaNs read 'n/a'."""
    try:
        is_nan = value != value  # NaN is the one value unequal to itself
    except Exception:
        return ""
    if not is_nan:
        return ""
    return MISSING.get(column.split("[", 1)[0], "n/a")


def format_cell(column: str, value: object) -> str:
    """One cell of a printed summary: MB for bytes, 3 decimals, words where a number is missing."""
    if column.startswith("bytes") and isinstance(value, int | float):
        return f"{value / 1e6:.1f} MB"
    if isinstance(value, float):
        return missing_reason(column, value) or f"{value:.3f}"
    return str(value)


def label_metric(key: str, split: str) -> tuple[str, str]:
    """An evaluation key ('LV/dice', or 'dice' for the mean) -> (label, metric) of a metrics.csv row."""
    if "/" in key:
        label, metric = key.rsplit("/", 1)
        return label, metric
    return (MEAN_LABEL if split in SCORE_SPLITS else ""), key


def labels_of(metrics: pd.DataFrame) -> list[str]:
    """The labels of a run's scored rows, classes and regions first, the mean last."""
    sel = metrics[metrics["split"].isin(SCORE_SPLITS)]["label"]
    found = [str(x) for x in dict.fromkeys(sel) if str(x) and str(x) != MEAN_LABEL]
    return found + [MEAN_LABEL]


def select_label(metrics: pd.DataFrame, label: str = MEAN_LABEL) -> pd.DataFrame:
    """The rows of one label (the mean by default); unscored rows (train, time, comm) are kept."""
    keep = (metrics["label"] == label) | ~metrics["split"].isin(SCORE_SPLITS)
    sel = metrics[keep]
    if label != MEAN_LABEL and not (sel["label"] == label).any():
        raise TedFlError(f"no rows for label '{label}'; the run has: {', '.join(labels_of(metrics))}")
    return sel


class RunDir:
    """A run directory, opened for writing (new or resumed) or for reading."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(cls, out: str | Path, name: str) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(out) / f"{name}-{stamp}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
        try:
            path.mkdir(parents=True)
        except OSError as exc:  # check_creatable ran before; this is what changed since
            raise TedFlError(f"output folder '{out}' cannot be created or written ({exc.strerror or exc}); "
                             "choose another folder (--out / out)") from None
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        run = cls(path)
        if not (run.path / "config.toml").is_file():
            raise TedFlError(
                f"{run.path}: not a ted-fl run directory (no config.toml); pass the folder a run printed"
            )
        return run

    # ------------------------------------------------------------------ config
    def write_config(self, cfg: ExperimentConfig) -> None:
        atomic_write_bytes(self.path / "config.toml", dump_toml(to_dict(cfg)).encode())

    def read_config(self) -> ExperimentConfig:
        import tomllib

        data = tomllib.loads((self.path / "config.toml").read_text())
        return from_dict(ExperimentConfig, data, str(self.path / "config.toml"))

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_bytes(self.path / name, json.dumps(obj, indent=1, sort_keys=True).encode())

    # ----------------------------------------------------------------- metrics
    def write_metrics(self, rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
        import pandas as pd

        df = pd.DataFrame(list(rows), columns=METRIC_COLUMNS)
        atomic_write_bytes(self.path / "metrics.csv", df.to_csv(index=False).encode())
        try:
            import pyarrow  # noqa: F401

            buf = df.to_parquet(index=False)
            atomic_write_bytes(self.path / "metrics.parquet", buf)
        except ImportError:
            pass
        return df

    def metrics(self) -> pd.DataFrame:
        """metrics.csv; runs written before the label column read as label "mean" on scored rows."""
        import pandas as pd

        p = self.path / "metrics.csv"
        if not p.is_file():
            return pd.DataFrame(columns=METRIC_COLUMNS)
        df = pd.read_csv(p, dtype={"label": str}, keep_default_na=False, na_values={"value": ["", "nan", "NaN"]})
        if "label" not in df.columns:
            df.insert(METRIC_COLUMNS.index("label"), "label",
                      [MEAN_LABEL if s in SCORE_SPLITS else "" for s in df["split"]])
        return df

    def write_summary(self, df: pd.DataFrame) -> None:
        atomic_write_bytes(self.path / "summary.csv", df.to_csv(index=False).encode())

    def summary(self) -> pd.DataFrame:
        import pandas as pd

        return pd.read_csv(self.path / "summary.csv")

    # ------------------------------------------------------------- checkpoints
    def ckpt_dir(self, approach: str, seed: int) -> Path:
        return self.path / "checkpoints" / f"{approach}-seed{seed}"

    def save_checkpoint(self, approach: str, seed: int, name: str, obj: dict[str, Any]) -> Path:
        p = self.ckpt_dir(approach, seed) / f"{name}.pt"
        atomic_torch_save(obj, p)
        return p

    def load_checkpoint(self, approach: str, seed: int, name: str) -> dict[str, Any] | None:
        p = self.ckpt_dir(approach, seed) / f"{name}.pt"
        if not p.is_file():
            return None
        import torch

        return torch.load(p, map_location="cpu", weights_only=False)

    # ------------------------------------------------------------------ status
    def mark_failed(self, error: str, resume: str) -> None:
        """Mark a run that stopped on an error: FAILED (the error, the resume command) and run.log;
        the report and --resume read it. A finished run (summary.csv written) is not marked."""
        if (self.path / "summary.csv").is_file():
            self.log(f"error after the results were written: {error}")
            return
        atomic_write_bytes(self.path / FAILED, f"failed: {error}\nresume: {resume}\n".encode())
        self.log(f"status: failed: {error}")

    def failure(self) -> str:
        """The error of a run marked failed ("" if it is not)."""
        p = self.path / FAILED
        if not p.is_file():
            return ""
        first = (p.read_text(errors="replace").splitlines() or ["failed: (no message)"])[0]
        return first.removeprefix("failed: ")

    def refuse_if_failed(self) -> None:
        """A reader of results (the report) stops at a failed run, naming it and how to resume it."""
        error = self.failure()
        if error:
            lines = (self.path / FAILED).read_text(errors="replace").splitlines()
            resume = next((ln.removeprefix("resume: ") for ln in lines if ln.startswith("resume: ")), "")
            raise TedFlError(f"{self.path}: this run failed ({error}) and has no results; "
                             + (f"resume it: {resume}" if resume else "resume it with --resume")
                             + ", or leave it out")

    def clear_failed(self) -> None:
        self.path.joinpath(FAILED).unlink(missing_ok=True)

    # --------------------------------------------------------------------- log
    def log(self, message: str) -> None:
        with open(self.path / "run.log", "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {message}\n")

    @property
    def client_state_dir(self) -> Path:
        return self.path / "client_state"
