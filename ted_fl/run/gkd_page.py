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
from ted_fl.run.directory import RunDir, paired_difference
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


def _per_seed_text(per_seed: pd.DataFrame, a: str, b: str, metric: str) -> str:
    x = per_seed[per_seed["approach"] == a].set_index("seed")[metric]
    y = per_seed[per_seed["approach"] == b].set_index("seed")[metric]
    d = (x - y).dropna()
    return f"per seed: {', '.join(f'{v:+.3f}' for v in d)}; higher in {int((d > 0).sum())} of {len(d)}"


def verdict(per_seed: pd.DataFrame, method: str = "gkd", baseline: str = "kd") -> str:
    """Plain words, paired by seed: does `method` beat `baseline` on the unseen targets?

    The evidence is the mean of the per-seed differences in Dice (and AUC), mean over the unseen
    targets, with its 95 % Student-t interval (`paired_difference`) and the seeds a paired t-test
    would need to detect a 0.02 Dice difference at the observed spread (`seeds_to_detect`).
    "Helps" / "does worse" only when the Dice interval excludes 0; one seed gives no interval, so
    its sign is reported as not established."""
    from ted_fl.run.findings import DETECT, seeds_to_detect

    dice = paired_difference(per_seed, method, baseline, "dice")
    if dice.n == 0:
        return f"No seed has both {method} and {baseline}: no comparison."
    auc = paired_difference(per_seed, method, baseline, "auc")
    if dice.n < 2:
        side = "ahead of" if dice.mean > 0 else "behind" if dice.mean < 0 else "level with"
        head = f"**{method} is {side} {baseline} in the one seed run (no interval: not established)**"
    elif dice.low > 0:
        head = f"**{method} helps the student generalise more than {baseline}**"
    elif dice.high < 0:
        head = f"**{method} does worse than {baseline} on the unseen domains**"
    else:
        head = (f"**no clear difference between {method} and {baseline} on the unseen domains** "
                "(the Dice interval holds 0)")
    x = per_seed[per_seed["approach"] == method].set_index("seed")["dice"]
    y = per_seed[per_seed["approach"] == baseline].set_index("seed")["dice"]
    d = (x - y).dropna()
    n = seeds_to_detect(float(d.std(ddof=1))) if len(d) > 1 else None
    need = (f"seeds to detect {DETECT} Dice at this spread: {n}" if n is not None else
            f"seeds to detect {DETECT} Dice: unknown (one seed, no spread)" if len(d) < 2 else
            f"seeds to detect {DETECT} Dice at this spread: more than 10000")
    return (f"{head}: mean over the unseen targets, {method} minus {baseline}, paired by seed: "
            f"Dice {dice.text()} ({_per_seed_text(per_seed, method, baseline, 'dice')}); "
            f"AUC {auc.text()} ({_per_seed_text(per_seed, method, baseline, 'auc')}); {need}.")


# The comparisons GKD's findings are made of: (method, baseline). gkd against each control (kd is
# the baseline that distils without views, kd_aug the one with the same views, student the floor),
# then each GKD term alone against the plain student (which term carries the effect).
FINDINGS = [("gkd", "kd"), ("gkd", "kd_aug"), ("gkd", "student"), ("gkd", "skd"), ("gkd", "at"),
            ("kd", "student"), ("kd_aug", "kd"),
            ("intra", "student"), ("inter", "student"), ("cross", "student")]


def findings(per_seed: pd.DataFrame) -> list[str]:
    """One paired verdict per comparison of FINDINGS whose rows both ran (the first in bold)."""
    have = set(per_seed["approach"])
    out = [verdict(per_seed, a, b) for a, b in FINDINGS if {a, b} <= have]
    return out[:1] + [line.replace("**", "") for line in out[1:]]


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
    found = findings(t["per_seed"]) if "per_seed" in t else []
    if found:
        lines += ["", found[0], *(f"\n- {line}" for line in found[1:])]
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


def headline(runs: RunDir | list[RunDir], name: str, command: str = "", regen: str = "") -> str:
    """GKD's block for the results page's headlines: one table (every student row and the teacher:
    seeds, Dice on the source, Dice and AUC over the unseen targets, mean ± sd over seeds), the
    budget, the command, the paired findings (`findings`) and the near-uniform DCGD warnings; the
    long section (per-target tables, FSD, terms) stays on the GKD page."""
    runs = [runs] if isinstance(runs, RunDir) else runs
    t = tables(runs)
    cfg = read_config(runs[0])
    g = cfg.gkd
    ps = t["per_seed"]
    source_col = f"{g.source} (source)"
    dice = t["dice"].set_index("approach")
    auc = t["auc"].set_index("approach") if "auc" in t else None
    rows = []
    for a in dice.index:
        rows.append({"approach": a, "seeds": int(ps[ps["approach"] == a]["seed"].nunique()),
                     "Dice source": dice.loc[a, source_col], "Dice unseen": dice.loc[a, "unseen mean"],
                     "AUC unseen": auc.loc[a, "unseen mean"] if auc is not None and a in auc.index else "–"})
    targets = [c for c in dice.columns if c not in (source_col, "unseen mean")]
    split = ("each seed draws its own split (data.split_seed = \"seed\")" if cfg.data.split_seed == "seed"
             else f"one split for every seed (data.split_seed = {cfg.data.split_seed})")
    budget = (f"teacher {g.teacher} {list(g.teacher_channels) if g.teacher_channels else ''}, student {g.student}; "
              f"{cfg.data.size} px, crops {g.crop or 'none'}, batch {g.batch_size}; {g.rounds} round(s) x "
              f"{g.steps_teacher} teacher / {g.steps_student} student / {g.steps_psae} P-SAE / {g.steps_act} ACT "
              f"steps; K = {g.views} views ({g.augment}); L_seg on "
              f"{'the anchors and the views' if g.seg_on_views else 'the anchors only'}; Adam lr {g.lr:g}; {split}")
    lines = [f"### {name}: GKD on {cfg.data.sites} (train {g.source}, test {', '.join(targets)})", "",
             f"Run{'s' if len(runs) > 1 else ''} {', '.join(f'`{r.path.name}`' for r in runs)}; seeds "
             f"{', '.join(map(str, sorted(ps['seed'].unique())))}. Budget: {budget}."]
    if command:
        lines += ["", "```bash", command, "```"]
    lines += ["", "Dice and AUC pooled over each site's test split (unseen: mean over the targets), mean ± std "
              "over seeds:", "", md_table(pd.DataFrame(rows), digits=3), "",
              "Findings (paired by seed: mean difference of the per-seed unseen-target means, 95% Student-t "
              "interval; seeds to detect: a paired t-test at 5 % with power 0.8 for a 0.02 difference at the "
              "observed spread):", ""]
    lines += [f"- {line.replace('**', '')}" for line in findings(ps)]
    lost = uniform_warnings(t["losses"]) if "losses" in t else []
    lines += lost
    if regen:
        lines += ["", f"Generated by `{regen}`."]
    return "\n".join(lines)
