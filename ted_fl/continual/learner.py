"""What the centralized runner and the Flower client both call: train locally, evaluate, lr."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import random
import warnings
import weakref
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from monai.utils import set_determinism as monai_set_determinism
from scipy import ndimage
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ted_fl.config import EvalSlices, ExperimentConfig, LossConfig, TrainConfig, choices
from ted_fl.continual.approaches import Approach
from ted_fl.continual.compiled import step_begins
from ted_fl.continual.probes import draw_probes
from ted_fl.continual.step import train_step
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError, unknown

EVAL_BN = ("running", "batch")
EVAL_SLICES = choices(EvalSlices)  # the schema owns the allowed values
HD95_MODES = ("slice_max", "pooled")


def set_determinism(seed: int, threads: int = 1) -> None:
    """Seed Python, numpy, torch (and MONAI's flags) and pin torch's thread count."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    monai_set_determinism(seed=seed % 2**32)
    torch.set_num_threads(max(1, int(threads)))


def lr_for(stage: int, round: int, cfg: TrainConfig, constant: bool = False) -> float:  # noqa: A002
    """lr_first on stage 0, lr_later after, times lr_gamma**round (StepLR stepped each round).

    `constant`: lr_first on every stage (the reference's seq, whose main.py never switches it).
    """
    base = cfg.lr_first if stage == 0 or constant else cfg.lr_later
    return float(base * cfg.lr_gamma**round)


def predict_labels(model: nn.Module, split: Split, per_volume: bool, cfg: ExperimentConfig) -> np.ndarray:
    """The (N, H, W) labels `evaluate` scores for this experiment (eval.bn, the protocol's rescale)."""
    opts = eval_options(cfg)
    images = rescale_percentiles(split.images, _groups(split, per_volume)) if opts["rescale"] else split.images
    with torch.no_grad():
        return _predict(model, images, int(opts["batch_size"]), str(opts["bn"]),  # type: ignore[call-overload]
                        str(opts["slices"]))


def eval_options(cfg: ExperimentConfig) -> dict[str, object]:
    """`evaluate`'s keyword options for an experiment: eval.bn, and protocol "reference"'s
    evaluation rescale and pooled HD95."""
    ref = cfg.protocol == "reference"
    return {"bn": cfg.eval.bn, "batch_size": cfg.eval.batch_size, "slices": cfg.eval.slices, "rescale": ref,
            "hd95": "pooled" if ref else "slice_max"}


def batch_indices(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """`steps` batches, epoch by epoch: a fresh permutation per pass, the last batch partial."""
    done = 0
    while done < steps:
        perm = rng.permutation(n)
        for i in range(0, n, batch_size):
            if done == steps:
                return
            yield perm[i : i + batch_size]
            done += 1


def local_train(
    student: nn.Module,
    teacher: nn.Module | None,
    approach: Approach,
    data: Split,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    optimizer_state: dict | None,
    seed: int,
    probes: torch.Tensor | None = None,
    aux: Mapping[str, torch.Tensor] | None = None,
    loss_cfg: LossConfig,
    amp: str = "off",
    dp: Mapping[str, float] | None = None,
    keep_on_device: bool | None = None,
    compile: str = "off",  # noqa: A002 - the config key's name
    trace: dict[str, Any] | None = None,
) -> tuple[dict[str, float], dict]:
    """Train `student` for `steps` steps (0: one pass, ceil(N / batch_size)) with Adam.

    Adam without weight decay, restored from `optimizer_state` when given, lr set to `lr`.
    Batches come from numpy Generator(seed) permutations (a new one each pass). Probes for SKA:
    with `probes` of shape (steps * count, 1, H, W), count = loss_cfg.ska_count or batch_size,
    step i uses rows [i*count, (i+1)*count); any other shape (e.g. (count, 1, H, W)) is used
    whole at every step. Without `probes`, each step draws fresh noise from a torch Generator
    seeded with `seed`. Torch's global RNG is forked and seeded too, so the same inputs and
    seed give identical weights on CPU. Returns (mean of each metric over the steps, the new
    optimizer state_dict). Term weights and the teacher mode come from the approach (built
    from a LossConfig by get_approach); `loss_cfg` sets the probes' count and law. On a GPU
    (see `gpu_setup`) the split and the probes are moved to the device once, not per step,
    and `amp` ("auto", "bf16", "off") picks mixed precision.

    `dp` ({"noise_multiplier", "max_grad_norm"}, privacy.dp = "sample"): DP-SGD through
    `ted_fl.continual.privacy` (Opacus): Poisson batches at rate 1 / ceil(n / batch_size) instead
    of the permutations, per-sample clipping and noise in the step; the metrics then carry the
    round's accounting inputs (dp_noise_multiplier, dp_sample_rate, dp_steps).

    `keep_on_device` (default: on any device but the CPU) draws the batches from the split held on
    the device by `on_device` (one copy per split, kept across rounds) in channels-last layout.
    `compile` (train.compile) runs the networks' forwards through `ted_fl.continual.compiled`.
    `trace`, when given, receives what the steps really used (the GPU path's report reads it):
    "source" (the tensor the batches were drawn from, None when they came from the numpy arrays),
    "batch" (the last step's input), "compiled" (the compiled forward's state, or why eager).
    """
    n = len(data)
    if n == 0:
        raise TedFlError("cannot train on an empty split: the site has no training images")
    if batch_size < 1:
        raise TedFlError(f"train.batch_size must be >= 1, got {batch_size}")
    if steps < 0:
        raise TedFlError(f"steps must be >= 0, got {steps}")
    steps = steps or math.ceil(n / batch_size)
    device = next(student.parameters()).device

    optimizer = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=0.0)
    if optimizer_state:
        optimizer.load_state_dict(optimizer_state)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = 0.0

    count = loss_cfg.ska_count or batch_size
    per_step = probes is not None and probes.shape[0] == steps * count
    amp_dtype = amp_dtype_for(amp, device)
    on_gpu = device.type != "cpu" if keep_on_device is None else keep_on_device
    images_d = None
    if on_gpu:  # the whole split and the round's probes cross to the device once
        images_d, masks_d = on_device(data.images, device), on_device(data.masks, device)
        probes = probes.to(device=device, dtype=torch.float32) if probes is not None else None
    probe_gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(seed)
    sums: dict[str, float] = defaultdict(float)
    private = None
    if dp is not None:
        from ted_fl.continual.privacy import attach

        private = attach(student, optimizer, n, batch_size, float(dp["noise_multiplier"]),
                         float(dp["max_grad_norm"]), seed)
    batches = private.batches(steps) if private is not None else batch_indices(n, batch_size, steps, rng)
    student_fwd, teacher_fwd = _compiled_forwards(student, teacher, compile, private is not None)
    if trace is not None:
        trace.update(source=images_d, compiled=student_fwd.state if student_fwd is not None else "off: eager")
    with torch.random.fork_rng(devices=[]), (contextlib.closing(private) if private else contextlib.nullcontext()):
        torch.manual_seed(seed)
        for i, idx in enumerate(batches):
            if on_gpu:
                sel = torch.as_tensor(idx, device=device)
                x = images_d[sel].float().contiguous(memory_format=torch.channels_last)
                y = masks_d[sel].long()
            else:
                x = torch.as_tensor(data.images[idx], dtype=torch.float32, device=device)
                y = torch.as_tensor(data.masks[idx], dtype=torch.long, device=device)
            step_probes = None
            if approach.needs_probes and teacher is not None:
                if probes is None:
                    step_probes = draw_probes(probe_gen, count, tuple(x.shape[1:]), loss_cfg)
                elif per_step:
                    step_probes = probes[i * count : (i + 1) * count]
                else:
                    step_probes = probes
                step_probes = step_probes.to(device=device, dtype=torch.float32)
            extra: dict[str, Any] = {"amp": amp_dtype} if amp_dtype is not None else {}  # full precision: the plain call
            if private is not None:
                extra["dp"] = private
            if student_fwd is not None:
                step_begins(student_fwd)
                extra.update(student_fwd=student_fwd, teacher_fwd=teacher_fwd)
            out = train_step(student, teacher, approach, x, y, optimizer, probes=step_probes, aux=aux, **extra)
            for k, v in out.items():
                sums[k] += v
    if trace is not None:
        trace["batch"] = x
    metrics = {k: v / steps for k, v in sums.items()}
    if private is not None:
        from ted_fl.continual.privacy import stage_dp_metrics

        metrics.update(stage_dp_metrics(private))
    return metrics, copy.deepcopy(optimizer.state_dict())


def _compiled_forwards(student: nn.Module, teacher: nn.Module | None, setting: str,
                       private: bool) -> tuple[Any, Any]:
    """train.compile's forwards of the student and the teacher (None, None: eager). DP-SGD keeps
    them eager (Opacus hooks the module for per-sample gradients): one warning line says so."""
    from ted_fl.continual.compiled import compiled

    if setting == "on" and private:
        from ted_fl.continual.compiled import warn

        warn("privacy.dp = 'sample' computes per-sample gradients through Opacus' hooks")
        return None, None
    return compiled(student, setting), compiled(teacher, setting)


AMP_MODES = ("auto", "bf16", "off")


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype: "auto" is bf16 on a GPU that supports it, else full precision."""
    if amp not in AMP_MODES:
        raise TedFlError(f"train.amp = '{amp}' is not one of {', '.join(AMP_MODES)}")
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def gpu_setup(model: nn.Module, device: torch.device, cudnn_benchmark: bool = True) -> nn.Module:
    """On a GPU: cuDNN autotuning and channels-last weights (the layout its convolutions prefer).

    Set after `set_determinism`, which switches autotuning off; with `cudnn_benchmark` False
    cuDNN stays deterministic. A CPU model is returned unchanged (same numbers as ever).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        torch.backends.cudnn.deterministic = not cudnn_benchmark
        if cudnn_benchmark:
            model.to(memory_format=torch.channels_last)
    return model


_DEVICE_CACHE: dict[tuple[int, str], tuple[Any, torch.Tensor]] = {}


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a tensor on `device`, copied once and kept while the array lives (a site's split
    stays on the GPU across rounds instead of crossing the bus batch by batch). The callers keep a
    split's arrays across rounds (the executors memoise the splits they derive), so the copy is made
    once per split and process."""
    key = (id(array), _device_key(device))
    hit = _DEVICE_CACHE.get(key)
    if hit is not None and hit[0]() is array:
        return hit[1]
    for k in [k for k, (ref, _) in _DEVICE_CACHE.items() if ref() is None]:
        del _DEVICE_CACHE[k]  # splits that are gone
    tensor = torch.as_tensor(array, device=device)
    _DEVICE_CACHE[key] = (weakref.ref(array), tensor)
    return tensor


def on_device_cached(array: np.ndarray, device: torch.device) -> bool:
    """Whether `on_device` holds `array` on `device` (the GPU path's check that a split stayed there)."""
    hit = _DEVICE_CACHE.get((id(array), _device_key(device)))
    return hit is not None and hit[0]() is array


def _device_key(device: torch.device | str) -> str:
    """One name per device: "cuda" and "cuda:0" are the same GPU (the worker holds the first, a
    model's parameters report the second; keyed apart, the GPU report never found the split)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


# Leaf modules whose eval-mode output for one slice does not depend on the other slices of the
# batch: torch.nn's layers (batch norm itself is swapped, see `batch_statistics`) and MONAI's
# activations. A network with any other leaf module is forwarded one slice at a time.
PER_SAMPLE_LEAVES = ("torch.nn.modules.", "monai.networks.blocks.activation")


def per_slice_batchable(model: nn.Module) -> bool:
    """Whether a batch of slices may go through one forward with each slice's batch norm on its own
    statistics (`batch_statistics(model, batched=True)`). The composite modules' own forwards are
    taken to be per-slice (every registered network is checked against the one-slice path in
    tests/unit/test_batched_slices.py); a leaf module outside `PER_SAMPLE_LEAVES` refuses."""
    return all(type(m).__module__.startswith(PER_SAMPLE_LEAVES)
               for m in model.modules() if next(m.children(), None) is None)


def _own_statistics(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm in train mode over ONE slice, for every slice of `x` at once: instance
    normalisation (each slice and channel over its spatial positions, biased variance) with the
    layer's weight, bias and eps. No running statistic is read or written."""
    return F.instance_norm(x, None, None, bn.weight, bn.bias, use_input_stats=True, eps=bn.eps)


@contextlib.contextmanager
def batch_statistics(model: nn.Module, batched: bool = False) -> Iterator[bool]:
    """Eval mode, except batch norm normalises with each forward's own statistics; yields whether
    the caller may forward several slices at once with each still normalised by its own statistics.

    `batched` False (the reference's loop): batch-norm layers run in train mode with
    `track_running_stats` off, so they neither read nor write running_mean / running_var /
    num_batches_tracked, and the caller forwards one slice at a time. `batched` True, on a network
    where it holds (`per_slice_batchable`): every batch-norm layer computes `_own_statistics`
    instead, which for each slice equals the train-mode layer over that slice alone, so a whole
    split goes through in batches with the same numbers (to float rounding) and, as in the loop,
    no buffer is touched. Dropout stays off. Every module's mode, flag and forward are restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    bns = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    fast = batched and per_slice_batchable(model)
    model.eval()
    own: list[tuple[_BatchNorm, Any]] = []
    for m, _ in bns:
        if fast:
            own.append((m, vars(m).get("forward")))
            m.forward = functools.partial(_own_statistics, m)  # type: ignore[method-assign]
        else:
            m.train()
            m.track_running_stats = False
    try:
        yield fast
    finally:
        for m, forward in own:
            del m.forward
            if forward is not None:
                m.forward = forward  # type: ignore[method-assign]
        for m, track in bns:
            m.track_running_stats = track
        for m, mode in modes:
            m.training = mode


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
    return float(metric(p[None, None], g[None, None]).reshape(-1)[0])


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
        values = metric(p, g).reshape(-1).numpy().astype(np.float64)
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
        iou.append(float(iou_m(p, g).reshape(-1)[0]))
        hd.append(hd_fn(pred[idx], gt[idx]))
    return {"dice": float(np.mean(dices)), "iou": float(np.mean(iou)), "hd95": float(np.mean(hd))}
