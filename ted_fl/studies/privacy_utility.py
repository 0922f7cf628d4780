"""Privacy studies: the privacy-utility grid of `python -m ted_fl.study privacy`, on ted_fl.studies.grid.

A study is a sweep whose first axis is the target epsilon (`privacy.epsilon`; inf = no DP noise,
`privacy.dp = "off"`; a finite value turns on the chosen DP level, `privacy.dp`), crossed with any
policy axes (`privacy.teacher`, `federated.probes`, `federated.retention`, `privacy.replay`, ...),
approaches and seeds. Every cell is one run with the membership-inference attack on
(`privacy.mia`), identified by the hash of its resolved configuration, so a rerun reuses every
finished cell. Cells run as the sweep runs them (Ray tasks of the centralized runner,
train.cells_in_parallel at once, `ted_fl.schedule.cells`) or, with `federated=True`, inside ONE Flower
simulation (Ray starts once; train.cells_in_parallel schedules at once, each on its own SuperNodes):
then every cell also has the server's audit of what travelled (audit.csv), which is what the byte
columns of the report come from.

Outputs (the study folder): cells/<cell>/ (run directories), study.csv (one tidy row per cell:
approach, seed, axes, Avg, BWT, forgetting, attack AUCs, the DP accounting columns `epsilon` /
`delta` when the run wrote them, bytes), study_mean.csv (mean, std and count over seeds per
approach and grid point), audit.csv (the cells' audits, federated only), rounds.csv (federated only:
per training round, wall time, client work, overhead and KB, e.g. with SecAgg+ on and off), report.md and
report.html (plotly: Avg Dice, BWT and attack AUC against epsilon per approach, with the spread
over seeds).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ted_fl.config import DPLevel, ExperimentConfig, choices
from ted_fl.errors import TedFlError
from ted_fl.privacy.leakage import leaks
from ted_fl.run.directory import RunDir, atomic_write_bytes
from ted_fl.run.markdown import md_table
from ted_fl.schedule.lifecycle import finish_run, load_and_record_sites
from ted_fl.studies.grid import (
    Cell,
    _mark_done,
    cell_done,
    collect,
    config_hash,
    expand,
    resolve_cells,
    run_cells,
    val_score,
)

EPS_KEY = "privacy.epsilon"
DP_LEVELS = tuple(d for d in choices(DPLevel) if d != "off")  # the schema's DP levels that are on
# What the study tables and figures show per cell, when the cells have them.
METRICS = ("avg", "bwt", "forgetting", "plasticity", "mia_auc", "mia_auc_cal", "mia_adv", "epsilon", "delta",
           "bytes_sent", "bytes_received", "wall_s")
FIGURES = (("avg", "Avg Dice (final, all sites)"), ("bwt", "BWT"), ("mia_auc", "attack AUC (loss threshold)"),
           ("mia_auc_cal", "attack AUC (calibrated)"))


def parse_epsilons(items: list[str]) -> list[float]:
    """'1 4 16 inf' -> [1.0, 4.0, 16.0, inf]; anything else is one clear line."""
    out: list[float] = []
    for item in items:
        try:
            e = float(item)
        except ValueError:
            raise TedFlError(f"--epsilon expects positive numbers or inf (e.g. --epsilon 1 4 16 inf), got '{item}'") from None
        if not e > 0:
            raise TedFlError(f"--epsilon {item}: epsilon must be > 0 (inf: no DP noise)")
        out.append(e)
    if len(set(out)) != len(out):
        raise TedFlError("--epsilon lists a value twice; give each epsilon once")
    return out


def privacy_cells(base: ExperimentConfig, epsilons: list[float], dp: str = "sample",
                  grid: dict[str, list[Any]] | None = None, approaches: list[str] | None = None,
                  seeds: list[int] | None = None) -> list[Cell]:
    """Every cell of epsilons x policy grid x approaches x seeds (each resolved, so checked, once by
    its runner, `run_cells` / `run_cells_federated`, before any cell runs)."""
    if dp not in DP_LEVELS:
        raise TedFlError(f"--dp {dp}: not a DP level; use one of {', '.join(DP_LEVELS)}")
    if not epsilons:
        raise TedFlError("--epsilon needs at least one value (inf: no DP noise)")
    grid = dict(grid or {})
    if EPS_KEY in grid or "privacy.dp" in grid:
        raise TedFlError("give epsilons with --epsilon and the DP level with --dp, not in --grid")
    cells = expand(base, {EPS_KEY: list(epsilons), **grid}, approaches, seeds)
    any_dp = any(math.isfinite(e) for e in epsilons)
    for c in cells:
        c.cfg.privacy.dp = dp if math.isfinite(c.cfg.privacy.epsilon) else "off"  # type: ignore[assignment]
        c.cfg.privacy.mia = True
        if any_dp and c.cfg.model.norm == "batch":
            # DP swaps batch norm for group norm (ted_fl.privacy.mechanisms); the epsilon = inf cells
            # use the same network, so the curve compares privacy, not two architectures
            c.cfg.model.norm = "group"
        c.key = config_hash(c.cfg)  # the DP level is part of the cell's identity
    return cells


def run_cells_federated(cells: list[Cell], folder: Path, quiet: bool = False) -> dict[str, Any]:
    """Run the unfinished cells in one Flower simulation, train.cells_in_parallel at once (each on its
    own block of SuperNodes, `ted_fl.federated.simulation.simulate_cells`); reuse the rest."""
    from ted_fl.federated.simulation import federated_slots, simulate_cells

    todo = [c for c in cells if not cell_done(folder / "cells" / c.name, c)]
    if not todo:
        return {"ran": 0, "reused": len(cells)}
    resolved = {name: exp.cfg for name, exp in resolve_cells(todo).items()}  # one line before any cell runs
    first = resolved[todo[0].name]
    for cfg in resolved.values():
        if cfg.data != first.data or cfg.federated.clients_per_site != first.federated.clients_per_site:
            raise TedFlError("study --federated: every cell must share [data] and federated.clients_per_site "
                             "(one set of client nodes); drop those keys from --grid")
    runs, orders = {}, {}
    for c in todo:
        path = folder / "cells" / c.name
        path.mkdir(parents=True, exist_ok=True)
        (path / "cell.json").unlink(missing_ok=True)
        run = RunDir(path)
        run.write_config(resolved[c.name])
        orders[c.name] = [s.name for s in load_and_record_sites(resolved[c.name], run)]
        runs[c.name] = run
    slots = min(federated_slots(resolved[c.name], len(todo)) for c in todo)  # one cell under client-level DP: all one
    if not quiet:
        print(f"[study] {len(todo)} cell(s) in one Flower simulation, {slots} at once, "
              f"{len(cells) - len(todo)} reused", flush=True)
    by_name = {c.name: c for c in todo}

    def done(job: Any, extras: dict[str, Any]) -> None:
        c = by_name[job.name]
        run = runs[c.name]
        summary = finish_run(resolved[c.name], run, {(c.approach, c.seed): extras})
        summary["val_score"] = val_score(run.metrics(), orders[c.name])
        run.write_summary(summary)
        _mark_done(folder, c)

    _, failures = simulate_cells([(c.name, resolved[c.name], runs[c.name], c.approach, c.seed) for c in todo], slots,
                                 keep_going=True, on_done=done)
    failures.raise_first("study cell")
    return {"ran": len(todo), "reused": len(cells) - len(todo)}


def tidy(cells: list[Cell], folder: Path) -> pd.DataFrame:
    """One row per cell: approach, seed, the grid point (epsilon first), and every METRICS column."""
    _, summary = collect(cells, folder)
    keys = list(cells[0].point)
    lead = ["approach", "seed", *keys]
    rest = [m for m in METRICS if m in summary.columns]
    sites = [c for c in summary.columns if c.startswith(("mia_auc@", "mia_auc_cal@"))]
    out = summary[lead + rest + sites + ["cell"]].copy()
    return out.rename(columns={EPS_KEY: "target_epsilon"})


def means(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof 1; 0 for one seed) and seeds per approach and grid point."""
    by = [c for c in table.columns if c not in METRICS and c not in ("seed", "cell") and "@" not in c]
    vals = [m for m in METRICS if m in table.columns]
    rows = []
    for point, g in table.groupby(by, sort=False, dropna=False):
        row = dict(zip(by, point if isinstance(point, tuple) else (point,), strict=True))
        row["seeds"] = len(g)
        for m in vals:
            v = pd.to_numeric(g[m], errors="coerce")
            row[m] = float(v.mean())
            row[f"{m}_std"] = float(v.std(ddof=1)) if len(g) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def audit_table(cells: list[Cell], folder: Path) -> pd.DataFrame:
    """The cells' audit.csv files (federated cells), with the cell's approach and grid point."""
    parts = []
    for c in cells:
        f = folder / "cells" / c.name / "audit.csv"
        if f.is_file():
            a = pd.read_csv(f)
            for k, v in c.point.items():
                a[k] = v
            a["cell"] = c.name
            parts.append(a)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def eps_text(e: float) -> str:
    return "inf" if not math.isfinite(float(e)) else f"{float(e):g}"


