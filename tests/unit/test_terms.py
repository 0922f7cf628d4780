"""Hand-computed values of every loss term on tiny tensors (formulas of docs/ted-method.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ted_fl.config import LossConfig
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import APPROACHES, get_approach
from ted_fl.errors import TedFlError


def two_class(fg: list[list[float]] | np.ndarray) -> torch.Tensor:
    """(B?, H, W) foreground probabilities -> (B, 2, H, W) [background, foreground]."""
    f = torch.tensor(np.asarray(fg, dtype=np.float64), dtype=torch.float64)
    if f.dim() == 2:
        f = f[None]
    return torch.stack([1 - f, f], dim=1)


P_FG = [[0.9, 0.2], [0.6, 0.1]]  # student argmax: [[1, 0], [1, 0]]
Q_FG = [[0.8, 0.7], [0.3, 0.2]]  # teacher argmax: [[1, 1], [0, 0]] -> disagreement at (0,1), (1,0)
Y = [[1, 0], [1, 0]]


def test_seg_loss_dice_plus_bce_over_all_channels() -> None:
    p, y = two_class(P_FG), two_class(Y)
    pn, yn = p.numpy(), y.numpy()
    dice = 1 - (2 * (pn * yn).sum() + 1) / (pn.sum() + yn.sum() + 1)
    bce = np.mean(-(yn * np.log(pn) + (1 - yn) * np.log(1 - pn)))
    # by hand: sum(p*y) = 0.9+0.6+0.8+0.9 = 3.2, sum p = sum y = 4 -> dice = 1 - 7.4/9
    assert dice == pytest.approx(1 - 7.4 / 9)
    got = T.SegLoss()(p, y)
    assert float(got) == pytest.approx(dice + bce, rel=1e-9)


def test_seg_loss_compute_uses_one_hot_of_masks() -> None:
    logits = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    masks = torch.tensor([Y])
    s = T.StepInputs(logits=logits, p=T.probabilities(logits), masks=masks, model=nn.Identity())
    assert float(T.SegLoss().compute(s)) == pytest.approx(float(T.SegLoss()(s.p, two_class(Y))))


def test_kd_and_ska_are_pixel_mean_cross_entropy() -> None:
    p, q = two_class(P_FG), two_class(Q_FG)
    expected = np.mean(-(q.numpy() * np.log(p.numpy())).sum(axis=1))
    # pixel (0,0) by hand: -(0.2 log 0.1 + 0.8 log 0.9)
    assert -(0.2 * np.log(0.1) + 0.8 * np.log(0.9)) == pytest.approx(
        -(q.numpy()[0, :, 0, 0] * np.log(p.numpy()[0, :, 0, 0])).sum()
    )
    assert float(T.KD()(p, q)) == pytest.approx(expected)
    assert float(T.SKA()(p, q)) == pytest.approx(expected)


def test_akt_distils_only_disagreeing_pixels() -> None:
    p, q = two_class(P_FG), two_class(Q_FG)
    stats: dict[str, float] = {}
    got = T.AKT()(p, q, stats)
    # M = 1 at (0,1) [teacher fg, p_fg = 0.2] and (1,0) [teacher bg, p_bg = 0.4]
    expected = -(np.log(0.2 + 1e-5) + np.log(0.4 + 1e-5)) / (2 + 1)
    assert float(got) == pytest.approx(expected)
    assert stats["akt_mask_frac"] == pytest.approx(0.5)


def test_akt_zero_when_student_agrees() -> None:
    p = two_class(P_FG)
    assert float(T.AKT()(p, p)) == 0.0


def _gugf_batch() -> tuple[torch.Tensor, torch.Tensor]:
    p = two_class([P_FG, [[0.3, 0.8], [0.7, 0.45]]])
    q = two_class([Q_FG, [[0.6, 0.9], [0.2, 0.55]]])
    return p, q


def test_gugf_uncertainty_formula() -> None:
    p, q = two_class(P_FG), two_class(Q_FG)
    u = T.GUGF.uncertainty(p, q)
    pn, qn = np.array(P_FG), np.array(Q_FG)
    assert u.shape == (1, 2, 2)
    np.testing.assert_allclose(u[0].numpy(), 1 - (pn * qn + (1 - pn) * (1 - qn)))


def test_gugf_batch_mode_is_batch_summed_uncertainty_broadcast() -> None:
    p, q = _gugf_batch()
    pn, qn = p.numpy(), q.numpy()
    u = 1 - (pn * qn).sum(axis=1)  # (B, H, W)
    y_hat = qn.argmax(axis=1)
    m = (pn.argmax(axis=1) != y_hat).astype(float)  # (B, H, W)
    log_t = np.take_along_axis(np.log(pn + 1e-5), y_hat[:, None], axis=1)[:, 0]
    denom = m.sum() + 1
    batch = -(m * log_t * u.sum(axis=0)[None]).sum() / denom  # every sample x batch-summed U
    sample = -(m * log_t * u).sum() / denom  # each sample x its own U
    # the literal B x B x H x W broadcast of the reference
    literal = -(u[None, :, :, :] * m[:, None] * log_t[:, None]).sum() / denom
    assert batch == pytest.approx(literal)

    got = float(T.AKT(T.GUGF("batch"))(p, q))
    assert got == pytest.approx(batch)
    assert got != pytest.approx(sample)
    assert float(T.AKT(T.GUGF("sample"))(p, q)) == pytest.approx(sample)
    assert float(T.AKT(T.GUGF("normalized"))(p, q)) == pytest.approx(batch / 2)
    assert T.GUGF("batch").weighted(torch.as_tensor(u), torch.as_tensor(m)[:, None]).shape == (2, 2, 2, 2)


def test_gugf_rejects_unknown_mode() -> None:
    with pytest.raises(TedFlError, match="normalized"):
        T.GUGF("normalised")


def test_lwf_temperature_scaled_kd() -> None:
    s = torch.tensor([[[[2.0]], [[-1.0]]]], dtype=torch.float64)  # 1 x 2 x 1 x 1
    t = torch.tensor([[[[0.5]], [[1.5]]]], dtype=torch.float64)
    temp = 2.0

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max())
        return e / e.sum()

    qt, pt = softmax(np.array([0.5, 1.5]) / temp), softmax(np.array([2.0, -1.0]) / temp)
    expected = temp**2 * -(qt * np.log(pt)).sum()
    assert float(T.LwF(temp)(s, t)) == pytest.approx(expected)


def test_mib_reduces_to_kd_over_classes_on_a_binary_label_space() -> None:
    logits = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    q = T.probabilities(torch.randn(2, 2, 3, 3, dtype=torch.float64))
    p = torch.softmax(logits, dim=1)
    assert float(T.MiB()(logits, q)) == pytest.approx(float(T.cross_entropy(p, q)) / 2)


def test_mib_merges_new_classes_into_background() -> None:
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)).reshape(1, 3, 1, 1)
    q = torch.tensor([0.6, 0.4], dtype=torch.float64).reshape(1, 2, 1, 1)
    # student bg := p0 + p2 = 0.5 (class 2 unknown to the teacher)
    expected = -(0.6 * np.log(0.5) + 0.4 * np.log(0.5)) / 2
    assert float(T.MiB()(logits, q)) == pytest.approx(expected)


def test_plop_pseudo_labels_and_adaptive_factor() -> None:
    q = two_class([[0.99, 0.6], [0.1, 0.5]])
    masks = torch.tensor([[[0, 0], [0, 1]]])
    plop = T.PLOPPseudo(threshold=0.5)
    labels, factor = plop.merge_labels(q, masks)
    # bg pixels the teacher calls fg: entropies e(.99) < e(.6): median keeps (0,0) only;
    # the single bg pixel it calls bg is kept (its own median); the fg label is kept.
    assert labels.tolist() == [[[1, -100], [0, 1]]]
    assert float(factor[0]) == pytest.approx(2 / 3)
    p = two_class(P_FG)
    ce = [-np.log(0.9), 0.0, -np.log(0.4), -np.log(0.1)]
    assert float(plop(p, q, masks)) == pytest.approx(2 / 3 * np.mean(ce))


def test_pod_zero_for_identical_features_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(0)
    feats = {"enc0": torch.randn(2, 3, 8, 8, generator=g), "bottleneck": torch.randn(2, 4, 4, 4, generator=g)}
    assert float(T.POD()(feats, feats)) == pytest.approx(0.0, abs=1e-6)
    other = {k: v + torch.randn(v.shape, generator=g) for k, v in feats.items()}
    assert float(T.POD()(feats, other)) > 0


def test_ewc_and_mas_penalties() -> None:
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 3.0]]))
    aux = {
        "fisher.weight": torch.tensor([[2.0, 0.5]]),
        "importance.weight": torch.tensor([[2.0, 0.5]]),
        "anchor.weight": torch.tensor([[0.0, 1.0]]),
    }
    s = T.StepInputs(logits=torch.zeros(1), p=torch.zeros(1), masks=torch.zeros(1), model=model, aux=aux)
    penalty = 2.0 * 1.0**2 + 0.5 * 2.0**2  # = 4
    assert float(T.EWC().compute(s).detach()) == pytest.approx(0.5 * penalty)
    assert float(T.MAS().compute(s).detach()) == pytest.approx(penalty)


@pytest.mark.parametrize(
    "term",
    [T.KD(), T.SKA(), T.AKT(), T.AKT(T.GUGF()), T.LwF(), T.MiB(), T.PLOPPseudo(), T.POD(), T.EWC(), T.MAS()],
)
def test_every_distillation_or_penalty_term_is_skipped_without_teacher(term: T.Term) -> None:
    logits = torch.randn(2, 2, 4, 4)
    s = T.StepInputs(
        logits=logits, p=T.probabilities(logits), masks=torch.zeros(2, 4, 4), model=nn.Linear(1, 1)
    )
    assert term.compute(s) is None


def test_probabilities_are_clamped() -> None:
    p = T.probabilities(torch.tensor([[[[1000.0]], [[-1000.0]]]]))
    assert float(p.min()) == pytest.approx(1e-8)
    assert float(p.max()) == pytest.approx(1 - 1e-8)


def test_registry_compositions_and_weights() -> None:
    cfg = LossConfig(lambda_d=0.01, w_kd=2.0, w_ska=3.0, w_akt=4.0)
    expected = {
        "seq": ["seg"], "joint": ["seg"], "kd": ["seg", "kd"], "kd_ref": ["seg", "kd"], "ska": ["seg", "kd", "ska"],
        "akt": ["seg", "kd", "akt"], "akt_gugf": ["seg", "kd", "akt"], "ted": ["seg", "kd", "ska", "akt"],
        "ted_gugf": ["seg", "kd", "ska", "akt"], "ewc": ["seg", "ewc"], "mas": ["seg", "mas"],
        "mib": ["seg", "mib"], "plop": ["seg", "plop"], "lwf": ["seg", "lwf"],
    }  # fmt: skip
    assert set(APPROACHES) == set(expected)
    for name, names in expected.items():
        assert get_approach(name, cfg).term_names == names, name
    ted = get_approach("ted_gugf", cfg)
    assert [w.weight for w in ted.terms] == pytest.approx([1.0, 0.02, 0.03, 0.04])
    assert ted.needs_teacher and ted.needs_probes and ted.uses_gugf and not ted.joint
    assert get_approach("joint").joint and not get_approach("joint").needs_teacher
    assert not get_approach("akt_gugf").needs_probes and get_approach("akt_gugf").uses_gugf
    assert not get_approach("ted").uses_gugf
    assert get_approach("ewc").importance == "fisher"
    assert get_approach("plop", LossConfig(pod_weight=0.01)).term_names == ["seg", "plop", "pod"]  # when asked


def test_unknown_approach_suggests_the_closest() -> None:
    with pytest.raises(TedFlError, match="did you mean 'ted_gugf'"):
        get_approach("ted_gfuf")


@pytest.mark.parametrize("mode", ["batch", "normalized", "sample"])
def test_gugf_folded_weight_equals_the_broadcast_weight(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    u, m = torch.rand(3, 4, 5, generator=g), (torch.rand(3, 1, 4, 5, generator=g) > 0.5).float()
    lt = torch.randn(3, 1, 4, 5, generator=g)
    gugf = T.GUGF(mode)
    assert gugf.folded(u, m).shape == (3, 1, 4, 5)
    torch.testing.assert_close((gugf.folded(u, m) * lt).sum(), (gugf.weighted(u, m) * lt).sum())


def test_class_argmax_is_argmax_with_first_maximum_on_ties() -> None:
    x = torch.tensor([[[[0.2, 0.5]], [[0.8, 0.5]], [[0.1, 0.5]]]])  # (1, 3, 1, 2); a tie in pixel 2
    assert T.class_argmax(x).tolist() == [[[[1, 0]]]]
    y = torch.randn(4, 3, 8, 8)
    assert torch.equal(T.class_argmax(y), y.argmax(dim=1, keepdim=True))
