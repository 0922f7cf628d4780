"""Membership inference: how much a final model gives away about which images trained it.

A site's training images are the members, its test images the non-members (the same
distribution, never trained on). Both sets are balanced (n = the smaller of the two, drawn
without replacement by a seed). Each image gets an attack score, higher meaning "member":

* loss threshold (Yeom et al. 2018): s(x) = -l_f(x), with l_f(x) the model's per-image
  cross-entropy (mean over the image's pixels, inside its field of view when it has one);
* difficulty-calibrated (Watson et al. 2022): s(x) = l_g(x) - l_f(x), with g a reference model
  that never saw the site (the model before the site arrived): an image that is simply easy
  is easy for g too, so only the drop the site's own training caused counts.

The attack's success is the ROC AUC of the scores, members against non-members:
AUC = P(s(member) > s(non-member)) + 1/2 P(tie), computed by the Mann-Whitney rank formula
AUC = (R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0), R_1 the sum of the members' ranks among all
scores (ties get their average rank). 0.5: no leakage measurable by this attack; 1: every
member scores above every non-member. `advantage` is max over thresholds of TPR - FPR.
Plain PyTorch and numpy, no Flower.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ted_fl.continual.device import batch_statistics
from ted_fl.data.types import Split


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return r


def auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """ROC AUC of scores (higher = member) by the Mann-Whitney rank formula (module docstring)."""
    n1, n0 = len(member), len(nonmember)
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = ranks(np.concatenate([np.asarray(member, float), np.asarray(nonmember, float)]))
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def advantage(member: np.ndarray, nonmember: np.ndarray) -> float:
    """max over thresholds t of TPR(t) - FPR(t), predicting "member" when score >= t."""
    if len(member) == 0 or len(nonmember) == 0:
        return float("nan")
    best = 0.0
    m, n = np.sort(np.asarray(member, float)), np.sort(np.asarray(nonmember, float))
    for t in np.unique(np.concatenate([m, n])):
        tpr = 1.0 - np.searchsorted(m, t, side="left") / len(m)
        fpr = 1.0 - np.searchsorted(n, t, side="left") / len(n)
        best = max(best, tpr - fpr)
    return float(best)


def balanced(n_members: int, n_nonmembers: int, seed: int, cap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Equal-sized index sets (min of the two, at most `cap` when > 0), drawn by `seed`."""
    n = min(n_members, n_nonmembers)
    if cap > 0:
        n = min(n, cap)
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_members)[:n]), np.sort(rng.permutation(n_nonmembers)[:n])


@contextmanager
def _mode(model: nn.Module, bn: str, slices: str) -> Iterator[bool]:
    """Evaluation's forward mode; yields whether several images may go through one forward."""
    if bn == "batch":
        with batch_statistics(model, slices == "batched") as batched:
            yield batched
        return
    was = model.training
    model.eval()
    try:
        yield True
    finally:
        model.train(was)


def per_image_losses(model: nn.Module, split: Split, bn: str = "batch", batch_size: int = 16,
                     slices: str = "batched") -> np.ndarray:
    """Each image's mean pixel cross-entropy under `model` (inside its field of view if any).

    Forwarded as evaluation forwards it (eval.bn, eval.slices): "batch" with each image's own
    batch-norm statistics (in batches where the network allows it, else one at a time), "running"
    in batches with the running statistics.
    """
    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), _mode(model, bn, slices) as batched:
        step = batch_size if batched else 1
        for i in range(0, len(split), step):
            x = torch.as_tensor(split.images[i : i + step], dtype=torch.float32, device=device)
            y = torch.as_tensor(split.masks[i : i + step], dtype=torch.long, device=device)
            ce = nn.functional.cross_entropy(model(x).float(), y, reduction="none")  # (B, H, W)
            if split.fov is not None:
                w = torch.as_tensor(split.fov[i : i + step], dtype=torch.float32, device=device)
                out.append(((ce * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1.0)).cpu().numpy())
            else:
                out.append(ce.mean(dim=(1, 2)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def attack(model: nn.Module, members: Split, nonmembers: Split, seed: int, *,
           reference: nn.Module | None = None, bn: str = "batch", batch_size: int = 16,
           cap: int = 0, slices: str = "batched") -> dict[str, float]:
    """The attacks of the module docstring on balanced member / non-member sets.

    Returns mia_auc (loss threshold), mia_adv (its advantage), mia_n (images per side) and,
    with a reference model, mia_auc_cal and mia_adv_cal (difficulty-calibrated).
    """
    im, inn = balanced(len(members), len(nonmembers), seed, cap)
    mem, non = members.take(im), nonmembers.take(inn)
    lm, ln = per_image_losses(model, mem, bn, batch_size, slices), per_image_losses(model, non, bn, batch_size, slices)
    out = {"mia_auc": auc(-lm, -ln), "mia_adv": advantage(-lm, -ln), "mia_n": float(len(im))}
    if reference is not None:
        gm = per_image_losses(reference, mem, bn, batch_size, slices)
        gn = per_image_losses(reference, non, bn, batch_size, slices)
        out["mia_auc_cal"] = auc(gm - lm, gn - ln)
        out["mia_adv_cal"] = advantage(gm - lm, gn - ln)
    return out
