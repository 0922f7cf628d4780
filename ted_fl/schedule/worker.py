"""What a site does to a model: train a round, evaluate a split, compute importances.

Plain PyTorch over the continual core, with no Flower in it: the centralized executor calls it
in-process and the Flower ClientApp calls it inside a Ray actor, so both do the same arithmetic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ted_fl.config import ExperimentConfig
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.combined import load_fixed_teacher, with_fixed_teacher
from ted_fl.continual.device import gpu_setup
from ted_fl.continual.evaluation import Labels, eval_options, evaluate
from ted_fl.continual.networks import build_model
from ted_fl.continual.probes import make_probes
from ted_fl.continual.strategies import with_proximal
from ted_fl.continual.training import local_train, set_determinism
from ted_fl.continual.weights import Weights, to_tensors
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError
from ted_fl.privacy.mechanisms import sample_dp_args
from ted_fl.privacy.mia import attack
from ted_fl.schedule.orders import DPOrder, SiteOrder

# Timing keys a client adds to its round's metrics: the wall and CPU (this thread's) seconds of its
# own work (train_round: load, steps, validation). The schedule moves them to its "time" rows, where
# the simulator's per-round overhead is read as round_s - work_s (see `python -m ted_fl.bench gpu`).
WORK_KEYS = ("work_s", "work_cpu_s")


@dataclass
class RoundOutput:
    weights: Weights
    num_examples: int
    metrics: dict[str, float]
    val: dict[str, float] | None
    optimizer_state: dict[str, Any]


class SiteWorker:
    """Holds one student and one teacher module and reuses them across rounds."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        set_determinism(0, cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        self.student = build_model(cfg.model).to(self.device)
        self.teacher = build_model(cfg.model).to(self.device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._teacher_key: Any = None
        self._fixed: tuple[str, torch.nn.Module] | None = None  # gkd.fixed_teacher, loaded once
        self.trace: dict[str, Any] = {}  # what the last round's steps used (local_train's trace)

    def fixed_teacher(self) -> torch.nn.Module | None:
        """The fixed large teacher of the continual combination (gkd.fixed_teacher), if configured."""
        path = self.cfg.gkd.fixed_teacher
        if not path:
            return None
        if self._fixed is None or self._fixed[0] != path:
            self._fixed = (path, load_fixed_teacher(path).to(self.device))
        return self._fixed[1]

    def set_teacher(self, key: Any, weights: Weights | None) -> torch.nn.Module | None:
        """Load the teacher once per stage (`key` identifies it), not once per round."""
        if weights is None:
            return None
        if key != self._teacher_key:
            self.teacher.load_state_dict(to_tensors(weights))
            self._teacher_key = key
        return self.teacher

    def run(self, order: SiteOrder, *, data: Split, weights: Weights, teacher: Weights | None = None,
            teacher_id: Any = None, aux: dict[str, np.ndarray] | None = None,
            optimizer_state: dict[str, Any] | None = None, val: Split | None = None, per_volume: bool = False,
            labels: Labels | None = None, probes: torch.Tensor | None = None) -> RoundOutput:
        """Carry out one site's order (ted_fl.schedule.orders) on its training data `data` (its share, or the
        replay buffer the order names). What the order names but the site does not have in hand comes
        from its seeds: the probes (unless their pixels travelled) and the training seed. `teacher_id`
        identifies the loaded teacher (default: the order's key); `val` is used when the order validates."""
        teacher_mod = (self.set_teacher(teacher_id if teacher_id is not None else order.teacher.key, teacher)
                       if order.teacher.held else None)
        if probes is None and order.probes.source != "none":
            probes = probes_for(self.cfg, order.probes.seed, order.probes.count, order.probes.shape)
        return self.train_round(
            approach=order.approach, data=data, weights=weights, teacher=teacher_mod, aux=aux or {},
            steps=order.steps, lr=order.lr, seed=order.train_seed, probes=probes,
            optimizer_state=optimizer_state, val=val if order.validate else None, per_volume=per_volume,
            labels=labels, stage_rounds=order.stage_rounds, dp=order.dp,
        )

    def train_round(
        self,
        *,
        approach: str,
        data: Split,
        weights: Weights,
        teacher: torch.nn.Module | None,
        aux: dict[str, np.ndarray],
        steps: int,
        lr: float,
        seed: int,
        probes: torch.Tensor | None,
        optimizer_state: dict[str, Any] | None,
        val: Split | None,
        per_volume: bool,
        labels: Labels | None = None,
        stage_rounds: int = 1,
        dp: DPOrder | None = None,
    ) -> RoundOutput:
        """One round of local training (`stage_rounds`: the stage's rounds, for DP-SGD's calibration;
        `dp`: the order's DP, else privacy's keys)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        appr = get_approach(approach, self.cfg.loss)
        appr.term_grads = self.cfg.diagnostics.term_grads  # per-step gradient ratios into the round's metrics
        fixed = self.fixed_teacher()
        if fixed is not None:
            appr = with_fixed_teacher(appr, fixed, self.cfg.gkd.fixed_term, self.cfg.gkd.w_fixed)
        self.student.load_state_dict(to_tensors(weights))
        gpu_setup(self.student, self.device, self.cfg.train.cudnn_benchmark)
        gpu_setup(self.teacher, self.device, self.cfg.train.cudnn_benchmark)
        appr = with_proximal(appr, self.student, self.cfg.federated)  # fedprox: mu/2 ||w - w_global||^2
        sgd_steps = steps or math.ceil(len(data) / self.cfg.train.batch_size)
        sgd_args = (dp.sgd_args(len(data), self.cfg.train.batch_size, sgd_steps, stage_rounds) if dp is not None else
                    sample_dp_args(self.cfg.privacy, len(data), self.cfg.train.batch_size, sgd_steps, stage_rounds))
        metrics, opt_state = local_train(
            self.student, teacher, appr, data,
            steps=steps, batch_size=self.cfg.train.batch_size, lr=lr,
            optimizer_state=optimizer_state, seed=seed, probes=probes,
            aux={k: torch.from_numpy(np.asarray(v)).to(self.device) for k, v in aux.items()} or None,
            loss_cfg=self.cfg.loss, amp=self.cfg.train.amp, compile=self.cfg.train.compile, trace=self.trace,
            dp=sgd_args,
        )
        out = {k: v.detach().cpu().numpy().copy() for k, v in self.student.state_dict().items()}
        scores = (evaluate(self.student, val, per_volume=per_volume, labels=labels, **eval_options(self.cfg))
                  if val is not None else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics = {**metrics, "work_s": time.perf_counter() - t0, "work_cpu_s": time.thread_time() - c0}
        return RoundOutput(out, len(data), metrics, scores, opt_state)

    def evaluate(self, weights: Weights, split: Split, per_volume: bool,
                 labels: Labels | None = None) -> dict[str, float]:
        """Scores of `weights` on `split`, per evaluation label and their mean (see evaluation.score)."""
        self.student.load_state_dict(to_tensors(weights))
        return evaluate(self.student, split, per_volume=per_volume, labels=labels, **eval_options(self.cfg))

    def leakage(self, weights: Weights, reference: Weights, members: Split, nonmembers: Split,
                seed: int) -> dict[str, float]:
        """Membership-inference scores of `weights` on one site (ted_fl.privacy.mia.attack);
        the reference model is loaded into the teacher's module (forgotten: the next stage reloads)."""
        self.student.load_state_dict(to_tensors(weights))
        self.teacher.load_state_dict(to_tensors(reference))
        self._teacher_key = None
        opts = eval_options(self.cfg)
        return attack(self.student, members, nonmembers, seed, reference=self.teacher,
                      bn=opts["bn"], batch_size=opts["batch_size"], slices=opts["slices"])

    def importance(self, approach: str, weights: Weights, split: Split) -> dict[str, np.ndarray]:
        appr = get_approach(approach, self.cfg.loss)
        self.student.load_state_dict(to_tensors(weights))
        state = appr.end_of_site(self.student, split, self.cfg.train)
        return {k: v.detach().cpu().numpy() for k, v in state.items()}


def pick_device(name: str) -> torch.device:
    """'auto' takes a GPU when one is visible (Ray hides GPUs from clients given num_gpus = 0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise TedFlError("train.device = 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def probes_for(cfg: ExperimentConfig, seed: int | None, count: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Regenerate the server's SKA probes from their seed (identical tensors to the server's)."""
    if seed is None or count == 0:
        return None
    return make_probes(seed, count, tuple(shape), cfg.loss)
