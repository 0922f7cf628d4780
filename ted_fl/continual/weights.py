"""The one weights type that crosses every boundary (executors, Flower records, checkpoints):
a state dict as numpy arrays, and its converters to and from a torch model."""

from __future__ import annotations

import numpy as np
import torch

Weights = dict[str, np.ndarray]


COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper puts in front of its module's keys


def plain_key(key: str) -> str:
    """A state-dict key without torch.compile's `_orig_mod.` prefix (train.compile never exposes the
    wrapper, so ted-fl writes none; a state dict taken from a compiled module elsewhere still loads)."""
    return key.replace(COMPILED_PREFIX, "")


def model_weights(model: torch.nn.Module) -> Weights:
    """The model's state dict as detached numpy copies, keyed as the plain module's."""
    return {plain_key(k): v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def to_tensors(weights: Weights) -> dict[str, torch.Tensor]:
    """A torch state dict of copies (the arrays may be read-only views of a message), plain keys."""
    return {plain_key(k): torch.from_numpy(np.asarray(v).copy()) for k, v in weights.items()}


def load_weights(model: torch.nn.Module, weights: Weights) -> torch.nn.Module:
    model.load_state_dict(to_tensors(weights))
    return model
