"""Teachers and lightweight students for generalizable distillation (docs: gkd-method.md 1).

Every network here is registered in `networks.NETWORKS` and has the same three handles:
- `forward(x)` -> logits (B, out_channels, H, W);
- `forward_features(x)` -> (logits, {"bottleneck": f, "decoder": last map before the head, ...});
- `bottleneck_module()` -> the module whose output is the bottleneck f. A forward hook that
  returns a tensor replaces f for one forward (DICD's header exchange, see `gkd.swap_bottleneck`);
  each decoder keeps its own skips.

Teachers: "basic_unet" (MONAI BasicUNet, the spec's 64..1024 features unless model.channels has 6
entries). Students: "mobilenetv2_unet" (the authors' main student, built from torch blocks because
torchvision does not import beside the CPU torch here), "small_unet" (MONAI UNet 8-16-32-64),
"flexible_unet_b0" (MONAI FlexibleUNet, EfficientNet-B0 encoder, pretrained=False: no download),
"erfnet" (Romera et al. 2018, as in the authors' repository).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, FlexibleUNet
from torch import nn

from ted_fl.config import ModelConfig
from ted_fl.continual.networks import SegNet, record_features, register_network

BASIC_UNET_FEATURES = (64, 128, 256, 512, 1024, 64)  # spec 1: BasicUNet(2, 1, 2, features=...)
SMALL_UNET_CHANNELS = [8, 16, 32, 64]


class HookedFeatures(nn.Module):
    """Mixin: `forward_features` records `feature_modules()` outputs with hooks that live one call."""

    def feature_modules(self) -> dict[str, nn.Module]:  # pragma: no cover - interface
        raise NotImplementedError

    def bottleneck_module(self) -> nn.Module:
        return self.feature_modules()["bottleneck"]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return record_features(self.feature_modules(), lambda: self(x))


# ----------------------------------------------------------------------------- teacher
class BasicUNetTeacher(HookedFeatures):
    """MONAI BasicUNet; bottleneck = `down_4` (H/16, features[4] channels)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        feats = tuple(cfg.channels) if len(cfg.channels) == 6 else BASIC_UNET_FEATURES
        self.net = BasicUNet(spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                             features=feats, norm=("batch", {"affine": True}), dropout=cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def feature_modules(self) -> dict[str, nn.Module]:
        n = self.net
        return {"enc0": n.conv_0, "enc1": n.down_1, "enc2": n.down_2, "enc3": n.down_3,
                "bottleneck": n.down_4, "decoder": n.upcat_1}


# ------------------------------------------------------------------- MobileNetV2-UNet
def conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(True))


def conv_1x1_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(True))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (t), 3x3 depthwise (stride), 1x1 project; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(True), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expansion t, channels c, repeats n, first stride s): Sandler et al. 2018, Table 2.
MOBILENETV2_TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenetv2_features(in_channels: int) -> list[nn.Module]:
    """The 19 feature layers of torchvision's MobileNetV2 (width 1.0), on `in_channels` inputs."""
    layers: list[nn.Module] = [conv_bn(in_channels, 32, 2)]
    cin = 32
    for t, c, n, s in MOBILENETV2_TABLE:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(conv_1x1_bn(cin, 1280))
    return layers


class MobileNetV2UNet(HookedFeatures):
    """The authors' MobileNetV2_unet (GKD-Framework networks/): encoder skips at H/2 (16 ch), H/4 (24),
    H/8 (32), H/16 (96); bottleneck = the 1280-channel 1x1 conv output at H/32; decoder of transposed
    convs and inverted residuals on the concatenated skips. Input sides must be multiples of 32.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        f = mobilenetv2_features(cfg.in_channels)
        self.enc1, self.enc2, self.enc3 = nn.Sequential(*f[0:2]), nn.Sequential(*f[2:4]), nn.Sequential(*f[4:7])
        self.enc4, self.bottleneck = nn.Sequential(*f[7:14]), nn.Sequential(*f[14:19])
        self.dconv1, self.invres1 = nn.ConvTranspose2d(1280, 96, 4, 2, 1), InvertedResidual(192, 96, 1, 6)
        self.dconv2, self.invres2 = nn.ConvTranspose2d(96, 32, 4, 2, 1), InvertedResidual(64, 32, 1, 6)
        self.dconv3, self.invres3 = nn.ConvTranspose2d(32, 24, 4, 2, 1), InvertedResidual(48, 24, 1, 6)
        self.dconv4, self.invres4 = nn.ConvTranspose2d(24, 16, 4, 2, 1), InvertedResidual(32, 16, 1, 6)
        self.dconv5 = nn.ConvTranspose2d(16, 16, 4, 2, 1)
        self.head = nn.Conv2d(16, cfg.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.enc1(x)
        x2 = self.enc2(x1)
        x3 = self.enc3(x2)
        x4 = self.enc4(x3)
        x5 = self.bottleneck(x4)
        u = self.invres1(torch.cat([x4, self.dconv1(x5)], 1))
        u = self.invres2(torch.cat([x3, self.dconv2(u)], 1))
        u = self.invres3(torch.cat([x2, self.dconv3(u)], 1))
        u = self.invres4(torch.cat([x1, self.dconv4(u)], 1))
        return self.head(self.dconv5(u))

    def feature_modules(self) -> dict[str, nn.Module]:
        return {"enc1": self.enc1, "enc2": self.enc2, "enc3": self.enc3, "enc4": self.enc4,
                "bottleneck": self.bottleneck, "decoder": self.dconv5}


# ------------------------------------------------------------------ small MONAI UNet
class SmallUNet(SegNet):
    """The spec's small student: MONAI UNet(channels=(8, 16, 32, 64), strides=(2, 2, 2))."""

    def __init__(self, cfg: ModelConfig) -> None:
        small = ModelConfig(name=cfg.name, channels=list(SMALL_UNET_CHANNELS), strides=[2, 2, 2],
                            num_res_units=cfg.num_res_units, norm=cfg.norm, dropout=cfg.dropout,
                            in_channels=cfg.in_channels, out_channels=cfg.out_channels)
        super().__init__(small)

    def bottleneck_module(self) -> nn.Module:
        return self.feature_modules()["bottleneck"]


