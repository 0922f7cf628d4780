"""Where the numbers are computed: mixed precision, cuDNN settings, a split kept on the GPU, and
batch norm on each image's own statistics (a forward's mode that training, evaluation and the
membership-inference attack share)."""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ted_fl.config import AmpMode, choices
from ted_fl.errors import TedFlError

AMP_MODES = choices(AmpMode)  # the schema owns the allowed values


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype: "auto" is bf16 on a GPU that supports it, else full precision."""
    if amp not in AMP_MODES:
        raise TedFlError(f"train.amp = '{amp}' is not one of {', '.join(AMP_MODES)}")
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def gpu_setup(model: nn.Module, device: torch.device, cudnn_benchmark: bool = True) -> nn.Module:
    """On a GPU: cuDNN autotuning and channels-last weights (the layout its convolutions prefer).

    Set after `set_determinism`, which switches autotuning off; with `cudnn_benchmark` False
    cuDNN stays deterministic. A CPU model is returned unchanged (same numbers as ever).
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
        torch.backends.cudnn.deterministic = not cudnn_benchmark
        if cudnn_benchmark:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
    return model


_DEVICE_CACHE: dict[tuple[int, str], tuple[Any, torch.Tensor]] = {}


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """`array` as a tensor on `device`, copied once and kept while the array lives (a site's split
    stays on the GPU across rounds instead of crossing the bus batch by batch). The callers keep a
    split's arrays across rounds (the executors memoise the splits they derive), so the copy is made
    once per split and process."""
    key = (id(array), _device_key(device))
    hit = _DEVICE_CACHE.get(key)
    if hit is not None and hit[0]() is array:
        return hit[1]
    for k in [k for k, (ref, _) in _DEVICE_CACHE.items() if ref() is None]:
        del _DEVICE_CACHE[k]  # splits that are gone
    tensor = torch.as_tensor(array, device=device)
    _DEVICE_CACHE[key] = (weakref.ref(array), tensor)
    return tensor


def on_device_cached(array: np.ndarray, device: torch.device) -> bool:
    """Whether `on_device` holds `array` on `device` (the GPU path's check that a split stayed there)."""
    hit = _DEVICE_CACHE.get((id(array), _device_key(device)))
    return hit is not None and hit[0]() is array


def _device_key(device: torch.device | str) -> str:
    """One name per device: "cuda" and "cuda:0" are the same GPU (the worker holds the first, a
    model's parameters report the second; keyed apart, the GPU report never found the split)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and torch.cuda.is_available():
        d = torch.device("cuda", torch.cuda.current_device())
    return str(d)


# Leaf modules whose eval-mode output for one slice does not depend on the other slices of the
# batch: torch.nn's layers (batch norm itself is swapped, see `batch_statistics`) and MONAI's
# activations. A network with any other leaf module is forwarded one slice at a time.
PER_SAMPLE_LEAVES = ("torch.nn.modules.", "monai.networks.blocks.activation")


def per_slice_batchable(model: nn.Module) -> bool:
    """Whether a batch of slices may go through one forward with each slice's batch norm on its own
    statistics (`batch_statistics(model, batched=True)`). The composite modules' own forwards are
    taken to be per-slice (every registered network is checked against the one-slice path in
    tests/unit/test_batched_slices.py); a leaf module outside `PER_SAMPLE_LEAVES` refuses."""
    return all(type(m).__module__.startswith(PER_SAMPLE_LEAVES)
               for m in model.modules() if next(m.children(), None) is None)


def _own_statistics(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm in train mode over ONE slice, for every slice of `x` at once: instance
    normalisation (each slice and channel over its spatial positions, biased variance) with the
    layer's weight, bias and eps. No running statistic is read or written."""
    return F.instance_norm(x, None, None, bn.weight, bn.bias, use_input_stats=True, eps=bn.eps)


@contextlib.contextmanager
def batch_statistics(model: nn.Module, batched: bool = False) -> Iterator[bool]:
    """Eval mode, except batch norm normalises with each forward's own statistics; yields whether
    the caller may forward several slices at once with each still normalised by its own statistics.

    `batched` False (the reference's loop): batch-norm layers run in train mode with
    `track_running_stats` off, so they neither read nor write running_mean / running_var /
    num_batches_tracked, and the caller forwards one slice at a time. `batched` True, on a network
    where it holds (`per_slice_batchable`): every batch-norm layer computes `_own_statistics`
    instead, which for each slice equals the train-mode layer over that slice alone, so a whole
    split goes through in batches with the same numbers (to float rounding) and, as in the loop,
    no buffer is touched. Dropout stays off. Every module's mode, flag and forward are restored.
    """
    modes = [(m, m.training) for m in model.modules()]
    bns = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    fast = batched and per_slice_batchable(model)
    model.eval()
    own: list[tuple[_BatchNorm, Any]] = []
    for m, _ in bns:
        if fast:
            own.append((m, vars(m).get("forward")))
            m.forward = functools.partial(_own_statistics, m)  # type: ignore[method-assign]
        else:
            m.train()
            m.track_running_stats = False
    try:
        yield fast
    finally:
        for m, forward in own:
            del m.forward
            if forward is not None:
                m.forward = forward  # type: ignore[method-assign]
        for m, track in bns:
            m.track_running_stats = track
        for module, mode in modes:
            module.training = mode
