"""Continual-learning metrics from the tidy results table (stage, site, metric, value).

R[t, i] is the score on site i's test split after training stage t (0-based here; the
formulas below are written 1-based as in docs/ted-method.md, with T stages = T sites).
Undefined quantities (BWT and friends with a single stage) are NaN, never an exception.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ted_fl.data.spec import MEAN_LABEL
from ted_fl.errors import TedFlError


def r_matrix(
    df: pd.DataFrame, metric: str = "dice", order: list[str] | None = None, label: str = MEAN_LABEL
) -> pd.DataFrame:
    """R as a DataFrame: rows the stage index, columns the sites in arrival order.

    `df` is already filtered to one run (approach / seed / split); repeated (stage, site)
    rows are averaged. Arrival order is `order` if given, else the order in which sites first
    appear in `df` (the runner writes them in arrival order). When `df` has a `label` column
    (a class, a region, or the mean over them), only `label`'s rows count: the mean by default.
    """
    missing = {"stage", "site", "metric", "value"} - set(df.columns)
    if missing:
        raise TedFlError(f"results table lacks column(s) {sorted(missing)}")
    if "label" in df.columns:
        labelled = df[df["label"] == label]
        if labelled.empty and not df.empty:
            known = sorted({str(x) for x in df["label"]})
            raise TedFlError(f"no rows for label '{label}'; the table has: {', '.join(known)}")
        df = labelled
    sel = df[df["metric"] == metric]
    if sel.empty:
        known = sorted(df["metric"].unique())
        raise TedFlError(f"no rows for metric '{metric}'; the table has: {', '.join(map(str, known))}")
    sites = order if order is not None else list(dict.fromkeys(sel["site"]))
    r = sel.pivot_table(index="stage", columns="site", values="value", aggfunc="mean")
    r = r.reindex(columns=[s for s in sites if s in r.columns]).sort_index()
    r.index = r.index.astype(int)
    r.columns.name = "site"
    return r


def _arr(r: pd.DataFrame) -> np.ndarray:
    a = r.to_numpy(dtype=float)
    if a.shape[0] > a.shape[1]:
        raise TedFlError(f"R has {a.shape[0]} stages but only {a.shape[1]} sites")
    return a


def _vec(s: pd.Series | None, r: pd.DataFrame) -> np.ndarray | None:
    return None if s is None else s.reindex(r.columns).to_numpy(dtype=float)


def _mean(x: list[float] | np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def continual_summary(
    R: pd.DataFrame,  # noqa: N803 - the literature's name
    joint: pd.Series | None = None,
    initial: pd.Series | None = None,
) -> dict[str, float]:
    """Summary after the last stage T (the last row of R); sites beyond T are ignored.

    - Avg = 1/T sum_i R[T, i];  rAvg = 1/T sum_i R[T, i] / Joint_i (if `joint`, indexed by site)
    - BWT = 1/(T-1) sum_{i<T} (R[T, i] - R[i, i]);  rBWT = same with each term / R[i, i]
    - FWT (Lopez-Paz & Ranzato 2017) = 1/(T-1) sum_{i>=2} (R[i-1, i] - b_i), b_i the initial
      (untrained) model's score on site i from `initial`; without `initial`, b_i = 0, so FWT is
      the mean zero-shot score on each site just before it is trained on.
    - forgetting (Chaudhry et al. 2018) = 1/(T-1) sum_{i<T} (max_{l<T} R[l, i] - R[T, i])
    - plasticity = 1/T sum_i R[i, i] (how well each site is learnt when it arrives)
    """
    a = _arr(R)
    t = a.shape[0]
    a = a[:, :t]
    last = a[t - 1]
    diag = np.diag(a)
    out: dict[str, float] = {"T": float(t), "avg": _mean(last), "plasticity": _mean(diag)}
    j = _vec(joint, R)
    out["ravg"] = _mean(last / j[:t]) if j is not None else float("nan")
    out["bwt"] = _mean([last[i] - diag[i] for i in range(t - 1)])
    with np.errstate(divide="ignore", invalid="ignore"):  # a site never learnt (R[i, i] = 0): NaN
        out["rbwt"] = _mean([(last[i] - diag[i]) / diag[i] for i in range(t - 1)])
    b = _vec(initial, R)
    b = np.zeros(a.shape[1]) if b is None else b
    out["fwt"] = _mean([a[i - 1, i] - b[i] for i in range(1, t)])
    out["forgetting"] = _mean([a[: t - 1, i].max() - last[i] for i in range(t - 1)])
    return out


def curves(R: pd.DataFrame, joint: pd.Series | None = None) -> pd.DataFrame:  # noqa: N803
    """Per stage t (1-based in the formulas), over the sites seen so far:

    avg_t = 1/t sum_{i<=t} R[t, i]; ravg_t the same / Joint_i; bwt_t = 1/(t-1) sum_{i<t}
    (R[t, i] - R[i, i]); forgetting_t = 1/(t-1) sum_{i<t} (max_{l<t} R[l, i] - R[t, i]);
    plasticity_t = R[t, t]. bwt_t and forgetting_t are NaN at the first stage.
    """
    a = _arr(R)
    j = _vec(joint, R)
    rows = []
    for t in range(a.shape[0]):
        seen = a[t, : t + 1]
        rows.append(
            {
                "stage": int(R.index[t]),
                "site": str(R.columns[t]),
                "avg": _mean(seen),
                "ravg": _mean(seen / j[: t + 1]) if j is not None else float("nan"),
                "bwt": _mean([a[t, i] - a[i, i] for i in range(t)]),
                "forgetting": _mean([a[:t, i].max() - a[t, i] for i in range(t)]),
                "plasticity": float(a[t, t]),
            }
        )
    return pd.DataFrame(rows).set_index("stage")