# ----------------------------------------------------------------- FlexibleUNet (B0)
class FlexibleUNetB0(HookedFeatures):
    """MONAI FlexibleUNet with an EfficientNet-B0 encoder (no pretrained weights: nothing downloads).

    The encoder's deepest map (320 ch at H/32) goes through `neck`, an identity module, so that it
    can be read and replaced like every other network's bottleneck. Sides must be multiples of 32.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = FlexibleUNet(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                backbone="efficientnet-b0", pretrained=False, spatial_dims=2)
        self.neck = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = list(self.net.encoder(x))
        feats[-1] = self.neck(feats[-1])
        return self.net.segmentation_head(self.net.decoder(feats, self.net.skip_connect))

    def feature_modules(self) -> dict[str, nn.Module]:
        return {"bottleneck": self.neck, "decoder": self.net.decoder}


# -------------------------------------------------------------------------- ERFNet
class DownsamplerBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout - cin, 3, 2, 1)
        self.pool = nn.MaxPool2d(2, 2)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], 1)))


class NonBottleneck1d(nn.Module):
    """ERFNet's factorised residual block: (3x1, 1x3) twice, the second pair dilated."""

    def __init__(self, ch: int, drop: float, dil: int) -> None:
        super().__init__()
        self.c31_1 = nn.Conv2d(ch, ch, (3, 1), 1, (1, 0))
        self.c13_1 = nn.Conv2d(ch, ch, (1, 3), 1, (0, 1))
        self.bn1 = nn.BatchNorm2d(ch, eps=1e-3)
        self.c31_2 = nn.Conv2d(ch, ch, (3, 1), 1, (dil, 0), dilation=(dil, 1))
        self.c13_2 = nn.Conv2d(ch, ch, (1, 3), 1, (0, dil), dilation=(1, dil))
        self.bn2 = nn.BatchNorm2d(ch, eps=1e-3)
        self.drop = nn.Dropout2d(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.c13_1(F.relu(self.c31_1(x)))))
        o = self.bn2(self.c13_2(F.relu(self.c31_2(o))))
        return F.relu(self.drop(o) + x)


class UpsamplerBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ERFNet(HookedFeatures):
    """ERFNet (Romera et al. 2018): encoder to 128 ch at H/8 (the bottleneck), no skips, light decoder.
    Dropout as in the paper (0.03 / 0.3); sides must be multiples of 8."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        enc: list[nn.Module] = [DownsamplerBlock(cfg.in_channels, 16), DownsamplerBlock(16, 64)]
        enc += [NonBottleneck1d(64, 0.03, 1) for _ in range(5)]
        enc.append(DownsamplerBlock(64, 128))
        for _ in range(2):
            enc += [NonBottleneck1d(128, 0.3, d) for d in (2, 4, 8, 16)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(UpsamplerBlock(128, 64), NonBottleneck1d(64, 0, 1), NonBottleneck1d(64, 0, 1),
                                     UpsamplerBlock(64, 16), NonBottleneck1d(16, 0, 1), NonBottleneck1d(16, 0, 1))
        self.head = nn.ConvTranspose2d(16, cfg.out_channels, 2, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))

    def feature_modules(self) -> dict[str, nn.Module]:
        return {"bottleneck": self.encoder, "decoder": self.decoder}


@register_network("basic_unet")
def _basic_unet(cfg: ModelConfig) -> nn.Module:
    return BasicUNetTeacher(cfg)


@register_network("mobilenetv2_unet")
def _mobilenetv2_unet(cfg: ModelConfig) -> nn.Module:
    return MobileNetV2UNet(cfg)


@register_network("small_unet")
def _small_unet(cfg: ModelConfig) -> nn.Module:
    return SmallUNet(cfg)


@register_network("flexible_unet_b0")
def _flexible_unet_b0(cfg: ModelConfig) -> nn.Module:
    return FlexibleUNetB0(cfg)


@register_network("erfnet")
def _erfnet(cfg: ModelConfig) -> nn.Module:
    return ERFNet(cfg)


TEACHERS = ("basic_unet", "reference_unet")  # reference_unet: registered by its own module (issue 10)
STUDENTS = ("mobilenetv2_unet", "small_unet", "flexible_unet_b0", "erfnet")
