"""Findings a reader can trust: paired comparisons over the seeds two approaches share.

Each line carries its evidence: the mean per-seed difference with its 95 % Student-t interval
(`ted_fl.run.directory.paired_difference`) and the seeds a paired t-test would need to detect a
0.02 difference at the observed spread (`seeds_to_detect`). Both the headline blocks
(`ted_fl.run.headline`) and each run's section of a results page (`ted_fl.run.results_page`) read
them, so a page never says "forgets less" on weaker evidence than its headline.
"""

from __future__ import annotations

import math

import pandas as pd

from ted_fl.run.directory import budget_check, paired_difference

DETECT = 0.02  # the difference in forgetting a reader wants to see resolved
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
            if bwt.mean() + half < 0:
                forgets = "it forgets"
            elif bwt.mean() - half > 0:
                forgets = "it improves on earlier sites: no forgetting at this budget"
            else:
                forgets = "forgetting not established: the interval holds 0"
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
