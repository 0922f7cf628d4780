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
import math
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ted_fl.config import ExperimentConfig, dump_toml, from_dict, to_dict
from ted_fl.data.spec import MEAN_LABEL  # the mean over a set's classes and regions: what R, Avg, BWT use
from ted_fl.errors import TedFlError
from ted_fl.files import atomic_torch_save, atomic_write_bytes  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # pandas and torch load on first use: the command lines answer before importing them
    import pandas as pd

    from ted_fl.run.processes import ProcessRecord

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
        # Ray's processes of this run (ted_fl.run.processes), when a command line started it; the
        # executors refresh it once Ray runs
        self.record: ProcessRecord | None = None

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

    def checkpoint(self, approach: str, seed: int, name: str) -> dict[str, Any]:
        """`load_checkpoint` where the checkpoint must exist: a one-line error naming it otherwise."""
        out = self.load_checkpoint(approach, seed, name)
        if out is None:
            raise TedFlError(f"{self.ckpt_dir(approach, seed) / (name + '.pt')}: no such checkpoint; "
                             "pass a run directory whose run wrote it (output.checkpoints)")
        return out

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


# ------------------------------------------------------------------ the verdict
# Below these, a budget cannot separate the approaches (budget_check says why).
NO_FORGETTING_BWT = -0.01  # fine-tuning's mean BWT at or above this: it does not forget
NOT_LEARNT_DICE = 0.1  # a site whose Dice after its own stage stays below this was not learnt...
NOT_LEARNT_FRACTION = 0.5  # ...or below this fraction of the best validation Dice its stage reached
VERDICT_METRICS = ("forgetting", "bwt", "plasticity")


@dataclass(frozen=True)
class Paired:
    """`a` minus `b` in `metric`, paired by seed: the mean difference over the `n` seeds both hold,
    and its 95 % Student-t interval (NaN below two seeds)."""

    a: str
    b: str
    metric: str
    n: int
    mean: float
    low: float
    high: float

    @property
    def clear(self) -> bool:
        """The interval excludes 0: the difference is beyond the seeds' noise."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        if self.n == 0:
            return "no shared seed"
        if self.n < 2:
            return f"{self.mean:+.3f} (one seed, no interval)"
        return f"{self.mean:+.3f} [95% CI {self.low:+.3f}, {self.high:+.3f}] (n={self.n})"


def per_seed(summary: pd.DataFrame, name: str, metric: str, by: str = "approach") -> pd.Series:
    """One approach's `metric` per seed (finite values only; several rows of a seed averaged)."""
    rows = summary[summary[by] == name]
    values = rows.groupby("seed")[metric].mean() if metric in rows else rows.iloc[0:0].groupby("seed").size()
    return values[np.isfinite(values.astype(float))].astype(float)


