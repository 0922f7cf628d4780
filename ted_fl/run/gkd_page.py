"""The GKD section of the results page, generated from a `python -m ted_fl.generalize` run directory.

`python -m ted_fl.gkd_report RUN_DIR [--doc docs/results-gkd.md]` prints the section (and writes it
between `<!-- section:gkd:start/end -->` markers of the page, leaving every other section alone).
Tables: per target domain, Dice and AUC of the teacher and of each student row (mean +- sd over
seeds), the student's size and speed against the teacher's, FSD, and the verdict against KD.
"""

from __future__ import annotations

import tomllib
import typing

import numpy as np
import pandas as pd

from ted_fl.config import ExperimentConfig, GKDApproachName, from_dict
from ted_fl.errors import TedFlError
from ted_fl.run.directory import RunDir
from ted_fl.run.markdown import md_table

ROW_ORDER = ["teacher", "student", "student_aug", "kd", "kd_aug", "at", "skd", "intra", "inter", "cross", "intra_inter", "gkd"]


def _pm(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if len(v) == 0:
        return "–"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def read_config(run: RunDir) -> ExperimentConfig:
    """The run's configuration; runs written before `gkd.approaches` existed kept the student rows in
    `approaches`, which now names continual approaches only: they are moved across."""
    data = tomllib.loads((run.path / "config.toml").read_text())
    gkd_names = set(typing.get_args(GKDApproachName))
    if any(a in gkd_names for a in data.get("approaches", [])):
        data.setdefault("gkd", {})["approaches"] = [a for a in data.pop("approaches") if a in gkd_names]
    return from_dict(ExperimentConfig, data, str(run.path / "config.toml"))


def combined_metrics(runs: list[RunDir]) -> pd.DataFrame:
    """The metrics of one or several runs of the same protocol (e.g. one run per seed, run in parallel)."""
    frames = []
    for run in runs:
        df = run.metrics()
        if df.empty:
            raise TedFlError(f"{run.path}: no metrics.csv; run python -m ted_fl.generalize first")
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    dup = df.duplicated(["approach", "seed", "site", "metric"])
    if dup.any():
        raise TedFlError("the runs repeat a seed; pass runs with different seeds")
    return df


def tables(runs: RunDir | list[RunDir]) -> dict[str, pd.DataFrame]:
    """score tables (rows approach, columns site x metric), size table and per-seed target means."""
    runs = [runs] if isinstance(runs, RunDir) else runs
    df = combined_metrics(runs)
    cfg = read_config(runs[0])
    source = cfg.gkd.source
    sites = [s for s in dict.fromkeys(df["site"]) if s != "all"]
    targets = [s for s in sites if s != source]
    order = [a for a in ROW_ORDER if a in set(df["approach"])] + sorted(set(df["approach"]) - set(ROW_ORDER))
    out: dict[str, pd.DataFrame] = {}
    for metric in ("dice", "auc", "code_mean_share", "fsd_teacher", "fsd_source"):
        sel = df[df["metric"] == metric]
        if sel.empty:
            continue
        rows = []
        for a in order:
            r = {"approach": a}
            for s in [source, *targets]:
                r[s + (" (source)" if s == source else "")] = _pm(sel[(sel["approach"] == a) & (sel["site"] == s)]["value"])
            per_seed = sel[(sel["approach"] == a) & (sel["site"].isin(targets))].groupby("seed")["value"].mean()
            r["unseen mean"] = _pm(per_seed)
            rows.append(r)
        out[metric] = pd.DataFrame(rows)
    size = df[df["site"] == "all"].groupby(["approach", "metric"])["value"].mean().unstack()
    if not size.empty:
        t = size.loc["teacher"] if "teacher" in size.index else None
        s = size.drop(index="teacher", errors="ignore").iloc[0] if len(size.index) > 1 else None
        rows = []
        for label, net, v in (("teacher", cfg.gkd.teacher, t), ("student", cfg.gkd.student, s)):
            if v is not None:
                rows.append({"model": label, "network": net, "params (M)": v["params"] / 1e6,
                             "GMACs / image": v["macs"] / 1e9, "CPU latency (ms / image)": v["latency_ms"]})
        out["size"] = pd.DataFrame(rows)
    train = df[df["split"] == "train"] if "split" in df else df.iloc[0:0]
    if not train.empty:
        lt = train.pivot_table(index="approach", columns="metric", values="value", aggfunc="mean")
        lt = lt.reindex([a for a in order if a in lt.index])
        lt.columns = [c.removeprefix("loss_") for c in lt.columns]
        out["losses"] = lt.reset_index()
    df = df[df["split"] != "train"] if "split" in df else df
    tgt = df[df["site"].isin(targets) & df["metric"].isin(["dice", "auc"])]
    out["per_seed"] = tgt.groupby(["approach", "seed", "metric"])["value"].mean().unstack("metric").reset_index()
    return out


def verdict(per_seed: pd.DataFrame, method: str = "gkd", baseline: str = "kd", margin: float = 0.005) -> str:
    """Plain words: does `method` beat `baseline` on the unseen targets, by how much, how often.
    "Helps" needs a mean Dice gain of at least `margin` and a gain in every seed."""
    a = per_seed[per_seed["approach"] == method].set_index("seed")
    b = per_seed[per_seed["approach"] == baseline].set_index("seed")
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        return f"No seed has both {method} and {baseline}: no comparison."
    parts = []
    for m in ("dice", "auc"):
        d = (a.loc[seeds, m] - b.loc[seeds, m]).to_numpy(dtype=float)
        wins = int(np.sum(d > 0))
        parts.append(f"{m.upper()} {d.mean():+.3f} (per seed: {', '.join(f'{x:+.3f}' for x in d)}; "
                     f"higher in {wins} of {len(d)} seeds)")
    d_dice = (a.loc[seeds, "dice"] - b.loc[seeds, "dice"]).to_numpy(dtype=float)
    if d_dice.mean() >= margin and np.all(d_dice > 0):
        head = f"**{method} helps the student generalise more than {baseline}**"
    elif abs(d_dice.mean()) < margin:
        head = f"**no clear difference between {method} and {baseline} on the unseen domains** (|mean Dice gap| < {margin})"
    elif d_dice.mean() > 0:
        head = f"**{method} is ahead of {baseline} on average, but not in every seed**"
    else:
        head = f"**{method} does worse than {baseline} on the unseen domains**"
    return f"{head}: mean over the unseen targets, {method} minus {baseline}: " + "; ".join(parts) + "."


def _gap(per_seed: pd.DataFrame, a: str, b: str, metric: str = "dice") -> float | None:
    x = per_seed[per_seed["approach"] == a].set_index("seed")[metric]
    y = per_seed[per_seed["approach"] == b].set_index("seed")[metric]
    common = sorted(set(x.index) & set(y.index))
    return float((x[common] - y[common]).mean()) if common else None


def diagnosis(t: dict[str, pd.DataFrame]) -> list[str]:
    """Computed reasons behind the verdict: headroom, what the views alone do, how large the terms are."""
    ps = t.get("per_seed")
    if ps is None or ps.empty:
        return []
    out = ["", "Why, from the same runs (mean over seeds and unseen targets):"]
    for a, b, what in (("teacher", "student", "headroom: teacher minus plain student"),
                       ("kd", "student", "pixel KD minus plain student"),
                       ("student_aug", "student", "the K augmented views alone (no distillation) minus plain student"),
                       ("kd_aug", "kd", "the same views in L_seg and KD on top of kd (augmentation alone)"),
                       ("gkd", "student", "GKD's three terms (L_seg on anchors, views only in DCGD) minus plain student"),
                       ("gkd", "kd", "gkd minus kd (no views in either L_seg)")):
        g = _gap(ps, a, b)
        if g is not None:
            out.append(f"- {what}: Dice {g:+.3f}, AUC {_gap(ps, a, b, 'auc'):+.3f}")
    lt = t.get("losses")
    if lt is not None and "gkd" in set(lt["approach"]):
        r = lt[lt["approach"] == "gkd"].iloc[0]
        parts = {k: float(r[k]) * w for k, w in (("intra", 1.0), ("inter", 1.0), ("cross", 0.5)) if k in r}
        share = sum(parts.values()) / float(r["seg"]) if float(r["seg"]) else float("nan")
        out.append("- size of the GKD terms in gkd's last round, weighted: " + ", ".join(
            f"{k} {v:.4f}" for k, v in parts.items()) + f" against seg {float(r['seg']):.4f} ({100 * share:.1f} %)")
    if lt is not None:
        out += uniform_warnings(lt)
    return out


def uniform_warnings(losses: pd.DataFrame) -> list[str]:
    """A warning per row whose DCGD graphs were near-uniform (normalised row entropy >= 0.9) in any
    step: its intra / inter terms were not tested (spec 2.3's check)."""
    from ted_fl.continual.gkd import NEAR_UNIFORM

    if "entropy_near_uniform" not in losses:
        return []
    out = []
    for _, r in losses.iterrows():
        share = r.get("entropy_near_uniform")
        if share is not None and np.isfinite(share) and share > 0:
            ent = ", ".join(f"{c.removeprefix('entropy_')} {float(r[c]):.3f}" for c in losses.columns
                            if c.startswith("entropy_") and c != "entropy_near_uniform" and np.isfinite(r[c]))
            out.append(f"- **warning: {r['approach']}'s DCGD graphs were near-uniform** (normalised row entropy >= "
                       f"{NEAR_UNIFORM}) in {100 * float(share):.0f} % of its last round's steps ({ent}): its intra / "
                       "inter terms were not tested; no DCGD conclusion from this row")
    return out


def section(runs: RunDir | list[RunDir], command: str = "", heading: str = "##", title: str = "") -> str:
    runs = [runs] if isinstance(runs, RunDir) else runs
    t = tables(runs)
    cfg = read_config(runs[0])
    seeds = sorted({int(s) for s in combined_metrics(runs)["seed"]})
    g = cfg.gkd
    title = title or f"Generalizable distillation (GKD) on {cfg.data.sites}: train {g.source}, test every site"
    lines = [f"{heading} {title}", ""]
    names = ", ".join(f"`{r.path.name}`" for r in runs)
    lines.append(f"Run{'s' if len(runs) > 1 else ''} {names}, seeds {', '.join(map(str, seeds))}, image size {cfg.data.size}, "
                 f"training crops {g.crop or 'none'}, batch {g.batch_size}, {g.rounds} round(s) x "
                 f"{g.steps_teacher} teacher / {g.steps_student} student / {g.steps_psae} P-SAE / {g.steps_act} "
                 f"ACT steps, K = {g.views} views ({g.augment} augmentation), Adam lr {g.lr}. Metrics pooled over each site's whole "
                 "test split inside the field of view (one confusion matrix, as the authors' test.py). "
                 "Federated: the source site trains, every other site only scores; no image leaves a site.")
    if command:
        lines += ["", "```", command, "```"]
    if "per_seed" in t and {"gkd", "kd"} <= set(t["per_seed"]["approach"]):
        lines += ["", verdict(t["per_seed"])]
        for m in ("student", "skd", "at"):
            if m in set(t["per_seed"]["approach"]):
                lines += ["", "- " + verdict(t["per_seed"], "gkd", m).replace("**", "")]
    lines += diagnosis(t)
    for metric, title in (("dice", "Dice (F1)"), ("auc", "AUC"), ("code_mean_share", "Share of the codes' second "
                          "moment in their mean, ||mu||^2 / E||z||^2 (1: all codes parallel, DCGD's graphs uniform)"), ("fsd_teacher", "FSD(teacher codes, model codes)"),
                          ("fsd_source", "FSD(source codes, target codes) of the same model")):
        if metric in t:
            lines += ["", f"{title}, mean ± sd over seeds:", "", md_table(t[metric])]
    if "losses" in t:
        lines += ["", "Training terms of each student (unweighted, mean over the last round's steps and the seeds; "
                  "weights: KD, AT, pair, intra, inter 1, cross 0.5). A term far smaller than seg moves the "
                  "student little:", "", md_table(t["losses"], digits=4)]
    if "size" in t:
        lines += ["", "Size and speed per image of the run's size, as the run measured them (runs made before commit "
                  "3bd83da timed wall time on the shared CPU, which its load inflates; later runs the single-thread "
                  "CPU time, as `python -m ted_fl.networks`):", "", md_table(t["size"])]
    anchors = ("L_seg on the anchors and the views (gkd.seg_on_views = true, the old rule)" if g.seg_on_views
               else "L_seg on the anchors only, the views only in DCGD")
    lines += ["", "Rows: student = L_seg alone; student_aug = L_seg on anchors and the K views (the "
              "augmentation without distillation); kd = + pixel KD; kd_aug = kd on anchors and the same views; "
              "at = + attention transfer; skd = + KD + pair-wise affinity; intra / inter / cross = + one GKD term; "
              f"gkd = + all three ({anchors}). The teacher runs in eval mode in every row. FSD uses the "
              "TAN on teacher codes and the SAN (trained on the plain student) on every student's codes."]
    return "\n".join(lines)
