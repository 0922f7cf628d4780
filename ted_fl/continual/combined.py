"""The two seeds in one step (GKD spec 5, "continual combination"): while sites arrive, a FIXED large
teacher (trained once, e.g. by `python -m ted_fl.generalize`) distils into the lightweight student,
and the previous student still acts as the continual approach's teacher (TED's KD/SKA/AKT...).

    L = L_approach(student, previous student) + w_fixed * L_fixed(student, fixed teacher)

L_fixed is pixel KD (CE(p, q_fixed)), AT, or SKD (KD + pair-wise affinity) on the step's images,
the fixed teacher in eval mode under no_grad. Configured by gkd.fixed_teacher (a checkpoint holding
{"name", "channels", "in_channels", "weights"}), gkd.fixed_term and gkd.w_fixed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ted_fl.config import FixedTerm, ModelConfig, choices
from ted_fl.continual import gkd as G
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import Approach, WeightedTerm
from ted_fl.continual.networks import build_model, features
from ted_fl.errors import TedFlError, unknown

FIXED_TERMS = choices(FixedTerm)  # the schema owns the allowed values


def load_fixed_teacher(path: str | Path) -> nn.Module:
    """The frozen large teacher saved by `generalize` (checkpoints/teacher-seed<N>/teacher.pt)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TedFlError(f"fixed teacher checkpoint '{p}' not found; set gkd.fixed_teacher to a teacher.pt "
                         "written by python -m ted_fl.generalize (run/checkpoints/teacher-seed<N>/teacher.pt)")
    ck = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or not {"name", "weights"} <= set(ck):
        raise TedFlError(f"{p}: not a teacher checkpoint (needs 'name' and 'weights'); use generalize's teacher.pt")
    channels = list(ck.get("channels") or [])
    kw: dict[str, Any] = {"channels": channels, "strides": [2] * (len(channels) - 1)} if channels else {}
    model = build_model(ModelConfig(name=str(ck["name"]), in_channels=int(ck.get("in_channels", 1)),
                                    out_channels=int(ck.get("out_channels", 2)), **kw))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in ck["weights"].items()})
    for q in model.parameters():
        q.requires_grad_(False)
    return model.eval()


class FixedTeacherDistill(T.Term):
    """w * L_fixed with L_fixed = CE(p, q_fixed) (kd), AT on {bottleneck, decoder} (at), or
    CE(p, q_fixed) + pair-wise affinity of the bottlenecks (skd); q_fixed from the fixed teacher."""

    needs_features = False
    own_teacher = True  # the step need not have a (previous-student) teacher for this term

    def __init__(self, teacher: nn.Module, kind: str = "kd") -> None:
        if kind not in FIXED_TERMS:
            raise unknown("fixed-teacher term", kind, FIXED_TERMS, "gkd.fixed_term")
        self.teacher, self.kind = teacher, kind
        self.name = f"fixed_{kind}"
        self.needs_features = kind in ("at", "skd")

    def compute(self, s: T.StepInputs) -> torch.Tensor | None:
        if s.images is None:
            return None
        self.teacher.eval()
        with torch.no_grad():
            t_logits, t_feats = features(self.teacher, s.images) if self.needs_features else (self.teacher(s.images), {})
        view = T.StepInputs(logits=s.logits, p=s.p, masks=s.masks, model=s.model, feats=s.feats,
                            teacher_feats=t_feats, q=T.probabilities(t_logits))
        if self.kind == "at":
            return G.AttentionTransfer().compute(view)
        kd = T.KD().compute(view)
        if self.kind == "kd" or kd is None:
            return kd
        pair = G.PairwiseAffinity().compute(view)
        return kd if pair is None else kd + pair


def with_fixed_teacher(approach: Approach, teacher: nn.Module | None, kind: str, weight: float) -> Approach:
    """`approach` plus the fixed teacher's term (unchanged when there is no fixed teacher)."""
    if teacher is None or weight == 0:
        return approach
    terms = [*approach.terms, WeightedTerm(FixedTeacherDistill(teacher, kind), weight)]
    return dataclasses.replace(approach, terms=terms)
