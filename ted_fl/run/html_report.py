"""The run report: one self-contained HTML page of forgetting curves, R matrices and samples.

    python -m ted_fl.report RUN_DIR [RUN_DIR ...] [--out FILE.html] [--label NAME] [--no-samples] [--png]
    (the command line: ted_fl.commands.report)

It reads only run directories (config.toml, metrics.csv, summary.csv, checkpoints/), never live
objects, so a finished, interrupted or copied run can be reported at any time. plotly.js is
embedded once, inline, so the page works offline. Sample predictions are recomputed from the
per-stage checkpoints on the researcher's own copy of the data (skipped with a note when the
data is not reachable). `--png` also writes every figure as a PNG next to the page (kaleido,
which needs a Chrome/Chromium; skipped with a note when none is found). The figures show one
label: the mean over the site set's classes and regions by default, or the class / region
`--label` names; multi-class runs also get a table of every label.
"""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly
import plotly.colors
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline
from plotly.subplots import make_subplots

from ted_fl.config import UPPER_BOUND, split_seed_of
from ted_fl.continual.metrics import curves, r_matrix
from ted_fl.continual.networks import build_model
from ted_fl.continual.weights import load_weights
from ted_fl.data import load_sites
from ted_fl.errors import TedFlError
from ted_fl.privacy.leakage import by_kind, leaks
from ted_fl.run.directory import (
    MEAN_LABEL,
    VERDICT_METRICS,
    RunDir,
    atomic_write_bytes,
    budget_check,
    labels_of,
    missing_reason,
    paired_difference,
    select_label,
    site_learning,
    verdict,
)
from ted_fl.run.results_page import label_table

# Summary columns of the final tables, with their headers (in this order): what the continual
# metrics say, then what a run cost and leaked (COST_COLUMNS, a second table so neither overflows).
TABLE_COLUMNS = {
    "avg": "Avg",
    "ravg": "rAvg",
    "bwt": "BWT",
    "rbwt": "rBWT",
    "fwt": "FWT",
    "forgetting": "forgetting",
    "plasticity": "plasticity",
    "hd95": "HD95",
    "epsilon": "epsilon",  # the largest epsilon a site spent (inf: no DP)
    "mia_auc": "attack AUC",  # membership inference, loss threshold, mean over sites (ted_fl.privacy.mia)
    "mia_auc_cal": "attack AUC (calibrated)",
    "bytes_sent": "sent (MB)",
    "wall_s": "wall (s)",
}
COST_COLUMNS = ("epsilon", "mia_auc", "mia_auc_cal", "bytes_sent", "wall_s")
CHROMIUM_NAMES = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome", "chrome")
SAMPLE_TILE = 128  # largest side of a sample tile in the page, pixels
# Per series, a dash and a marker as well as a colour: curves that coincide (seq and an approach that
# changed nothing) stay visible, the later one drawn dashed over the earlier one's solid line.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "triangle-down")
# Class colours of the mask overlays (class 1, 2, ...): green, red, blue, yellow.
CLASS_COLOURS = np.array([[0, 200, 80], [230, 60, 60], [60, 120, 240], [240, 200, 40]], dtype=np.float32)

# Records script errors in the page itself (data-errors on <html>) and, once loaded, its scroll and
# client widths (data-widths), so a headless browser's DOM dump shows whether the page rendered
# cleanly and whether anything overflows the window sideways.
ERROR_PROBE = """<script>
(function () {
  var errs = [];
  function rec(msg) {
    errs.push(String(msg));
    document.documentElement.setAttribute("data-errors", JSON.stringify(errs));
  }
  window.addEventListener("error", function (e) { rec(e.message || e.type); });
  window.addEventListener("unhandledrejection", function (e) { rec("unhandled rejection: " + e.reason); });
  window.addEventListener("load", function () {  // the page's own width against the window's
    setTimeout(function () {
      var d = document.documentElement;
      d.setAttribute("data-widths", d.scrollWidth + " " + d.clientWidth);
    }, 500);
  });
})();
</script>"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222;
       overflow-wrap: anywhere; }
.scroll { overflow-x: auto; max-width: 100%; }
.js-plotly-plot, .plotly-graph-div { max-width: 100%; }
details { margin: 0.6em 0; } summary { cursor: pointer; font-weight: 600; }
.verdict { background: #eef6ee; border-left: 4px solid #2a8a3a; padding: 6px 12px; }
.verdict li { margin: 3px 0; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table.summary { border-collapse: collapse; font-size: 0.9em; }
table.summary th, table.summary td { padding: 3px 8px; overflow-wrap: normal; border-bottom: 1px solid #eee; text-align: right; }
table.summary td { white-space: nowrap; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
.note { background: #fff6d6; border-left: 4px solid #e0b000; padding: 4px 10px; margin: 6px 0; }
.meta { color: #555; font-size: 0.9em; }
table.samples { border-collapse: collapse; font-size: 0.8em; margin-bottom: 1em; }
table.samples td, table.samples th { padding: 2px; text-align: center; vertical-align: top; }
table.samples img { image-rendering: pixelated; display: block; }
"""


