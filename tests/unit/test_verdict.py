"""The verdict's statistics (ted_fl.run.directory): paired differences against scipy, the budget check."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ted_fl.run.directory import budget_check, paired_difference, verdict


def summary(rows: dict[str, list[tuple[int, float, float, float]]]) -> pd.DataFrame:
    """summary.csv rows: per approach, (seed, forgetting, bwt, plasticity)."""
    return pd.DataFrame([{"approach": a, "seed": s, "forgetting": f, "bwt": b, "plasticity": p}
                         for a, rs in rows.items() for s, f, b, p in rs])


def test_paired_difference_is_scipys_paired_t_interval() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.2, 0.05, 5), rng.normal(0.35, 0.08, 5)
    s = pd.DataFrame({"approach": ["ted"] * 5 + ["seq"] * 5, "seed": [*range(5), *range(5)],
                      "forgetting": [*x, *y]})
    got = paired_difference(s, "ted", "seq", "forgetting")
    ci = stats.ttest_rel(x, y).confidence_interval(0.95)
    assert got.n == 5
    assert got.mean == pytest.approx(float(np.mean(x - y)), abs=1e-12)
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_paired_difference_uses_only_shared_seeds() -> None:
    s = summary({"seq": [(0, 0.3, -0.3, 0.8), (1, 0.4, -0.4, 0.8), (2, 0.5, -0.5, 0.8)],
                 "ted": [(1, 0.2, -0.2, 0.7), (2, 0.1, -0.1, 0.7), (3, 0.0, 0.0, 0.7)]})
    got = paired_difference(s, "ted", "seq", "forgetting")
    ci = stats.ttest_rel([0.2, 0.1], [0.4, 0.5]).confidence_interval(0.95)
    assert got.n == 2 and got.mean == pytest.approx(-0.3)
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high))
    one = paired_difference(s.drop(s.index[(s["approach"] == "ted") & (s["seed"] == 2)]), "ted", "seq", "forgetting")
    assert one.n == 1 and math.isnan(one.low) and "one seed" in one.text()
    assert paired_difference(s, "ted", "joint", "forgetting").n == 0


def test_verdict_names_the_approach_that_forgets_least_and_its_cost() -> None:
    s = summary({"seq": [(0, 0.40, -0.40, 0.85), (1, 0.35, -0.35, 0.83), (2, 0.38, -0.37, 0.84)],
                 "kd": [(0, 0.39, -0.39, 0.85), (1, 0.36, -0.35, 0.83), (2, 0.37, -0.36, 0.84)],
                 "ted": [(0, 0.20, -0.19, 0.80), (1, 0.18, -0.17, 0.79), (2, 0.21, -0.20, 0.80)],
                 "joint": [(0, 0.0, 0.0, 0.9), (1, 0.0, 0.0, 0.9), (2, 0.0, 0.0, 0.9)]})
    head, *rest = verdict(s)
    assert head.startswith("ted forgets least") and "(n=3)" in head
    p = paired_difference(s, "ted", "seq", "plasticity")
    assert f"{p.mean:+.3f}" in head and p.clear and p.mean < 0  # the cost in plasticity
    assert [line.split(" - ")[0] for line in rest] == ["kd", "ted"]  # joint is the bound, not a contender
    assert budget_check(s) == []


def test_verdict_of_seq_alone() -> None:
    s = summary({"seq": [(0, 0.3, -0.3, 0.8), (1, 0.32, -0.31, 0.8), (2, 0.3, -0.29, 0.8)]})
    assert verdict(s) == [f"Only fine-tuning (seq) ran (forgetting {0.92 / 3:.3f}): no approach to compare with it."]


def test_verdict_within_noise_says_so() -> None:
    s = summary({"seq": [(0, 0.40, -0.40, 0.8), (1, 0.30, -0.30, 0.8)],
                 "ted": [(0, 0.25, -0.25, 0.8), (1, 0.36, -0.36, 0.8)]})
    assert verdict(s)[0].startswith("No approach forgets measurably less")


def test_budget_check_fine_tuning_that_does_not_forget() -> None:
    s = summary({"seq": [(0, -0.02, 0.10, 0.5), (1, -0.06, 0.17, 0.3)], "ted": [(0, 0.0, 0.08, 0.5), (1, 0.0, 0.1, 0.3)]})
    (why,) = budget_check(s)
    assert "does not forget" in why and "cannot separate" in why
    assert verdict(s)[-1] == why
    noisy = summary({"seq": [(0, 0.1, -0.10, 0.8), (1, 0.0, 0.02, 0.8), (2, 0.1, -0.05, 0.8)]})
    (why,) = budget_check(noisy)  # mean BWT -0.043 but its interval reaches above 0
    assert "within the seeds' noise" in why
    clear = summary({"seq": [(0, 0.1, -0.10, 0.8), (1, 0.1, -0.09, 0.8), (2, 0.1, -0.11, 0.8)]})
    assert budget_check(clear) == []


def test_budget_check_site_no_approach_learnt() -> None:
    s = summary({"seq": [(0, 0.3, -0.3, 0.8), (1, 0.3, -0.31, 0.8), (2, 0.3, -0.29, 0.8)]})
    sites = pd.DataFrame([
        {"approach": a, "seed": 0, "site": site, "test": t, "val": v}
        for a in ("seq", "ted")
        for site, t, v in (("A", 0.8, 0.82), ("B", 0.05, 0.06), ("C", 0.3, 0.75 if a == "seq" else 0.2))])
    (why,) = budget_check(s, sites)
    assert "No approach learnt B " in why and "C" not in why.split("(")[0]  # ted learnt C (0.3 of 0.2)
    sites.loc[sites["site"] == "C", "val"] = 0.75
    (why,) = budget_check(s, sites)  # now C is far below what validation reached for both
    assert why.startswith("No approach learnt B, C") and "validation reached 0.750" in why
