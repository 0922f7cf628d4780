"""KD, SKA, AKT and GUGF at K = 3 classes (C = 4 channels with the background), by hand.

The tensors have B = 2, C = 4, H = 3, W = 5, so a term that mixes up the class, row or
column axis gives another number (or fails). Every pixel's student distribution is one of
two vectors and the teacher's one of two, so each expected value is a short sum of logs
counted by hand from the layout drawn in `layout()`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ted_fl.config import LossConfig
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.continual.training import local_train
from ted_fl.data.types import Split

# student p: a -> argmax 3, b -> argmax 2; teacher q: c -> argmax 2, d -> argmax 1
A = [0.1, 0.2, 0.3, 0.4]
B_ = [0.1, 0.1, 0.7, 0.1]
C = [0.1, 0.2, 0.6, 0.1]
D = [0.1, 0.6, 0.2, 0.1]


def layout() -> tuple[torch.Tensor, torch.Tensor]:
    """(2, 4, 3, 5) p and q.

    sample 0: p = b on row 0, a on rows 1-2; q = d on column 0, c elsewhere
    sample 1: p = b everywhere;              q = d on row 2, c elsewhere
    pixel pairs: (a,c) x 8, (a,d) x 2, (b,c) x 14, (b,d) x 6 (30 pixels)
    """
    p = np.empty((2, 3, 5, 4))
    q = np.empty((2, 3, 5, 4))
    p[0, 0], p[0, 1:], p[1] = B_, A, B_
    q[0], q[0, :, 0] = C, D
    q[1], q[1, 2] = C, D
    to = lambda x: torch.tensor(x, dtype=torch.float64).permute(0, 3, 1, 2)  # noqa: E731
    return to(p), to(q)


def ce(p: list[float], q: list[float]) -> float:
    return -sum(qc * math.log(pc) for pc, qc in zip(p, q, strict=True))


def test_layout_is_as_drawn() -> None:
    p, q = layout()
    assert p.shape == (2, 4, 3, 5)
    pairs = {"ac": 0, "ad": 0, "bc": 0, "bd": 0}
    for b in range(2):
        for h in range(3):
            for w in range(5):
                pk = "a" if p[b, :, h, w].tolist() == A else "b"
                qk = "c" if q[b, :, h, w].tolist() == C else "d"
                pairs[pk + qk] += 1
    assert pairs == {"ac": 8, "ad": 2, "bc": 14, "bd": 6}


def test_kd_and_ska_three_classes() -> None:
    p, q = layout()
    # CE(a, c) = -(0.1 ln 0.1 + 0.2 ln 0.2 + 0.6 ln 0.3 + 0.1 ln 0.4), and so on
    expected = (8 * ce(A, C) + 2 * ce(A, D) + 14 * ce(B_, C) + 6 * ce(B_, D)) / 30
    assert ce(A, C) == pytest.approx(-(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.6 * math.log(0.3)
                                       + 0.1 * math.log(0.4)))
    assert float(T.KD()(p, q)) == pytest.approx(expected, rel=1e-12)
    assert float(T.SKA()(p, q)) == pytest.approx(expected, rel=1e-12)
    s = T.StepInputs(logits=p.log(), p=p, masks=torch.zeros(2, 3, 5, dtype=torch.long), model=torch.nn.Identity(),
                     q=q, p_probe=p, q_probe=q)
    assert float(T.KD().compute(s)) == pytest.approx(expected, rel=1e-12)
    assert float(T.SKA().compute(s)) == pytest.approx(expected, rel=1e-12)


L3, L2, L1 = math.log(0.3 + 1e-5), math.log(0.2 + 1e-5), math.log(0.1 + 1e-5)


def test_akt_three_classes_only_disagreeing_pixels() -> None:
    p, q = layout()
    # disagreement (argmax p != argmax q): (a,c) 3 vs 2, (a,d) 3 vs 1, (b,d) 2 vs 1; (b,c) agrees.
    # M sums to 8 + 2 + 6 = 16; l = log(p + 1e-5) at the teacher's class: 0.3, 0.2, 0.1.
    expected = -(8 * L3 + 2 * L2 + 6 * L1) / (16 + 1)
    stats: dict[str, float] = {}
    assert float(T.AKT()(p, q, stats)) == pytest.approx(expected, rel=1e-12)
    assert stats["akt_mask_frac"] == pytest.approx(16 / 30)


def test_gugf_three_classes_every_mode() -> None:
    p, q = layout()
    # U = 1 - sum_c q_c p_c: (a,c) 0.73, (a,d) 0.77, (b,c) 0.54, (b,d) 0.78
    u = T.GUGF.uncertainty(p, q)
    assert u.shape == (2, 3, 5)
    assert float(u[0, 1, 1]) == pytest.approx(0.73) and float(u[0, 1, 0]) == pytest.approx(0.77)
    assert float(u[1, 0, 0]) == pytest.approx(0.54) and float(u[1, 2, 3]) == pytest.approx(0.78)
    # sample: each disagreeing pixel weighted by its own U
    sample = -(8 * 0.73 * L3 + 2 * 0.77 * L2 + 6 * 0.78 * L1) / 17
    # batch: weighted by S(h, w) = U_0(h, w) + U_1(h, w):
    #   row 0: col 0 0.78 + 0.54 = 1.32, cols 1-4 1.08; row 1: 1.31, 1.27; row 2: 0.77 + 0.78 = 1.55, 1.51
    #   disagreeing: sample 0 (b,d) at (0,0); (a,d) at (1,0), (2,0); (a,c) at rows 1-2, cols 1-4;
    #                sample 1 (b,d) on row 2
    batch = -(L1 * 1.32 + L2 * (1.31 + 1.55) + L3 * (4 * 1.27 + 4 * 1.51) + L1 * (1.55 + 4 * 1.51)) / 17
    assert float(T.AKT(T.GUGF("sample"))(p, q)) == pytest.approx(sample, rel=1e-9)
    assert float(T.AKT(T.GUGF("batch"))(p, q)) == pytest.approx(batch, rel=1e-9)
    assert float(T.AKT(T.GUGF("normalized"))(p, q)) == pytest.approx(batch / 2, rel=1e-9)


@pytest.mark.parametrize("name", ["seq", "kd", "ted_gugf", "lwf", "mib", "plop", "ewc"])
def test_every_approach_trains_four_channels(name: str) -> None:
    """A K = 3 network (4 output channels) trains on 0..3 masks with every kind of term, and learns."""
    cfg = tiny_model_config()
    cfg.out_channels = 4
    torch.manual_seed(0)
    teacher, student = build_model(cfg), build_model(cfg)
    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16, 16), np.int64)
    masks[:, 2:8, 2:8], masks[:, 8:14, 3:9], masks[:, 4:12, 10:15] = 1, 2, 3
    images = (masks[:, None] / 3.0 + 0.1 * rng.standard_normal((6, 1, 16, 16))).astype(np.float32)
    data = Split(images, masks, np.array([f"v{i}" for i in range(6)]))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    loss_cfg = LossConfig(lambda_d=1.0)
    metrics, _ = local_train(student, teacher, get_approach(name, loss_cfg), data, steps=2, batch_size=3,
                             lr=1e-2, optimizer_state=None, seed=0, loss_cfg=loss_cfg)
    assert np.isfinite(metrics["total"])
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert student(torch.as_tensor(images[:1])).shape == (1, 4, 16, 16)
