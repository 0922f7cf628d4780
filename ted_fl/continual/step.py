"""One training step, the same for every approach: forward what the terms need, sum, step.

Teacher handling: the teacher's parameters get requires_grad False and every teacher
forward runs under torch.no_grad, so gradients reach only the student and the teacher's
weights never change. teacher_mode "eval" uses the running statistics; "train" (default)
reproduces the reference code (which never calls .eval() on the old model): batch
norm uses the *batch's* statistics, but we switch off running-stat tracking for that forward
so the teacher's buffers are not mutated either, and dropout stays off.

The student runs in train mode on the images and, for SKA, separately on the probes. The
reference code lets the noise batches update the student's batch-norm running statistics; at
evaluation the student then normalises real images with statistics half made of noise, which
on CPU-sized budgets collapses it to background (measured on the synthetic prostate twin: SKA
alone at lambda_d = 1 drops every site's Dice to 0). By default the probe forward uses batch
statistics without updating the running ones; `loss.probe_bn_update = true` restores the
reference behaviour.

Cost (`python -m ted_fl.bench step`): the teacher runs under torch.inference_mode; when its
forward is per-sample (teacher_mode "eval", or a network without batch norm, whose "train"
mode differs only by batch statistics) it runs ONCE over the batch and the probes
concatenated, and the probabilities are computed once over both. With teacher_mode "train"
and batch norm the two forwards stay separate: the batch statistics of a joint forward would
mix images and noise (the reference normalises each by its own). The student's two forwards
always stay separate, for the same reason (train-mode batch norm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ted_fl.config import TeacherMode, choices
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import Approach
from ted_fl.continual.networks import features
from ted_fl.continual.probes import draw_probes
from ted_fl.errors import unknown

if TYPE_CHECKING:
    from ted_fl.privacy.mechanisms import SampleDP

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


def _fp32(x: Any) -> Any:
    """float32 view of a tensor or a dict of them (no copy when already float32; None stays None)."""
    if isinstance(x, dict):
        return {k: _fp32(v) for k, v in x.items()}
    return x.float() if isinstance(x, torch.Tensor) and x.dtype != torch.float32 else x


def per_sample_teacher(teacher: nn.Module, mode: str) -> bool:
    """Whether the teacher's output for one image is independent of the rest of its batch."""
    return mode == "eval" or not any(isinstance(m, _BatchNorm) for m in teacher.modules())


