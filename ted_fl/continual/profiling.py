"""Size and speed of a network: parameters, multiply-accumulates (MACs) and CPU latency per image.

MACs are counted with forward hooks on every Conv / ConvTranspose / Linear layer of one forward
(no extra dependency): a conv contributes out_elements * (C_in / groups) * prod(kernel); a
transposed conv in_elements * (C_out / groups) * prod(kernel); a linear layer out_elements * in_features.
Normalisation, activations, pooling and additions are not counted (as fvcore/thop do by default).
"""

from __future__ import annotations

import math
import time

import pandas as pd
import torch
from torch import nn

from ted_fl.config import ModelConfig
from ted_fl.continual.networks import NETWORKS, build_model
from ted_fl.errors import TedFlError, unknown


def param_count(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one conv / transposed conv / linear call (0 for any other module)."""
    if isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
        k = math.prod(module.kernel_size)
        return int(inp.numel() * (module.out_channels // module.groups) * k)
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        k = math.prod(module.kernel_size)
        return int(out.numel() * (module.in_channels // module.groups) * k)
    if isinstance(module, nn.Linear):
        return int(out.numel() * module.in_features)
    return 0


@torch.no_grad()
def count_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of one forward of a single image of `shape` (C, H, W), in eval mode."""
    total = 0
    handles = []

    def hook(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        nonlocal total
        total += layer_macs(m, i[0], o)

    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d
                      | nn.ConvTranspose3d | nn.Linear):
            handles.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(torch.zeros(1, *shape))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total


@torch.no_grad()
def latency_ms(model: nn.Module, shape: tuple[int, ...], repeats: int = 5, warmup: int = 1) -> float:
    """CPU time of one single-threaded forward of one image (eval mode), in ms: the fastest of
    `repeats`, measured with the thread's CPU clock (time.thread_time) and torch pinned to 1 thread.
    Wall time on a shared machine measures the neighbours' load; the thread's CPU time does not
    (cache sharing still adds a little)."""
    was, threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(1)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.thread_time()
            model(x)
            times.append((time.thread_time() - t0) * 1000.0)
    finally:
        model.train(was)
        torch.set_num_threads(threads)
    return float(min(times))


def profile_table(names: list[str], size: int, repeats: int = 5, latency: bool = True) -> pd.DataFrame:
    """One row per network: params, MACs (G) and CPU latency (ms) per image at size x size."""
    rows = []
    for name in names:
        if name not in NETWORKS:
            raise unknown("network", name, NETWORKS, "--names")
        torch.manual_seed(0)
        model = build_model(ModelConfig(name=name, out_channels=2))  # a binary head, as the GKD protocol
        shape = (1, size, size)
        try:
            macs = count_macs(model, shape)
        except RuntimeError as exc:
            raise TedFlError(f"network '{name}' does not take {size} x {size} images ({exc}); "
                             "pick a --size that is a multiple of 32") from None
        rows.append({"network": name, "params_M": param_count(model) / 1e6, "GMACs": macs / 1e9,
                     "latency_ms": latency_ms(model, shape, repeats) if latency else float("nan")})
    return pd.DataFrame(rows)