@dataclass
class Series:
    """One approach of one run: its R matrices (one per seed) and its labels."""

    label: str
    run: RunDir
    approach: str
    rs: dict[int, pd.DataFrame]  # seed -> R (test dice), stages >= 0
    initial: dict[int, pd.Series]  # seed -> the untrained model's test dice per site
    order: list[str]


@dataclass
class Report:
    series: list[Series]
    summary: pd.DataFrame  # summary.csv rows of every run, with a "label" column
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- loading
def load(run_dirs: list[Path], label: str = MEAN_LABEL) -> Report:
    """Read every run directory into R matrices per (approach, seed) of one class / region (`label`,
    default the mean over them); label approaches uniquely."""
    which = label  # `label` names a series below
    runs = [RunDir.open(p) for p in run_dirs]
    for run in runs:
        run.refuse_if_failed()
    pairs: list[tuple[RunDir, str, pd.DataFrame]] = []
    for run in runs:
        m = run.metrics()
        if m.empty:
            raise TedFlError(f"{run.path / 'metrics.csv'}: missing or empty; the run has not finished a stage")
        test = select_label(m[(m["split"] == "test") & (m["metric"] == "dice")], which)
        for approach, g in test.groupby("approach", sort=False):
            pairs.append((run, str(approach), g))
    counts = pd.Series([a for _, a, _ in pairs]).value_counts()
    series: list[Series] = []
    summaries = []
    for run, approach, g in pairs:
        label = approach if counts[approach] == 1 else f"{approach} [{run.path.name}]"
        trained = g[g["stage"] >= 0]
        order = list(dict.fromkeys(trained.sort_values("stage", kind="stable")["stage_site"]))
        rest = [s for s in dict.fromkeys(trained["site"]) if s not in order]
        order += rest
        rs, init = {}, {}
        for seed, gs in trained.groupby("seed"):
            rs[int(seed)] = r_matrix(gs, "dice", order, which)
        for seed, gs in g[g["stage"] < 0].groupby("seed"):
            init[int(seed)] = gs.groupby("site")["value"].mean()
        series.append(Series(label, run, approach, rs, init, order))
    for run in runs:
        if (run.path / "summary.csv").is_file():
            s = run.summary()
            s["run"] = run.path.name
            summaries.append(s)
    summary = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame()
    if not summary.empty:
        labels = {(s.run.path.name, s.approach): s.label for s in series}
        summary["label"] = [labels.get((r, a), a) for r, a in zip(summary["run"], summary["approach"], strict=True)]
    return Report(series, summary)


def joint_final(series: list[Series]) -> pd.Series | None:
    """The joint upper bound's last-stage Dice per site (mean over seeds), for rAvg curves."""
    joint = [s for s in series if s.approach == UPPER_BOUND]
    if not joint:
        return None
    rows = [r.iloc[-1] for r in joint[0].rs.values()]
    return sum(rows) / len(rows)


def stage_curves(report: Report) -> pd.DataFrame:
    """Tidy: label, seed, stage (1-based), site, avg, bwt, forgetting, ... per stage."""
    joint = joint_final(report.series)
    frames = []
    for s in report.series:
        for seed, r in s.rs.items():
            c = curves(r, joint).reset_index()
            c["stage"] = c["stage"] + 1
            c["label"], c["seed"] = s.label, seed
            frames.append(c)
    return pd.concat(frames, ignore_index=True)


def site_curves(report: Report) -> pd.DataFrame:
    """Tidy: label, seed, stage (0 = untrained, 1..T), site, dice: every site's forgetting curve."""
    frames = []
    for s in report.series:
        for seed, r in s.rs.items():
            long = r.reset_index().melt(id_vars="stage", var_name="site", value_name="dice")
            long["stage"] = long["stage"] + 1
            if seed in s.initial:
                init = s.initial[seed].rename("dice").rename_axis("site").reset_index()
                init["stage"] = 0
                long = pd.concat([init, long], ignore_index=True)
            long["label"], long["seed"] = s.label, seed
            frames.append(long)
    return pd.concat(frames, ignore_index=True)


