"""The one weights type that crosses every boundary (executors, Flower records, checkpoints):
a state dict as numpy arrays, and its converters to and from a torch model."""

from __future__ import annotations

import numpy as np
import torch

Weights = dict[str, np.ndarray]


def model_weights(model: torch.nn.Module) -> Weights:
    """The model's state dict as detached numpy copies."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def to_tensors(weights: Weights) -> dict[str, torch.Tensor]:
    """A torch state dict of copies (the arrays may be read-only views of a message)."""
    return {k: torch.from_numpy(np.asarray(v).copy()) for k, v in weights.items()}


def load_weights(model: torch.nn.Module, weights: Weights) -> torch.nn.Module:
    model.load_state_dict(to_tensors(weights))
    return model
