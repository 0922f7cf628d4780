"""Sample-level differential privacy inside a site (DP-SGD with Opacus) and the RDP accounting of both
DP levels. Plain PyTorch + Opacus: no Flower here (the client-level mechanisms are Flower's own
strategies and mods, wired in `ted_fl.federated`; only their accounting lives here).

DP-SGD (Abadi et al. 2016) as a plugin of the one training step (`step.train_step(..., dp=...)`):
Opacus' hooks record per-sample gradients of the loss terms computed on the site's images; the
DPOptimizer clips each to `max_grad_norm`, sums them, adds N(0, sigma^2 max_grad_norm^2) and divides by
the expected batch size. Batches are Poisson samples (Opacus' DPDataLoader, sample rate
q = 1 / ceil(n / batch_size)), the sampling the RDP analysis assumes, not the project's permutation
batches. sigma is chosen per site and stage with Opacus' `get_noise_multiplier` (RDP accountant) so
that the stage's rounds x steps spend the target epsilon at delta: what `make_private_with_epsilon`
does, which only takes whole epochs while a stage is rounds x steps_per_round steps.

What DP-SGD covers and what it does not:
- covered: every term computed from the site's images (segmentation, KD, AKT/GUGF, LwF, MiB,
  PLOP, POD). Such terms must be sums of per-image losses: under dp = "sample" the batch-level
  Dice of L_seg and AKT's batch normaliser become per-image (StepInputs.per_sample), and
  cross-sample terms (GUGF "batch"/"normalized", PLOP's reference variant) are refused.
- outside the mechanism and free of privacy cost: terms that do not read the site's data given
  the current weights (`Term.data_independent`): SKA on the server's noise probes, the EWC / MAS
  penalties. Their gradient is computed with Opacus' hooks off and added after the noise
  (post-processing of the private gradient).
- NOT covered: what a site computes from its data outside the training step: EWC/MAS importances
  (refused with dp != "off"), validation scores used to select the best round, and train metrics
  (loss values) reported to the server. docs/privacy.md lists them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ted_fl.config import PrivacyConfig

ACCOUNTANT = "rdp"  # Opacus' RDP accountant (Mironov 2017; the sampled Gaussian of Mironov et al. 2019)


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """sigma such that `steps` sampled Gaussian steps at rate q spend `epsilon` at `delta` (RDP).

    epsilon = inf: 0 (clipping only). Opacus' own search (`get_noise_multiplier`), tolerance 0.01.
    """
    if math.isinf(epsilon):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=float(epsilon), target_delta=float(delta),
                                      sample_rate=float(sample_rate), steps=int(steps), accountant=ACCOUNTANT))


def epsilon_spent(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """epsilon at `delta` of composed (noise multiplier, sample rate, steps) mechanisms, by Opacus' RDP
    accountant; a step without noise (sigma = 0) makes it inf, no step at all makes it 0."""
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=float(delta)))


def client_noise_multiplier(epsilon: float, delta: float, releases: int) -> float:
    """Client-level DP: sigma (Flower's noise_multiplier) for `releases` aggregates of a stage.

    Every client of a stage takes part in every round (no sampling, q = 1), so the stage is the
    `releases`-fold composition of the Gaussian mechanism with sensitivity clip_norm (one client
    added or removed) and std sigma * clip_norm (the sum; Flower divides both by the client count).
    """
    return noise_multiplier_for(epsilon, delta, 1.0, releases)


# ------------------------------------------------------------------------------- DP-SGD plugin
class SampleDP:
    """DP-SGD for one round of one site: Opacus' GradSampleModule, DPOptimizer and Poisson loader.

    Made by `attach` around the plain student and its Adam; `batches` yields the round's Poisson
    batches (index arrays, possibly empty); `train_step(..., dp=self)` runs the forwards as usual,
    `public()` switches the hooks off for data-independent forwards, and `step` does backward,
    clipping, noise and the optimizer step. `close` removes every hook (the worker reuses the student).
    """

    def __init__(self, student: nn.Module, optimizer: torch.optim.Optimizer, n: int, batch_size: int,
                 noise_multiplier: float, max_grad_norm: float, seed: int) -> None:
        from opacus import GradSampleModule
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer

        self.n, self.noise_multiplier, self.max_grad_norm = n, float(noise_multiplier), float(max_grad_norm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' notes on secure RNG and functorch fall-backs
            self.gsm = GradSampleModule(student, batch_first=True, loss_reduction="mean")
        self.student = student
        plain = DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size)
        self.sample_rate = 1.0 / len(plain)  # Opacus' rate for a loader of this batch size
        self.loader = DPDataLoader.from_data_loader(plain, generator=torch.Generator().manual_seed(int(seed)))
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                     max_grad_norm=self.max_grad_norm,
                                     expected_batch_size=max(1, round(n * self.sample_rate)),
                                     loss_reduction="mean",
                                     generator=torch.Generator().manual_seed(int(seed) ^ 0x5EED))
        self.steps = 0

    def batches(self, steps: int) -> Iterator[np.ndarray]:
        """`steps` Poisson batches of indices (each image in with probability q, independently)."""
        done = 0
        while done < steps:
            for (idx,) in self.loader:
                if done == steps:
                    return
                yield idx.numpy()
                done += 1

    @contextlib.contextmanager
    def public(self) -> Iterator[None]:
        """Forwards / backwards whose inputs are not the site's data: no per-sample gradients."""
        self.gsm.disable_hooks()
        try:
            yield
        finally:
            self.gsm.enable_hooks()

    def step(self, private: torch.Tensor | None, public: torch.Tensor | None) -> None:
        """Backward, clip per sample, add noise, add the public terms' gradient, optimizer step."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        g_pub: Sequence[torch.Tensor | None] = [None] * len(params)
        if public is not None and public.requires_grad:
            with self.public():
                g_pub = torch.autograd.grad(public, params, allow_unused=True)
        if private is not None and private.requires_grad:
            with warnings.catch_warnings():  # torch's note that the input images need no gradient
                warnings.simplefilter("ignore", UserWarning)
                private.backward()
        else:  # an empty Poisson batch: no sample, the step is noise only (as the analysis assumes)
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]  # Opacus's
        if self.optimizer.pre_step():  # clip, sum, noise, divide by the expected batch size
            for p, g in zip(params, g_pub, strict=True):
                if g is not None and p.grad is not None:
                    p.grad.add_(g)
            self.optimizer.original_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def history(self) -> list[tuple[float, float, int]]:
        """What the accountant composes for this round: [(sigma, q, steps)]."""
        sigma = float(self.optimizer.noise_multiplier)  # what the optimizer noised with, not the request
        return [(sigma, self.sample_rate, self.steps)] if self.steps else []

    def close(self) -> None:
        self.gsm.remove_hooks()
        for p in self.student.parameters():
            for attr in ("grad_sample", "_current_grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)


def attach(student: nn.Module, optimizer: torch.optim.Optimizer, n: int, batch_size: int,
           noise_multiplier: float, max_grad_norm: float, seed: int) -> SampleDP:
    """Make one round of `student`'s training DP-SGD (see SampleDP)."""
    return SampleDP(student, optimizer, n, batch_size, noise_multiplier, max_grad_norm, seed)


def compatibility_errors(model: nn.Module) -> list[str]:
    """What Opacus cannot compute per-sample gradients through (ModuleValidator), one line each."""
    from opacus.validators import ModuleValidator

    return [str(e).splitlines()[0] for e in ModuleValidator.validate(model, strict=False)]


@dataclass(frozen=True)
class SampleDPArgs:
    """DP-SGD's arguments for one round of one site (what `local_train(dp=...)` takes)."""

    noise_multiplier: float  # sigma: the noise's std over max_grad_norm, calibrated per stage
    max_grad_norm: float  # the per-sample clipping bound (privacy.max_grad_norm)


class SampleDPKeys(Protocol):
    """The privacy keys sample_dp_args reads (a PrivacyConfig, or a round's order)."""

    @property
    def dp(self) -> str: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def max_grad_norm(self) -> float: ...


def sample_dp_args(privacy: SampleDPKeys | PrivacyConfig, n: int, batch_size: int, steps: int,
                   stage_rounds: int) -> SampleDPArgs | None:
    """DP-SGD's arguments for one round of a site (None unless privacy.dp = "sample"): sigma calibrated to
    spend privacy.epsilon over the stage's stage_rounds x steps Poisson steps at q = 1 / ceil(n / batch_size)."""
    if privacy.dp != "sample":
        return None
    q = 1.0 / math.ceil(n / batch_size)
    sigma = noise_multiplier_for(float(privacy.epsilon), float(privacy.delta), q, max(1, stage_rounds) * steps)
    return SampleDPArgs(noise_multiplier=sigma, max_grad_norm=float(privacy.max_grad_norm))


def stage_dp_metrics(dp: SampleDP) -> dict[str, float]:
    """The round's accounting inputs, reported as train metrics (composed by the server per stage)."""
    hist = dp.history()
    if not hist:
        return {}
    sigma, q, steps = hist[0]
    return {"dp_noise_multiplier": sigma, "dp_sample_rate": q, "dp_steps": float(steps)}
