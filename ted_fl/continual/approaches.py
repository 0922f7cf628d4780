"""Approaches: a few named terms with weights, registered by name. No approach has a loop.

L = sum_k w_k * term_k; distillation terms carry lambda_d * w_<term>; EWC / MAS carry
ewc_lambda / mas_lambda; PLOP's POD carries pod_weight. Parameter-importance baselines keep
an "aux state": a flat dict name -> tensor ("fisher.<param>" or "importance.<param>",
"anchor.<param>", "meta.sites") that a federated layer can ship as arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ted_fl.config import LossConfig, TrainConfig
from ted_fl.continual import terms as T
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError, unknown

AuxState = dict[str, torch.Tensor]


@dataclass
class WeightedTerm:
    term: T.Term
    weight: float

    @property
    def name(self) -> str:
        return self.term.name


@dataclass
class Approach:
    """What an approach is: its terms and weights, and what the trainer must provide."""

    name: str
    loss_cfg: LossConfig
    terms: list[WeightedTerm]
    joint: bool = False  # the runner trains on the union of the sites seen so far
    importance: str = ""  # "" | "fisher" (EWC) | "importance" (MAS)

    @property
    def needs_teacher(self) -> bool:
        return any(t.term.needs_teacher for t in self.terms)

    @property
    def needs_probes(self) -> bool:
        return any(t.term.needs_probes for t in self.terms)

    @property
    def needs_features(self) -> bool:
        return any(t.term.needs_features for t in self.terms)

    @property
    def uses_gugf(self) -> bool:
        return any(isinstance(t.term, T.AKT) and t.term.gugf is not None for t in self.terms)

    @property
    def term_names(self) -> list[str]:
        return [t.name for t in self.terms]

    def end_of_site(self, model: nn.Module, split: Split, cfg: TrainConfig | None = None) -> AuxState:
        """Importances on the site just finished plus a copy of the parameters; {} if not needed."""
        if not self.importance:
            return {}
        batch_size = cfg.batch_size if cfg is not None else 4
        imp = estimate_importance(model, split, self.importance, batch_size)
        out: AuxState = {f"{self.importance}.{k}": v for k, v in imp.items()}
        out.update({f"anchor.{k}": p.detach().clone() for k, p in model.named_parameters()})
        out["meta.sites"] = torch.tensor(1.0)
        return out

    def merge_state(self, old: AuxState | None, new: AuxState) -> AuxState:
        """Running mean of the importances over the sites (weighted by site count); newest anchor."""
        if not old:
            return {k: v.clone() for k, v in new.items()}
        if not new:
            return {k: v.clone() for k, v in old.items()}
        n_old = float(old.get("meta.sites", torch.tensor(1.0)))
        n_new = float(new.get("meta.sites", torch.tensor(1.0)))
        out: AuxState = {}
        for k, v in new.items():
            if k.startswith(f"{self.importance}.") and k in old:
                out[k] = (old[k] * n_old + v * n_new) / (n_old + n_new)
            else:
                out[k] = v.clone()
        out["meta.sites"] = torch.tensor(n_old + n_new)
        return out


def _batches(n: int, batch_size: int) -> list[np.ndarray]:
    idx = np.arange(n)
    return [idx[i : i + batch_size] for i in range(0, n, batch_size)]


def estimate_importance(model: nn.Module, split: Split, kind: str, batch_size: int = 4) -> AuxState:
    """Per-parameter importances averaged over the split's batches (in order, eval mode).

    fisher: squared gradient of L_seg against the labels (diagonal empirical Fisher, per batch);
    importance (MAS): |gradient of mean(logits^2)| (squared L2 norm of the output, label-free).
    Eval mode keeps batch-norm running statistics untouched; gradients are cleared afterwards.
    """
    if len(split) == 0:
        raise TedFlError("cannot estimate parameter importances on an empty split")
    was_training = model.training
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    device = next(model.parameters()).device
    seg = T.SegLoss()
    batches = _batches(len(split), batch_size)
    for idx in batches:
        x = torch.as_tensor(split.images[idx], dtype=torch.float32, device=device)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        if kind == "fisher":
            y = torch.as_tensor(split.masks[idx], device=device)
            loss = seg(T.probabilities(logits), T.one_hot(y, logits.shape[1]))
        else:
            loss = logits.pow(2).mean()
        loss.backward()
        for k, p in params.items():
            if p.grad is not None:
                acc[k] += p.grad.detach().pow(2) if kind == "fisher" else p.grad.detach().abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {k: v / len(batches) for k, v in acc.items()}


def _distill(cfg: LossConfig, w: float) -> float:
    return cfg.lambda_d * w


def _seg() -> WeightedTerm:
    return WeightedTerm(T.SegLoss(), 1.0)


def _kd(c: LossConfig) -> WeightedTerm:
    return WeightedTerm(T.KD(), _distill(c, c.w_kd))


def _ska(c: LossConfig) -> WeightedTerm:
    return WeightedTerm(T.SKA(), _distill(c, c.w_ska))


def _akt(c: LossConfig, gugf: bool) -> WeightedTerm:
    return WeightedTerm(T.AKT(T.GUGF(c.gugf) if gugf else None), _distill(c, c.w_akt))


def _plop(c: LossConfig) -> list[WeightedTerm]:
    out = [_seg(), WeightedTerm(T.PLOPPseudo(c.plop_threshold), _distill(c, c.w_plop))]
    if c.pod_weight > 0:
        out.append(WeightedTerm(T.POD(), c.pod_weight))
    return out


Builder = Callable[[LossConfig], Approach]

APPROACHES: dict[str, Builder] = {
    "seq": lambda c: Approach("seq", c, [_seg()]),
    "joint": lambda c: Approach("joint", c, [_seg()], joint=True),
    "kd": lambda c: Approach("kd", c, [_seg(), _kd(c)]),
    "ska": lambda c: Approach("ska", c, [_seg(), _kd(c), _ska(c)]),
    "akt": lambda c: Approach("akt", c, [_seg(), _kd(c), _akt(c, False)]),
    "akt_gugf": lambda c: Approach("akt_gugf", c, [_seg(), _kd(c), _akt(c, True)]),
    "ted": lambda c: Approach("ted", c, [_seg(), _kd(c), _ska(c), _akt(c, False)]),
    "ted_gugf": lambda c: Approach("ted_gugf", c, [_seg(), _kd(c), _ska(c), _akt(c, True)]),
    "ewc": lambda c: Approach("ewc", c, [_seg(), WeightedTerm(T.EWC(), c.ewc_lambda)], importance="fisher"),
    "mas": lambda c: Approach(
        "mas", c, [_seg(), WeightedTerm(T.MAS(), c.mas_lambda)], importance="importance"
    ),
    "mib": lambda c: Approach("mib", c, [_seg(), WeightedTerm(T.MiB(), _distill(c, c.w_mib))]),
    "plop": lambda c: Approach("plop", c, _plop(c)),
    "lwf": lambda c: Approach("lwf", c, [_seg(), WeightedTerm(T.LwF(c.temperature), _distill(c, c.w_lwf))]),
}


def get_approach(name: str, loss_cfg: LossConfig | None = None) -> Approach:
    """The approach registered as `name`, its weights taken from `loss_cfg` (defaults if None)."""
    if name not in APPROACHES:
        raise unknown("approach", name, APPROACHES, "approaches")
    return APPROACHES[name](loss_cfg if loss_cfg is not None else LossConfig())
