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
# # Compare approaches, end to end
#
# Runs a small comparison with the centralized reference runner (the same schedule and
# evaluation as the Flower simulation, in one process), then plots what it wrote.
#
# Settings from the environment, with defaults for a laptop:
# `TED_FL_CONFIG` (experiment file, default `simulations/quick.toml`), `TED_FL_APPROACHES`
# (default `seq kd ted_gugf`), `TED_FL_SEEDS` (default `0`), `TED_FL_OUT` (default `runs`).

# %%
import os
from pathlib import Path

import pandas as pd
import plotly.express as px
from IPython.display import display

from ted_fl.commands.shared import run_command
from ted_fl.continual.metrics import curves, r_matrix
from ted_fl.run.directory import RunDir

REPO = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
CONFIG = os.environ.get("TED_FL_CONFIG", str(REPO / "simulations" / "quick.toml"))
APPROACHES = os.environ.get("TED_FL_APPROACHES", "seq kd ted_gugf").split()
SEEDS = os.environ.get("TED_FL_SEEDS", "0").split()
OUT = Path(os.environ.get("TED_FL_OUT", str(REPO / "runs")))

# %%
before = set(OUT.glob("*")) if OUT.is_dir() else set()
rc = run_command("centralized", [
    "--config", CONFIG, "--approach", *APPROACHES, "--seed", *SEEDS, "--quiet", "--out", str(OUT),
    "--set", 'data.order=["RUNMC","BMC","I2CVB"]',
])
assert rc == 0, f"the run failed (exit {rc})"
run_dir = max({p for p in OUT.glob("*") if p.is_dir()} - before, key=lambda p: p.stat().st_mtime)
display(run_dir)

# %% [markdown]
# ## The final table

# %%
summary = pd.read_csv(run_dir / "summary.csv")
table = summary.groupby("approach", sort=False)[["avg", "bwt", "fwt", "forgetting", "hd95", "wall_s"]].agg(["mean", "std"])
display(table)

# %%
long = summary.melt(id_vars=["approach", "seed"], value_vars=["avg", "bwt", "fwt", "forgetting"],
                    var_name="metric", value_name="value")
fig = px.bar(long.groupby(["approach", "metric"], as_index=False, sort=False)["value"].mean(),
             x="metric", y="value", color="approach", barmode="group", title="Final continual metrics")
fig.show()

# %% [markdown]
# ## Mean Dice over the sites seen so far

# %%
metrics = RunDir(run_dir).metrics()  # label: a class / region of the site set, or "mean" over them
test = metrics[(metrics["split"] == "test") & (metrics["metric"] == "dice") & (metrics["stage"] >= 0)
               & (metrics["label"] == "mean")]
frames = []
for (approach, seed), g in test.groupby(["approach", "seed"], sort=False):
    c = curves(r_matrix(g, "dice")).reset_index().assign(approach=approach, seed=seed)
    frames.append(c)
stage_curves = pd.concat(frames, ignore_index=True)
stage_curves["stage"] += 1
fig = px.line(stage_curves.groupby(["approach", "stage"], as_index=False, sort=False)["avg"].mean(),
              x="stage", y="avg", color="approach", markers=True, range_y=[0, 1],
              title="Mean Dice over the sites seen so far")
fig.show()

# %% [markdown]
# The full report (every site's forgetting curve, R matrices, sample predictions) was written
# with the run:

# %%
report = run_dir / "report.html"
print(report if report.is_file() else "no report written")