def _series_name(row: pd.Series, axes: list[str]) -> str:
    extra = ", ".join(f"{a.split('.')[-1]}={row[a]}" for a in axes)
    return f"{row['approach']}" + (f" ({extra})" if extra else "")


def figures(mean: pd.DataFrame, axes: list[str]) -> dict[str, Any]:
    """Plotly figures: each FIGURES metric against epsilon, a line per approach (and policy point)."""
    import plotly.graph_objects as go

    order = sorted(mean["target_epsilon"].unique(), key=lambda e: (not math.isfinite(e), e))
    cats = [eps_text(e) for e in order]
    figs = {}
    for metric, title in FIGURES:
        if metric not in mean.columns or mean[metric].isna().all():
            continue
        fig = go.Figure()
        for name, g in mean.groupby(mean.apply(_series_name, axis=1, axes=axes), sort=False):
            g = g.set_index("target_epsilon").reindex(order)
            fig.add_trace(go.Scatter(x=cats, y=g[metric], name=str(name), mode="lines+markers",
                                     error_y=dict(type="data", array=g[f"{metric}_std"], visible=True)))
        if metric.startswith("mia_auc"):
            fig.add_hline(y=0.5, line_dash="dot", annotation_text="no measurable leakage")
        fig.update_layout(title=f"{title} against the target epsilon (mean ± std over seeds)",
                          xaxis_title="target epsilon per site and stage (inf: no DP)", yaxis_title=title,
                          xaxis=dict(type="category", categoryorder="array", categoryarray=cats),
                          height=380, margin=dict(l=60, r=20, t=50, b=50))
        figs[metric] = fig
    return figs


