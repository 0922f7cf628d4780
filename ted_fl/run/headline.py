"""A data set's headline for the results page: one table, its budget and command, then findings.

`python -m ted_fl.results_doc RUN --headline NAME --out docs/results.md` writes the block
`<!-- headline:NAME:start -->...<!-- headline:NAME:end -->` of the page and leaves the rest of
it as it is. The table has every approach (Avg, BWT, forgetting, plasticity as mean ± std over
seeds); each finding is one line with its evidence: a paired comparison over the seeds both
approaches ran (mean difference with its 95 % Student-t interval, `ted_fl.run.directory.paired_difference`)
and the seeds a paired t-test would need to detect a 0.02 difference at the observed spread
(`seeds_to_detect`). Every number comes from the run's metrics.csv through
`ted_fl.run.results_page.per_seed_rows`, the same rows as the run's own section.
"""

from __future__ import annotations

import math

import pandas as pd

from ted_fl.config import ExperimentConfig
from ted_fl.run.directory import RunDir, budget_check, paired_difference, site_learning
from ted_fl.run.markdown import md_table
from ted_fl.run.results_page import SweepRun, _read, per_seed_rows, shown

DETECT = 0.02  # the difference in forgetting a reader wants to see resolved
HEADLINE_COLUMNS = ["avg", "bwt", "forgetting", "plasticity"]
# The paper's claim, forgetting TED < KD < seq, as pairs (a, b): "a forgets less than b". kd_ref is
# the reference code's KD arm (its cross-entropy summed over the image width), the one the paper's
# published KD row ran; kd is the formula as the paper writes it.
ORDERING = [("ted", "kd_ref"), ("ted_gugf", "kd_ref"), ("ted", "kd"), ("ted_gugf", "kd"),
            ("kd_ref", "seq"), ("kd", "seq")]


def seeds_to_detect(sd: float, delta: float = DETECT, alpha: float = 0.05, power: float = 0.8,
                    most: int = 10_000) -> int | None:
    """The fewest seeds n at which a two-sided paired t-test at level `alpha` detects a true mean
    difference `delta` with probability `power`, when the per-seed differences spread with standard
    deviation `sd`: the smallest n >= 2 with P(|T| > t(1 - alpha/2, n-1)) >= power, T noncentral t
    with n-1 degrees of freedom and noncentrality delta / (sd / sqrt(n)). None: more than `most`
    (or no spread measured: `sd` NaN)."""
    from scipy import stats  # lazily, as ted_fl.run.directory: the command's --help stays fast

    if not math.isfinite(sd):
        return None
    if sd <= 0:
        return 2
    for n in range(2, most + 1):
        df, nc = n - 1, delta / (sd / math.sqrt(n))
        crit = float(stats.t.ppf(1 - alpha / 2, df))
        got = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
        if not math.isfinite(got):  # scipy's noncentral t gives NaN far in the tail: all mass beyond crit
            got = 1.0 if nc > crit else 0.0
        if got >= power:
            return n
    return None


def budget_line(cfg: ExperimentConfig) -> str:
    """The schedule, model and data settings a reader needs to judge the budget, from the run's config."""
    t, d = cfg.train, cfg.data
    steps = f"{t.steps_per_round} steps" if t.steps_per_round else "one pass over the site's training split"
    size = f"{d.size} px" if d.size else "each site at its own preprocess.size"
    split = ("each seed draws its own train/val/test split (data.split_seed = \"seed\")" if d.split_seed == "seed"
             else f"one split for every seed (data.split_seed = {d.split_seed})")
    data = f"data from {d.data_dir}" if d.data_dir else "the embedded synthetic twin"
    return (f"{t.rounds} round(s) x {steps} a site (joint: x{t.joint_rounds_factor:g}), batch {t.batch_size}, "
            f"rates {t.lr_first:g} / {t.lr_later:g}; {cfg.model.name} {list(cfg.model.channels)}; {size}; "
            f"lambda_d {cfg.loss.lambda_d:g}, kd_reduce \"{cfg.loss.kd_reduce}\", eval.bn \"{cfg.eval.bn}\"; "
            f"{data}; {split}; protocol \"{cfg.protocol}\"")


