"""Named loss terms. Each is a small class: a tensor-level `__call__` with the exact formula of
docs/ted-method.md (so tests can check it by hand), and `compute(s)` that reads what it needs
from one step's `StepInputs` and returns None when it does not apply (no teacher on the
first site, no importances yet), so every approach is safe on the first site.

Notation: p = softmax(student(x)) clamped to [1e-8, 1 - 1e-8]; q = softmax(teacher(x)) without
gradient; CE(p, q) = mean over the B*H*W pixels of -sum_c q_c log p_c.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ted_fl.config import BaselineVariant, GugfMode, KDReduce, choices
from ted_fl.errors import unknown

EPS = 1e-8
GUGF_MODES = choices(GugfMode)  # the schema owns the allowed values


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, clamped to [1e-8, 1 - 1e-8] as the reference does before any log."""
    return torch.softmax(logits, dim=1).clamp(EPS, 1.0 - EPS)


def one_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class indices -> (B, C, H, W) float one-hot."""
    return F.one_hot(masks.long(), num_classes).permute(0, 3, 1, 2).float()


def class_argmax(x: torch.Tensor) -> torch.Tensor:
    """argmax over the class dimension 1, keepdim: (B, C, H, W) -> (B, 1, H, W) long.

    `x.max(dim=1).indices` is the same index (the first maximum, as argmax) but on CPU about
    15x faster than `x.argmax(dim=1)`, which takes a slow strided path over a non-last dimension
    (3.4 ms against 0.23 ms on a (8, 2, 64, 64) tensor, one thread).
    """
    return x.max(dim=1, keepdim=True).indices



KD_REDUCE = choices(KDReduce)  # the schema owns the allowed values
BASELINE_VARIANTS = choices(BaselineVariant)


def cross_entropy(p: torch.Tensor, q: torch.Tensor, reduce: str = "class") -> torch.Tensor:
    """CE(p, q) = mean over B*H*W of -sum_c q_c log p_c (temperature 1).

    reduce = "reference" reproduces a bug of the reference code's kd/ska/akt agents
    (`(-(target * log(prediction)).sum(dim=-1)).mean()` on B x C x H x W tensors): the sum runs
    over the image *width* and the mean over B*C*H, i.e. W / C times the class-reduced value
    (about 100x at 192 px and 2 classes). Its TED agent sums over the classes (dim=1).
    """
    if reduce not in KD_REDUCE:
        raise unknown("KD reduction", reduce, KD_REDUCE, "loss.kd_reduce")
    return (-(q * torch.log(p)).sum(dim=1 if reduce == "class" else -1)).mean()


@dataclass
class StepInputs:
    """What one training step offers the terms; optional fields are None when not computed."""

    logits: torch.Tensor  # student logits on x (B, C, H, W)
    p: torch.Tensor  # probabilities(logits)
    masks: torch.Tensor  # (B, H, W) int labels
    model: nn.Module  # the student (parameter penalties)
    q: torch.Tensor | None = None  # teacher probabilities on x
    teacher_logits: torch.Tensor | None = None
    p_probe: torch.Tensor | None = None  # student / teacher probabilities on the SKA probes
    q_probe: torch.Tensor | None = None
    feats: Mapping[str, torch.Tensor] | None = None  # student / teacher intermediate features
    teacher_feats: Mapping[str, torch.Tensor] | None = None
    aux: Mapping[str, torch.Tensor] | None = None  # EWC / MAS state (see approaches)
    stats: dict[str, float] = field(default_factory=dict)  # diagnostics terms may add (u_mean)
    images: torch.Tensor | None = None  # the step's input batch (terms that run extra forwards: DICD)
    teacher: nn.Module | None = None  # the frozen teacher of the step, when there is one
    n_anchors: int | None = None  # rows [0, n_anchors) are anchors, the rest their views (GKD's DCGD)
    cache: dict[str, torch.Tensor] = field(default_factory=dict)  # values terms of one step share
    # DP-SGD (privacy.dp = "sample"): every term on the images must be a mean of per-image losses
    per_sample: bool = False
    private_total: torch.Tensor | None = None  # the weighted sum of the terms on the site's images
    public_total: torch.Tensor | None = None  # ... of the data-independent terms (Term.data_independent)


class Term:
    """A named loss term; subclasses set the flags the step uses to compute only what is needed.

    These are every flag the training step (ted_fl.continual.step) reads; a term sets them as
    class or instance attributes, never new ones.
    """

    name = "term"
    data_independent = False  # True: reads no site data given the weights (outside DP-SGD's clipping)
    needs_teacher = False  # the previous model's outputs on the batch (q, teacher_logits)
    needs_probes = False  # the SKA noise probes and both models' outputs on them
    needs_features = False  # intermediate features (of the student, and of the teacher when there is one)
    own_teacher = False  # brings its own teacher (gkd.fixed_teacher): features even without a previous model

    def compute(self, s: StepInputs) -> torch.Tensor | None:  # pragma: no cover - interface
        raise NotImplementedError


class SegLoss(Term):
    """L_seg = 1 - (2 sum(p*y) + 1) / (sum(p) + sum(y) + 1) + BCE(p, y).

    Soft Dice plus binary cross-entropy on the softmax probabilities p against the one-hot y,
    over all channels (background included), flattened over the whole batch: the reference's
    LossDiceBCE. Hand-written because MONAI's DiceLoss averages per-channel/per-sample Dice.
    """

    name = "seg"

    def __call__(self, p: torch.Tensor, y: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        if per_sample:  # DP-SGD: the mean over images of each image's own Dice (no cross-image sums)
            dims = tuple(range(1, p.dim()))
            inter = (p * y).sum(dims)
            dice = (1.0 - (2.0 * inter + 1.0) / (p.sum(dims) + y.sum(dims) + 1.0)).mean()
            return dice + F.binary_cross_entropy(p, y)
        inter = (p * y).sum()
        dice = 1.0 - (2.0 * inter + 1.0) / (p.sum() + y.sum() + 1.0)
        return dice + F.binary_cross_entropy(p, y)

    def compute(self, s: StepInputs) -> torch.Tensor:
        return self(s.p, one_hot(s.masks, s.p.shape[1]).to(s.p), s.per_sample)


class KD(Term):
    """L_KD = CE(p(x), q(x)) = mean over B*H*W of -sum_c q_c(x) log p_c(x).

    `reduce` = "reference": the reference's width-axis sum (see cross_entropy), a bug kept only
    to reproduce its kd / ska / akt numbers (loss.kd_reduce).
    """

    name = "kd"
    needs_teacher = True

    def __init__(self, reduce: str = "class") -> None:
        if reduce not in KD_REDUCE:
            raise unknown("KD reduction", reduce, KD_REDUCE, "loss.kd_reduce")
        self.reduce = reduce

    def __call__(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return cross_entropy(p, q, self.reduce)

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        return None if s.q is None else self(s.p, s.q)


class SKA(KD):
    """L_SKA = CE(p(n), q(n)): KD on noise probes n ~ N(mean, std^2) (see probes.py).

    p(n), q(n) are the student's and the teacher's probabilities on the probes, never on the
    images; `reduce` as for KD.
    """

    name = "ska"
    data_independent = True  # the probes are noise, the teacher is the frozen previous model
    needs_teacher = True
    needs_probes = True

    def __call__(self, p_n: torch.Tensor, q_n: torch.Tensor) -> torch.Tensor:
        return cross_entropy(p_n, q_n, self.reduce)

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        if s.p_probe is None or s.q_probe is None:
            return None
        return self(s.p_probe, s.q_probe)


class GUGF:
    """Global Uncertainty-Guided Fusion: U = 1 - sum_c q_c p_c per pixel (B x H x W), no grad.

    It weights AKT's disagreement mask M (B x 1 x H x W). Modes:
    - "batch" (default, the reference's *batch-broadcast* weighting): U * M broadcasts to
      B x B x H x W, so sample i's pixel is weighted by the batch-summed uncertainty
      sum_j U_j(h, w); the loss grows with B. This is what the published numbers come from.
    - "normalized": the same global view divided by B (batch-mean uncertainty), B-invariant.
    - "sample": each sample's own uncertainty U_i(h, w) (no cross-sample fusion).
    """

    def __init__(self, mode: str = "batch") -> None:
        if mode not in GUGF_MODES:
            raise unknown("GUGF mode", mode, GUGF_MODES, "loss.gugf")
        self.mode = mode

    @staticmethod
    def uncertainty(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """U = 1 - sum_c q_c p_c, shape (B, H, W), detached."""
        return (1.0 - (q * p).sum(dim=1)).detach()

    def weighted(self, u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The weight U*M per mode; "batch" returns the B x B x H x W broadcast product."""
        if self.mode == "batch":
            return u * m  # (B, H, W) * (B, 1, H, W) -> (B, B, H, W)
        if self.mode == "normalized":
            return u * m / u.shape[0]
        return u.unsqueeze(1) * m

    def folded(self, u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """`weighted` summed over its broadcast axis: a (B, 1, H, W) weight W' with
        sum(W' * l) = sum(weighted(u, m) * l) for any per-sample l of shape (B, 1, H, W).

        "batch": sum_ij U_j M_i l_i = sum_i M_i l_i sum_j U_j, so W' = M * sum_j U_j
        ("normalized": divided by B); "sample" is already (B, 1, H, W). It spares AKT the
        B x B x H x W product (B times the memory and work of the loss itself).
        """
        if self.mode == "sample":
            return u.unsqueeze(1) * m
        w = m * u.sum(dim=0)  # (B, 1, H, W) * (H, W)
        return w / u.shape[0] if self.mode == "normalized" else w


class AKT(Term):
    """L_AKT = -sum(U * M * l) / (sum(M) + 1), only where student and teacher disagree.

    y_hat = argmax_c q; M = [argmax_c p != y_hat] (B x 1 x H x W, no grad);
    l = log(p + 1e-5) at class y_hat; U = 1 without GUGF, else GUGF's uncertainty weight
    (see GUGF for the batch broadcast). The denominator is sum(M) + 1 in every mode.
    """

    name = "akt"
    needs_teacher = True

    def __init__(self, gugf: GUGF | None = None) -> None:
        self.gugf = gugf

    def __call__(
        self, p: torch.Tensor, q: torch.Tensor, stats: dict[str, float] | None = None, per_sample: bool = False
    ) -> torch.Tensor:
        y_hat = class_argmax(q)
        l_t = torch.log(p.gather(1, y_hat) + 1e-5)  # log(p + 1e-5) at y_hat, on the gathered pixels only
        m = (class_argmax(p.detach()) != y_hat).float()
        if stats is not None:
            stats["akt_mask_frac"] = float(m.mean())
        if self.gugf is None:
            w = m
        else:
            u = GUGF.uncertainty(p, q)
            w = self.gugf.folded(u, m)  # sum(w * l_t) as with the literal (B, B, H, W) weighting
            if stats is not None:
                stats["u_mean"] = float(u.mean())
                stats["u_max"] = float(u.max())
        if per_sample:  # DP-SGD: each image normalised by its own mask (no cross-image sum)
            return (-(w * l_t).sum((1, 2, 3)) / (m.sum((1, 2, 3)) + 1.0)).mean()
        return -(w * l_t).sum() / (m.sum() + 1.0)

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        return None if s.q is None else self(s.p, s.q, s.stats, s.per_sample)


class LwF(Term):
    """L_LwF = T^2 * mean over B*H*W of -sum_c softmax(t/T)_c log softmax(s/T)_c (Li & Hoiem)."""

    name = "lwf"
    needs_teacher = True

    def __init__(self, temperature: float = 2.0) -> None:
        self.t = float(temperature)

    def __call__(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        q_t = torch.softmax(teacher_logits / self.t, dim=1)
        log_p_t = torch.log_softmax(logits / self.t, dim=1)
        return self.t**2 * (-(q_t * log_p_t).sum(dim=1)).mean()

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        return None if s.teacher_logits is None else self(s.logits, s.teacher_logits.detach())


class MiB(Term):
    """MiB's unbiased distillation (Cermelli et al. 2020), on the teacher's C_old classes:

    L = -mean_pixels [ q_0 log(p_0 + sum_{c >= C_old} p_c) + sum_{0<c<C_old} q_c log p_c ] / C_old

    The student's background absorbs the classes the teacher never had. With the binary
    (background + structure) label space of every domain here there are no such classes, so
    it reduces to CE(p, q) / C. MiB's unbiased *cross-entropy* would score background pixels
    against log(p_bg + p_old) = log 1 = 0 when the label spaces coincide, so it is left out:
    the segmentation loss stays L_seg, as in the reference code. (The reference also applies a
    second softmax to the teacher's probabilities; we use the teacher's probabilities directly.)

    variant "reference" (loss.baseline_variant): the reference's MiB agent feeds the student's
    *probabilities* (softmax, clamped) where MiB's logits belong and softmaxes the teacher's
    probabilities once more: L_ref = L(logits := p, q := softmax(q)).
    """

    name = "mib"
    needs_teacher = True

    def __init__(self, variant: str = "paper") -> None:
        if variant not in BASELINE_VARIANTS:
            raise unknown("baseline variant", variant, BASELINE_VARIANTS, "loss.baseline_variant")
        self.variant = variant

    def __call__(self, logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        c_old, c_new = q.shape[1], logits.shape[1]
        log_p = torch.log_softmax(logits, dim=1)
        bkg_idx = [0, *range(c_old, c_new)]
        log_bkg = torch.logsumexp(log_p[:, bkg_idx], dim=1)
        inner = q[:, 0] * log_bkg + (q[:, 1:] * log_p[:, 1:c_old]).sum(dim=1)
        return -(inner / c_old).mean()

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        if s.q is None:
            return None
        if self.variant == "reference":
            return self(s.p, torch.softmax(s.q, dim=1))
        return self(s.logits, s.q)


class PLOPPseudo(Term):
    """PLOP's pseudo-label merging (Douillard et al. 2021, the paper's formula) on a binary label space.

    Pixels labelled background in the new domain may hide what the old model knew: there the
    teacher's label argmax q replaces the label when the teacher is confident, i.e. its
    normalised entropy H(q)/log C is at most the per-class `threshold`-quantile of the
    entropies of background-labelled pixels it assigns to that class (PLOP: the per-class
    median over the data set; here per batch). Unconfident background pixels are ignored;
    foreground labels are kept. L = mean over B*H*W of a_b * CE_pixel(p, merged label), with
    PLOP's adaptive factor a_b = (#confident bg pixels / #bg pixels) of sample b (1 if none).
    PLOP's POD feature term is the separate `POD`, added only when loss.pod_weight > 0. The
    reference code's variant (a Dice against a merged background, no threshold, no POD) is
    `PLOPReference`.
    """

    name = "plop"
    needs_teacher = True

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)

    def merge_labels(self, q: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(merged labels with -100 for ignored pixels, adaptive factor per sample)."""
        c = q.shape[1]
        ent = -(q * torch.log(q.clamp_min(EPS))).sum(dim=1) / math.log(c)
        pseudo = q.argmax(dim=1)
        bg = masks == 0
        thr = torch.zeros(c, dtype=ent.dtype, device=ent.device)
        for k in range(c):
            sel = ent[bg & (pseudo == k)]
            thr[k] = torch.quantile(sel, self.threshold) if sel.numel() else 0.0
        confident = ent <= thr[pseudo]
        labels = masks.long().clone()
        labels[bg & confident] = pseudo[bg & confident]
        labels[bg & ~confident] = -100
        n_bg = bg.flatten(1).sum(1).float()
        n_ok = (bg & confident).flatten(1).sum(1).float()
        factor = torch.where(n_bg > 0, n_ok / n_bg.clamp_min(1.0), torch.ones_like(n_bg))
        return labels, factor

    def __call__(self, p: torch.Tensor, q: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            labels, factor = self.merge_labels(q, masks)
        ce = F.nll_loss(torch.log(p), labels, ignore_index=-100, reduction="none")  # 0 if ignored
        return (ce * factor[:, None, None]).mean()

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        return None if s.q is None else self(s.p, s.q, s.masks)


class PLOPReference(Term):
    """The reference code's "PLOP" (loss.baseline_variant = "reference"): a soft Dice against a
    target whose background channel is merged with the teacher's background.

    target_0 = [argmax_c q = 0] OR y_0 (one-hot labels y), target_c = y_c for c > 0;
    L = 1 - (2 sum(p * target) + 1) / (sum(p) + sum(target) + 1) over the whole batch
    (the reference's LossDice). No entropy threshold, no adaptive factor, no POD.
    """

    name = "plop"
    needs_teacher = True

    def __call__(self, p: torch.Tensor, q: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        target = one_hot(masks, p.shape[1]).to(p)
        target[:, 0] = torch.maximum(target[:, 0], (q.argmax(dim=1) == 0).to(p))
        inter = (p * target).sum()
        return 1.0 - (2.0 * inter + 1.0) / (p.sum() + target.sum() + 1.0)

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        return None if s.q is None else self(s.p, s.q.detach(), s.masks)


def local_pod(f: torch.Tensor, scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """PLOP's local POD embedding of f**2: width- and height-pooled windows at several scales."""
    f = f.pow(2)
    b, _, h, w = f.shape
    parts = []
    for k in scales:
        if h // k < 1 or w // k < 1:
            continue
        for rows in torch.tensor_split(f, k, dim=2):
            for win in torch.tensor_split(rows, k, dim=3):
                parts.append(F.normalize(win.mean(dim=3).reshape(b, -1), dim=1, p=2))
                parts.append(F.normalize(win.mean(dim=2).reshape(b, -1), dim=1, p=2))
    return torch.cat(parts, dim=1)


class POD(Term):
    """PLOP's local POD feature distillation: mean over layers of mean_b ||POD(f_s) - POD(f_t)||_2,
    on the encoder levels, the bottleneck and the decoder output (networks.SegNet features).
    """

    name = "pod"
    needs_teacher = True
    needs_features = True

    def __call__(
        self, feats: Mapping[str, torch.Tensor], teacher_feats: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        names = [n for n in feats if n in teacher_feats]
        losses = [
            (local_pod(feats[n]) - local_pod(teacher_feats[n].detach())).norm(dim=1).mean() for n in names
        ]
        return torch.stack(losses).mean()

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        if not s.feats or not s.teacher_feats:
            return None
        return self(s.feats, s.teacher_feats)


def _penalty(model: nn.Module, aux: Mapping[str, torch.Tensor] | None, key: str) -> torch.Tensor | None:
    """sum_i w_i (theta_i - theta*_i)^2 with w = aux[key.<param>], theta* = aux[anchor.<param>]."""
    if not aux:
        return None
    total: torch.Tensor | None = None
    for name, param in model.named_parameters():
        w, anchor = aux.get(f"{key}.{name}"), aux.get(f"anchor.{name}")
        if w is None or anchor is None:
            continue
        term = (w.to(param) * (param - anchor.to(param)).pow(2)).sum()
        total = term if total is None else total + term
    return total


class EWC(Term):
    """L_EWC = 1/2 sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick et al. 2017).

    F is the diagonal empirical Fisher: the mean over the site's training images of the squared
    per-image gradient of the log-likelihood of its labels, log p(y|x) = mean over pixels of
    log p_y (see approaches.estimate_importance), averaged over the sites seen; theta* the
    parameters at the end of the previous site. The reference code's EWC agent has no runnable
    variant: it reads config["unet_only"], which args.py never defines, at the second domain
    (and its "Fisher" is the min-max normalised mean gradient of L_seg, not a squared one).
    """

    name = "ewc"
    data_independent = True  # a penalty on the weights (its importances are refused under DP)

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        pen = _penalty(s.model, s.aux, "fisher")
        return None if pen is None else 0.5 * pen


class MAS(Term):
    """L_MAS = sum_i Omega_i (theta_i - theta*_i)^2 (Aljundi et al. 2018).

    Omega = mean over the site's training images of |d ||f(x)||^2 / d theta| per image, with
    ||f(x)||^2 the squared L2 norm of the output logits over the classes, averaged over the
    pixels: label-free (see approaches.estimate_importance). The reference's MAS agent crashes
    at the second domain like its EWC (config["unet_only"]), so there is no reference variant.
    """

    name = "mas"
    data_independent = True

    def compute(self, s: StepInputs) -> torch.Tensor | None:
        return _penalty(s.model, s.aux, "importance")


class Proximal(Term):
    """L_prox = 1/2 sum_i (theta_i - theta^g_i)^2, weighted by mu: FedProx's mu/2 ||w - w_global||^2
    (Li et al. 2020; Flower's FedProx sends proximal_mu for its clients to add it).

    theta^g are the parameters of the round's global model, fixed when the round starts
    (`ted_fl.continual.strategies.with_proximal`); its gradient is mu (theta - theta^g).
    """

    name = "prox"
    data_independent = True  # a penalty on the weights: outside DP-SGD's per-sample clipping

    def __init__(self, anchor: Mapping[str, torch.Tensor]) -> None:
        self.anchor = dict(anchor)

    def __call__(self, model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, param in model.named_parameters():
            if name in self.anchor:
                total = total + (param - self.anchor[name].to(param)).pow(2).sum()
        return 0.5 * total

    def compute(self, s: StepInputs) -> torch.Tensor:
        return self(s.model)
