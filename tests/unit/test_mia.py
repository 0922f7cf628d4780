"""The membership-inference attack: the AUC and advantage formulas by hand, and the attack on a
model that memorised its members (AUC near 1) and on an untrained one (AUC near 0.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ted_fl.data.types import Split
from ted_fl.privacy.mia import advantage, attack, auc, balanced, per_image_losses, ranks


def test_auc_by_hand() -> None:
    # pairs (member > non-member: 1, tie: 1/2): 0.9 beats all 3; 0.4 beats 0.1, ties 0.4, loses to 0.5;
    # 0.7 beats all 3: (3 + 1.5 + 3) / 9
    assert auc(np.array([0.9, 0.4, 0.7]), np.array([0.5, 0.4, 0.1])) == pytest.approx(7.5 / 9)
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert auc(np.array([2.0]), np.array([1.0, 3.0, 5.0])) == pytest.approx(1 / 3)
    assert np.isnan(auc(np.array([]), np.array([1.0])))


def test_auc_equals_sklearn_when_installed() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    m, n = np.round(rng.normal(0.3, 1, 37), 1), np.round(rng.normal(0, 1, 41), 1)  # rounding makes ties
    y = np.r_[np.ones(37), np.zeros(41)]
    assert auc(m, n) == pytest.approx(metrics.roc_auc_score(y, np.r_[m, n]), abs=1e-12)


def test_ranks_and_advantage_by_hand() -> None:
    assert ranks(np.array([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]
    # threshold 0.7: TPR 2/3 (0.9, 0.7), FPR 0; threshold 0.4: TPR 1, FPR 2/3 -> best 2/3
    assert advantage(np.array([0.9, 0.4, 0.7]), np.array([0.5, 0.4, 0.1])) == pytest.approx(2 / 3)
    assert advantage(np.array([1.0]), np.array([0.0])) == 1.0


def test_balanced_sets_are_seeded_and_equal() -> None:
    a, b = balanced(10, 4, seed=3)
    assert len(a) == len(b) == 4 and len(set(a)) == 4 and a.max() < 10
    a2, b2 = balanced(10, 4, seed=3)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert not np.array_equal(balanced(10, 4, seed=4)[0], a)
    assert len(balanced(10, 8, seed=0, cap=5)[0]) == 5


def _data(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.normal(size=(n, 1, 6, 6)).astype(np.float32), rng.integers(0, 2, (n, 6, 6)).astype(np.int64),
                 np.array([f"v{i}" for i in range(n)]))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 128), nn.ReLU(), nn.Linear(128, 72), nn.Unflatten(1, (2, 6, 6)))


@pytest.fixture
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend
    yield
    torch.set_num_threads(threads)


def test_a_memorising_model_leaks_and_an_untrained_one_does_not(one_thread: object) -> None:
    members, nonmembers = _data(48, 1), _data(48, 2)  # random labels: only memorising can fit members
    untrained = _net()
    chance = attack(untrained, members, nonmembers, seed=0, bn="running")
    assert abs(chance["mia_auc"] - 0.5) < 0.15
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(members.images), torch.from_numpy(members.masks)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    out = attack(model, members, nonmembers, seed=0, reference=untrained, bn="running")
    assert out["mia_auc"] > 0.95 and out["mia_adv"] > 0.8 and out["mia_n"] == 48
    assert out["mia_auc_cal"] > 0.95  # the untrained reference finds every image equally hard
    # the per-image loss is the mean pixel cross-entropy
    loss = per_image_losses(model, members.take(np.arange(2)), bn="running")
    with torch.no_grad():
        want = nn.functional.cross_entropy(model(x[:2]), y[:2], reduction="none").mean(dim=(1, 2)).numpy()
    assert np.allclose(loss, want, atol=1e-6)
