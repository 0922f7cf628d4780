# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Forgetting curves
#
# Loads one or more run directories (only what they hold on disk: `metrics.csv`, `summary.csv`),
# recomputes the continual metrics from the tidy table with `ted_fl.continual.metrics`, and plots
# them with plotly.
#
# Which runs: `TED_FL_RUN_DIR` (several separated by `:`); by default the newest run under `runs/`.

# %%
import os
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
from IPython.display import display

from ted_fl.continual.metrics import continual_summary, curves, r_matrix
from ted_fl.run.directory import RunDir, labels_of


def newest_run() -> Path:
    found = [p.parent for base in (Path("runs"), Path("../runs")) for p in base.glob("*/metrics.csv")]
    if not found:
        raise SystemExit("no run found: set TED_FL_RUN_DIR or run python -m ted_fl.centralized first")
    return max(found, key=lambda p: (p / "metrics.csv").stat().st_mtime)


RUN_DIRS = [Path(p) for p in os.environ.get("TED_FL_RUN_DIR", "").split(os.pathsep) if p] or [newest_run()]
display(RUN_DIRS)

# %% [markdown]
# ## The tidy table
# One row per (approach, seed, stage, round, site, split, label, metric). Stage -1 is the untrained
# model. `label` is a class or region of the site set (LV, MYO, RV...) or "mean" over them: pick one.

# %%
LABEL = "mean"  # or a class / region of the run's site set (see labels_of below)
metrics = pd.concat([RunDir(d).metrics().assign(run=d.name) for d in RUN_DIRS], ignore_index=True)
print("labels:", labels_of(metrics))
test = metrics[(metrics["split"] == "test") & (metrics["metric"] == "dice") & (metrics["label"] == LABEL)]
display(test.head())

# %% [markdown]
# ## R matrices and the continual summary, recomputed
# R[t, i] is the Dice on site i's test split after stage t. The summary recomputed here matches
# the run's own `summary.csv`.

# %%
R, rows, curve_rows = {}, [], []
for (run, approach, seed), g in test.groupby(["run", "approach", "seed"], sort=False):
    trained = g[g["stage"] >= 0]
    order = list(dict.fromkeys(trained.sort_values("stage", kind="stable")["stage_site"]))
    r = r_matrix(trained, "dice", order, LABEL)
    initial = g[g["stage"] < 0].groupby("site")["value"].mean()
    R[(run, approach, seed)] = r
    rows.append({"run": run, "approach": approach, "seed": seed, **continual_summary(r, initial=initial)})
    c = curves(r).reset_index().assign(run=run, approach=approach, seed=seed)
    c["stage"] += 1
    curve_rows.append(c)
recomputed = pd.DataFrame(rows)
stage_curves = pd.concat(curve_rows, ignore_index=True)
display(recomputed)

# %%
written = pd.concat([pd.read_csv(d / "summary.csv").assign(run=d.name) for d in RUN_DIRS], ignore_index=True)
check = recomputed.merge(written, on=["run", "approach", "seed"], suffixes=("", "_written"))
for col in ("avg", "bwt", "fwt", "forgetting"):  # summary.csv holds the mean label's figures
    assert LABEL != "mean" or np.allclose(check[col], check[f"{col}_written"], equal_nan=True), col
display(check[["run", "approach", "seed", "avg", "avg_written", "bwt", "bwt_written"]])

# %% [markdown]
# ## Mean Dice over the sites seen so far, and BWT, per stage
# Mean over seeds; the shaded spread is one standard deviation.

# %%
agg = (
    stage_curves.groupby(["approach", "stage", "site"], as_index=False)
    .agg(avg=("avg", "mean"), avg_std=("avg", "std"), bwt=("bwt", "mean"), bwt_std=("bwt", "std"))
    .fillna({"avg_std": 0.0, "bwt_std": 0.0})
)
fig = px.line(agg, x="stage", y="avg", error_y="avg_std", color="approach", markers=True,
              hover_data=["site"], range_y=[0, 1], title="Mean Dice over the sites seen so far")
fig.show()

# %%
fig = px.line(agg.dropna(subset=["bwt"]), x="stage", y="bwt", error_y="bwt_std", color="approach",
              markers=True, title="Backward transfer per stage (below 0: forgetting)")
fig.add_hline(y=0, line_dash="dot")
fig.show()

# %% [markdown]
# ## Every site's forgetting curve

# %%
per_site = (
    test.assign(stage=test["stage"] + 1)  # 0 = untrained, 1..T = after each stage
    .groupby(["approach", "site", "stage"], as_index=False, sort=False)["value"].mean()
    .rename(columns={"value": "dice"})
)
fig = px.line(per_site, x="stage", y="dice", color="approach", facet_col="site", markers=True,
              range_y=[0, 1], title="Each site's Dice across stages (0 = untrained)")
fig.show()

# %% [markdown]
# ## R matrix of each approach (first seed)

# %%
for (run, approach, seed), r in R.items():
    if seed != min(s for (ru, a, s) in R if ru == run and a == approach):
        continue
    fig = px.imshow(r, text_auto=".2f", zmin=0, zmax=1, aspect="auto",
                    labels=dict(x="evaluated on site", y="after stage", color="Dice"),
                    title=f"R matrix: {approach} (seed {seed}, {run})")
    fig.show()
