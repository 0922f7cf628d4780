"""Approaches: a few named terms with weights, registered by name. No approach has a loop.

L = sum_k w_k * term_k; distillation terms carry lambda_d * w_<term>; EWC / MAS carry
ewc_lambda / mas_lambda; PLOP's POD carries pod_weight. Parameter-importance baselines keep
an "aux state": a flat dict name -> tensor ("fisher.<param>" or "importance.<param>",
"anchor.<param>", "meta.sites") that a federated layer can ship as arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    term_grads: bool = False  # record each term's gradient-norm ratio at every step (diagnostics.term_grads)
    keeps_first_lr: bool = False  # protocol "reference": the reference's agent trains every site at lr_first (its seq)

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
    def sends_importance(self) -> bool:
        """Whether a site leaves parameter importances computed on its images (EWC, MAS) in the aux state."""
        return bool(self.importance)

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


def estimate_importance(model: nn.Module, split: Split, kind: str, batch_size: int = 4) -> AuxState:
    """Per-parameter importances: the mean over the split's images of a per-image quantity.

    fisher (EWC, Kirkpatrick et al. 2017): (d log p(y|x) / d theta)^2, the diagonal empirical
    Fisher, log p(y|x) = mean over pixels of log softmax(f(x))_y against the labels y;
    importance (MAS, Aljundi et al. 2018): |d ||f(x)||^2 / d theta|, ||f(x)||^2 the squared L2
    norm of the logits over the classes averaged over pixels (label-free). Each image gets its
    own gradient (squares and absolute values do not commute with the mean over a batch).
    Eval mode keeps batch-norm running statistics untouched; gradients are cleared afterwards.
    `batch_size` is unused (kept for callers); images are taken one at a time.
    """
    if len(split) == 0:
        raise TedFlError("cannot estimate parameter importances on an empty split")
    if kind not in ("fisher", "importance"):
        raise TedFlError(f"unknown importance kind '{kind}' (fisher | importance)")
    was_training = model.training
    model.eval()
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    device = next(model.parameters()).device
    for i in range(len(split)):
        x = torch.as_tensor(split.images[i : i + 1], dtype=torch.float32, device=device)
        model.zero_grad(set_to_none=True)
        logits = model(x)
        if kind == "fisher":
            y = torch.as_tensor(split.masks[i : i + 1], dtype=torch.long, device=device)
            loss = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).mean()  # log-likelihood
        else:
            loss = logits.pow(2).sum(dim=1).mean()
        loss.backward()
        for k, p in params.items():
            if p.grad is not None:
                acc[k] += p.grad.detach().pow(2) if kind == "fisher" else p.grad.detach().abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {k: v / len(split) for k, v in acc.items()}


def _distill(cfg: LossConfig, w: float) -> float:
    return cfg.lambda_d * w


def _seg() -> WeightedTerm:
    return WeightedTerm(T.SegLoss(), 1.0)


def _kd(c: LossConfig, reduce: str = "class") -> WeightedTerm:
    return WeightedTerm(T.KD(reduce), _distill(c, c.w_kd))


def _ska(c: LossConfig, reduce: str = "class") -> WeightedTerm:
    return WeightedTerm(T.SKA(reduce), _distill(c, c.w_ska))


def _akt(c: LossConfig, gugf: bool) -> WeightedTerm:
    return WeightedTerm(T.AKT(T.GUGF(c.gugf) if gugf else None), _distill(c, c.w_akt))


def _variant(c: LossConfig) -> str:
    if c.baseline_variant not in T.BASELINE_VARIANTS:
        raise unknown("baseline variant", c.baseline_variant, T.BASELINE_VARIANTS, "loss.baseline_variant")
    return c.baseline_variant


def _no_reference(name: str, c: LossConfig) -> None:
    """EWC and MAS: the reference code's agents crash at the second domain, so no variant runs."""
    if _variant(c) == "reference":
        raise TedFlError(
            f"approach '{name}' has no reference variant: the reference code's {name.upper()} agent "
            "crashes at the second domain (it reads config['unet_only'], which args.py never "
            "defines); set loss.baseline_variant = \"paper\" for it"
        )


def _plop(c: LossConfig) -> list[WeightedTerm]:
    """PLOP as its paper (pseudo-labels; POD only when pod_weight > 0) or the reference's Dice."""
    if _variant(c) == "reference":
        return [_seg(), WeightedTerm(T.PLOPReference(), _distill(c, c.w_plop))]
    out = [_seg(), WeightedTerm(T.PLOPPseudo(c.plop_threshold), _distill(c, c.w_plop))]
    if c.pod_weight > 0:
        out.append(WeightedTerm(T.POD(), c.pod_weight))
    return out


def _ewc(c: LossConfig) -> Approach:
    _no_reference("ewc", c)
    return Approach("ewc", c, [_seg(), WeightedTerm(T.EWC(), c.ewc_lambda)], importance="fisher")


def _mas(c: LossConfig) -> Approach:
    _no_reference("mas", c)
    return Approach("mas", c, [_seg(), WeightedTerm(T.MAS(), c.mas_lambda)], importance="importance")


Builder = Callable[[LossConfig], Approach]

APPROACHES: dict[str, Builder] = {
    "seq": lambda c: Approach("seq", c, [_seg()], keeps_first_lr=True),
    "joint": lambda c: Approach("joint", c, [_seg()], joint=True),
    # kd_reduce = "reference" reproduces the reference's width-axis CE in its kd/ska/akt agents
    # only; its TED agent reduces over the classes, so ted / ted_gugf always do.
    "kd": lambda c: Approach("kd", c, [_seg(), _kd(c, c.kd_reduce)]),
    # the paper's KD arm as the reference code ran it (its KD agent's CE summed over the image
    # width, whatever loss.kd_reduce says): the published KD row; kd is the formula as written
    "kd_ref": lambda c: Approach("kd_ref", c, [_seg(), _kd(c, "reference")]),
    "ska": lambda c: Approach("ska", c, [_seg(), _kd(c, c.kd_reduce), _ska(c, c.kd_reduce)]),
    "akt": lambda c: Approach("akt", c, [_seg(), _kd(c, c.kd_reduce), _akt(c, False)]),
    "akt_gugf": lambda c: Approach("akt_gugf", c, [_seg(), _kd(c, c.kd_reduce), _akt(c, True)]),
    "ted": lambda c: Approach("ted", c, [_seg(), _kd(c), _ska(c), _akt(c, False)]),
    "ted_gugf": lambda c: Approach("ted_gugf", c, [_seg(), _kd(c), _ska(c), _akt(c, True)]),
    "ewc": _ewc,
    "mas": _mas,
    "mib": lambda c: Approach("mib", c, [_seg(), WeightedTerm(T.MiB(_variant(c)), _distill(c, c.w_mib))]),
    "plop": lambda c: Approach("plop", c, _plop(c)),
    "lwf": lambda c: Approach("lwf", c, [_seg(), WeightedTerm(T.LwF(c.temperature), _distill(c, c.w_lwf))]),
}


def get_approach(name: str, loss_cfg: LossConfig | None = None) -> Approach:
    """The approach registered as `name`, its weights taken from `loss_cfg` (defaults if None)."""
    if name not in APPROACHES:
        raise unknown("approach", name, APPROACHES, "approaches")
    return APPROACHES[name](loss_cfg if loss_cfg is not None else LossConfig())