def _pair_line(rows: pd.DataFrame, a: str, b: str, metric: str = "forgetting") -> str:
    p = paired_difference(rows, a, b, metric)
    d = (rows[rows["approach"] == a].set_index("seed")[metric]
         - rows[rows["approach"] == b].set_index("seed")[metric]).dropna()
    n = seeds_to_detect(float(d.std(ddof=1))) if len(d) > 1 else None
    if p.n >= 2:
        word = ("less" if p.high < 0 else "more") if p.clear else "no clear difference in"
        verdict = f"{a} forgets {word} than {b}" if p.clear else f"{word} {metric}: {a} vs {b}"
    else:
        verdict = f"{a} vs {b}"
    need = (f"; seeds to detect {DETECT} at this spread: {n}" if n is not None else
            "; seeds to detect 0.02: unknown (fewer than 2 seeds, no spread)" if len(d) < 2 else
            f"; seeds to detect {DETECT} at this spread: more than 10000")
    return f"{verdict}: {metric} {a} - {b} = {p.text()}{need}."


def headline_findings(rows: pd.DataFrame, sites: pd.DataFrame | None = None) -> list[str]:
    """One line per finding, each with its evidence: seq's forgetting, the paper's ordering pairs
    (where both ran), each approach against seq (forgetting, paired), then budget_check's reasons."""
    have = set(rows["approach"])
    out: list[str] = []
    if "seq" in have:
        bwt = rows[rows["approach"] == "seq"]["bwt"]
        from scipy import stats

        n = len(bwt)
        half = float(stats.t.ppf(0.975, n - 1)) * float(bwt.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        if n > 1:
            forgets = "it forgets" if bwt.mean() + half < 0 else "forgetting not established: the interval reaches 0"
            out.append(f"Fine-tuning (seq): BWT {bwt.mean():+.3f} [95% CI {bwt.mean() - half:+.3f}, "
                       f"{bwt.mean() + half:+.3f}] over {n} seed(s) ({forgets}).")
        else:
            out.append(f"Fine-tuning (seq): BWT {bwt.mean():+.3f} over one seed (no interval, so forgetting "
                       "is not established).")
    for a, b in ORDERING:
        if {a, b} <= have:
            out.append("Paper's ordering: " + _pair_line(rows, a, b))
    for a in dict.fromkeys(rows["approach"]):
        if a not in ("seq", "joint") and "seq" in have and (a, "seq") not in ORDERING:
            out.append(_pair_line(rows, str(a), "seq"))
    return out + budget_check(rows, sites)


def headline_block(run: RunDir, name: str, regen: str) -> str:
    """The data set's table (every approach, mean ± std over seeds), budget, command and findings."""
    cfg = run.read_config()
    matrices, rows = per_seed_rows(run)
    summary = pd.DataFrame([
        {"approach": a, "seeds": int(g["seed"].nunique()),
         **{k: g[k].mean() for k in HEADLINE_COLUMNS},
         **{f"{k}_sd": (g[k].std(ddof=1) if len(g) > 1 else math.nan) for k in HEADLINE_COLUMNS}}
        for a, g in rows.groupby("approach", sort=False)]).set_index("approach")
    table = shown(summary)
    order = " -> ".join(next(iter(matrices.values())).columns)
    command = (_read(run, "command.txt") or "(not recorded)").splitlines()
    missing = run.missing if isinstance(run, SweepRun) else 0
    partial = (f" **{missing} cell(s) of this sweep had not finished when this block was written**; the table "
               "holds the finished ones." if isinstance(run, SweepRun) and missing else "")
    return "\n".join([
        f"### {name}: {cfg.data.sites} ({order})",
        "",
        f"Run `{run.path.name}`; seeds {', '.join(map(str, cfg.seeds))}. Budget: {budget_line(cfg)}.{partial}",
        "",
        "```bash",
        *command,
        "```",
        "",
        "Dice after the last site, mean ± std over seeds (Avg: mean over the sites; BWT: mean change on "
        "earlier sites since each was learnt; forgetting: mean drop from each earlier site's best; "
        "plasticity: mean of R's diagonal):",
        "",
        md_table(table, index=True, index_name="approach"),
        "",
        "Findings (paired by seed: mean difference of the per-seed values, 95% Student-t interval; "
        "seeds to detect: a paired t-test at 5 % with power 0.8 for a 0.02 difference at the observed "
        "spread of the differences):",
        "",
        *(f"- {line}" for line in headline_findings(rows, site_learning(run.metrics()))),
        "",
        f"Generated by `{regen}`.",
    ])
