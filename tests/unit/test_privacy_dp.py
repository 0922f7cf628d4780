"""Sample-level DP-SGD (Opacus) in the shared step, and the RDP accounting of both DP levels."""

from __future__ import annotations

import math

import numpy as np
import opacus  # noqa: F401  (imported at collection: its import is no test's time)
import pytest
import torch

from ted_fl.config import LossConfig
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.continual.training import local_train
from ted_fl.data.types import Split
from ted_fl.privacy.mechanisms import (
    SampleDPArgs,
    attach,
    client_noise_multiplier,
    compatibility_errors,
    epsilon_spent,
    noise_multiplier_for,
)


def _split(n: int = 12, size: int = 16) -> Split:
    g = np.random.default_rng(0)
    images = g.random((n, 1, size, size), dtype=np.float32)
    return Split(images, (images[:, 0] > 0.5).astype(np.int64), np.array([f"v{i // 3}" for i in range(n)]))


def _train(dp: SampleDPArgs | None, approach: str = "seq", steps: int = 3, seed: int = 0) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = build_model(tiny_model_config("group"))
    teacher = build_model(tiny_model_config("group")) if approach != "seq" else None
    metrics, _ = local_train(model, teacher, get_approach(approach, LossConfig()), _split(), steps=steps,
                             batch_size=4, lr=1e-3, optimizer_state=None, seed=seed, loss_cfg=LossConfig(), dp=dp)
    return metrics, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_batch_norm_is_incompatible_and_group_norm_is_fine() -> None:
    assert compatibility_errors(build_model(tiny_model_config("batch")))
    assert compatibility_errors(build_model(tiny_model_config("group"))) == []


@pytest.fixture(scope="module")
def calibrated() -> tuple[float, float, int, float, float]:
    """(sigma, q, steps, epsilon, delta): sigma for 2 steps at q = 4 / 12 to spend epsilon 4."""
    q, steps, eps, delta = 1 / math.ceil(12 / 4), 2, 4.0, 1e-5
    return noise_multiplier_for(eps, delta, q, steps), q, steps, eps, delta


def test_dp_sgd_reports_its_accounting_and_spends_at_most_the_target(calibrated: tuple) -> None:
    sigma, q, steps, eps, delta = calibrated
    metrics, _ = _train(SampleDPArgs(noise_multiplier=sigma, max_grad_norm=1.0), steps=steps)
    assert metrics["dp_noise_multiplier"] == pytest.approx(sigma)
    assert metrics["dp_sample_rate"] == pytest.approx(q)
    assert metrics["dp_steps"] == steps
    spent = epsilon_spent([(sigma, q, steps)], delta)
    assert math.isfinite(spent) and 0.9 * eps < spent <= eps + 0.05


def _sgd_step(sigma: float, seed: int = 0) -> torch.Tensor:
    """One DP-SGD step with SGD (lr 1) on a fixed batch: the parameter change."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config("group"))
    dp = attach(model, torch.optim.SGD(model.parameters(), lr=1.0), n=8, batch_size=8,
                noise_multiplier=sigma, max_grad_norm=1e-3, seed=seed)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        dp.step(model(torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))).pow(2).mean() * 1e3,
                None)
    finally:
        dp.close()
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])


def test_per_sample_gradients_are_clipped_and_noise_is_added() -> None:
    """sigma 0: the step is the mean of 5 rows clipped to 1e-3 over the expected batch (8), so its norm
    is <= 5e-3 / 8; sigma 1 adds N(0, (1e-3 / 8)^2) per coordinate: sqrt(P) times larger; seeded."""
    clipped = _sgd_step(0.0)
    assert 0 < float(clipped.norm()) <= 5e-3 / 8 + 1e-7
    noisy = _sgd_step(1.0)
    expected = 1e-3 / 8 * math.sqrt(noisy.numel())
    assert float((noisy - clipped).norm()) == pytest.approx(expected, rel=0.1)
    assert torch.equal(noisy, _sgd_step(1.0))
    assert not torch.equal(noisy, _sgd_step(1.0, seed=1))


def test_probes_term_is_outside_the_clipping() -> None:
    """TED's SKA term (noise probes) trains through DP-SGD without per-sample rows of its own."""
    metrics, _ = _train(SampleDPArgs(noise_multiplier=1.0, max_grad_norm=1.0), approach="ted_gugf", steps=1)
    assert metrics["dp_steps"] == 1 and math.isfinite(metrics["total"]) and metrics["ska"] > 0


def test_client_level_epsilon_is_the_rdp_of_the_gaussian_mechanism() -> None:
    """R releases of the Gaussian mechanism (q = 1): RDP alpha R / (2 z^2), converted to (eps, delta)
    as Opacus does (Balle et al. 2020): min over alpha of rdp + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1)."""
    z, rounds, delta = 1.3, 4, 1e-5
    alphas = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = rounds * alphas / (2 * z**2)
    expected = np.min(rdp + np.log((alphas - 1) / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1))
    assert epsilon_spent([(z, 1.0, rounds)], delta) == pytest.approx(float(expected), rel=1e-6)
    # and the calibration hits its target over the stage's rounds
    sigma = client_noise_multiplier(2.0, delta, rounds)
    assert epsilon_spent([(sigma, 1.0, rounds)], delta) == pytest.approx(2.0, abs=0.02)
    assert client_noise_multiplier(math.inf, delta, rounds) == 0.0
    assert epsilon_spent([(0.0, 1.0, rounds)], delta) == math.inf


def _rows(stage: int, site: str, rounds: int, sigma: float, approach: str = "ted_gugf") -> list[dict]:
    return [dict(approach=approach, seed=0, stage=stage, round=r, site=site, split="train", label="", metric=k,
                 value=v) for r in range(rounds)
            for k, v in (("dp_noise_multiplier", sigma), ("dp_sample_rate", 1.0), ("dp_steps", 1.0), ("total", 0.3))]


def test_stage_accounting_composes_a_clients_own_rounds_only() -> None:
    """Two clients of one site, 2 rounds each at the sigma calibrated for 2 releases: each spends the target
    (not 4 releases' worth); a retained site composes its stages in epsilon_total only; a partial round is inf."""
    from ted_fl.schedule.engine import stage_privacy

    delta, sigma = 1e-5, client_noise_multiplier(8.0, 1e-5, 2)
    rows = _rows(0, "A/0", 2, sigma) + _rows(0, "A/1", 2, sigma) + _rows(0, "B", 2, 5.0)
    acc = stage_privacy(rows, 0, delta)
    assert set(acc) == {"A/0", "A/1", "B"}
    for c in ("A/0", "A/1"):
        assert acc[c]["epsilon"] == pytest.approx(8.0, abs=0.02) and acc[c]["steps"] == 2
        assert acc[c]["epsilon_total"] == acc[c]["epsilon"] and acc[c]["noise_multiplier"] == sigma
    assert acc["B"]["epsilon"] < 2.0
    rows += _rows(1, "A/0", 2, sigma) + _rows(1, "C", 2, sigma)
    later = stage_privacy(rows, 1, delta)
    assert set(later) == {"A/0", "C"} and later["C"]["epsilon_total"] == pytest.approx(8.0, abs=0.02)
    assert later["A/0"]["epsilon"] == pytest.approx(8.0, abs=0.02)
    assert later["A/0"]["epsilon_total"] == pytest.approx(epsilon_spent([(sigma, 1.0, 4)], delta))
    partial = [r for r in _rows(0, "D", 2, sigma) if not (r["round"] == 1 and r["metric"] == "dp_steps")]
    assert stage_privacy(partial, 0, delta)["D"]["epsilon"] == math.inf
