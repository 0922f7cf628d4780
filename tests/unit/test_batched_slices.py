"""eval.bn = "batch" in batches (eval.slices = "batched"): each slice still normalised by its own
statistics, equal to the one-slice-at-a-time forward (the reference's loop) on every registered
network, with every buffer, mode and flag left as that loop leaves them (untouched)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import ted_fl.continual.zoo  # noqa: F401 - registers the GKD networks
from ted_fl.config import ModelConfig
from ted_fl.continual.device import batch_statistics, per_slice_batchable
from ted_fl.continual.evaluation import _predict, evaluate
from ted_fl.continual.networks import NETWORKS, build_model, tiny_model_config
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError

SMALL = {"basic_unet": [4, 8, 16, 32, 64, 4], "monai_unet": [4, 8, 16, 32], "reference_unet": [4, 8, 16, 32]}


def network(name: str, norm: str = "batch") -> nn.Module:
    """A registered network with trained-looking batch norms (affine and running stats far from 1 / 0)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, out_channels=2, norm=norm)  # type: ignore[arg-type]
    if name in SMALL:
        cfg.channels, cfg.strides = SMALL[name], [2] * (len(SMALL[name]) - 1)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.num_batches_tracked.fill_(7)
    return model


def images(n: int = 5, size: int = 64, width: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(n, 1, size, width or size, generator=g)
    return x * torch.linspace(0.5, 3.0, n).view(n, 1, 1, 1) + torch.linspace(-1, 1, n).view(n, 1, 1, 1)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def flags(model: nn.Module) -> list[tuple[bool, bool | None, bool]]:
    return [(m.training, getattr(m, "track_running_stats", None), "forward" in vars(m)) for m in model.modules()]


CASES = [(name, "batch") for name in sorted(NETWORKS)] + [("monai_unet", "instance"), ("monai_unet", "group"),
                                                          ("reference_unet", "group")]


@pytest.mark.parametrize(("name", "norm"), CASES)
def test_batched_equals_one_slice_at_a_time_on_every_network(name: str, norm: str) -> None:
    """In float64 the batched forward equals the loop within 1e-5 (in fact ~1e-12) on every network;
    in float32 a slice through the batched layers is bitwise the loop's: the normalisation is the
    same, and what remains in float32 is the convolutions' rounding at another batch size (largest
    on erfnet, about 6e-4 in logits of magnitude 7 with these random weights; as in eval.bn = "running")."""
    model = network(name, norm)
    model.train(name != "monai_unet")  # the modes are restored whichever the model was in
    before, modes = state(model), flags(model)
    small = name in ("monai_unet", "small_unet", "reference_unet", "erfnet")
    x = images(2, 32 if small else 64, 32)  # the deep ones: 64 x 32, so that the bottleneck has 2 pixels
    assert per_slice_batchable(model), f"{name}: the batched path should hold"
    with torch.no_grad():
        with batch_statistics(model) as batched:  # the reference's loop
            assert batched is False
            one = model(x[:1])
        with batch_statistics(model, batched=True) as batched:
            assert batched is True
            assert torch.equal(model(x[:1]), one)
        for k, v in state(model).items():  # neither path writes a buffer: running stats as they were
            assert torch.equal(v, before[k]), k
        assert flags(model) == modes
        model.double()
        with batch_statistics(model):
            loop = torch.cat([model(x[i : i + 1].double()) for i in range(len(x))])
        with batch_statistics(model, batched=True):
            many = model(x.double())
        ref = copy.deepcopy(model).eval()  # the reference: batch norm in train mode over the slice alone
        for m in ref.modules():
            if isinstance(m, _BatchNorm):
                m.train()
        alone = ref(x[1:2].double())[0]
    torch.testing.assert_close(many, loop, rtol=0, atol=1e-5)
    torch.testing.assert_close(many[1], alone, rtol=0, atol=1e-5)
    assert not torch.equal(loop[0], loop[1])
    assert flags(model) == modes


def test_predictions_and_scores_match_the_loop() -> None:
    model = network("monai_unet")
    x = images(7).numpy()
    one = _predict(model, x, 4, "batch", "one")
    np.testing.assert_array_equal(_predict(model, x, 4, "batch", "batched"), one)
    y = (x[:, 0] > x.mean()).astype(np.int64)
    s = Split(x, y, np.array([f"v{i // 3}" for i in range(7)]))
    assert evaluate(model, s, per_volume=True, bn="batch", slices="batched", batch_size=3) == pytest.approx(
        evaluate(model, s, per_volume=True, bn="batch", slices="one"), abs=1e-6)
    with pytest.raises(TedFlError, match="eval.slices"):
        _predict(model, x, 4, "batch", "some")


class Odd(nn.Module):
    """A leaf layer outside torch.nn: the batched path cannot vouch for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


def test_a_network_with_an_unknown_layer_keeps_the_loop() -> None:
    model = nn.Sequential(build_model(tiny_model_config()), Odd())
    assert not per_slice_batchable(model)
    x = images(3, 32).numpy()
    with batch_statistics(model, batched=True) as batched:
        assert batched is False
    np.testing.assert_array_equal(_predict(model, x, 16, "batch", "batched"), _predict(model, x, 16, "batch", "one"))
