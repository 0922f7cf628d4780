"""train.compile = "on": the networks' forwards (and their backward) through torch.compile.

On a GPU the step is kernel-launch bound (issue 22: a seq step at 192 px costs the same at batch
4 and 32), so the forwards are compiled with mode "reduce-overhead": Inductor's kernels replayed
as CUDA graphs. On a CPU Inductor's default mode generates C++ (it needs a C++ compiler; without
one, or when compilation fails, the forward stays eager and one warning line says why).

What is compiled: the student's plain forwards in a training step (on the batch and on the SKA
probes; AOTAutograd compiles their backward too) and the teacher's plain forwards (under
inference mode). What is not: forwards that record features with hooks (`forward_features`),
DP-SGD's per-sample gradients (Opacus hooks the module), evaluation (its batched per-slice path,
`device.batch_statistics`, already puts a split through in a few forwards), and Adam.

The compiled callable wraps the module without replacing it: `state_dict`, `load_state_dict`,
checkpoints and resume see the module's own keys (never `_orig_mod.`), and weights loaded into the
module in place (every round, every stage's teacher) are the compiled graph's weights. One
compiled callable per module, kept for the last few modules (a worker compiles once per process,
not once per round). Batch shapes are static (dynamic=False): a partial last batch or
another probe count compiles its own graph once. Determinism: with a fixed setting the compiled
arithmetic is the same every run (the CPU test trains twice and compares bitwise); it is not
bitwise the eager arithmetic (Inductor fuses and reorders float operations): the CPU test bounds
the difference in the loss after a few steps.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ted_fl.config import Compile, choices
from ted_fl.errors import unknown

COMPILE_MODES = choices(Compile)  # the schema owns the allowed values


def compiler_missing(device: torch.device) -> str:
    """Why Inductor cannot compile on `device` here ("" when it can): on a CPU it needs a C++ compiler."""
    if device.type != "cpu":
        return ""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    return "" if any(shutil.which(n) for n in names) else f"no C++ compiler ({' / '.join(names)}) on PATH"


class CompiledForward:
    """`model`'s forward through torch.compile; eager (one warning line) where compilation fails."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model
        self.mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs on a GPU
        self.eager_because = compiler_missing(device)
        self.fn: Callable[..., Any] | None = None
        if not self.eager_because:
            self.fn = torch.compile(model, mode=self.mode, dynamic=False)
        else:
            warn(self.eager_because)

    @property
    def state(self) -> str:
        """What the forward does now: compiled (with its mode) or eager and why (the GPU report's)."""
        if self.fn is not None:
            return f"on: torch.compile, mode {self.mode or 'default'}"
        return f"off: eager ({self.eager_because})"

    def __call__(self, x: torch.Tensor) -> Any:
        if self.fn is not None:
            try:
                return self.fn(x)
            except Exception as exc:  # noqa: BLE001 - a backend that cannot compile: run eager, say so once
                if _is_compile_failure(exc):
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    self.fn, self.eager_because = None, f"torch.compile failed: {type(exc).__name__}: {first}"
                    warn(self.eager_because)
                else:
                    raise
        return self.model(x)


def _is_compile_failure(exc: Exception) -> bool:
    """A failure of the compiler itself (Inductor's backend, a missing toolchain), not of the model."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(exc, BackendCompilerFailed | InternalTorchDynamoError)


_WARNED: set[str] = set()


def warn(why: str) -> None:
    """One warning line per reason and process: train.compile is on but the networks run eager."""
    if why not in _WARNED:
        _WARNED.add(why)
        print(f"warning: train.compile = 'on': {why}; the networks run eager (same numbers as "
              "train.compile = 'off')", file=sys.stderr)


# The compiled forwards of the last few modules (a worker's student and teacher). Not a weak map:
# the compiled callable holds its module, so it would keep every module alive; the oldest goes.
_CACHE: OrderedDict[int, CompiledForward] = OrderedDict()
CACHED_MODULES = 4


def compiled(model: nn.Module | None, setting: str, device: torch.device | None = None) -> CompiledForward | None:
    """The compiled forward of `model` for train.compile = `setting` ("on"), or None ("off", no model).

    Built once per module and kept for the last `CACHED_MODULES` modules; `device` defaults to the model's."""
    if setting not in COMPILE_MODES:
        raise unknown("compile setting", setting, COMPILE_MODES, "train.compile")
    if setting == "off" or model is None:
        return None
    hit = _CACHE.get(id(model))
    if hit is None or hit.model is not model:
        dev = device or next(model.parameters()).device
        hit = _CACHE[id(model)] = CompiledForward(model, dev)
        while len(_CACHE) > CACHED_MODULES:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(id(model))
    return hit


def step_begins(forward: CompiledForward | None) -> None:
    """Before a training step under CUDA graphs: tell the graph trees that a new iteration starts
    (the previous step's graph outputs are no longer read)."""
    if forward is not None and forward.fn is not None and forward.mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()
