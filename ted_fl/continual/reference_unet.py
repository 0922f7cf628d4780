"""The reference code's 2-D U-Net (TED_DCMIS `mp/models/segmentation/unet_fepegar.py`, `UNet2D`).

Registered as `model.name = "reference_unet"`. Structure, as the reference builds it at the
paper's settings (`UNet2D((1, 192, 192), 2)`: 5 encoding blocks, 16 channels first,
batch norm, no pre-activation, padding, max pooling, transposed-convolution upsampling):

- encoder level k (channels c_k = 16, 32, 64, 128): conv3x3 -> norm -> ReLU, conv3x3 -> norm ->
  ReLU, then 2x2 max pooling; the *first* conv of level 0 has no normalisation;
- bottom block (c = 256): the same two convs, no pooling;
- decoder level k (deepest first): ConvTranspose2d(c_{k+1}, c_{k+1}, 2, stride 2), concat with
  the skip (c_k channels) in front, conv3x3 (c_k + c_{k+1} -> c_k) -> norm -> ReLU,
  conv3x3 (c_k -> c_k) -> norm -> ReLU;
- head: a 1x1 convolution to the classes, no normalisation or activation.

`model.channels` gives c_0..c_K (the last one is the bottom block), so the default
[16, 32, 64, 128, 256] is the reference network; `model.strides` and `model.num_res_units`
do not apply (pooling is always 2x2). `model.norm` picks batch (reference) / instance / group.

Parameter count: 2,313,906 at the paper's settings (1 input channel, 2 classes). Counted by
running the reference's own `unet_fepegar.py` and `model_utils.py` (taken verbatim from the
mirror, with `SegmentationModel` reduced to a plain `nn.Module` and the `torchsummary` import
dropped, neither of which holds parameters) as `UNet2D((1, 192, 192), 2, dropout=0,
monte_carlo_dropout=0, preactivation=False)` (how `get.py`/`mp/models/model.py` build it with
args.py's defaults) and summing `p.numel()` over `parameters()`; see docs/protocol.md.
"""

from __future__ import annotations

import torch
from torch import nn

from ted_fl.config import ModelConfig, Norm, choices
from ted_fl.errors import TedFlError, unknown

REFERENCE_PARAMETERS = 2_313_906  # the reference UNet2D((1, 192, 192), 2), counted as above
NORMS = choices(Norm)  # the schema owns the allowed values


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    groups = 8
    while groups > 1 and channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def conv_block(c_in: int, c_out: int, norm: str | None, dropout: float) -> nn.Sequential:
    """conv3x3 (padding 1) -> [norm] -> ReLU [-> Dropout2d]: the reference's ConvolutionalBlock."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1)]
    if norm is not None:
        layers.append(_norm(norm, c_out))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class DecodingBlock(nn.Module):
    """Upsample (transposed conv), concat [skip, upsampled], two conv blocks."""

    def __init__(self, c_skip: int, c_below: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(c_below, c_below, kernel_size=2, stride=2)
        self.conv1 = conv_block(c_skip + c_below, c_skip, norm, dropout)
        self.conv2 = conv_block(c_skip, c_skip, norm, dropout)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        return self.conv2(self.conv1(torch.cat((skip, x), dim=1)))


class ReferenceUNet(nn.Module):
    """The fepegar 2-D U-Net of the reference code; `forward_features` exposes its levels."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.norm not in NORMS:
            raise unknown("normalisation", cfg.norm, NORMS, "model.norm")
        ch = list(cfg.channels)
        if len(ch) < 2:
            raise TedFlError(f"model.channels needs >= 2 levels for reference_unet; got {ch}")
        self.encoder = nn.ModuleList()
        c_in = cfg.in_channels
        for k, c in enumerate(ch[:-1]):
            first_norm = None if k == 0 else cfg.norm  # the reference's first conv has no norm
            self.encoder.append(
                nn.Sequential(conv_block(c_in, c, first_norm, cfg.dropout), conv_block(c, c, cfg.norm, cfg.dropout))
            )
            c_in = c
        self.pool = nn.MaxPool2d(2)
        self.bottom = nn.Sequential(
            conv_block(c_in, ch[-1], cfg.norm, cfg.dropout), conv_block(ch[-1], ch[-1], cfg.norm, cfg.dropout)
        )
        self.decoder = nn.ModuleList(
            DecodingBlock(ch[k], ch[k + 1], cfg.norm, cfg.dropout) for k in reversed(range(len(ch) - 1))
        )
        self.classifier = nn.Conv2d(ch[0], cfg.out_channels, kernel_size=1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits plus {"enc0", ..., "bottleneck", "decoder"} (the head's input) of one pass."""
        feats: dict[str, torch.Tensor] = {}
        skips = []
        for k, block in enumerate(self.encoder):
            x = block(x)
            feats[f"enc{k}"] = x
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        feats["bottleneck"] = x
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            x = block(skip, x)
        feats["decoder"] = x
        return self.classifier(x), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
