"""Terms checked where wrong code would still pass the value tests of test_terms.py: reductions on
tensors whose B, C, H and W all differ, gradients (GUGF's detached uncertainty), SKA fed the
probes, the importances of EWC and MAS, and the reference code's variants."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ted_fl.config import LossConfig
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import estimate_importance, get_approach
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.continual.step import train_step
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError

B, C, H, W = 2, 3, 4, 5  # all different, so a sum over the wrong axis changes the value


def probs(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return T.probabilities(torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 2)


def test_kd_and_ska_reduce_over_the_classes() -> None:
    p, q = probs(0), probs(1)
    pn, qn = p.numpy(), q.numpy()
    expected = np.mean([-(qn[b, :, h, w] * np.log(pn[b, :, h, w])).sum()
                        for b in range(B) for h in range(H) for w in range(W)])  # fmt: skip
    assert float(T.KD()(p, q)) == pytest.approx(expected, rel=1e-12)
    assert float(T.SKA()(p, q)) == pytest.approx(expected, rel=1e-12)
    # the reference's bug: a sum over the width, a mean over B * C * H
    ref = np.mean([-(qn[b, c, h, :] * np.log(pn[b, c, h, :])).sum()
                   for b in range(B) for c in range(C) for h in range(H)])  # fmt: skip
    assert float(T.KD("reference")(p, q)) == pytest.approx(ref, rel=1e-12)
    assert float(T.SKA("reference")(p, q)) == pytest.approx(ref, rel=1e-12)
    assert ref == pytest.approx(expected * W / C, rel=1e-12)
    with pytest.raises(TedFlError, match="class"):
        T.KD("width")


def test_akt_by_explicit_loops() -> None:
    p, q = probs(2), probs(3)
    pn, qn = p.numpy(), q.numpy()
    num, den = 0.0, 1.0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                t = int(np.argmax(qn[b, :, h, w]))
                if int(np.argmax(pn[b, :, h, w])) != t:  # disagreement only
                    num -= np.log(pn[b, t, h, w] + 1e-5)
                    den += 1
    assert 1 < den - 1 < B * H * W  # some pixels agree, some do not
    assert float(T.AKT()(p, q)) == pytest.approx(num / den, rel=1e-12)
    # with GUGF per sample: each disagreeing pixel weighted by U = 1 - sum_c q_c p_c
    num = 0.0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                t = int(np.argmax(qn[b, :, h, w]))
                if int(np.argmax(pn[b, :, h, w])) != t:
                    u = 1 - (qn[b, :, h, w] * pn[b, :, h, w]).sum()
                    num -= u * np.log(pn[b, t, h, w] + 1e-5)
    assert float(T.AKT(T.GUGF("sample"))(p, q)) == pytest.approx(num / den, rel=1e-12)


@pytest.mark.parametrize("mode", ["batch", "normalized", "sample"])
def test_gugf_uncertainty_carries_no_gradient(mode: str) -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    q = probs(5)
    T.AKT(T.GUGF(mode))(T.probabilities(logits), q).backward()
    got = logits.grad.clone()
    # the same loss with U computed outside the graph (a constant weight)
    logits.grad = None
    p = T.probabilities(logits)
    gugf = T.GUGF(mode)
    y_hat = q.argmax(dim=1, keepdim=True)
    m = (p.argmax(dim=1, keepdim=True) != y_hat).double()
    u = torch.as_tensor((1 - (q * p).sum(dim=1)).detach().numpy())
    wgt = gugf.weighted(u, m)
    (-(wgt * torch.log(p + 1e-5).gather(1, y_hat)).sum() / (m.sum() + 1)).backward()
    torch.testing.assert_close(got, logits.grad)


def _student_teacher() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student = build_model(tiny_model_config())
    torch.manual_seed(1)
    teacher = build_model(tiny_model_config())
    return student, teacher


def test_ska_distils_on_the_probes_not_on_the_images() -> None:
    student, teacher = _student_teacher()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 32, 32, generator=g)
    y = torch.zeros(3, 32, 32, dtype=torch.long)
    y[:, 5:20, 8:22] = 1
    probes = torch.randn(3, 1, 32, 32, generator=g) * 1.5 + 0.3
    s0, t0 = copy.deepcopy(student), copy.deepcopy(teacher)
    # a teacher on its running statistics: under batch statistics two untrained nets answer the
    # images and the probes too alike for the wrong pairings below to differ
    approach = get_approach("ted", LossConfig(lambda_d=1.0, teacher_mode="eval"))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    out = train_step(student, teacher, approach, x, y, opt, probes=probes)
    with torch.no_grad():
        p_n, q_n = T.probabilities(s0.train()(probes)), T.probabilities(t0.eval()(probes))
        p_x, q_x = T.probabilities(copy.deepcopy(s0).train()(x)), T.probabilities(t0(x))
    assert out["ska"] == pytest.approx(float(T.cross_entropy(p_n, q_n)), rel=1e-5)
    assert out["kd"] == pytest.approx(float(T.cross_entropy(p_x, q_x)), rel=1e-5)
    for wrong in (T.cross_entropy(p_x, q_x), T.cross_entropy(p_n, q_x), T.cross_entropy(p_x, q_n)):
        assert out["ska"] != pytest.approx(float(wrong), rel=1e-3)


def _importance_split() -> Split:
    rng = np.random.default_rng(3)
    images = rng.random((5, 1, 32, 32)).astype(np.float32)
    masks = np.zeros((5, 32, 32), dtype=np.int64)
    masks[:, 6:18, 9:25] = 1
    masks[1] = 0
    return Split(images, masks, np.array(["a"] * 5))


def test_ewc_fisher_and_mas_importance_by_hand() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    data = _importance_split()
    fisher = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    omega = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    ref = copy.deepcopy(model).eval()
    for i in range(len(data)):
        x = torch.as_tensor(data.images[i : i + 1])
        y = torch.as_tensor(data.masks[i : i + 1])
        grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
        for (k, _), gr in zip(ref.named_parameters(), grads, strict=True):
            fisher[k] += gr.pow(2) / len(data)  # squared per-image gradient of the log-likelihood
        out = ref(x)
        grads = torch.autograd.grad((out**2).sum(dim=1).mean(), list(ref.parameters()))
        for (k, _), gr in zip(ref.named_parameters(), grads, strict=True):
            omega[k] += gr.abs() / len(data)  # |per-image gradient of the squared output norm|
    got_f = estimate_importance(model, data, "fisher")
    got_m = estimate_importance(model, data, "importance")
    for k in fisher:
        torch.testing.assert_close(got_f[k], fisher[k], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(got_m[k], omega[k], rtol=1e-4, atol=1e-10)
    assert get_approach("ewc").importance == "fisher" and get_approach("mas").importance == "importance"


@pytest.mark.parametrize("name", ["ewc", "mas"])
def test_ewc_and_mas_have_no_reference_variant(name: str) -> None:
    with pytest.raises(TedFlError, match="unet_only"):
        get_approach(name, LossConfig(baseline_variant="reference"))


def test_mib_reference_variant_feeds_probabilities_and_softmaxes_the_teacher() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    q = probs(7)
    s = T.StepInputs(logits=logits, p=T.probabilities(logits), masks=torch.zeros(B, H, W), model=nn.Identity(), q=q)
    pn, qn = s.p.numpy(), q.numpy()

    def mib(z: np.ndarray, t: np.ndarray) -> float:  # MiB with C_old = C_new = C
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-np.mean((t * logp).sum(axis=1) / C))

    assert float(T.MiB().compute(s)) == pytest.approx(mib(logits.numpy(), qn), rel=1e-10)
    soft_q = np.exp(qn) / np.exp(qn).sum(axis=1, keepdims=True)
    assert float(T.MiB("reference").compute(s)) == pytest.approx(mib(pn, soft_q), rel=1e-10)


def test_plop_reference_is_a_dice_against_the_merged_background() -> None:
    p = probs(8)
    q = probs(9)
    masks = torch.randint(0, C, (B, H, W), generator=torch.Generator().manual_seed(10))
    target = F.one_hot(masks, C).permute(0, 3, 1, 2).double().numpy()
    target[:, 0] = np.maximum(target[:, 0], (q.argmax(dim=1) == 0).double().numpy())
    pn = p.numpy()
    expected = 1 - (2 * (pn * target).sum() + 1) / (pn.sum() + target.sum() + 1)
    assert float(T.PLOPReference()(p, q, masks)) == pytest.approx(expected, rel=1e-12)
    ref = get_approach("plop", LossConfig(baseline_variant="reference", pod_weight=0.01))
    assert ref.term_names == ["seg", "plop"] and isinstance(ref.terms[1].term, T.PLOPReference)


def test_kd_reduce_reaches_kd_ska_akt_but_never_ted() -> None:
    cfg = LossConfig(kd_reduce="reference")
    for name in ("kd", "ska", "akt", "akt_gugf", "ted", "ted_gugf"):
        reduces = {t.term.reduce for t in get_approach(name, cfg).terms if isinstance(t.term, T.KD)}
        assert reduces == ({"class"} if name.startswith("ted") else {"reference"}), name
    assert all(t.term.reduce == "class" for t in get_approach("ska").terms if isinstance(t.term, T.KD))


def test_kd_ref_is_the_reference_kd_agents_width_sum_whatever_kd_reduce_says() -> None:
    """kd_ref's loss = L_seg + lambda_d * w_kd * the reference KD agent's CE, written out here as
    `(-(target * log(prediction)).sum(dim=-1)).mean()` on B x C x H x W (a sum over the width);
    kd keeps the class-axis CE of loss.kd_reduce = "class"."""
    g = torch.Generator().manual_seed(3)
    logits, t_logits = torch.randn(2, 2, 4, 6, generator=g), torch.randn(2, 2, 4, 6, generator=g)
    masks = (torch.rand(2, 4, 6, generator=g) > 0.5).long()
    p, q = T.probabilities(logits), T.probabilities(t_logits)
    s = T.StepInputs(logits=logits, p=p, masks=masks, model=nn.Identity(), q=q, teacher_logits=t_logits)
    seg = T.SegLoss().compute(s)
    width_ce = (-(q * torch.log(p)).sum(dim=-1)).mean()  # the reference's kd_agent.py, by hand
    class_ce = (-(q * torch.log(p)).sum(dim=1)).mean()
    for cfg in (LossConfig(lambda_d=0.5, w_kd=2.0), LossConfig(lambda_d=0.5, w_kd=2.0, kd_reduce="class")):
        ref = get_approach("kd_ref", cfg)
        total = sum(w.weight * w.term.compute(s) for w in ref.terms)
        assert float(total) == pytest.approx(float(seg + 1.0 * width_ce), rel=1e-6)
        kd = get_approach("kd", cfg)
        assert float(sum(w.weight * w.term.compute(s) for w in kd.terms)) == pytest.approx(float(seg + class_ce), rel=1e-6)
    # the two reductions differ here by about W / C = 3x: the test tells them apart
    assert abs(float(width_ce) / float(class_ce) - 3.0) < 1.5 and float(width_ce) != pytest.approx(float(class_ce))
