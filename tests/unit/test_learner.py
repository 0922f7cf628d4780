"""local_train determinism, batching and probe slicing; evaluate conventions; lr_for; probes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import ted_fl.continual.training as learner
from ted_fl.config import LossConfig, ModelConfig, TrainConfig
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.evaluation import evaluate
from ted_fl.continual.networks import SegNet, build_model, tiny_model_config
from ted_fl.continual.probes import make_probes
from ted_fl.continual.training import local_train, lr_for, set_determinism
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError


def split(n: int = 10, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, 32, 32)).astype(np.float32)
    masks = np.zeros((n, 32, 32), dtype=np.int64)
    masks[:, 8:20, 10:24] = 1
    return Split(images, masks, np.array([f"v{i // 4}" for i in range(n)]))


def train(model: nn.Module, teacher: nn.Module | None, name: str, **kw: object) -> tuple[dict, dict]:
    cfg = LossConfig(lambda_d=1.0)
    args = {"steps": 3, "batch_size": 4, "lr": 1e-2, "optimizer_state": None, "seed": 5, "loss_cfg": cfg}
    args.update(kw)
    return local_train(model, teacher, get_approach(name, cfg), split(), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["seq", "ted_gugf"])
def test_local_train_is_deterministic(name: str) -> None:
    set_determinism(0)
    base = build_model(tiny_model_config())
    teacher = copy.deepcopy(base) if name != "seq" else None
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ma, oa = train(a, teacher, name, steps=4)
    mb, ob = train(b, teacher, name, steps=4)
    assert ma == mb
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    c = copy.deepcopy(base)
    train(c, teacher, name, steps=4, seed=6)
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    # the optimizer state resumes: step counts accumulate
    _, oa2 = train(a, teacher, name, steps=2, optimizer_state=oa)
    assert float(oa2["state"][0]["step"]) == 6.0
    assert oa2["param_groups"][0]["weight_decay"] == 0.0


def test_steps_zero_is_one_pass_and_batches_wrap_around(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def spy(student, teacher, approach, images, masks, optimizer, probes=None, aux=None):  # noqa: ANN001
        seen.append(images.shape[0])
        return {"seg": 1.0, "total": 1.0}

    monkeypatch.setattr(learner, "train_step", spy)
    metrics, _ = train(build_model(tiny_model_config()), None, "seq", steps=0)
    assert seen == [4, 4, 2]  # ceil(10 / 4) batches, the last one partial
    assert metrics == {"seg": 1.0, "total": 1.0}
    seen.clear()
    train(build_model(tiny_model_config()), None, "seq", steps=5)
    assert seen == [4, 4, 2, 4, 4]  # a new permutation after the first pass


def test_probe_slicing(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[torch.Tensor] = []

    def spy(student, teacher, approach, images, masks, optimizer, probes=None, aux=None):  # noqa: ANN001
        got.append(probes)
        return {"total": 0.0}

    monkeypatch.setattr(learner, "train_step", spy)
    model = build_model(tiny_model_config())
    teacher = copy.deepcopy(model)
    cfg = LossConfig()
    per_step = make_probes(1, 3 * 4, (1, 32, 32), cfg)  # steps * count, count = batch_size
    train(model, teacher, "ska", probes=per_step)
    assert [torch.equal(p, per_step[4 * i : 4 * i + 4]) for i, p in enumerate(got)] == [True] * 3
    got.clear()
    fixed = make_probes(1, 2, (1, 32, 32), cfg)
    train(model, teacher, "ska", probes=fixed)
    assert all(torch.equal(p, fixed) for p in got)
    got.clear()
    train(model, teacher, "ska")  # drawn per step from the seed: fresh each step, reproducible
    first = list(got)
    got.clear()
    train(model, teacher, "ska")
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(x, y) for x, y in zip(first, got, strict=True))
    got.clear()
    train(model, None, "ska", probes=fixed)  # no teacher: no probes
    assert all(p is None for p in got)


def test_make_probes_seeded_and_distributions() -> None:
    cfg = LossConfig(ska_mean=0.5, ska_std=2.0)
    a = make_probes(3, 64, (1, 16, 16), cfg)
    assert a.shape == (64, 1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, make_probes(3, 64, (1, 16, 16), cfg))
    assert not torch.equal(a, make_probes(4, 64, (1, 16, 16), cfg))
    assert float(a.mean()) == pytest.approx(0.5, abs=0.05)
    assert float(a.std()) == pytest.approx(2.0, rel=0.05)
    u = make_probes(3, 64, (1, 16, 16), LossConfig(ska_distribution="uniform", ska_mean=0.5, ska_std=2.0))
    assert float(u.std()) == pytest.approx(2.0, rel=0.05)
    assert float(u.max()) <= 0.5 + 2.0 * 3**0.5
    with pytest.raises(ValidationError, match="normal"):  # the schema refuses it on construction
        LossConfig(ska_distribution="gauss")


class Oracle(nn.Module):
    """Predicts foreground where the image is > 0.5: a perfect model when images are the masks."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1)