def mean_std(df: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Mean and std over seeds (std 0 with a single seed)."""
    g = df.groupby(keys, sort=False)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


# --------------------------------------------------------------------------- figures
def _stage_ticks(report: Report) -> tuple[list[int], list[str]]:
    order = max((s.order for s in report.series), key=len)
    return list(range(1, len(order) + 1)), [f"{i + 1}: {site}" for i, site in enumerate(order)]


def curve_figure(report: Report, sc: pd.DataFrame, value: str, title: str, ytitle: str) -> go.Figure:
    fig = go.Figure()
    agg = mean_std(sc, ["label", "stage"], value)
    colours = _colours([s.label for s in report.series])
    for label, g in agg.groupby("label", sort=False):
        g = g.dropna(subset=["mean"])
        fig.add_trace(
            go.Scatter(
                x=g["stage"], y=g["mean"], name=str(label), mode="lines+markers",
                **_style(colours, str(label)),
                error_y=dict(type="data", array=g["std"], visible=bool((g["count"] > 1).any())),
                hovertemplate="stage %{x}: %{y:.3f}<extra>" + html.escape(str(label)) + "</extra>",
            )
        )
    tv, tt = _stage_ticks(report)
    fig.update_layout(title=title, xaxis=dict(title="stage: site arrived", tickvals=tv, ticktext=tt),
                      yaxis_title=ytitle, template="plotly_white", height=420)
    if value == "bwt":
        fig.add_hline(y=0, line_dash="dot", line_color="#888")
    else:
        fig.update_yaxes(range=[-0.02, 1.02])
    return fig


def site_figure(report: Report, sites_df: pd.DataFrame, what: str = "") -> go.Figure:
    """One panel per site: its Dice after every stage (0 = untrained), one line per approach."""
    order: list[str] = list(dict.fromkeys(site for s in report.series for site in s.order))
    cols = min(3, len(order))
    rows = -(-len(order) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=order, shared_yaxes=True,
                        vertical_spacing=0.18 / max(rows - 1, 1) if rows > 1 else 0.1)
    agg = mean_std(sites_df, ["label", "site", "stage"], "dice")
    colours = _colours([s.label for s in report.series])
    for k, site in enumerate(order):
        r, c = k // cols + 1, k % cols + 1
        for label, g in agg[agg["site"] == site].groupby("label", sort=False):
            fig.add_trace(
                go.Scatter(
                    x=g["stage"], y=g["mean"], name=str(label), legendgroup=str(label), showlegend=k == 0,
                    mode="lines+markers", **_style(colours, str(label)),
                    error_y=dict(type="data", array=g["std"], visible=bool((g["count"] > 1).any())),
                    hovertemplate=f"{html.escape(site)} after stage %{{x}}: %{{y:.3f}}<extra>"
                    + html.escape(str(label)) + "</extra>",
                ),
                row=r, col=c,
            )
        if site in report.series[0].order:
            fig.add_vline(x=report.series[0].order.index(site) + 1, line_dash="dot", line_color="#999",
                          row=r, col=c)
    fig.update_xaxes(title_text="stage (0 = untrained)", dtick=1)
    fig.update_yaxes(range=[-0.02, 1.02])
    fig.update_yaxes(title_text="Dice", col=1)
    fig.update_layout(title="Each site's Dice across stages (its forgetting curve; dotted: the site arrives)"
                      + (f"<br><sup>{what}</sup>" if what else ""), margin=dict(t=110),
                      template="plotly_white", height=330 * rows + 60)
    return fig


def r_figure(s: Series, what: str = "Dice") -> go.Figure:
    """R[t, i]: Dice on site i after stage t, mean over seeds."""
    first = pd.concat(list(s.rs.values())).groupby(level=0).mean()  # seeds may stop at different stages
    mean = first.to_numpy(dtype=float)
    ylabels = [f"{t + 1}: {s.order[t]}" if t < len(s.order) else str(t + 1) for t in first.index]
    text = [[f"{v:.3f}" for v in row] for row in mean]
    fig = go.Figure(
        go.Heatmap(z=mean, x=list(first.columns), y=ylabels, zmin=0, zmax=1, colorscale="Viridis",
                   text=text, texttemplate="%{text}", colorbar=dict(title="Dice"),
                   hovertemplate="after stage %{y}, site %{x}: %{z:.3f}<extra></extra>")
    )
    seeds = ", ".join(map(str, s.rs))
    fig.update_layout(title=f"R matrix: {html.escape(s.label)}<br><sup>{what}, mean over seeds {seeds}</sup>",
                      template="plotly_white", xaxis_title="evaluated on site",
                      yaxis=dict(title="after stage", autorange="reversed"),
                      height=160 + 60 * mean.shape[0], width=max(560, 160 + 110 * mean.shape[1]))
    return fig


def _style(colours: dict[str, str], label: str) -> dict:
    """Line and marker of one series: its colour, and a dash and symbol of its own."""
    k = list(colours).index(label)
    return dict(line=dict(color=colours[label], dash=DASHES[k % len(DASHES)], width=2.5 if k == 0 else 2),
                marker=dict(symbol=SYMBOLS[k % len(SYMBOLS)], size=max(6, 11 - 2 * k), color=colours[label]),
                opacity=0.9)


def _colours(labels: list[str]) -> dict[str, str]:
    palette = plotly.colors.qualitative.Plotly
    return {lab: palette[i % len(palette)] for i, lab in enumerate(dict.fromkeys(labels))}


# --------------------------------------------------------------------------- table
def summary_table(summary: pd.DataFrame, columns: list[str] | tuple[str, ...] | None = None) -> str:
    """The final table: mean ± std over seeds per approach (from summary.csv), of `columns`
    (default: every column of TABLE_COLUMNS the runs have); '' when none of them is there."""
    if summary.empty:
        return '<p class="note">No summary.csv in these runs.</p>'
    s = summary.copy()
    if "bytes_sent" in s:
        s["bytes_sent"] = s["bytes_sent"] / 1e6
    cols = [c for c in TABLE_COLUMNS if c in s.columns and (columns is None or c in columns)]
    if not cols:
        return ""
    g = s.groupby("label", sort=False)
    mean, std, n = g[cols].mean(), g[cols].std(), g.size()
    out = pd.DataFrame(index=mean.index)
    out["seeds"] = n
    for c in cols:
        digits = 1 if c in ("hd95", "bytes_sent", "wall_s") else 3
        out[TABLE_COLUMNS[c]] = [
            (missing_reason(c, m) or "–") if pd.isna(m) else (f"{m:.{digits}f}" if k < 2 or pd.isna(sd) else f"{m:.{digits}f} ± {sd:.{digits}f}")
            for m, sd, k in zip(mean[c], std[c], n, strict=True)
        ]
    out.index.name = "approach"
    table = out.reset_index().to_html(index=False, classes="summary", border=0, escape=True)
    return f'<div class="scroll">{table}</div>'


def verdict_html(report: Report, run_dirs: list[Path]) -> str:
    """The page's answer first: which approach forgets least and at what cost in plasticity, paired
    by seed against seq (ted_fl.run.directory.verdict), each budget warning, and the paired table."""
    if report.summary.empty:
        return '<p class="note">No summary.csv in these runs: no verdict.</p>'
    names = {(s.run.path.name, s.approach): s.label for s in report.series}
    frames = []
    for p in run_dirs:  # the report's names: "seq [RUN]" where two runs hold seq
        m = RunDir.open(p).metrics()
        frames.append(site_learning(m.assign(approach=[names.get((p.name, a), a) for a in m["approach"]])))
    sites = pd.concat(frames, ignore_index=True).rename(columns={"approach": "label"})
    lines = verdict(report.summary, sites, by="label")
    warnings = set(budget_check(report.summary, sites, by="label"))
    items = "".join(f"<li>{html.escape(x)}</li>" for x in lines if x not in warnings)
    warn = "".join(f'<p class="note"><b>Budget check:</b> {html.escape(x)}</p>'
                   for x in lines if x in warnings)
    rows = []
    if "seq" in set(report.summary["label"]):
        for name in dict.fromkeys(report.summary["label"]):
            if name in ("seq", "joint"):
                continue
            ps = [paired_difference(report.summary, str(name), "seq", k, by="label") for k in VERDICT_METRICS]
            cells = "".join(f"<td>{html.escape(p.text())}</td>" for p in ps)
            rows.append(f"<tr><td>{html.escape(str(name))} - seq</td>{cells}</tr>")
    table = ("<div class='scroll'><table class='summary'><tr><th>paired by seed</th>"
             + "".join(f"<th>{k}</th>" for k in VERDICT_METRICS) + "</tr>" + "".join(rows) + "</table></div>"
             if rows else "")
    return (f"<div class='verdict'><ul>{items}</ul></div>{warn}{table}<p class='meta'>Mean difference of each "
            "approach's per-seed value minus seq's over the seeds both hold, with its 95% Student-t interval; "
            "an interval that excludes 0 is beyond the seeds' noise. Forgetting: mean drop from each earlier "
            "site's best Dice (lower is better); BWT: mean change on earlier sites (below 0: forgetting); "
            "plasticity: mean Dice on each site right after its own stage.</p>")


# --------------------------------------------------------------------------- samples
def _overlay(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Grey image (min-max scaled) with each class blended in its colour: (H, W, 3) uint8."""
    img = image.astype(np.float32)
    lo, hi = np.percentile(img, [1, 99])
    g = np.clip((img - lo) / (hi - lo + 1e-8), 0, 1) * 255
    rgb = np.repeat(g[..., None], 3, axis=2)
    if mask is not None:
        for k in range(1, int(mask.max()) + 1):
            sel = mask == k
            rgb[sel] = 0.45 * rgb[sel] + 0.55 * CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]
    return rgb.astype(np.uint8)


