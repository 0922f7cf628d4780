"""One training step, the same for every approach: forward what the terms need, sum, step.

Teacher handling: the teacher's parameters get requires_grad False and every teacher
forward runs under torch.no_grad, so gradients reach only the student and the teacher's
weights never change. teacher_mode "eval" (default) uses the running statistics;
"train" reproduces the reference code (which never calls .eval() on the old model): batch
norm uses the *batch's* statistics, but we switch off running-stat tracking for that forward
so the teacher's buffers are not mutated either, and dropout stays off.

The student runs in train mode on the images and, for SKA, separately on the probes. The
reference code lets the noise batches update the student's batch-norm running statistics; at
evaluation the student then normalises real images with statistics half made of noise, which
on CPU-sized budgets collapses it to background (measured on the synthetic prostate twin: SKA
alone at lambda_d = 1 drops every site's Dice to 0). By default the probe forward uses batch
statistics without updating the running ones; `loss.probe_bn_update = true` restores the
reference behaviour.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ted_fl.config import TeacherMode, choices
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import Approach
from ted_fl.continual.networks import features
from ted_fl.continual.probes import draw_probes
from ted_fl.errors import unknown

TEACHER_MODES = choices(TeacherMode)  # the schema owns the allowed values


def freeze(teacher: nn.Module) -> nn.Module:
    """Make `teacher` a frozen old model: no parameter asks for a gradient."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module, frozen: bool = True) -> Iterator[nn.Module]:
    """Forward with batch statistics but leave every batch-norm running_mean/var untouched."""
    changed: list[tuple[_BatchNorm, bool]] = []
    if frozen:
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                changed.append((m, m.track_running_stats))
                m.track_running_stats = False
    try:
        yield model
    finally:
        for m, track in changed:
            m.track_running_stats = track


@contextlib.contextmanager
def teacher_mode(teacher: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Run the teacher in eval mode, or with batch statistics ("train") and no buffer updates."""
    if mode not in TEACHER_MODES:
        raise unknown("teacher mode", mode, TEACHER_MODES, "loss.teacher_mode")
    was_training = teacher.training
    teacher.eval()
    changed: list[tuple[_BatchNorm, bool]] = []
    if mode == "train":
        for m in teacher.modules():
            if isinstance(m, _BatchNorm):
                changed.append((m, m.track_running_stats))
                m.train()
                m.track_running_stats = False  # batch statistics, running_mean/var untouched
    try:
        yield teacher
    finally:
        for m, track in changed:
            m.track_running_stats = track
        teacher.train(was_training)


def train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    approach: Approach,
    images: torch.Tensor,
    masks: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    probes: torch.Tensor | None = None,
    aux: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimizer step on (images, masks); returns every term's unweighted value and "total".

    Terms that do not apply (no teacher on the first site, no aux state yet) report 0.0 and
    add nothing. SKA uses `probes` when given, else draws noise of the images' shape from
    torch's global RNG (as the reference's randn_like). GUGF adds u_mean / u_max.
    """
    cfg = approach.loss_cfg
    student.train()
    use_teacher = teacher is not None and approach.needs_teacher
    want_feats = use_teacher and approach.needs_features
    if want_feats:
        logits, feats = features(student, images)
    else:
        logits, feats = student(images), None
    s = T.StepInputs(logits=logits, p=T.probabilities(logits), masks=masks, model=student, aux=aux)
    s.feats = feats

    if use_teacher:
        assert teacher is not None
        freeze(teacher)
        with teacher_mode(teacher, cfg.teacher_mode), torch.no_grad():
            if want_feats:
                t_logits, s.teacher_feats = features(teacher, images)
            else:
                t_logits = teacher(images)
            s.teacher_logits = t_logits
            s.q = T.probabilities(t_logits)
            if approach.needs_probes:
                if probes is None:
                    count = cfg.ska_count or images.shape[0]
                    probes = draw_probes(None, count, tuple(images.shape[1:]), cfg)
                probes = probes.to(images)
                s.q_probe = T.probabilities(teacher(probes))
        if approach.needs_probes:
            with running_stats_frozen(student, not cfg.probe_bn_update):
                s.p_probe = T.probabilities(student(probes))

    total = torch.zeros((), device=logits.device)
    out: dict[str, float] = {}
    for wt in approach.terms:
        value = wt.term.compute(s)
        if value is None:
            out[wt.name] = 0.0
            continue
        out[wt.name] = float(value.detach())
        total = total + wt.weight * value

    optimizer.zero_grad(set_to_none=True)
    if total.requires_grad:
        total.backward()
        optimizer.step()
    out["total"] = float(total.detach())
    if approach.uses_gugf:
        s.stats.setdefault("u_mean", 0.0)
        s.stats.setdefault("u_max", 0.0)
    out.update(s.stats)
    return out
