"""FSD (gkd-method.md 2.6 and 4) from summed statistics, and the protocol's pooled metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.metrics import DiceMetric

from ted_fl.continual.fsd import GaussStats, frechet, fsd, oas_shrink
from ted_fl.continual.scores import pooled_scores


def sets(seed: int, n1: int = 60, n2: int = 80, d: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d))
    b = rng.normal(0.5, 1.5, size=(n2, d)) @ rng.normal(size=(d, d))
    return a, b


def test_fsd_zero_for_identical_sets() -> None:
    a, _ = sets(0)
    assert fsd(GaussStats.of(a), GaussStats.of(a)) == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 100_000))
def test_fsd_symmetric_and_nonnegative(seed: int) -> None:
    a, b = sets(seed)
    ab, ba = fsd(GaussStats.of(a), GaussStats.of(b)), fsd(GaussStats.of(b), GaussStats.of(a))
    assert ab == pytest.approx(ba, rel=1e-7, abs=1e-9)
    assert ab >= -1e-6


def test_fsd_is_mean_distance_when_covariances_are_equal() -> None:
    a, _ = sets(1)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert fsd(GaussStats.of(a), GaussStats.of(a + shift)) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_fsd_one_dimensional_closed_form() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 2.0, size=(50, 1)), rng.normal(-1.0, 0.5, size=(70, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert fsd(GaussStats.of(a), GaussStats.of(b)) == pytest.approx(expected, rel=1e-9)


def test_fsd_unchanged_by_a_common_shift() -> None:
    a, b = sets(3)
    c = np.array([10.0, -4.0, 2.0, 7.0, -1.0])
    assert fsd(GaussStats.of(a + c), GaussStats.of(b + c)) == pytest.approx(fsd(GaussStats.of(a), GaussStats.of(b)), rel=1e-9)


def test_fsd_from_per_site_sums_equals_pooled_vectors() -> None:
    a, b = sets(4)
    parts = np.array_split(a, [7, 30, 31])  # four "sites" of unequal size
    summed = GaussStats.zeros(a.shape[1])
    for p in parts:  # what travels: 1-D arrays per site, rebuilt and added at the server
        summed = summed + GaussStats.from_arrays(GaussStats.of(p).to_arrays())
    pooled = GaussStats.of(a)
    assert summed.n == pooled.n
    np.testing.assert_allclose(summed.s2, pooled.s2, rtol=1e-12)
    assert fsd(summed, GaussStats.of(b)) == pytest.approx(fsd(pooled, GaussStats.of(b)), rel=1e-10)
    assert all(v.ndim == 1 for v in GaussStats.of(a).to_arrays().values())


def test_few_vectors_get_a_shrunk_full_rank_covariance() -> None:
    rng = np.random.default_rng(5)
    z = rng.normal(size=(10, 64))  # n < D: the sample covariance is singular
    s = GaussStats.of(z)
    cov = s.cov()
    assert np.linalg.matrix_rank(cov) == 64 and np.all(np.linalg.eigvalsh(cov) > 0)
    raw = np.cov(z, rowvar=False)
    np.testing.assert_allclose(cov, oas_shrink(raw, 10), rtol=1e-9, atol=1e-12)
    assert np.isfinite(fsd(s, GaussStats.of(rng.normal(size=(12, 64)))))


def test_frechet_float64_matches_scipy_style_sqrtm() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = a @ a.T, b @ b.T
    w, v = np.linalg.eig(s1 @ s2)  # Tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)) (real, non-negative)
    tr_sqrt = float(np.sum(np.sqrt(np.clip(w.real, 0, None))))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(expected, rel=1e-8)


def test_f1_equals_dice_and_auc_is_one_for_perfect_ranking() -> None:
    rng = np.random.default_rng(7)
    gt = rng.random((3, 16, 16)) > 0.7
    prob = np.clip(gt * 0.6 + rng.random(gt.shape) * 0.5, 0, 1)
    s = pooled_scores(prob, gt)
    pred = torch.as_tensor((prob > 0.5).reshape(1, 1, -1), dtype=torch.float32)
    dice = DiceMetric(include_background=True)(pred, torch.as_tensor(gt.reshape(1, 1, -1), dtype=torch.float32))
    assert s["dice"] == pytest.approx(float(dice), rel=1e-6)
    ranked = pooled_scores(np.where(gt, 0.9, 0.1) + 0.01 * rng.random(gt.shape), gt)
    assert ranked["auc"] == pytest.approx(1.0)
    assert ranked["acc"] == ranked["se"] == ranked["sp"] == ranked["miou"] == pytest.approx(1.0)
    tp, fp = float(np.sum((prob > 0.5) & gt)), float(np.sum((prob > 0.5) & ~gt))
    fn, tn = float(np.sum((prob <= 0.5) & gt)), float(np.sum((prob <= 0.5) & ~gt))
    assert s["miou"] == pytest.approx((tp / (tp + fp + fn) + tn / (tn + fp + fn)) / 2)
    assert s["se"] == pytest.approx(tp / (tp + fn)) and s["sp"] == pytest.approx(tn / (tn + fp))