def _png(rgb: np.ndarray) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    side = max(im.size)
    scale = SAMPLE_TILE / side
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                   Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pick_slices(masks: np.ndarray, volumes: np.ndarray, k: int) -> list[int]:
    """The `k` test slices with the most foreground, from different volumes where possible."""
    fg = (masks > 0).reshape(len(masks), -1).sum(axis=1)
    ranked = [int(i) for i in np.argsort(-fg, kind="stable")]
    chosen: list[int] = []
    for i in ranked:
        if len(chosen) == k:
            break
        if volumes[i] not in {volumes[j] for j in chosen}:
            chosen.append(i)
    chosen += [i for i in ranked if i not in chosen][: k - len(chosen)]
    return chosen


def slice_dice(pred: np.ndarray, gt: np.ndarray, labels: list[tuple[str, tuple[int, ...]]]) -> float:
    """Dice of one slice as the tables' `mean` label: the mean over the set's classes and regions
    (a region = the union of its classes) of `dice` (1 where both are empty)."""
    from ted_fl.continual.evaluation import dice

    return float(np.mean([dice(np.isin(pred, idx), np.isin(gt, idx)) for _, idx in labels]))


def samples_html(report: Report, per_site: int = 2) -> str:
    """Per run and approach (first seed): image, ground truth, prediction after every stage."""
    from ted_fl.continual.evaluation import predict_labels

    parts: list[str] = []
    by_run: dict[Path, list[Series]] = {}
    for s in report.series:
        by_run.setdefault(s.run.path, []).append(s)
    for path, series in by_run.items():
        run = series[0].run
        try:
            cfg = run.read_config()
            sites = load_sites(cfg.data, split_seed_of(cfg, min(cfg.seeds)))
        except Exception as exc:  # the data moved or is gone: the rest of the report still stands
            report.notes.append(f"Sample predictions of {path.name} skipped: the data is not reachable ({exc}).")
            continue
        picks = {site.name: pick_slices(site.test.masks, site.test.volumes, per_site) for site in sites if len(site.test)}
        model = build_model(cfg.model)
        model.eval()
        for s in series:
            seed = min(s.rs)
            stages = sorted(int(p.stem[5:]) for p in run.ckpt_dir(s.approach, seed).glob("stage*.pt"))
            if not stages:
                report.notes.append(f"Sample predictions of {s.label}: no stage checkpoints in {run.ckpt_dir(s.approach, seed)}.")
                continue
            preds: dict[int, dict[str, np.ndarray]] = {}
            for t in stages:
                ck = run.checkpoint(s.approach, seed, f"stage{t}")
                load_weights(model, ck["weights"])
                preds[t] = {  # as the run scored them: eval.bn and the protocol's rescale
                    site.name: predict_labels(model, site.test, site.per_volume, cfg)[picks[site.name]]
                    for site in sites if site.name in picks
                }
            head = "".join(f"<th>after stage {t + 1}<br>{html.escape(s.order[t] if t < len(s.order) else '')}</th>"
                           for t in stages)
            rows = []
            for site in sites:
                if site.name not in picks:
                    continue
                for j, i in enumerate(picks[site.name]):
                    img, gt = site.test.images[i, 0], site.test.masks[i]
                    cells = [f"<th>{html.escape(site.name)}<br>{html.escape(str(site.test.volumes[i]))}</th>",
                             f'<td><img src="{_png(_overlay(img, None))}" alt="image"></td>',
                             f'<td><img src="{_png(_overlay(img, gt))}" alt="ground truth"></td>']
                    for t in stages:
                        p = preds[t][site.name][j]
                        cells.append(f'<td><img src="{_png(_overlay(img, p))}" alt="prediction">'
                                     f"Dice {slice_dice(p, gt, site.labels.labels()):.2f}</td>")
                    rows.append("<tr>" + "".join(cells) + "</tr>")
            parts.append(
                f"<h3>{html.escape(s.label)} (seed {seed})</h3><div class='scroll'><table class='samples'><tr>"
                f"<th>site / volume</th><th>image</th><th>ground truth</th>{head}</tr>{''.join(rows)}</table></div>"
            )
    return "".join(parts)


