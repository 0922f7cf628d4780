"""The GPU path's switches, exercised on CPU: mixed precision, the device cache, the setup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ted_fl.config import LossConfig
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.device import amp_dtype_for, gpu_setup, on_device
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.continual.training import local_train
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError


def split(n: int = 6) -> Split:
    g = np.random.default_rng(0)
    y = np.zeros((n, 32, 32), dtype=np.uint8)
    y[:, 8:20, 10:24] = 1
    return Split(g.random((n, 1, 32, 32), dtype=np.float32), y, np.array([f"v{i // 3}" for i in range(n)]))


def train(amp: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    student, teacher = build_model(tiny_model_config()), build_model(tiny_model_config())
    metrics, _ = local_train(student, teacher, get_approach("ted_gugf", LossConfig(lambda_d=1.0)), split(),
                             steps=3, batch_size=3, lr=1e-3, optimizer_state=None, seed=1,
                             loss_cfg=LossConfig(), amp=amp)
    return metrics, {k: v.clone() for k, v in student.state_dict().items()}


def test_amp_modes() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype_for("auto", cpu) is None and amp_dtype_for("off", cpu) is None
    assert amp_dtype_for("bf16", cpu) is torch.bfloat16
    with pytest.raises(TedFlError, match="train.amp"):
        amp_dtype_for("fp8", cpu)


def test_auto_is_full_precision_on_cpu_and_bf16_trains_close_to_it() -> None:
    m_off, w_off = train("off")
    m_auto, w_auto = train("auto")
    assert m_off == m_auto and all(torch.equal(w_off[k], w_auto[k]) for k in w_off)
    m_bf, w_bf = train("bf16")
    assert all(np.isfinite(v) for v in m_bf.values())
    assert m_bf["total"] != m_off["total"]  # autocast really ran in bfloat16
    assert m_bf["seg"] == pytest.approx(m_off["seg"], rel=0.05)


def test_on_device_keeps_one_copy_per_live_array() -> None:
    a, b = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    cpu = torch.device("cpu")
    assert on_device(a, cpu) is on_device(a, cpu)
    assert on_device(b, cpu) is not on_device(a, cpu) and float(on_device(b, cpu).sum()) == 0.0


def test_gpu_setup_leaves_a_cpu_model_alone() -> None:
    m = build_model(tiny_model_config())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert gpu_setup(m, torch.device("cpu")) is m
    assert all(v.is_contiguous() and torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_the_path_report_reads_the_tensors_the_steps_used() -> None:
    """Item 4 of issue 22: the report said "off" although the split stayed on the GPU (it looked the
    split up under "cuda", the cache held it under "cuda:0"). Now it reads the steps' own tensors;
    with the device path forced on the CPU, the flags say what happened."""
    from ted_fl.bench.gpu import data_path, weights_channels_last
    from ted_fl.continual.device import on_device_cached

    torch.manual_seed(0)
    student = build_model(tiny_model_config())
    s, cpu = split(), torch.device("cpu")
    traces = []
    for rnd in range(2):
        trace: dict = {}
        local_train(student, None, get_approach("seq", LossConfig()), s, steps=2, batch_size=3, lr=1e-3,
                    optimizer_state=None, seed=rnd, loss_cfg=LossConfig(), keep_on_device=True, trace=trace)
        traces.append(trace)
    assert traces[0]["source"] is traces[1]["source"] and on_device_cached(s.images, cpu)
    kept, layout = data_path(traces, cpu)
    assert kept == "on: one device copy of the split across 2 rounds", kept
    assert layout == "either: one channel, both layouts are the same bytes: the step's input (3, 1, 32, 32) on cpu"
    s2 = split()  # a split rebuilt every round (what the executors no longer do): copied each time
    trace = {}
    local_train(student, None, get_approach("seq", LossConfig()), s2, steps=1, batch_size=3, lr=1e-3,
                optimizer_state=None, seed=0, loss_cfg=LossConfig(), keep_on_device=True, trace=trace)
    assert data_path([traces[0], trace], cpu)[0].startswith("off: 2 copies")
    plain: dict = {}
    local_train(student, None, get_approach("seq", LossConfig()), s, steps=1, batch_size=3, lr=1e-3,
                optimizer_state=None, seed=0, loss_cfg=LossConfig(), trace=plain)
    assert data_path([plain], cpu)[0] == "off: batches built from the numpy arrays each step"
    from ted_fl.config import ModelConfig

    ref = build_model(ModelConfig(name="reference_unet", channels=[4, 8], strides=[2], out_channels=2))
    assert not weights_channels_last(ref)
    ref.to(memory_format=torch.channels_last)
    assert weights_channels_last(ref)  # read on a 3 x 3 kernel, not on the 1 x 1 head


def test_derived_splits_are_the_same_arrays_every_round() -> None:
    from ted_fl.config import ExperimentConfig
    from ted_fl.federated import client_app

    cfg = ExperimentConfig()
    cfg.federated.clients_per_site = 2
    cfg.data.synthetic_volumes = 4
    cfg.data.size = 32
    first = client_app.site_data(cfg, "RUNMC", 1)[1]
    assert client_app.site_data(cfg, "RUNMC", 1)[1] is first and len(first) > 0
