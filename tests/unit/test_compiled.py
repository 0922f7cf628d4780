"""train.compile = "on" on the CPU (Inductor's C++): the same training as eager within a stated
tolerance, bitwise the same on a rerun of the same setting, checkpoints free of `_orig_mod.`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ted_fl.config import LossConfig, TrainConfig
from ted_fl.continual import compiled as C
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.networks import build_model, tiny_model_config
from ted_fl.continual.training import local_train
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError

# Inductor fuses and reorders float32 operations, so compiled is not bitwise eager. Bound: the loss
# (mean over the N steps, and KD's term) within LOSS_TOL, relative. The weights are not compared
# element by element: a conv bias in front of batch norm has a zero gradient up to rounding noise,
# which Adam's normalisation turns into lr-sized steps of either sign (2.7e-3 apart after 3 steps).
LOSS_TOL, STEPS = 1e-5, 3


def split(n: int = 6) -> Split:
    g = np.random.default_rng(0)
    y = np.zeros((n, 32, 32), dtype=np.int64)
    y[:, 8:20, 10:24] = 1
    return Split(g.random((n, 1, 32, 32), dtype=np.float32), y, np.array([f"v{i // 3}" for i in range(n)]))


def train(student: torch.nn.Module, teacher: torch.nn.Module, setting: str,
          trace: dict | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    metrics, _ = local_train(student, teacher, get_approach("kd", LossConfig(lambda_d=1.0)), split(),
                             steps=STEPS, batch_size=3, lr=1e-3, optimizer_state=None, seed=1,
                             loss_cfg=LossConfig(), compile=setting, trace=trace)
    return metrics, {k: v.clone() for k, v in student.state_dict().items()}


def test_compiled_training_equals_eager_within_tolerance_and_reruns_bitwise() -> None:
    if C.compiler_missing(torch.device("cpu")):
        pytest.skip("no C++ compiler: train.compile falls back to eager (tested below)")
    torch.manual_seed(0)
    student, teacher = build_model(tiny_model_config()), build_model(tiny_model_config())
    start = {k: v.clone() for k, v in student.state_dict().items()}
    m_eager, w_eager = train(student, teacher, "off")
    student.load_state_dict(start)
    trace: dict = {}
    m_on, w_on = train(student, teacher, "on", trace)
    assert trace["compiled"] == "on: torch.compile, mode default"
    assert C.compiled(student, "on").fn is not None  # it really ran compiled (no fallback)
    assert set(w_on) == set(start)  # the module's own keys, never `_orig_mod.`
    assert m_on["total"] == pytest.approx(m_eager["total"], rel=LOSS_TOL)
    assert m_on["kd"] == pytest.approx(m_eager["kd"], rel=LOSS_TOL, abs=1e-9)
    student.load_state_dict(start)
    m_again, w_again = train(student, teacher, "on")  # the same setting again: bitwise
    assert m_again == m_on and all(torch.equal(w_again[k], w_on[k]) for k in w_on)


def test_without_a_compiler_it_runs_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CXX", "ted-fl-no-such-compiler")
    monkeypatch.setattr(C, "_WARNED", set())
    torch.manual_seed(0)
    student, teacher = build_model(tiny_model_config()), build_model(tiny_model_config())
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trace: dict = {}
    m_on, w_on = train(student, teacher, "on", trace)
    student.load_state_dict(start)
    m_off, w_off = train(student, teacher, "off")
    assert m_on == m_off and all(torch.equal(w_on[k], w_off[k]) for k in w_on)
    assert trace["compiled"].startswith("off: eager (no C++ compiler")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: train.compile = 'on': no C++ compiler"), err


def test_the_setting_is_checked() -> None:
    assert TrainConfig().compile == "off"
    with pytest.raises(TedFlError, match="train.compile"):
        C.compiled(build_model(tiny_model_config()), "fast")


def test_weights_of_a_compiled_module_load_into_the_plain_one() -> None:
    from ted_fl.continual.weights import load_weights, model_weights

    torch.manual_seed(0)
    plain = build_model(tiny_model_config())
    wrapped = torch.compile(build_model(tiny_model_config()))  # never called: no compilation
    assert any(k.startswith("_orig_mod.") for k in wrapped.state_dict())
    w = model_weights(wrapped)
    assert set(w) == set(plain.state_dict())
    load_weights(plain, w)
    assert all(np.array_equal(v.numpy(), w[k]) for k, v in plain.state_dict().items())
