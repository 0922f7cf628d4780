"""Segmentation networks by name (`model.name`), each with its intermediate features reachable.

Every network is an `nn.Module` whose `forward(x)` returns logits (B, out_channels, H, W) and whose
`forward_features(x)` returns `(logits, {name: feature})` from the same pass (PLOP's POD,
distillation of features, analysis). A new network is one builder registered with
`@register_network("name")`; `build_model(cfg)` looks `cfg.name` up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast, runtime_checkable

import torch
from monai.networks.nets import UNet
from torch import nn

from ted_fl.config import ModelConfig, Norm, choices
from ted_fl.continual.reference_unet import ReferenceUNet
from ted_fl.errors import TedFlError, unknown

NORMS = choices(Norm)  # the schema owns the allowed values


@runtime_checkable
class FeatureNetwork(Protocol):
    """A network whose intermediate features are reachable (every registered network is one)."""

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def _norm_arg(cfg: ModelConfig) -> str | tuple:
    """MONAI's norm argument; group norm uses up to 8 groups dividing every level's width."""
    if cfg.norm not in NORMS:
        raise unknown("normalisation", cfg.norm, NORMS, "model.norm")
    if cfg.norm == "group":
        groups = 8
        while groups > 1 and any(c % groups for c in cfg.channels):
            groups //= 2
        return ("group", {"num_groups": groups})
    if cfg.norm == "instance":
        return ("instance", {"affine": True})
    return "batch"


class SegNet(nn.Module):
    """A MONAI UNet whose encoder, bottleneck and decoder outputs can be read in one pass.

    `forward` returns logits only, so the model is a drop-in UNet; `forward_features` also
    returns the features, recorded by forward hooks that live only during that call (the
    module stays picklable and deep-copyable, as the teacher copy and Ray need).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if len(cfg.channels) < 2 or len(cfg.strides) != len(cfg.channels) - 1:
            raise TedFlError(
                f"model.channels needs >= 2 levels and model.strides one fewer entry; "
                f"got channels={list(cfg.channels)} strides={list(cfg.strides)}"
            )
        self.unet = UNet(
            spatial_dims=2,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels or 2,  # 0 (not resolved against a site set): binary
            channels=tuple(cfg.channels),
            strides=tuple(cfg.strides),
            num_res_units=cfg.num_res_units,
            norm=_norm_arg(cfg),
            dropout=cfg.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)

    def feature_modules(self) -> dict[str, nn.Module]:
        """Named feature points: enc0..encK (down blocks), bottleneck, decoder (input of the head)."""
        out: dict[str, nn.Module] = {}
        seq = cast(nn.Sequential, self.unet.model)
        out["decoder"] = seq[1]  # skip connection at full level: concat of enc0 and the decoded map
        level = 0
        while True:
            out[f"enc{level}"] = seq[0]
            inner = seq[1].submodule
            if isinstance(inner, nn.Sequential) and len(inner) == 3:
                seq, level = inner, level + 1
                continue
            out["bottleneck"] = cast(nn.Module, inner)
            return out

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits plus {"enc0", ..., "bottleneck", "decoder"} features of the same pass."""
        return record_features(self.feature_modules(), lambda: self.unet(x))


def record_features(modules: dict[str, nn.Module],
                    forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`forward()`'s logits and the outputs of the named `modules` in that same pass, recorded by
    forward hooks that live for this one call (every network's `forward_features`)."""
    feats: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in modules.items():

        def hook(_m: nn.Module, _i: tuple, o: torch.Tensor, name: str = name) -> None:
            feats[name] = o

        handles.append(mod.register_forward_hook(hook))
    try:
        logits = forward()
    finally:
        for h in handles:
            h.remove()
    return logits, feats


NETWORKS: dict[str, Callable[[ModelConfig], nn.Module]] = {}


def register_network(name: str) -> Callable[[Callable[[ModelConfig], nn.Module]], Callable[[ModelConfig], nn.Module]]:
    """Register a builder `ModelConfig -> nn.Module` under `model.name = name`."""

    def wrap(builder: Callable[[ModelConfig], nn.Module]) -> Callable[[ModelConfig], nn.Module]:
        if name in NETWORKS:
            raise ValueError(f"network '{name}' registered twice")
        NETWORKS[name] = builder
        return builder

    return wrap


@register_network("monai_unet")
def _monai_unet(cfg: ModelConfig) -> nn.Module:
    return SegNet(cfg)


def build_model(cfg: ModelConfig) -> nn.Module:
    """The segmentation network named by `cfg.name` (default: the MONAI UNet)."""
    if cfg.name not in NETWORKS:
        raise unknown("network", cfg.name, sorted(NETWORKS), "model.name")
    return NETWORKS[cfg.name](cfg)


def tiny_model_config(norm: Norm = "batch") -> ModelConfig:
    """A three-level 4-8-16 U-Net: fast enough for unit tests on 32 px images."""
    return ModelConfig(channels=[4, 8, 16], strides=[2, 2], norm=norm)


def features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`forward_features` when the network has it; a plain module gives its logits and no features."""
    if isinstance(model, FeatureNetwork):
        return model.forward_features(x)
    return model(x), {}


@register_network("reference_unet")
def _reference_unet(cfg: ModelConfig) -> nn.Module:
    return ReferenceUNet(cfg)