def _pm(mean: pd.DataFrame, m: str) -> pd.Series:
    def one(r: pd.Series) -> str:
        if pd.isna(r[m]):
            return "–"
        return "inf" if np.isinf(r[m]) else f"{r[m]:.3f} ± {r[f'{m}_std']:.3f}"

    return mean.apply(one, axis=1)


def display_table(mean: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """The report's table: approach, epsilon, axes, seeds, then mean ± std of the headline metrics."""
    out = pd.DataFrame({"approach": mean["approach"], "epsilon": mean["target_epsilon"].map(eps_text)})
    for a in axes:
        out[a] = mean[a]
    out["seeds"] = mean["seeds"]
    for m in ("avg", "bwt", "forgetting", "mia_auc", "mia_auc_cal", "epsilon"):
        if m in mean.columns:
            out["spent epsilon" if m == "epsilon" else m] = _pm(mean, m)
    return out


BYTE_COLUMNS = {  # (kind, direction, record) -> column of the bytes table; None: any record of that kind
    "train down: weights": ("train", "down", "weights"),
    "train down: teacher": ("train", "down", "teacher"),
    "train down: probes": ("train", "down", "probes"),
    "train up: weights": ("train", "up", "weights"),
    "train up: masked (SecAgg+)": ("train", "up", "secaggplus_configs"),
    "SecAgg+ key exchange": ("secagg", None, None),
    "evaluate": ("evaluate", None, None),
    "leakage (attack)": ("leakage", None, None),
}


def bytes_table(audit: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """MB per run by approach (and policy point): the training messages' records, evaluation, the
    attack's measurement, and the totals per direction; summed over sites, mean over seeds and epsilons."""
    if audit.empty:
        return audit
    by = ["approach", *axes]
    rows = []
    for point, g in audit.groupby(by, sort=False, dropna=False):
        row = dict(zip(by, point if isinstance(point, tuple) else (point,), strict=True))
        runs = g.groupby(["cell", "seed"]).ngroups or 1
        for col, (kind, direction, record) in BYTE_COLUMNS.items():
            sel = g["kind"] == kind
            if direction:
                sel &= (g["direction"] == direction) & (g["record"] == record)
            row[col] = float(g[sel]["bytes"].sum()) / runs / 1e6
        for direction in ("down", "up"):
            row[f"total {direction}"] = float(g[g["direction"] == direction]["bytes"].sum()) / runs / 1e6
        rows.append(row)
    return pd.DataFrame(rows)


def round_costs(cells: list[Cell], folder: Path) -> pd.DataFrame:
    """Per cell, from its metrics.csv (split "time" and "comm" rows): the training rounds, and per round the
    wall time of the training call (train_s: SecAgg+'s four stages included), the slowest client's own work
    (work_s), their difference (the protocol's and the messages' overhead), and the payload KB down and up."""
    rows = []
    for c in cells:
        f = folder / "cells" / c.name / "metrics.csv"
        if not f.is_file():
            continue
        m = pd.read_csv(f)
        m = m[(m["stage"] >= 0) & m["split"].isin(["time", "comm"])]
        per = m.pivot_table(index=["stage", "round"], columns="metric", values="value",
                            aggfunc="max")  # work_s: the slowest client of the round
        if per.empty or "train_s" not in per:
            continue
        row: dict[str, Any] = {"approach": c.approach, "seed": c.seed, **c.point, "cell": c.name, "rounds": len(per),
                               "train_s": float(per["train_s"].mean())}
        work = per["work_s"] if "work_s" in per else pd.Series(np.nan, index=per.index)
        row["work_s"] = float(work.mean())
        row["overhead_s"] = float((per["train_s"] - work).mean())
        for k in ("bytes_down", "bytes_up"):
            row[f"kb_{k.split('_')[1]}"] = float(per[k].mean()) / 1e3 if k in per else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def probe_findings(bt: pd.DataFrame, mean: pd.DataFrame, axes: list[str]) -> list[str]:
    """What TED's server-side teacher and probes cost (bytes) and leak (attack AUC) next to KD, per
    policy point: computed from the tables, never typed."""
    if bt.empty or not {"kd", "ted_gugf"} <= set(bt["approach"]):
        return []
    out = []
    for point, g in bt.groupby(axes, sort=False, dropna=False) if axes else [((), bt)]:
        point = point if isinstance(point, tuple) else (point,)
        where = ", ".join(f"{a.split('.')[-1]} = {v}" for a, v in zip(axes, point, strict=True))
        kd, ted = (g[g["approach"] == a].iloc[0] for a in ("kd", "ted_gugf"))
        m = mean
        for a, v in zip(axes, point, strict=True):
            m = m[m[a] == v]
        auc = {a: m[m["approach"] == a]["mia_auc_cal"].mean() for a in ("kd", "ted_gugf")}
        out.append(
            f"- {where or 'this run'}: ted_gugf sends {ted['train down: probes']:.2f} MB of probes and "
            f"{ted['train down: teacher']:.2f} MB of teacher per run (kd: {kd['train down: probes']:.2f} and "
            f"{kd['train down: teacher']:.2f} MB), total down (every kind) {ted['total down']:.2f} vs {kd['total down']:.2f} MB "
            f"({(ted['total down'] / kd['total down'] - 1) * 100:+.0f} %); what leaves the sites is the same "
            f"({ted['total up']:.2f} vs {kd['total up']:.2f} MB). Calibrated attack AUC ted_gugf "
            f"{auc['ted_gugf']:.3f} vs kd {auc['kd']:.3f} (mean over epsilons and seeds).")
    return out


def utility_findings(mean: pd.DataFrame, table: pd.DataFrame, axes: list[str]) -> list[str]:
    """Per approach (and policy point), what the strongest privacy cost in Avg, BWT and attack AUC,
    against epsilon = inf; and sites where the loss-threshold attack is below chance. Computed."""
    out = []
    for point, g in mean.groupby(["approach", *axes], sort=False, dropna=False):
        point = point if isinstance(point, tuple) else (point,)
        name = point[0] + (" (" + ", ".join(f"{a.split('.')[-1]} = {v}" for a, v in zip(axes, point[1:], strict=True))
                           + ")" if axes else "")
        g = g.set_index("target_epsilon").sort_index()
        if len(g) < 2 or not np.isinf(g.index[-1]):
            continue
        free, tight = g.iloc[-1], g.iloc[0]
        seeds = int(g["seeds"].min())
        noise = " (one seed: no spread to compare against)" if seeds < 2 else ""
        out.append(
            f"- {name}: at epsilon {eps_text(g.index[0])} Avg {tight['avg']:.3f} vs {free['avg']:.3f} without DP "
            f"({tight['avg'] - free['avg']:+.3f}), BWT {tight['bwt']:+.3f} vs {free['bwt']:+.3f}, calibrated attack "
            f"AUC {tight['mia_auc_cal']:.3f} vs {free['mia_auc_cal']:.3f}, loss-threshold {tight['mia_auc']:.3f} vs "
            f"{free['mia_auc']:.3f}{noise}.")
    if mean["approach"].nunique() > 1:
        for eps, g in mean.groupby("target_epsilon", sort=True):
            spread = g["avg"].max() - g["avg"].min()
            out.append(f"- epsilon {eps_text(eps)}: the approaches' Avg spans {g['avg'].min():.3f} to "
                       f"{g['avg'].max():.3f} (spread {spread:.4f})"
                       + (": under this much noise the distillation terms change almost nothing"
                          if np.isfinite(eps) and spread < 0.005 else "") + ".")
    low = []
    for c in (c for c in table.columns if c.startswith("mia_auc@")):
        v = table[c].mean()
        if v < 0.4:
            low.append(f"{c.split('@', 1)[1]} ({v:.3f})")
    if low:
        out.append(f"- Below chance, loss threshold: {', '.join(low)}: these sites' training images have a higher "
                   "loss than their test images under every model, so they differ from them (the attack assumes one "
                   "distribution); the calibrated attack subtracts each image's loss under the model before the site "
                   "arrived and is the one to read there.")
    return out


def write_report(cells: list[Cell], folder: Path, command: str = "", title: str = "privacy study") -> dict[str, Any]:
    """study.csv, study_mean.csv, audit.csv (federated cells), report.md and report.html."""
    table = tidy(cells, folder)
    axes = [k for k in cells[0].point if k != EPS_KEY]
    mean = means(table)
    audit = audit_table(cells, folder)
    atomic_write_bytes(folder / "study.csv", table.to_csv(index=False).encode())
    atomic_write_bytes(folder / "study_mean.csv", mean.to_csv(index=False).encode())
    if not audit.empty:
        atomic_write_bytes(folder / "audit.csv", audit.to_csv(index=False).encode())
    shown = display_table(mean, axes)
    cfg = cells[0].cfg
    dp_levels = sorted({c.cfg.privacy.dp for c in cells})
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"{len(cells)} cells: site set {cfg.data.sites} ({'real data' if cfg.data.data_dir else 'synthetic twin'}), "
        f"approaches {sorted({c.approach for c in cells})}, seeds {sorted({c.seed for c in cells})}, target epsilons "
        f"{[eps_text(e) for e in sorted({c.cfg.privacy.epsilon for c in cells})]} (DP level {dp_levels}, "
        f"delta {cfg.privacy.delta:g}), axes {({k: sorted({str(c.point[k]) for c in cells}) for k in axes}) or '-'}; "
        f"{cfg.data.size} px, model.norm = {cfg.model.norm}, {cfg.train.rounds} rounds x {cfg.train.steps_per_round} steps a site.",
        "",
        "Avg = mean final test Dice over all sites; BWT = mean change on earlier sites since each was learnt. "
        "Attack AUC: membership inference on each site's training (members) against its test images "
        "(non-members), balanced and seeded, against the final model, averaged over sites "
        "(`ted_fl/privacy/mia.py`): loss threshold, and calibrated by the model before the site arrived. "
        "0.5 = no leakage this attack can measure; a loss-threshold AUC away from 0.5 for a model that "
        "learnt little (e.g. under strong DP) reflects a difference between a site's training and test "
        "images, not membership, which the calibrated attack removes. Mean ± std over seeds"
        + (" (one seed: std 0)." if table["seed"].nunique() == 1 else "."),
        "",
        md_table(shown),
        "",
        *utility_findings(mean, table, axes),
        "",
    ]
    for prefix, what in (("mia_auc@", "Loss-threshold"), ("mia_auc_cal@", "Calibrated")):
        site_cols = [c for c in table.columns if c.startswith(prefix)]
        if site_cols:
            per_site = table.groupby(["approach", "target_epsilon", *axes], sort=False, dropna=False)[site_cols].mean()
            per_site = per_site.reset_index().rename(columns={c: c.split("@", 1)[1] for c in site_cols})
            per_site["target_epsilon"] = per_site["target_epsilon"].map(eps_text)
            lines += [f"{what} attack AUC per site (mean over seeds):", "", md_table(per_site), ""]
    costs = round_costs(cells, folder)
    if not costs.empty and not audit.empty:  # federated cells: what a training round costs, per axis point
        atomic_write_bytes(folder / "rounds.csv", costs.to_csv(index=False).encode())
        keys = [k for k in ("approach", *axes) if k in costs.columns]
        per = costs.groupby(keys, sort=False, dropna=False)[["rounds", "train_s", "work_s", "overhead_s", "kb_down",
                                                            "kb_up"]].mean().reset_index()
        lines += ["Per training round (`rounds.csv`, from each cell's metrics.csv; mean over rounds, seeds and "
                  "epsilons): wall time of the training call (train_s), the slowest client's own work (work_s), "
                  "their difference (overhead_s: messages, and SecAgg+'s key exchange, masking and unmasking "
                  "when on), and payload KB per round.", "", md_table(per.round(4)), ""]
    if not audit.empty:
        bt = bytes_table(audit, axes)
        bad = leaks(audit)
        lines += [
            "What travelled, from the server's audit of every message (`audit.csv`): MB per run, summed over "
            "sites, mean over seeds and epsilons. Down = to the sites, up = from them; `leakage` is the "
            "attack's own measurement (two models down, scores up), not part of training.", "",
            md_table(bt), "", *probe_findings(bt, mean, axes), "",
            (f"**{len(bad)} image- or mask-shaped array(s) left a site.**" if len(bad) else
             f"No image- or mask-shaped array left any site ({int((audit['direction'] == 'up').sum())} "
             "audited upward records; every array's trailing shape checked against the images')."), "",
        ]
    lines += ["Per cell: `study.csv`; mean and std: `study_mean.csv`; each cell's run directory under `cells/`.", ""]
    text = "\n".join(lines)
    atomic_write_bytes(folder / "report.md", text.encode())
    figs = figures(mean, axes)
    parts = [fig.to_html(full_html=False, include_plotlyjs=k == 0, div_id=name,
                         config={"displaylogo": False, "responsive": True})
             for k, (name, fig) in enumerate(figs.items())]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em}"
            "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style></head>"
            f"<body data-figures=\"{len(figs)}\"><h1>{html.escape(title)}</h1>"
            + (f"<p><code>{html.escape(command)}</code></p>" if command else "")
            + shown.to_html(index=False, border=0, escape=True) + "".join(parts) + "</body></html>\n")
    atomic_write_bytes(folder / "report.html", page.encode())
    return {"table": table, "mean": mean, "shown": shown, "audit": audit, "markdown": text,
            "report": folder / "report.html"}


def study(base: ExperimentConfig, epsilons: list[float], folder: str | Path, *, dp: str = "sample",
          grid: dict[str, list[Any]] | None = None, approaches: list[str] | None = None,
          seeds: list[int] | None = None, federated: bool = False, parallel: bool = True,
          quiet: bool = False, num_cpus: int | None = None, command: str = "") -> dict[str, Any]:
    """Expand, run what is missing (reusing finished cells), write the tables and the report."""
    cells = privacy_cells(base, epsilons, dp, grid, approaches, seeds)
    if not federated and any(c.cfg.privacy.secagg for c in cells):
        raise TedFlError("privacy.secagg = true runs between Flower clients and the server; add --federated")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if federated:
        stats = run_cells_federated(cells, folder, quiet)
    else:
        stats = run_cells(cells, folder, parallel=parallel, quiet=quiet, num_cpus=num_cpus)
    out = write_report(cells, folder, command, title=f"privacy study: {base.data.sites}")
    out.update(ran=stats["ran"], reused=stats["reused"], cells=cells)
    return out