def mask_split(masks: np.ndarray, volumes: list[str], fov: np.ndarray | None = None) -> Split:
    return Split(masks[:, None].astype(np.float32), masks.astype(np.int64), np.array(volumes), fov)


def test_evaluate_perfect_prediction() -> None:
    masks = np.zeros((4, 16, 16), dtype=np.int64)
    masks[0, 2:6, 2:6] = 1
    masks[1, 4:10, 3:12] = 1
    masks[3, 8:12, 8:15] = 1  # slice 2 has no foreground
    sp = mask_split(masks, ["a", "a", "b", "b"])
    for per_volume in (True, False):
        out = evaluate(Oracle(), sp, per_volume=per_volume, batch_size=3)
        assert out == {"dice": pytest.approx(1.0), "iou": pytest.approx(1.0), "hd95": pytest.approx(0.0)}


def test_evaluate_empty_conventions_and_fov() -> None:
    empty = np.zeros((2, 16, 16), dtype=np.int64)
    out = evaluate(Oracle(), mask_split(empty, ["a", "b"]), per_volume=True)
    assert out == {"dice": 1.0, "iou": 1.0, "hd95": 0.0}  # both empty: perfect, no NaN

    class AllForeground(Oracle):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros_like(x), torch.ones_like(x)], dim=1)

    gt = np.zeros((2, 16, 16), dtype=np.int64)
    gt[0, 4:8, 4:8] = 1
    out = evaluate(AllForeground(), mask_split(gt, ["a", "b"]), per_volume=False)
    assert out["dice"] == pytest.approx((2 * 16 / (256 + 16) + 0.0) / 2)  # image b: gt empty, pred not
    assert np.isfinite(out["hd95"])

    class Nothing(Oracle):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.ones_like(x), torch.zeros_like(x)], dim=1)

    out = evaluate(Nothing(), mask_split(gt, ["a", "a"]), per_volume=True)
    assert out["dice"] == 0.0 and out["hd95"] == pytest.approx(np.hypot(16, 16))  # missed: diagonal

    fov = np.zeros((2, 16, 16), dtype=bool)
    fov[:, 4:8, 4:8] = True  # outside the FOV the all-foreground prediction is ignored
    out = evaluate(AllForeground(), mask_split(gt, ["a", "b"], fov), per_volume=False)
    assert out["dice"] == pytest.approx((1.0 + 0.0) / 2)


def test_evaluate_real_net_restores_mode_and_needs_no_grad() -> None:
    model = build_model(tiny_model_config())
    model.train()
    out = evaluate(model, split(6), per_volume=True)
    assert set(out) == {"dice", "iou", "hd95"} and all(np.isfinite(v) for v in out.values())
    assert model.training
    with pytest.raises(TedFlError):
        evaluate(model, split(0), per_volume=True)


def test_lr_for() -> None:
    cfg = TrainConfig(lr_first=2e-4, lr_later=1e-4, lr_gamma=0.5)
    assert lr_for(0, 0, cfg) == pytest.approx(2e-4)
    assert lr_for(0, 2, cfg) == pytest.approx(5e-5)
    assert lr_for(3, 1, cfg) == pytest.approx(5e-5)


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_networks_configurable_and_features(norm: str) -> None:
    model = build_model(tiny_model_config(norm))
    assert isinstance(model, SegNet)
    logits, feats = model.forward_features(torch.rand(2, 1, 32, 32))
    assert logits.shape == (2, 2, 32, 32)
    assert {"enc0", "enc1", "bottleneck", "decoder"} == set(feats)
    assert feats["bottleneck"].shape[1] == 16
    assert torch.equal(model.eval()(torch.ones(1, 1, 32, 32)), model(torch.ones(1, 1, 32, 32)))
    copy.deepcopy(model)  # no hooks left behind
    with pytest.raises(ValidationError, match="instance"):  # the schema refuses it on construction
        ModelConfig(norm="layer")
    deep = build_model(ModelConfig(channels=[4, 8, 8, 8], strides=[2, 2, 2]))
    assert {"enc0", "enc1", "enc2", "bottleneck", "decoder"} == set(
        deep.forward_features(torch.rand(1, 1, 32, 32))[1]
    )
