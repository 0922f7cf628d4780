"""Evaluation: a model's labels on a split (eval.bn's batch-norm modes) and their Dice / HD95, the
same for the centralized runner and the Flower client."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import TypedDict

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from scipy import ndimage
from torch import nn

from ted_fl.config import EvalBN, EvalSlices, ExperimentConfig, choices
from ted_fl.continual.device import batch_statistics, on_device
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError, unknown

EVAL_BN = choices(EvalBN)  # the schema owns the allowed values


EVAL_SLICES = choices(EvalSlices)  # the schema owns the allowed values


HD95_MODES = ("slice_max", "pooled")


def predict_labels(model: nn.Module, split: Split, per_volume: bool, cfg: ExperimentConfig) -> np.ndarray:
    """The (N, H, W) labels `evaluate` scores for this experiment (eval.bn, the protocol's rescale)."""
    opts = eval_options(cfg)
    images = rescale_percentiles(split.images, _groups(split, per_volume)) if opts["rescale"] else split.images
    with torch.no_grad():
        return _predict(model, images, opts["batch_size"], opts["bn"], opts["slices"])


class EvalOptions(TypedDict):
    """`evaluate`'s keyword options that an experiment fixes (`eval_options`)."""

    bn: str
    batch_size: int
    slices: str
    rescale: bool
    hd95: str


def eval_options(cfg: ExperimentConfig) -> EvalOptions:
    """`evaluate`'s keyword options for an experiment: eval.bn, and protocol "reference"'s
    evaluation rescale and pooled HD95."""
    ref = cfg.protocol == "reference"
    return {"bn": cfg.eval.bn, "batch_size": cfg.eval.batch_size, "slices": cfg.eval.slices, "rescale": ref,
            "hd95": "pooled" if ref else "slice_max"}


def _predict(model: nn.Module, images: np.ndarray, batch_size: int, bn: str = "running",
             slices: str = "batched") -> np.ndarray:
    """Argmax labels; bn "running": model.eval() in batches; "batch": each image on its own batch-norm
    statistics, `batch_size` images a forward (slices "batched", where the network allows it) or one
    (slices "one", the reference's loop)."""
    if bn not in EVAL_BN:
        raise unknown("evaluation batch-norm mode", bn, EVAL_BN, "eval.bn")
    if slices not in EVAL_SLICES:
        raise unknown("evaluation slice mode", slices, EVAL_SLICES, "eval.slices")
    device = next(model.parameters()).device
    ctx = batch_statistics(model, slices == "batched") if bn == "batch" else _eval_mode(model)
    preds = []
    source = on_device(images, device) if device.type != "cpu" else None  # a split stays on the GPU
    with ctx as batched:
        step = batch_size if bn == "running" or batched else 1
        for i in range(0, len(images), step):
            x = (source[i : i + step].float() if source is not None
                 else torch.as_tensor(images[i : i + step], dtype=torch.float32, device=device))
            preds.append(model(x).max(dim=1).indices.cpu().numpy())  # = argmax(dim=1), ~15x faster on CPU
    return np.concatenate(preds, axis=0)


def dice(pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> float:
    """Foreground Dice of binary arrays of any shape (an image, a volume), MONAI's: 1 when both
    are empty, 0 when only one is (ignore_empty=False). Every Dice in ted-fl comes from here."""
    p = torch.as_tensor(np.asarray(pred) > 0 if not torch.is_tensor(pred) else pred > 0, dtype=torch.float32)
    g = torch.as_tensor(np.asarray(gt) > 0 if not torch.is_tensor(gt) else gt > 0, dtype=torch.float32)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    return float(torch.as_tensor(metric(p[None, None], g[None, None])).reshape(-1)[0])  # MONAI: a tensor


def class_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two class-index maps: the mean of `dice` over the classes present in either (1 when none)."""
    classes = sorted((set(np.unique(pred).tolist()) | set(np.unique(gt).tolist())) - {0})
    if not classes:
        return 1.0
    return float(np.mean([dice(pred == k, gt == k) for k in classes]))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[bool]:
    was_training = model.training
    model.eval()
    try:
        yield True
    finally:
        model.train(was_training)


def rescale_percentiles(images: np.ndarray, groups: list[np.ndarray], low: float = 0.1, high: float = 99.0) -> np.ndarray:
    """The reference's evaluation-only intensity rescale (torchio RescaleIntensity((0, 1), (0.1, 99))).

    Per volume (or per image for 2-D sets): clip to the [low, high] percentiles of its
    intensities, then map that range to [0, 1]; a constant volume is left as it is.
    """
    out = images.astype(np.float32, copy=True)
    for idx in groups:
        lo, hi = np.percentile(out[idx], [low, high])
        if hi > lo:
            out[idx] = (np.clip(out[idx], lo, hi) - lo) / (hi - lo)
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), iterations=1)


def hd95_pooled_slice(pred: np.ndarray, gt: np.ndarray) -> float:
    """medpy's hd95 on one 2-D slice: the 95th percentile of both directed surface-distance sets pooled.

    Both masks must be non-empty. Surfaces are the masks minus their erosion (4-connectivity);
    distances are Euclidean in pixels (MONAI's percentile=95 takes the larger of the two directed
    95th percentiles instead of pooling them).
    """
    sp, sg = _surface(pred), _surface(gt)
    d_pg = ndimage.distance_transform_edt(~sg)[sp]  # prediction surface -> ground-truth surface
    d_gp = ndimage.distance_transform_edt(~sp)[sg]
    return float(np.percentile(np.hstack((d_pg, d_gp)), 95))


def _hd95_pooled(pred: np.ndarray, gt: np.ndarray) -> float:
    """The reference's ScoreHausdorff: mean over slices with ground truth of the pooled HD95;
    an empty prediction on such a slice scores max(H, W). No foreground slice: as `_hd95`."""
    size = float(max(gt.shape[-2:]))
    scores = []
    for p, g in zip(pred, gt, strict=True):
        if not g.any():
            continue
        scores.append(size if not p.any() else hd95_pooled_slice(p, g))
    if not scores:
        return 0.0 if not pred.any() else float(np.hypot(*gt.shape[-2:]))
    return float(np.mean(scores))


def _hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean HD95 over the slices with ground-truth foreground (the paper's convention).

    A slice whose prediction is empty scores the image diagonal (the largest possible
    distance; MONAI would give inf). With no foreground slice at all: 0 if the prediction is
    empty too, else the diagonal.
    """
    diag = float(np.hypot(*gt.shape[-2:]))
    has_fg = gt.reshape(len(gt), -1).any(axis=1)
    if not has_fg.any():
        return 0.0 if not pred.any() else diag
    p = torch.as_tensor(pred[has_fg][:, None].astype(np.float32))
    g = torch.as_tensor(gt[has_fg][:, None].astype(np.float32))
    metric = HausdorffDistanceMetric(include_background=True, percentile=95.0, reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = torch.as_tensor(metric(p, g)).reshape(-1).numpy().astype(np.float64)
    values = np.where(np.isfinite(values), values, diag)
    return float(values.mean())


Labels = Sequence[tuple[str, Sequence[int]]]  # evaluation labels: (name, the class indices it unites)


def _groups(split: Split, per_volume: bool) -> list[np.ndarray]:
    """Slice indices per volume (in first-appearance order), or one group per image."""
    if not per_volume:
        return [np.array([i]) for i in range(len(split))]
    _, first = np.unique(split.volumes, return_index=True)
    return [np.flatnonzero(split.volumes == split.volumes[i]) for i in sorted(first)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    per_volume: bool,
    batch_size: int = 16,
    labels: Labels | None = None,
    bn: str = "running",
    rescale: bool = False,
    hd95: str = "slice_max",
    slices: str = "batched",
) -> dict[str, float]:
    """Dice, IoU and HD95, averaged over volumes (per_volume) or images; see `score`.

    How the model is run (`_predict`) and what is scored (`score`) are separate steps.
    `bn` (eval.bn): "running" scores in eval mode with the running statistics; "batch" normalises
    every image with batch norm on its own statistics (the reference's predictor, which forwards
    each alone), no buffer touched; `slices` (eval.slices) "batched" puts `batch_size` images
    through a forward with the same numbers (`batch_statistics`), "one" forwards each alone. `rescale` applies the reference's evaluation-only percentile rescale per
    volume before the forward; `hd95` "pooled" is the reference's HD95 (`_hd95_pooled`),
    "slice_max" MONAI's (`_hd95`). The model's training flags are restored in every case.
    """
    if len(split) == 0:
        raise TedFlError("cannot evaluate an empty split")
    if hd95 not in HD95_MODES:
        raise unknown("HD95 mode", hd95, HD95_MODES, "protocol")
    images = rescale_percentiles(split.images, _groups(split, per_volume)) if rescale else split.images
    pred = _predict(model, images, batch_size, bn, slices)
    return score(pred, split, per_volume=per_volume, labels=labels, hd95=hd95)


def score(
    pred: np.ndarray, split: Split, *, per_volume: bool, labels: Labels | None = None, hd95: str = "slice_max"
) -> dict[str, float]:
    """Score predicted class indices (N, H, W) against `split.masks`, per evaluation label.

    Without `labels`: one label, every class > 0 as foreground, returned as plain "dice",
    "iou", "hd95". With `labels` [(name, class indices), ...] (each class, then each region =
    a union of classes): "<name>/<metric>" per label, and the plain keys hold the mean over
    the labels (for a one-class set the mean equals that class). `hd95` as in `evaluate`.
    """
    if labels is None:
        return _score_binary(pred > 0, split.masks > 0, split, per_volume, hd95)
    out: dict[str, float] = {}
    per_label = []
    for name, classes in labels:
        idx = np.asarray(list(classes))
        scores = _score_binary(np.isin(pred, idx), np.isin(split.masks, idx), split, per_volume, hd95)
        out.update({f"{name}/{k}": v for k, v in scores.items()})
        per_label.append(scores)
    mean = {k: float(np.mean([s[k] for s in per_label])) for k in per_label[0]}
    return {**mean, **out}


def _score_binary(
    pred: np.ndarray, gt: np.ndarray, split: Split, per_volume: bool, hd95: str = "slice_max"
) -> dict[str, float]:
    """Foreground Dice, IoU and HD95 of one label (bool masks), averaged over volumes or images.

    Per volume: the volume's slices are stacked into a 3-D volume and Dice / IoU are computed
    on it (MONAI); HD95 is the mean over its slices with foreground. Outside the FOV mask (when
    the split has one) prediction and ground truth are set to background. Empty cases: Dice and
    IoU are 1 when ground truth and prediction are both empty and 0 when only one is
    (MONAI's ignore_empty=False); HD95 as in `_hd95` ("slice_max") or `_hd95_pooled` ("pooled").
    """
    if split.fov is not None:
        pred = pred & split.fov.astype(bool)
        gt = gt & split.fov.astype(bool)
    groups = _groups(split, per_volume)
    hd_fn = _hd95_pooled if hd95 == "pooled" else _hd95

    iou_m = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    dices, iou, hd = [], [], []
    for idx in groups:
        p = torch.as_tensor(pred[idx], dtype=torch.float32)[None, None]  # (1, 1, D, H, W)
        g = torch.as_tensor(gt[idx], dtype=torch.float32)[None, None]
        if not per_volume:
            p, g = p[:, :, 0], g[:, :, 0]  # (1, 1, H, W)
        dices.append(dice(p[0, 0], g[0, 0]))
        iou.append(float(torch.as_tensor(iou_m(p, g)).reshape(-1)[0]))
        hd.append(hd_fn(pred[idx], gt[idx]))
    return {"dice": float(np.mean(dices)), "iou": float(np.mean(iou)), "hd95": float(np.mean(hd))}
