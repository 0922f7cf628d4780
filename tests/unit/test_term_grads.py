"""`diagnose term-grads`' ratios: the batch-broadcast GUGF grows with the batch size (the reference's
behaviour, which the term-gradient measurements in docs/results-twin.md rest on), the per-sample one does
not, and a student equal to its batch-statistics teacher has nothing for AKT to distil."""

from __future__ import annotations

import copy

import pytest
import torch

from ted_fl.config import LossConfig
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.run.diagnostics import term_grad_ratios


def _nets() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = build_model(tiny_model_config())
    torch.manual_seed(1)
    return student, build_model(tiny_model_config())


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 16, 16, generator=g)
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    y[:, 3:10, 4:12] = 1
    return x, y, torch.randn(2, 1, 16, 16, generator=g)


def test_batch_gugf_doubles_with_a_doubled_batch_sample_gugf_does_not() -> None:
    student, teacher = _nets()
    x, y, n = _batch()
    loss = LossConfig(lambda_d=0.5)
    one = term_grad_ratios(student, teacher, x, y, n, loss)
    two = term_grad_ratios(student, teacher, torch.cat([x, x]), torch.cat([y, y]), torch.cat([n, n]), loss)
    assert one["akt_mask_frac"] > 0
    # the same images twice: batch statistics, L_seg and KD are unchanged; AKT's sum and its
    # denominator sum(M) + 1 both about double; GUGF's batch-summed uncertainty doubles
    assert two["kd"] == pytest.approx(one["kd"], rel=1e-3)
    assert two["akt_gugf_sample"] == pytest.approx(one["akt_gugf_sample"], rel=0.02)
    assert two["akt_gugf_batch"] == pytest.approx(2 * one["akt_gugf_batch"], rel=0.02)
    # lambda_d scales every ratio
    half = term_grad_ratios(student, teacher, x, y, n, LossConfig(lambda_d=0.25))
    assert half["akt"] == pytest.approx(one["akt"] / 2, rel=1e-6)


def test_a_student_equal_to_its_batch_statistics_teacher_has_no_akt() -> None:
    student, _ = _nets()
    teacher = copy.deepcopy(student)
    x, y, n = _batch()
    same = term_grad_ratios(student, teacher, x, y, n, LossConfig(teacher_mode="train"))
    assert same["akt_mask_frac"] == 0.0 and same["akt_gugf_batch"] == 0.0
    assert 0.0 <= same["teacher_dice"] <= 1.0


def _step_ratios(student: torch.nn.Module, teacher: torch.nn.Module, loss: LossConfig, term_grads: bool = True
                 ) -> tuple[dict[str, float], torch.Tensor]:
    from ted_fl.continual.approaches import get_approach
    from ted_fl.continual.step import train_step

    x, y, n = _batch()
    appr = get_approach("ted_gugf", loss)
    appr.term_grads = term_grads
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    out = train_step(student, teacher, appr, x, y, opt, probes=n)
    return out, torch.cat([p.detach().flatten() for p in student.parameters()])


def test_recorded_pull_is_the_weighted_terms_gradient_ratio_and_leaves_training_alone() -> None:
    """diagnostics.term_grads: grad_ratio_<term> = |grad (w * term)| / |grad L_seg| at the step,
    the same number term_grad_ratios computes by hand; the step's weights are unchanged by it."""
    student, teacher = _nets()
    loss = LossConfig(lambda_d=0.5)
    by_hand = term_grad_ratios(copy.deepcopy(student), teacher, *_batch(), loss)
    out, w_on = _step_ratios(copy.deepcopy(student), teacher, loss)
    _, w_off = _step_ratios(copy.deepcopy(student), teacher, loss, term_grads=False)
    assert torch.equal(w_on, w_off)
    assert out["grad_ratio_kd"] == pytest.approx(by_hand["kd"], rel=1e-4)
    assert out["grad_ratio_ska"] == pytest.approx(by_hand["ska"], rel=1e-4)
    assert out["grad_ratio_akt"] == pytest.approx(by_hand["akt_gugf_batch"], rel=1e-4)
    assert out["grad_seg"] > 0 and "grad_ratio_seg" not in out


def test_at_a_stage_start_the_student_equals_its_teacher_and_kd_and_akt_pull_nothing() -> None:
    student, _ = _nets()
    out, _ = _step_ratios(student, copy.deepcopy(student), LossConfig(teacher_mode="train"))
    assert out["grad_ratio_kd"] == pytest.approx(0.0, abs=1e-6)
    assert out["grad_ratio_akt"] == pytest.approx(0.0, abs=1e-6)


def test_recorded_pull_is_read_back_as_the_stage_mean(tmp_path) -> None:
    from ted_fl.config import ExperimentConfig
    from ted_fl.run.diagnostics import recorded_pull
    from ted_fl.run.directory import RunDir

    run = RunDir.create(tmp_path, "x")
    run.write_config(ExperimentConfig())
    base = {"approach": "kd", "seed": 0, "stage_site": "BMC", "site": "BMC", "split": "train", "label": ""}
    rows = [{**base, "stage": 1, "round": r, "metric": "grad_ratio_kd", "value": v} for r, v in ((0, 0.0), (1, 0.2))]
    rows += [{**base, "stage": 2, "round": 0, "metric": "grad_ratio_kd", "value": 9.0},
             {**base, "stage": 1, "round": 0, "metric": "seg", "value": 1.0}]
    run.write_metrics(rows)
    pull = recorded_pull(run, "kd", 0, 1)
    assert pull.set_index("quantity")["value"].to_dict() == pytest.approx({"grad_ratio_kd": 0.1})
    assert recorded_pull(run, "seq", 0, 1).empty