def train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    approach: Approach,
    images: torch.Tensor,
    masks: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    probes: torch.Tensor | None = None,
    aux: Mapping[str, torch.Tensor] | None = None,
    fuse_teacher: bool = True,
    amp: torch.dtype | None = None,
    n_anchors: int | None = None,
    dp: SampleDP | None = None,
    student_fwd: Callable[[torch.Tensor], torch.Tensor] | None = None,
    teacher_fwd: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One optimizer step on (images, masks); returns every term's unweighted value and "total".

    Terms that do not apply (no teacher on the first site, no aux state yet) report 0.0 and
    add nothing. SKA uses `probes` when given, else draws noise of the images' shape from
    torch's global RNG (as the reference's randn_like). GUGF adds u_mean / u_max. `n_anchors`:
    the batch is anchors followed by their augmented views (generalizable distillation's DCGD).
    `fuse_teacher` False forces one teacher forward per input (the reference's; same numbers).
    `amp` (e.g. torch.bfloat16) runs the networks' forwards under autocast; their outputs are
    cast back to float32 for the terms (CUDA autocast refuses binary_cross_entropy, and the
    losses' sums want full precision); backward and the optimizer step run outside autocast.
    `dp` (a `ted_fl.privacy.mechanisms.SampleDP`, privacy.dp = "sample"): the terms on the images
    get per-sample clipping and noise, the data-independent ones (SKA, EWC/MAS) are added after
    the noise; an empty (Poisson) batch makes a noise-only step. `student_fwd` / `teacher_fwd`
    (train.compile, `ted_fl.continual.compiled`): what runs the plain forwards of the student and
    the teacher instead of the modules themselves (modes, flags and parameters stay the modules').
    """
    if dp is not None and images.shape[0] == 0:
        dp.step(None, None)
        return {"total": 0.0}
    total, out, s = _forward_terms(student, teacher, approach, images, masks, probes, aux, fuse_teacher, amp,
                                 n_anchors, dp, student_fwd, teacher_fwd)
    optimizer.zero_grad(set_to_none=True)
    if approach.term_grads and dp is None and total.requires_grad:
        out.update(term_gradient_ratios(student, s))
    if dp is not None:
        dp.step(s.private_total, s.public_total)
    elif total.requires_grad:
        total.backward()
        optimizer.step()
    out["total"] = float(total.detach())
    if approach.uses_gugf:
        s.stats.setdefault("u_mean", 0.0)
        s.stats.setdefault("u_max", 0.0)
    out.update(s.stats)
    return out


TERM_PREFIX = "term:"  # StepInputs.cache keys of the step's weighted term values (for term_gradient_ratios)


def term_gradient_ratios(student: nn.Module, s: T.StepInputs) -> dict[str, float]:
    """grad_ratio_<term> = |grad of w * term| / |grad of L_seg| over the student's parameters, for
    every weighted term of this step but L_seg, and grad_seg = |grad L_seg| (diagnostics.term_grads):
    how hard each term pulls at this step against the segmentation loss. One extra backward per
    term; nothing accumulates in .grad."""
    params = [p for p in student.parameters() if p.requires_grad]
    norms: dict[str, float] = {}
    for key, value in s.cache.items():
        if not key.startswith(TERM_PREFIX) or not value.requires_grad:
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        norms[key[len(TERM_PREFIX):]] = float(torch.sqrt(sum(((g.double() ** 2).sum() for g in grads if g is not None),
                                                              torch.zeros((), dtype=torch.float64))))
    seg = norms.pop("seg", 0.0)
    out = {f"grad_ratio_{name}": n / max(seg, 1e-30) for name, n in norms.items()}
    out["grad_seg"] = seg
    return out


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast on `device` with `dtype`, or nothing when dtype is None (full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward_terms(
    student: nn.Module,
    teacher: nn.Module | None,
    approach: Approach,
    images: torch.Tensor,
    masks: torch.Tensor,
    probes: torch.Tensor | None,
    aux: Mapping[str, torch.Tensor] | None,
    fuse_teacher: bool,
    amp: torch.dtype | None = None,
    n_anchors: int | None = None,
    dp: SampleDP | None = None,
    student_fwd: Callable[[torch.Tensor], torch.Tensor] | None = None,
    teacher_fwd: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float], T.StepInputs]:
    """The forwards and the weighted sum of the terms (everything of a step before backward)."""
    cfg = approach.loss_cfg
    run_student = student_fwd or student
    student.train()
    use_teacher = teacher is not None and approach.needs_teacher
    own = any(t.term.own_teacher and t.term.needs_features for t in approach.terms)
    want_feats = (use_teacher and approach.needs_features) or own  # own: a term that brings its teacher
    with autocast(images.device, amp):
        if want_feats:
            logits, feats = features(student, images)
        else:
            logits, feats = run_student(images), None
    logits, feats = _fp32(logits), _fp32(feats)
    s = T.StepInputs(logits=logits, p=T.probabilities(logits), masks=masks, model=student, aux=aux,
                     images=images, n_anchors=n_anchors, per_sample=dp is not None)
    s.feats = feats

    if use_teacher:
        assert teacher is not None
        run_teacher = teacher_fwd or teacher
        freeze(teacher)
        s.teacher = teacher
        probe_batch = torch.empty(0)  # the SKA probes on the images' device (when the approach has them)
        if approach.needs_probes:
            if probes is None:
                count = cfg.ska_count or images.shape[0]
                probes = draw_probes(None, count, tuple(images.shape[1:]), cfg)
            probe_batch = probes.to(images)
        fuse = (fuse_teacher and approach.needs_probes and not want_feats
                and per_sample_teacher(teacher, cfg.teacher_mode))
        # Inference tensors (no autograd bookkeeping) out; the probabilities below are computed
        # outside inference mode, so the terms may save them for the student's backward.
        with teacher_mode(teacher, cfg.teacher_mode), torch.inference_mode(), autocast(images.device, amp):
            if fuse:
                t_all = run_teacher(torch.cat([images, probe_batch]))
            elif want_feats:
                t_logits, s.teacher_feats = features(teacher, images)
            else:
                t_logits = run_teacher(images)
            if approach.needs_probes and not fuse:
                t_probe = run_teacher(probe_batch)
        if fuse:
            t_all = _fp32(t_all)
            q_all = T.probabilities(t_all)
            n = images.shape[0]
            s.teacher_logits, s.q, s.q_probe = t_all[:n], q_all[:n], q_all[n:]
        else:
            t_logits, s.teacher_feats = _fp32(t_logits), _fp32(s.teacher_feats)
            s.teacher_logits, s.q = t_logits, T.probabilities(t_logits)
            if approach.needs_probes:
                s.q_probe = T.probabilities(_fp32(t_probe))
        if approach.needs_probes:
            public = dp.public() if dp is not None else contextlib.nullcontext()  # probes are not site data
            with running_stats_frozen(student, not cfg.probe_bn_update), autocast(images.device, amp), public:
                p_logits = run_student(probe_batch)
            s.p_probe = T.probabilities(_fp32(p_logits))

    total = torch.zeros((), device=logits.device)
    parts = {False: torch.zeros((), device=logits.device), True: torch.zeros((), device=logits.device)}
    out: dict[str, float] = {}
    for wt in approach.terms:
        value = wt.term.compute(s)
        if value is None:
            out[wt.name] = 0.0
            continue
        out[wt.name] = float(value.detach())
        total = total + wt.weight * value
        if approach.term_grads:
            s.cache[TERM_PREFIX + wt.name] = wt.weight * value
        free = wt.term.data_independent  # outside DP-SGD's clipping
        parts[free] = parts[free] + wt.weight * value
    s.private_total, s.public_total = parts[False], parts[True]
    return total, out, s
