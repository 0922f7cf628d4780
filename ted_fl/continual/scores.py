"""The GKD protocol's test metrics [repo test.py]: ONE confusion matrix over a whole test split.

Pixels inside the field of view (when the split has one) of every test image are pooled; the
prediction is the argmax of the 2-class softmax, the score its foreground probability.
Acc, Se (recall), Sp, F1 (= foreground Dice for binary) come from MONAI's confusion-matrix metric;
mIoU is the mean of the foreground and background IoU; AUC is MONAI's ROC AUC on the scores.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc
from torch import nn

from ted_fl.data.types import Split
from ted_fl.errors import TedFlError

SCORE_NAMES = ("dice", "se", "sp", "acc", "auc", "miou")


def pooled_scores(prob: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Metrics of foreground probabilities `prob` against binary `gt` (same shape, any pixels)."""
    prob, gt = np.asarray(prob, dtype=np.float64).ravel(), np.asarray(gt).astype(bool).ravel()
    if prob.size == 0:
        raise TedFlError("no pixel to score (empty split or empty field of view)")
    pred = prob > 0.5
    tp, fp = float(np.sum(pred & gt)), float(np.sum(pred & ~gt))
    fn, tn = float(np.sum(~pred & gt)), float(np.sum(~pred & ~gt))
    cm = torch.tensor([[tp, fp, tn, fn]], dtype=torch.float64)

    def metric(name: str) -> float:
        return float(compute_confusion_matrix_metric(name, cm).reshape(-1)[0])

    iou_fg = tp / (tp + fp + fn) if tp + fp + fn else 1.0
    iou_bg = tn / (tn + fn + fp) if tn + fn + fp else 1.0
    out = {"dice": metric("f1 score"), "se": metric("sensitivity"), "sp": metric("specificity"),
           "acc": metric("accuracy"), "miou": (iou_fg + iou_bg) / 2.0}
    if gt.all() or not gt.any():
        out["auc"] = float("nan")  # undefined with a single class
    else:
        out["auc"] = float(torch.as_tensor(compute_roc_auc(torch.as_tensor(prob), torch.as_tensor(gt.astype(np.float64)))))
    return {k: float(np.nan_to_num(v, nan=0.0)) if k != "auc" else v for k, v in out.items()}


@torch.no_grad()
def foreground_probabilities(model: nn.Module, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """softmax(model(x))[:, 1] for every image, in eval mode (batch-norm running statistics)."""
    was = model.training
    model.eval()
    try:
        out = []
        device = next(model.parameters()).device
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i : i + batch_size], dtype=torch.float32, device=device)
            out.append(torch.softmax(model(x), dim=1)[:, 1].float().cpu().numpy())
    finally:
        model.train(was)
    return np.concatenate(out)


def split_scores(model: nn.Module, split: Split) -> dict[str, float]:
    """The protocol's metrics of `model` on `split`, pooled inside the field of view."""
    if len(split) == 0:
        raise TedFlError("cannot score an empty split")
    prob = foreground_probabilities(model, split.images)
    gt = split.masks > 0
    if split.fov is not None:
        keep = split.fov.astype(bool)
        return pooled_scores(prob[keep], gt[keep])
    return pooled_scores(prob, gt)