def paired_difference(summary: pd.DataFrame, a: str, b: str, metric: str, by: str = "approach") -> Paired:
    """`a` - `b` in `metric` over the seeds both have (rows of summary.csv: `by`, seed, metric):
    the mean of the per-seed differences d and mean ± t(0.975, n-1) * sd(d) / sqrt(n). Seeds fix
    the data split and the initial weights, so pairing removes what the seeds share."""
    from scipy import stats

    x, y = per_seed(summary, a, metric, by), per_seed(summary, b, metric, by)
    d = (x - y).dropna()
    n = len(d)
    if n == 0:
        return Paired(a, b, metric, 0, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return Paired(a, b, metric, 1, mean, math.nan, math.nan)
    half = float(stats.t.ppf(0.975, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return Paired(a, b, metric, n, mean, mean - half, mean + half)


def site_learning(metrics: pd.DataFrame, by: str = "approach") -> pd.DataFrame:
    """Per approach, seed and site: Dice on its test split right after its own stage (`test`, the
    diagonal of R: plasticity) and the best validation Dice its stage reached (`val`, NaN when the
    run kept no validation rows). Mean label only."""
    import pandas as pd

    m = metrics[(metrics["metric"] == "dice") & (metrics["label"] == MEAN_LABEL)]
    keys = [by, "seed", "site"]
    test = m[(m["split"] == "test") & (m["stage"] >= 0) & (m["site"] == m["stage_site"])]
    test = test.groupby(keys, sort=False)["value"].mean().rename("test")
    val = m[(m["split"] == "val") & (m["site"] == m["stage_site"])]
    val = val.groupby(keys, sort=False)["value"].max().rename("val")
    return pd.concat([test, val], axis=1).reindex(test.index).reset_index()


def budget_check(summary: pd.DataFrame, sites: pd.DataFrame | None = None, by: str = "approach") -> list[str]:
    """Why this run's budget cannot separate the approaches, one sentence per reason; [] if none.

    Forgetting can only be prevented where fine-tuning (seq) forgets: its mean BWT must be below
    NO_FORGETTING_BWT and, over two or more seeds, its 95 % interval below 0. And an approach can
    only keep what it learnt: a site that no approach learnt (Dice after its own stage below
    NOT_LEARNT_DICE, or below NOT_LEARNT_FRACTION of the validation Dice its stage reached; mean
    over seeds) leaves nothing to forget."""
    from scipy import stats

    out: list[str] = []
    bwt = per_seed(summary, "seq", "bwt", by)
    if len(bwt):
        mean, n = float(bwt.mean()), len(bwt)
        high = (mean + float(stats.t.ppf(0.975, n - 1)) * float(bwt.std(ddof=1)) / math.sqrt(n)) if n > 1 else mean
        if mean >= NO_FORGETTING_BWT:
            out.append(f"Fine-tuning (seq) does not forget at this budget (BWT {mean:+.3f} over {n} seed(s), "
                       f"not below {NO_FORGETTING_BWT}): there is no forgetting for an approach to prevent, "
                       "so this budget cannot separate the approaches; train longer (train.rounds, "
                       "train.steps_per_round).")
        elif high >= 0:
            out.append(f"Fine-tuning's forgetting is within the seeds' noise (seq BWT {mean:+.3f}, its 95% "
                       f"interval reaches {high:+.3f} over {n} seeds), so this budget cannot separate the "
                       "approaches; add seeds or train longer.")
    if sites is not None and not sites.empty:
        g = sites.groupby([by, "site"], sort=False)[["test", "val"]].mean().reset_index()
        val = g["val"].fillna(0.0)
        g["learnt"] = (g["test"] >= NOT_LEARNT_DICE) & (g["test"] >= NOT_LEARNT_FRACTION * val)
        missed = [str(site) for site, s in g.groupby("site", sort=False) if not s["learnt"].any()]
        if missed:
            worst = g[g["site"].isin(missed)]
            detail = "; ".join(
                f"{site}: Dice {s['test'].max():.3f} after its stage"
                + (f" (validation reached {s['val'].max():.3f})" if s["val"].notna().any() else "")
                for site, s in worst.groupby("site", sort=False))
            out.append(f"No approach learnt {', '.join(missed)} at this budget ({detail}): what was not "
                       "learnt cannot be forgotten, so this budget cannot separate the approaches there; "
                       "train longer.")
    return out


def verdict(summary: pd.DataFrame, sites: pd.DataFrame | None = None, by: str = "approach") -> list[str]:
    """The run's answer in plain sentences: which approach forgets least (mean forgetting over
    seeds) and at what cost in plasticity, each approach against seq paired by seed (mean
    difference with its 95 % t-interval), then budget_check's reasons the budget cannot tell."""
    if summary.empty or "forgetting" not in summary or by not in summary:
        return []
    names = [str(a) for a in dict.fromkeys(summary[by]) if str(a) != "joint"]
    means = {a: float(per_seed(summary, a, "forgetting", by).mean()) for a in names}
    means = {a: v for a, v in means.items() if v == v}
    if not means:
        return []
    best = min(means, key=lambda a: means[a])
    out: list[str] = []
    if "seq" not in means:
        out.append(f"{best} forgets least (forgetting {means[best]:.3f}); without seq (fine-tuning) "
                   "among the approaches there is no baseline to measure the gain against.")
        return out + budget_check(summary, sites, by)
    if list(means) == ["seq"]:
        out.append(f"Only fine-tuning (seq) ran (forgetting {means['seq']:.3f}): no approach to compare with it.")
    elif best == "seq":
        out.append(f"No approach forgets less than fine-tuning (seq, forgetting {means['seq']:.3f}).")
    else:
        f, p = (paired_difference(summary, best, "seq", k, by) for k in ("forgetting", "plasticity"))
        if f.clear:
            out.append(f"{best} forgets least: forgetting {means[best]:.3f} against seq's {means['seq']:.3f}, "
                       f"a paired difference of {f.text()}; its plasticity against seq's: {p.text()}.")
        else:
            out.append(f"No approach forgets measurably less than fine-tuning: the least, {best} (forgetting "
                       f"{means[best]:.3f}, seq {means['seq']:.3f}), differs from seq by {f.text()}, "
                       "within the seeds' noise.")
    for a in names:
        if a == "seq":
            continue
        diffs = "; ".join(f"{k} {paired_difference(summary, a, 'seq', k, by).text()}" for k in VERDICT_METRICS)
        out.append(f"{a} - seq: {diffs}.")
    return out + budget_check(summary, sites, by)
