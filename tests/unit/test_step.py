"""train_step properties: the teacher never changes, gradients reach only the student,
every approach is safe on the first site, teacher modes behave as documented."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from ted_fl.config import LossConfig
from ted_fl.continual.approaches import APPROACHES, get_approach
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.continual.step import teacher_mode, train_step
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError


def batch(seed: int = 0, b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 32, 32, generator=g)
    y = torch.zeros(b, 32, 32, dtype=torch.long)
    y[:, 8:20, 10:24] = 1
    return x, y


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained(seed: int = 0) -> torch.nn.Module:
    """A tiny net whose batch-norm running stats differ from their defaults."""
    torch.manual_seed(seed)
    m = build_model(tiny_model_config())
    m.train()
    with torch.no_grad():
        for i in range(3):
            m(batch(100 + i)[0] * 3 + 1)
    return m


def small_split(n: int = 6) -> Split:
    x, y = batch(7, n)
    return Split(x.numpy(), y.numpy(), np.array([f"v{i // 3}" for i in range(n)]))


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["ted_gugf", "plop", "lwf", "mib"])
def test_teacher_weights_and_buffers_never_change(name: str, mode: str) -> None:
    student = pretrained()
    teacher = copy.deepcopy(student)
    before = state(teacher)
    approach = get_approach(name, LossConfig(teacher_mode=mode, lambda_d=1.0))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    s_before = state(student)
    for i in range(2):
        train_step(student, teacher, approach, *batch(i), opt)
    after = state(teacher)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    changed = [k for k, v in state(student).items() if "running" not in k and not torch.equal(v, s_before[k])]
    assert changed  # the student did learn
    assert teacher.training  # the mode switch restores the module's own flag


def test_gradients_reach_only_the_student() -> None:
    student = pretrained()
    teacher = copy.deepcopy(student)
    approach = get_approach("ted_gugf", LossConfig(lambda_d=1.0))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: inspect the gradients only
    train_step(student, teacher, approach, *batch(), opt)
    # zero_grad(set_to_none) runs before backward, so grads are those of this step
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_train_mode_uses_batch_statistics_without_touching_buffers() -> None:
    teacher = pretrained()
    teacher.eval()
    x = batch(3)[0]
    before = state(teacher)
    with torch.no_grad():
        eval_out = teacher(x)
        with teacher_mode(teacher, "train"):
            train_out = teacher(x)
        reference = copy.deepcopy(teacher).train()(x)  # batch statistics, as the reference code
    assert torch.allclose(train_out, reference, atol=1e-6)
    assert not torch.allclose(train_out, eval_out, atol=1e-3)
    for k, v in state(teacher).items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(TedFlError, match="eval"), teacher_mode(teacher, "evaluation"):
        pass


@pytest.mark.parametrize("name", sorted(APPROACHES))
def test_first_site_is_safe_for_every_approach(name: str) -> None:
    torch.manual_seed(0)
    student = build_model(tiny_model_config())
    approach = get_approach(name)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    out = train_step(student, None, approach, *batch(), opt)
    assert all(math.isfinite(v) for v in out.values())
    assert out["total"] == pytest.approx(out["seg"])
    for term in approach.term_names:
        if term != "seg":
            assert out[term] == 0.0


def test_total_is_the_weighted_sum_and_gugf_stats_reported() -> None:
    student = pretrained()
    teacher = copy.deepcopy(student)
    cfg = LossConfig(lambda_d=0.5, w_kd=2.0, w_ska=3.0, w_akt=4.0)
    approach = get_approach("ted_gugf", cfg)
    probes = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    out = train_step(student, teacher, approach, *batch(), opt, probes=probes)
    expected = out["seg"] + 0.5 * (2 * out["kd"] + 3 * out["ska"] + 4 * out["akt"])
    assert out["total"] == pytest.approx(expected, rel=1e-5)
    assert 0 < out["u_mean"] <= out["u_max"] <= 1
    assert out["ska"] > 0


def test_default_teacher_is_normalised_like_the_evaluated_model() -> None:
    """The default teacher uses batch statistics (the reference's old model, and how eval.bn =
    "batch" scores every model): a student equal to its teacher then has nothing to distil on the
    first step, and the teacher's running statistics are never read. A teacher in "eval" mode is
    another function (its running statistics) and AKT finds disagreeing pixels at once."""
    student = pretrained()
    teacher = copy.deepcopy(student)
    probes = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    assert LossConfig().teacher_mode == "train"
    approach = get_approach("ted_gugf", LossConfig(lambda_d=1.0))
    out = train_step(student, teacher, approach, *batch(), opt, probes=probes)
    assert out["akt"] == 0.0 and out["akt_mask_frac"] == 0.0
    with torch.no_grad():
        for name, buf in teacher.named_buffers():
            if "running_mean" in name:
                buf.add_(5.0)
    again = train_step(student, teacher, approach, *batch(), opt, probes=probes)
    assert again["kd"] == out["kd"] and again["ska"] == out["ska"] and again["akt"] == 0.0
    stale = get_approach("ted_gugf", LossConfig(lambda_d=1.0, teacher_mode="eval"))
    assert train_step(student, teacher, stale, *batch(), opt, probes=probes)["akt_mask_frac"] > 0


def test_ewc_and_mas_aux_state_round_trip() -> None:
    model = pretrained()
    split = small_split()
    for name, key in (("ewc", "fisher"), ("mas", "importance")):
        approach = get_approach(name)
        before = state(model)
        first = approach.end_of_site(model, split)
        assert torch.equal(
            state(model)["unet.model.0.adn.N.running_mean"], before["unet.model.0.adn.N.running_mean"]
        )
        names = [k for k, _ in model.named_parameters()]
        assert {f"{key}.{n}" for n in names} | {f"anchor.{n}" for n in names} | {"meta.sites"} == set(first)
        assert all(p.grad is None for p in model.parameters())
        second = {k: (v * 3 if k.startswith(key) else v + 1) for k, v in first.items() if k != "meta.sites"}
        second["meta.sites"] = torch.tensor(1.0)
        merged = approach.merge_state(approach.merge_state({}, first), second)
        n = names[0]
        assert torch.allclose(merged[f"{key}.{n}"], 2 * first[f"{key}.{n}"])  # mean of x and 3x
        assert torch.equal(merged[f"anchor.{n}"], second[f"anchor.{n}"])  # newest anchor
        assert float(merged["meta.sites"]) == 2.0
        # the penalty is 0 at the anchor and positive away from it
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        out = train_step(model, None, approach, *batch(), opt, aux=first)
        assert out[name] == pytest.approx(0.0, abs=1e-12)
        with torch.no_grad():
            next(model.parameters()).add_(0.1)
        out = train_step(model, None, approach, *batch(), opt, aux=first)
        assert out[name] > 0
    assert get_approach("ted").end_of_site(model, split) == {}
    assert get_approach("seq").merge_state({}, {}) == {}


@pytest.mark.parametrize(("mode", "norm"), [("eval", "batch"), ("eval", "instance"), ("train", "instance")])
@pytest.mark.parametrize("name", ["ska", "ted", "ted_gugf"])
def test_fused_teacher_forward_equals_separate_forwards(name: str, mode: str, norm: str) -> None:
    """One teacher forward over batch + probes gives the same losses and weights as two.

    Equal up to float rounding (a conv over 6 images is not bitwise the conv over 3 and 3);
    SGD, not Adam: Adam's g / sqrt(v) turns the rounding noise of the numerically-zero
    gradients of conv biases before batch norm into full-size steps.
    """
    from ted_fl.continual.probes import make_probes

    torch.manual_seed(0)
    base = build_model(tiny_model_config(norm))
    with torch.no_grad():
        base.train()
        base(batch(100)[0] * 3 + 1)  # running stats away from their defaults
    approach = get_approach(name, LossConfig(teacher_mode=mode, lambda_d=1.0))
    probes = make_probes(3, 3, (1, 32, 32), LossConfig())
    outs, weights = [], []
    for fuse in (True, False):
        student, teacher = copy.deepcopy(base), copy.deepcopy(base)
        opt = torch.optim.SGD(student.parameters(), lr=1e-2)
        outs.append([train_step(student, teacher, approach, *batch(i), opt, probes=probes, fuse_teacher=fuse)
                     for i in range(2)])
        weights.append(state(student))
    for a, b in zip(*outs, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6)


def test_teacher_train_mode_with_batch_norm_is_never_fused() -> None:
    """With batch statistics a joint forward would normalise images and noise together."""
    from ted_fl.continual.step import per_sample_teacher

    bn, inst = build_model(tiny_model_config("batch")), build_model(tiny_model_config("instance"))
    assert per_sample_teacher(bn, "eval") and per_sample_teacher(inst, "train")
    assert not per_sample_teacher(bn, "train")
    x, noise = batch(0)[0], torch.randn(3, 1, 32, 32)
    with teacher_mode(bn, "train"), torch.no_grad():
        joint, alone = bn(torch.cat([x, noise]))[:3], bn(x)
    assert not torch.allclose(joint, alone, atol=1e-4)  # the reason: batch statistics mix
