"""`diagnose term-grads`' ratios: the batch-broadcast GUGF grows with the batch size (the reference's
behaviour, which the GUGF-strength measurement in docs/results.md rests on), the per-sample one does
not, and a student equal to its batch-statistics teacher has nothing for AKT to distil."""

from __future__ import annotations

import copy

import pytest
import torch

from ted_fl.config import LossConfig
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.diagnose import term_grad_ratios


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
