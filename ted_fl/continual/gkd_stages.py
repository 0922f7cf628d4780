"""The stages of generalizable distillation (spec 3) as plain PyTorch on one site's split.

1 teacher (L_seg) -> 2 scratch student (L_seg) -> 3 P-SAE (mask reconstruction) -> 4 ACT for TAN
(on the teacher) and SAN (on the scratch student) -> 5 a fresh student trained with the approach's
terms through `step.train_step`. Every stage is Adam (no weight decay [our choice]; the repo's SGD
schedule is for 300 GPU epochs) on random crops, seeded: the same seed gives the same weights on CPU.
The federated layer calls these at the source site; nothing here knows Flower.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ted_fl.continual import gkd as G
from ted_fl.continual.approaches import Approach
from ted_fl.continual.device import batch_statistics
from ted_fl.continual.fsd import GaussStats
from ted_fl.continual.networks import features
from ted_fl.continual.step import freeze, train_step
from ted_fl.data.types import Split
from ted_fl.errors import unknown

ACT_MODES = ("eval", "batch")  # how ACT runs the frozen owner of an alignment network


def _adam(params: list[nn.Parameter], lr: float, state: dict | None) -> torch.optim.Adam:
    opt = torch.optim.Adam(params, lr=lr)
    if state:
        opt.load_state_dict(state)
        for g in opt.param_groups:
            g["lr"] = lr
    return opt


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_with_terms(student: nn.Module, teacher: nn.Module | None, approach: Approach, split: Split, *,
                     steps: int, batch_size: int, crop: int, lr: float, seed: int, views: int = 0,
                     optimizer_state: dict | None = None, augment: str = "spec") -> tuple[dict[str, float], dict]:
    """`steps` steps of `approach` (stages 1, 2 and 5). With views > 0 each batch is its anchors
    followed by `views` augmented views of each (same views for teacher and student). Batches go
    to the student's device (the views are drawn on CPU from the seeded generator, then moved)."""
    device = _device(student)
    opt = _adam(list(student.parameters()), lr, optimizer_state)
    gen = torch.Generator().manual_seed(int(seed))
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, y in G.sample_batches(split.images, split.masks, steps, batch_size, crop, seed):
            n_anchors = None
            if views > 0:
                n_anchors = x.shape[0]
                x, y = G.make_views(x, y, views, gen, augment)
            out = train_step(student, teacher, approach, x.to(device), y.to(device), opt, n_anchors=n_anchors)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
    return {k: v / max(1, steps) for k, v in sums.items()}, opt.state_dict()


def train_psae(psae: G.PSAE, split: Split, *, steps: int, batch_size: int, crop: int, lr: float, seed: int,
               optimizer_state: dict | None = None) -> tuple[dict[str, float], dict]:
    """Stage 3: the P-SAE reconstructs the site's masks (Dice + BCE)."""
    opt = _adam(list(psae.parameters()), lr, optimizer_state)
    psae.train()
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, y in G.sample_batches(split.images, split.masks, steps, batch_size, crop, seed):
            loss = G.psae_loss(psae, y.to(_device(psae)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
    return {"psae": total / max(1, steps)}, opt.state_dict()


def train_alignment(model: nn.Module, msan: G.MSAN, psae: G.PSAE, split: Split, *, steps: int, batch_size: int,
                    crop: int, lr: float, seed: int, optimizer_state: dict | None = None, augment: str = "spec",
                    mode: str = "eval") -> tuple[dict[str, float], dict]:
    """Stage 4 (ACT): train `msan` on the frozen `model` and the frozen P-SAE, the model run in the
    mode the alignment network is used in: "eval" (running statistics: the TAN, as DICD and every
    GKD row run the teacher) or "batch" (batch statistics, no buffer touched: the SAN, which reads
    the student while it trains in train mode)."""
    if mode not in ACT_MODES:
        raise unknown("ACT mode", mode, ACT_MODES, "train_alignment(mode=...)")
    freeze(model).eval()
    freeze(psae).eval()
    msan.train()
    opt = _adam(list(msan.parameters()), lr, optimizer_state)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, y in G.sample_batches(split.images, split.masks, steps, batch_size, crop, seed):
            x_aug, _ = G.augment(x, y, gen, geometric=False, strength=augment)  # the code's consistency view keeps the geometry
            device = _device(msan)
            with batch_statistics(model) if mode == "batch" else contextlib.nullcontext():
                parts = G.act_loss(model, msan, psae, x.to(device), y.to(device), x_aug.to(device))
            opt.zero_grad(set_to_none=True)
            parts["total"].backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
    return {k: v / max(1, steps) for k, v in sums.items()}, opt.state_dict()


@torch.no_grad()
def code_stats(model: nn.Module, msan: G.MSAN, images: np.ndarray, batch_size: int = 8) -> GaussStats:
    """(n, sum z, sum z z^T) of the un-normalised codes E_m(A_m(f_m)) of every image (eval mode)."""
    model.eval()
    msan.eval()
    stats = GaussStats.zeros(msan.dim)
    for i in range(0, len(images), batch_size):
        x = torch.as_tensor(images[i : i + batch_size], dtype=torch.float32, device=_device(model))
        _, feats = features(model, x)
        stats = stats + GaussStats.of(msan.encode(feats["bottleneck"]).double().cpu().numpy())
    return stats