# --------------------------------------------------------------------------- PNG export
def find_chromium() -> str | None:
    """A Chrome/Chromium for kaleido: $BROWSER_PATH, else the first known name on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def export_pngs(figures: dict[str, go.Figure], folder: Path) -> tuple[list[Path], str | None]:
    """Every figure as folder/<id>.png through kaleido; (files, note if skipped)."""
    chrome = find_chromium()
    if chrome is None:
        return [], "PNG export skipped: no Chrome/Chromium found (install Debian's chromium, or set BROWSER_PATH)."
    os.environ.setdefault("BROWSER_PATH", chrome)

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{name}.png" for name in figures]
    try:
        pio.write_images(list(figures.values()), files, format="png", scale=2)
    except Exception as exc:  # kaleido or the browser failed: the HTML page still stands
        return [], f"PNG export failed ({type(exc).__name__}: {exc})."
    return files, None


# --------------------------------------------------------------------------- page
def label_title(label: str) -> str:
    """How a figure names the label it shows."""
    return "Dice of the mean over classes and regions" if label == MEAN_LABEL else f"Dice of {label}"


def build_figures(report: Report, label: str = MEAN_LABEL) -> dict[str, go.Figure]:
    """The page's figures by element id (the browser test checks each one renders); every title
    names the label shown."""
    sc = stage_curves(report)
    what = html.escape(label_title(label))
    figs = {
        "fig-avg": curve_figure(report, sc, "avg", f"Mean Dice over the sites seen so far<br><sup>{what}</sup>",
                                "mean Dice (seen sites)"),
        "fig-bwt": curve_figure(report, sc, "bwt",
                                f"Backward transfer per stage (below 0: forgetting)<br><sup>{what}</sup>", "BWT"),
        "fig-sites": site_figure(report, site_curves(report), what),
    }
    for k, s in enumerate(report.series):
        figs[f"fig-r-{k}"] = r_figure(s, what)
    return figs


def privacy_html(run_dirs: list[Path]) -> str:
    """Per run with differential privacy: epsilon spent per site and stage (and in total) at delta."""
    parts = []
    for p in run_dirs:
        run = RunDir.open(p)
        m = run.metrics()
        rows = m[m["split"] == "privacy"] if "split" in m.columns else m.iloc[0:0]
        rows = rows[~rows["metric"].astype(str).str.startswith("mia_")]  # the attack's rows: leakage_html
        if rows.empty:
            continue
        t = rows.pivot_table(index=["approach", "seed", "stage", "site"], columns="metric", values="value",
                             aggfunc="first").reset_index()
        cols = [c for c in ("approach", "seed", "stage", "site", "epsilon", "epsilon_total", "delta",
                            "noise_multiplier", "steps") if c in t.columns]
        cfg = run.read_config().privacy
        head = (f"dp = {cfg.dp}, target epsilon {cfg.epsilon:g} per site and stage at delta {cfg.delta:g}"
                + (f", clipping {cfg.clipping}, noise on the {cfg.noise}" if cfg.dp == "client" else ""))
        t.columns.name = None
        parts.append(f"<p class='meta'>{html.escape(run.path.name)}: {html.escape(head)}</p><details><summary>"
                     f"{html.escape(run.path.name)}: epsilon per site and stage</summary><div class='scroll'>"
                     + t[cols].to_html(index=False, classes="summary", border=0, float_format=lambda v: f"{v:.4g}")
                     + "</div></details>")
    if not parts:
        return ""
    return ("<h2>Differential privacy</h2><p class='meta'>Epsilon from Opacus' RDP accountant over each stage's "
            "rounds (epsilon) and over every stage a site trained in (epsilon_total); docs/privacy.md says what "
            "each level covers.</p>" + "".join(parts))


MIA_COLUMNS = {"mia_auc": "attack AUC", "mia_auc_cal": "attack AUC (calibrated)", "mia_adv": "advantage",
               "mia_adv_cal": "advantage (calibrated)", "mia_n": "images per side"}


def mia_table(rows: pd.DataFrame) -> str:
    """The attack's rows (split `privacy`, metric mia_*) as one row per approach and site, one
    named column per attack metric, mean ± std over seeds."""
    g = rows.groupby(["approach", "site", "metric"], sort=False)["value"]
    t = g.agg(["mean", "std", "count"]).reset_index()
    t["cell"] = [f"{m:.0f}" if k == "mia_n" else f"{m:.3f}" if n < 2 or pd.isna(sd) else f"{m:.3f} ± {sd:.3f}"
                 for m, sd, n, k in zip(t["mean"], t["std"], t["count"], t["metric"], strict=True)]
    wide = t.pivot(index=["approach", "site"], columns="metric", values="cell")
    wide = wide[[c for c in MIA_COLUMNS if c in wide.columns] + [c for c in wide.columns if c not in MIA_COLUMNS]]
    wide = wide.rename(columns=MIA_COLUMNS).reindex(pd.MultiIndex.from_frame(t[["approach", "site"]].drop_duplicates()))
    wide.columns.name = None
    return wide.reset_index().to_html(index=False, classes="summary", border=0, escape=True)


def leakage_html(run_dirs: list[Path]) -> str:
    """Per run: the membership-inference attack per site, and the audit of what travelled."""
    parts = []
    for p in run_dirs:
        run = RunDir.open(p)
        m = run.metrics()
        rows = m[(m["split"] == "privacy") & m["metric"].astype(str).str.startswith("mia_")] if "split" in m else m.iloc[0:0]
        if not rows.empty:
            parts.append(f"<details><summary>{html.escape(run.path.name)}: membership inference per site "
                         "(mean ± std over seeds)</summary><div class='scroll'>" + mia_table(rows) + "</div></details>")
        audit_file = run.path / "audit.csv"
        if audit_file.is_file():
            audit = pd.read_csv(audit_file)
            bad = leaks(audit)
            verdict = (f"{len(bad)} image- or mask-shaped record(s) left a site" if len(bad) else
                       "no image- or mask-shaped array left any site")
            parts.append(f"<p class='meta'>{html.escape(run.path.name)}: {html.escape(verdict)} (audit.csv).</p>"
                         f"<details><summary>{html.escape(run.path.name)}: what travelled (audit.csv)</summary>"
                         "<p class='meta'>Payload bytes per kind, direction and record, summed over sites (mean "
                         "over seeds).</p><div class='scroll'>"
                         + by_kind(audit).to_html(index=False, classes="summary", border=0,
                                                  float_format=lambda v: f"{v:.0f}") + "</div></details>")
    if not parts:
        return ""
    return ("<h2>Privacy: membership inference and what travelled</h2><p class='meta'>Membership inference on each site's training (members) against "
            "its test images (non-members), balanced and seeded, against the final model (ted_fl/privacy/mia.py): "
            "mia_auc by loss threshold, mia_auc_cal calibrated by the model before the site arrived; 0.5 = no "
            "leakage the attack can measure.</p>" + "".join(parts))


def label_tables_html(run_dirs: list[Path]) -> str:
    """Per run with several classes / regions: Avg, BWT, forgetting, plasticity of every label."""
    parts = []
    for p in run_dirs:
        run = RunDir.open(p)
        if len(labels_of(run.metrics())) <= 2:  # one class: it equals the mean
            continue
        t = label_table(run, spread=True).reset_index()
        parts.append(f"<h3>{html.escape(run.path.name)}</h3><div class='scroll'>"
                     + t.to_html(index=False, classes="summary", border=0, escape=True) + "</div>")
    if not parts:
        return ""
    return ("<h2>Per class and region</h2><p class='meta'>Mean ± std over seeds. The figures show one label "
            "(python -m ted_fl.report --label NAME); this table shows them all.</p>" + "".join(parts))


def shared_plotlyjs(folder: Path) -> Path:
    """The one plotly.js file of an output folder, written on first use, named by its version."""
    path = Path(folder) / f"plotly-{plotly.__version__}.min.js"
    if not path.is_file():
        atomic_write_bytes(path, plotly.offline.get_plotlyjs().encode())
    return path


def _plotly_head(out: Path, plotlyjs: Path | None) -> str:
    """The page's <script> for a shared plotly.js, and a note that shows only when it is missing."""
    if plotlyjs is None:
        return ""
    rel = html.escape(Path(os.path.relpath(plotlyjs, out.parent)).as_posix())
    return f'<script src="{rel}"></script>'


