"""Local training, the same for the centralized runner and the Flower client: a site's steps on its
split (with DP-SGD when privacy.dp = "sample"), the learning-rate schedule and determinism."""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from monai.utils import set_determinism as monai_set_determinism
from torch import nn

from ted_fl.config import LossConfig, TrainConfig
from ted_fl.continual.approaches import Approach
from ted_fl.continual.compiled import compiled, step_begins, warn
from ted_fl.continual.device import amp_dtype_for, on_device
from ted_fl.continual.probes import draw_probes
from ted_fl.continual.step import train_step
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError
from ted_fl.privacy.mechanisms import SampleDPArgs, attach, stage_dp_metrics


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
    dp: SampleDPArgs | None = None,
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

    `dp` (`SampleDPArgs`: noise multiplier and clipping bound, privacy.dp = "sample"): DP-SGD through
    `ted_fl.privacy.mechanisms` (Opacus): Poisson batches at rate 1 / ceil(n / batch_size) instead
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
    images_d = masks_d = torch.empty(0)  # the split on the device (on_gpu only)
    source: torch.Tensor | None = None  # what the batches are drawn from: None for the numpy arrays
    if on_gpu:  # the whole split and the round's probes cross to the device once
        images_d, masks_d = on_device(data.images, device), on_device(data.masks, device)
        source = images_d
        probes = probes.to(device=device, dtype=torch.float32) if probes is not None else None
    probe_gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(seed)
    sums: dict[str, float] = defaultdict(float)
    private = None
    if dp is not None:
        private = attach(student, optimizer, n, batch_size, dp.noise_multiplier, dp.max_grad_norm, seed)
    batches = private.batches(steps) if private is not None else batch_indices(n, batch_size, steps, rng)
    student_fwd, teacher_fwd = _compiled_forwards(student, teacher, compile, private is not None)
    if trace is not None:
        trace.update(source=source, compiled=student_fwd.state if student_fwd is not None else "off: eager")
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
        metrics.update(stage_dp_metrics(private))
    return metrics, copy.deepcopy(optimizer.state_dict())


def _compiled_forwards(student: nn.Module, teacher: nn.Module | None, setting: str,
                       private: bool) -> tuple[Any, Any]:
    """train.compile's forwards of the student and the teacher (None, None: eager). DP-SGD keeps
    them eager (Opacus hooks the module for per-sample gradients): one warning line says so."""
    if setting == "on" and private:
        warn("privacy.dp = 'sample' computes per-sample gradients through Opacus' hooks")
        return None, None
    return compiled(student, setting), compiled(teacher, setting)


















