def _plotly_missing(plotlyjs: Path | None, run_dirs: list[Path]) -> str:
    if plotlyjs is None:
        return ""
    hint = " ".join(html.escape(str(p)) for p in run_dirs)
    return (f'<p class="note" id="plotly-missing">The figures need <code>{html.escape(plotlyjs.name)}</code> '
            f"in the folder above this page (shared by the runs of one output folder); it is missing, e.g. the "
            f"run was copied alone. <code>python -m ted_fl.report {hint}</code> rewrites the page with plotly.js "
            "inside.</p><script>if (window.Plotly) document.getElementById('plotly-missing').remove();</script>")


def write_report(run_dirs: list[Path], out: Path, *, samples: bool = True, png: bool = False,
                 label: str = MEAN_LABEL, plotlyjs: Path | None = None) -> Path:
    """Write the HTML report of `run_dirs` to `out` (figures of `label`); returns `out`.

    plotly.js (~3.5 MB) is embedded once in the page, or, with `plotlyjs` (a file, see
    `shared_plotlyjs`), loaded from that file: the runs of one output folder share one copy.
    """
    run_dirs = [Path(p) for p in run_dirs]
    out = Path(out)
    report = load(run_dirs, label)
    figs = build_figures(report, label)
    sample_part = ""
    if samples:
        sample_part = samples_html(report)
    else:
        report.notes.append("Sample predictions left out (--no-samples).")
    if png:
        files, note = export_pngs(figs, out.parent / f"{out.stem}-figures")
        if note:
            report.notes.append(note)
            print(f"warning: {note}", file=sys.stderr)
        else:
            report.notes.append(f"PNG figures: {files[0].parent}")
    fig_html = []
    for k, (name, fig) in enumerate(figs.items()):
        fig_html.append(
            fig.to_html(full_html=False, include_plotlyjs=k == 0 and plotlyjs is None, div_id=name,
                        config={"displaylogo": False, "responsive": True})
        )
    n_r = len(report.series)
    meta = "".join(
        f"<li><code>{html.escape(str(p))}</code>: {html.escape(', '.join(s.label for s in report.series if s.run.path == p))}</li>"
        for p in dict.fromkeys(s.run.path for s in report.series)
    )
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in report.notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ted-fl report</title>
{ERROR_PROBE}
{_plotly_head(out, plotlyjs)}
<style>{CSS}</style></head>
<body data-figures="{len(figs)}">
<h1>ted-fl report: forgetting across sites</h1>
{_plotly_missing(plotlyjs, run_dirs)}
<ul class="meta">{meta}</ul>
{notes}
<h2>Verdict</h2>
{verdict_html(report, run_dirs)}
<h2>Final table (mean ± std over seeds)</h2>
{summary_table(report.summary, [c for c in TABLE_COLUMNS if c not in COST_COLUMNS])}
{summary_table(report.summary, COST_COLUMNS)}
<p class="meta">Figures below: {html.escape(label_title(label))} (label <b>{html.escape(label)}</b>).</p>
<h2>Mean Dice over the sites seen so far</h2>
{fig_html[0]}
<h2>Backward transfer per stage</h2>
{fig_html[1]}
<h2>Forgetting curves per site</h2>
{fig_html[2]}
<h2>R matrices ({n_r})</h2>
{''.join(f'<div class="scroll">{h}</div>' for h in fig_html[3:])}
{label_tables_html(run_dirs)}
<h2>Sample predictions</h2>
<p class="meta">Dice under each prediction: that slice's Dice as the tables' mean label (the mean over the
set's classes and regions).</p>
{sample_part or '<p class="meta">none</p>'}
{privacy_html(run_dirs)}
{leakage_html(run_dirs)}
</body></html>
"""
    out.parent.mkdir(parents=True, exist_ok=True)

    atomic_write_bytes(out, page.encode())
    return out



