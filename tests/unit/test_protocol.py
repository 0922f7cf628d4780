"""The evaluation protocol and the reference's choices: eval.bn, the reference U-Net, the
evaluation rescale, pooled HD95, best-round selection on validation, one-run joint, seq's lr."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ted_fl.config import ExperimentConfig, ModelConfig
from ted_fl.continual.evaluation import _hd95, _hd95_pooled, evaluate, hd95_pooled_slice, rescale_percentiles
from ted_fl.continual.networks import NETWORKS, build_model, tiny_model_config
from ted_fl.continual.training import lr_for
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError
from ted_fl.run.directory import RunDir
from ted_fl.schedule.engine import TrainResult, TrainTask, fedavg, run_schedule

# The reference UNet2D((1, 192, 192), 2) of TED_DCMIS, counted by running its own
# unet_fepegar.py / model_utils.py (see ted_fl/continual/reference_unet.py and docs/protocol.md).
REFERENCE_COUNT = 2_313_906


def split(n: int = 6, seed: int = 0, size: int = 32) -> Split:
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 1, size, size)) * np.linspace(0.5, 2, n)[:, None, None, None]).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=np.int64)
    masks[:, 8:20, 10:24] = 1
    return Split(images, masks, np.array([f"v{i // 3}" for i in range(n)]))


def trained_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = build_model(tiny_model_config())
    m.train()
    with torch.no_grad():
        for i in range(3):
            m(torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 + 0.5)
    return m


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _predictions(model: nn.Module, s: Split, bn: str) -> np.ndarray:
    """Per-image foreground masks the evaluation scores (via a per-image Dice against a full mask)."""
    from ted_fl.continual import evaluation as learner

    return learner._predict(model, s.images, 16, bn)


# ------------------------------------------------------------------ eval.bn


@pytest.mark.parametrize("bn", ["running", "batch"])
@pytest.mark.parametrize("training", [True, False])
def test_evaluation_never_mutates_a_buffer_and_restores_the_mode(bn: str, training: bool) -> None:
    model = trained_bn_model()
    model.train(training)
    before = buffers(model)
    evaluate(model, split(), per_volume=True, bn=bn)
    evaluate(model, split(), per_volume=False, bn=bn)
    for k, v in buffers(model).items():
        assert torch.equal(v, before[k]), k
    assert all(m.training == training for m in model.modules())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_batch_mode_ignores_running_statistics_and_forwards_each_image_alone() -> None:
    model = trained_bn_model()
    s = split()
    batch_preds = _predictions(model, s, "batch")
    running_preds = _predictions(model, s, "running")
    corrupted = copy.deepcopy(model)
    with torch.no_grad():
        for m in corrupted.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(5.0)
                m.running_var.mul_(30.0)
    np.testing.assert_array_equal(_predictions(corrupted, s, "batch"), batch_preds)
    assert evaluate(corrupted, s, per_volume=True, bn="batch") == evaluate(model, s, per_volume=True, bn="batch")
    assert not np.array_equal(_predictions(corrupted, s, "running"), running_preds)
    # each image alone: its prediction does not depend on the other images of the split
    for i in range(len(s)):
        alone = Split(s.images[i : i + 1], s.masks[i : i + 1], s.volumes[i : i + 1])
        np.testing.assert_array_equal(_predictions(model, alone, "batch")[0], batch_preds[i])
    # and it is batch norm on that image's own statistics (the reference's train-mode forward)
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        x = torch.as_tensor(s.images[2:3])
        np.testing.assert_array_equal(ref(x).argmax(1)[0].numpy(), batch_preds[2])


def test_eval_bn_unknown_mode_is_refused() -> None:
    with pytest.raises(TedFlError, match="running"):
        evaluate(trained_bn_model(), split(), per_volume=True, bn="own")


# ------------------------------------------------------------------ reference U-Net


def test_reference_unet_parameter_count_matches_the_reference_code() -> None:
    model = build_model(ModelConfig(name="reference_unet", channels=[16, 32, 64, 128, 256], out_channels=2))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - REFERENCE_COUNT) / REFERENCE_COUNT < 0.02
    monai = build_model(ModelConfig(name="monai_unet", out_channels=2))
    assert abs(sum(p.numel() for p in monai.parameters()) - REFERENCE_COUNT) / REFERENCE_COUNT > 0.5


def test_reference_unet_structure() -> None:
    assert {"monai_unet", "reference_unet"} <= set(NETWORKS)
    model = build_model(ModelConfig(name="reference_unet", out_channels=2))
    mods = list(model.modules())
    convs3 = [m for m in mods if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 2 * 5 + 2 * 4  # two 3x3 convs per encoder level, bottom and decoder level
    assert sum(isinstance(m, nn.ReLU) for m in mods) == len(convs3)
    assert not any(isinstance(m, nn.PReLU) for m in mods)
    assert sum(isinstance(m, nn.MaxPool2d) for m in mods) >= 1
    assert all(c.stride == (1, 1) for c in convs3)  # downsampling by pooling, not strided convs
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in mods) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in mods) == len(convs3) - 1  # first conv: no norm
    first = model.encoder[0][0]
    assert isinstance(first[0], nn.Conv2d) and isinstance(first[1], nn.ReLU)
    head = model.classifier
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.out_channels == 2
    logits, feats = model.forward_features(torch.zeros(2, 1, 48, 64))
    assert logits.shape == (2, 2, 48, 64)
    assert list(feats) == ["enc0", "enc1", "enc2", "enc3", "bottleneck", "decoder"]
    assert feats["bottleneck"].shape == (2, 256, 3, 4) and feats["decoder"].shape == (2, 16, 48, 64)
    assert torch.equal(model(torch.ones(1, 1, 32, 32)), model.forward_features(torch.ones(1, 1, 32, 32))[0])


# ------------------------------------------------------------------ protocol "reference" pieces


def test_rescale_percentiles_per_volume() -> None:
    rng = np.random.default_rng(1)
    images = rng.random((4, 1, 5, 7)).astype(np.float32) * 10
    groups = [np.array([0, 1]), np.array([2, 3])]
    out = rescale_percentiles(images, groups)
    for idx in groups:
        v = images[idx].astype(np.float64)
        lo, hi = np.percentile(v, 0.1), np.percentile(v, 99.0)
        np.testing.assert_allclose(out[idx], (np.clip(v, lo, hi) - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    assert images.max() > 1.5  # the input is untouched


def test_pooled_hd95_by_hand_and_different_from_monai() -> None:
    gt = np.zeros((1, 9, 12), dtype=bool)
    gt[0, 2:5, 2:5] = True  # a 3x3 square
    pred = gt.copy()
    pred[0, 2:5, 9] = True  # plus a column 5 px away
    # surfaces: gt's 8 border pixels (distance 0 to pred's surface); pred's border: the square's
    # 8 (0) + the column's 3 at distance 5 -> pooled 19 distances, 3 of them 5: the 95th percentile
    d = np.array([0.0] * 16 + [5.0] * 3)
    assert hd95_pooled_slice(pred[0], gt[0]) == pytest.approx(np.percentile(d, 95))
    assert _hd95_pooled(pred, gt) == pytest.approx(np.percentile(d, 95))
    assert _hd95(pred, gt) == pytest.approx(5.0)  # MONAI: the larger directed 95th percentile
    empty = np.zeros_like(gt)
    assert _hd95_pooled(empty, gt) == 12.0  # max(H, W), not the diagonal
    two = np.concatenate([gt, np.zeros_like(gt)])  # a slice without ground truth is skipped
    assert _hd95_pooled(np.concatenate([pred, pred]), two) == pytest.approx(np.percentile(d, 95))


def test_evaluate_reference_options_change_what_they_should() -> None:
    model = trained_bn_model()
    s = split()
    base = evaluate(model, s, per_volume=True)
    assert evaluate(model, s, per_volume=True, hd95="pooled")["dice"] == base["dice"]
    rescaled = Split(rescale_percentiles(s.images, [np.arange(0, 3), np.arange(3, 6)]), s.masks, s.volumes)
    assert evaluate(model, s, per_volume=True, rescale=True) == evaluate(model, rescaled, per_volume=True)


def test_seq_keeps_its_first_rate_only_when_asked() -> None:
    cfg = ExperimentConfig().train
    assert lr_for(2, 3, cfg) == pytest.approx(cfg.lr_later * cfg.lr_gamma**3)
    assert lr_for(2, 3, cfg, constant=True) == pytest.approx(cfg.lr_first * cfg.lr_gamma**3)


# ------------------------------------------------------------------ the schedule, on a scripted executor


class ScriptedExecutor:
    """Training returns weights {"w": [round]}; evaluation scores are scripted per split.

    Validation peaks at round 1, test at round 2: a schedule that selects on the test split keeps
    round 2's weights.
    """

    def __init__(self, sites: list[str]) -> None:
        self.sites = sites
        self.train_sizes = dict.fromkeys(sites, 8)
        self.image_shape = (1, 8, 8)
        self.bytes_sent = self.bytes_received = 0
        self.tasks: list[TrainTask] = []
        self.evals: list[tuple[str, list[str]]] = []

    def train(self, task: TrainTask) -> list[TrainResult]:
        self.tasks.append(task)
        w = {"w": np.array([float(task.round)], dtype=np.float32)}
        return [TrainResult(task.sites[-1], 0, w, 8, {"total": 0.0}, None)]

    def aggregate(self, task: TrainTask, results: list[TrainResult]) -> dict[str, np.ndarray]:
        return fedavg([(r.weights, r.num_examples) for r in results])

    def evaluate(self, weights: dict, split: str, sites: list[str]) -> dict[str, dict[str, float]]:
        self.evals.append((split, list(sites)))
        r = float(weights["w"][0]) if "w" in weights else -1.0
        peak = {"val": 1.0, "test": 2.0}.get(split, 0.0)
        return {s: {"dice": 1.0 - abs(r - peak) / 10, "iou": 0.0, "hd95": 0.0} for s in sites}

    def importance(self, approach: str, weights: dict, site: str) -> dict[str, np.ndarray]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _schedule(tmp: Path, approach: str, protocol: str = "ted-fl") -> tuple[ScriptedExecutor, RunDir, ExperimentConfig]:
    cfg = ExperimentConfig()
    cfg.model = tiny_model_config()
    cfg.protocol = protocol
    cfg.train.rounds = 4
    cfg.train.joint_rounds_factor = 1.0
    cfg.train.steps_per_round = 1
    cfg.privacy.mia = False  # scripted weights are no network to attack
    ex = ScriptedExecutor(["A", "B", "C"])
    run = RunDir.create(tmp, "scripted")
    import ted_fl.schedule.engine as engine

    real = engine.model_weights
    engine.model_weights = lambda m: {"w": np.array([-1.0], dtype=np.float32)}  # type: ignore[assignment]
    try:
        run_schedule(cfg, approach, 0, ex, run)
    finally:
        engine.model_weights = real  # type: ignore[assignment]
    return ex, run, cfg


def test_best_round_is_selected_on_the_validation_split(tmp_path: Path) -> None:
    ex, run, _ = _schedule(tmp_path, "seq")
    for stage in range(3):
        kept = run.load_checkpoint("seq", 0, f"stage{stage}")
        assert kept is not None and float(kept["weights"]["w"][0]) == 1.0  # val's best, not test's (2)
    # selection evaluated the arriving site's validation split only
    during = [e for e in ex.evals if e[0] != "test"]
    assert during and all(e == ("val", [s]) for e, s in zip(during, [x for x in "ABC" for _ in range(4)], strict=True))
    # the "ted-fl" protocol: seq switches to lr_later after the first site
    assert {t.lr for t in ex.tasks if t.stage > 0} == {lr_for(1, r, ExperimentConfig().train) for r in range(4)}


def test_reference_protocol_seq_rate_and_one_run_joint(tmp_path: Path) -> None:
    ex, _, cfg = _schedule(tmp_path / "a", "seq", "reference")
    assert [t.lr for t in ex.tasks if t.stage == 2] == [lr_for(0, r, cfg.train) for r in range(4)]
    ex, run, _ = _schedule(tmp_path / "b", "joint", "reference")
    assert {t.stage for t in ex.tasks} == {0} and all(t.sites == ["A", "B", "C"] for t in ex.tasks)
    assert all(e == ("val", ["A"]) for e in ex.evals if e[0] == "val")  # selected on the first site
    m = pd_rows(run)
    assert sorted(m["stage"].unique()) == [-1, 0, 1, 2]  # the one model stands for every stage
    ex, _, _ = _schedule(tmp_path / "c", "joint", "ted-fl")
    assert [t.sites for t in ex.tasks if t.round == 0] == [["A"], ["A", "B"], ["A", "B", "C"]]


def pd_rows(run: RunDir) -> Any:
    import pandas as pd

    from ted_fl.schedule.engine import ScheduleState

    st = run.load_checkpoint("joint", 0, "last")
    assert st is not None
    rows = ScheduleState(**st).rows
    df = pd.DataFrame(rows)
    return df[df["split"] == "test"]


def test_predict_labels_follows_the_experiment() -> None:
    from ted_fl.continual.evaluation import _predict, predict_labels

    model = trained_bn_model()
    s = split()
    cfg = ExperimentConfig()
    cfg.eval.bn, cfg.protocol = "batch", "reference"
    rescaled = rescale_percentiles(s.images, [np.arange(0, 3), np.arange(3, 6)])
    np.testing.assert_array_equal(predict_labels(model, s, True, cfg), _predict(model, rescaled, 16, "batch"))
    cfg.eval.bn, cfg.protocol = "running", "ted-fl"
    np.testing.assert_array_equal(predict_labels(model, s, True, cfg), _predict(model, s.images, 16, "running"))


# ------------------------------------------------- the teacher of a stage, retention's average, HD95


class RetainingExecutor(ScriptedExecutor):
    """Every site that trains returns the round's weights plus its own step (A +1, B +10, C +100)
    with its own example count (A 2, B 6, C 12): FedAvg's result is known exactly."""

    STEP = {"A": 1.0, "B": 10.0, "C": 100.0}

    def __init__(self, sites: list[str]) -> None:
        super().__init__(sites)
        self.train_sizes = {"A": 2, "B": 6, "C": 12}

    def train(self, task: TrainTask) -> list[TrainResult]:
        self.tasks.append(task)
        return [TrainResult(s, 0, {"w": task.weights["w"] + np.float32(self.STEP[s])}, self.train_sizes[s],
                            {"total": 0.0}, None) for s in task.sites]


def _retaining_run(tmp: Path, approach: str = "kd") -> RetainingExecutor:
    cfg = ExperimentConfig()
    cfg.model = tiny_model_config()
    cfg.train.rounds, cfg.train.steps_per_round, cfg.train.select_best = 3, 1, False
    cfg.federated.retention = 1  # stage 1: A and B train, stage 2: B and C
    cfg.privacy.mia = False
    ex = RetainingExecutor(["A", "B", "C"])
    import ted_fl.schedule.engine as engine

    real = engine.model_weights
    engine.model_weights = lambda m: {"w": np.array([0.0], dtype=np.float32)}  # type: ignore[assignment]
    try:
        run_schedule(cfg, approach, 0, ex, RunDir.create(tmp, "retaining"))
    finally:
        engine.model_weights = real  # type: ignore[assignment]
    return ex


def test_teacher_is_frozen_for_the_whole_stage(tmp_path: Path) -> None:
    """The teacher of stage t is the model that ended stage t - 1, unchanged over all of stage t's
    rounds while the student moves on (a teacher refreshed every round would be last round's model)."""
    ex = _retaining_run(tmp_path)
    assert [t.teacher for t in ex.tasks if t.stage == 0] == [None] * 3  # nothing to distil from yet
    for stage in (1, 2):
        tasks = [t for t in ex.tasks if t.stage == stage]
        assert len(tasks) == 3
        start = tasks[0].weights["w"]
        for t in tasks:
            assert t.teacher is not None and t.teacher["w"].tolist() == start.tolist(), (stage, t.round)
        assert tasks[-1].weights["w"][0] != start[0]  # the student did move within the stage


def test_retention_averages_every_retained_sites_update_by_examples(tmp_path: Path) -> None:
    """With retention the round's model is FedAvg over every site that trained, weighted by its
    examples: not the newest site's weights, not an unweighted mean."""
    ex = _retaining_run(tmp_path, "seq")
    assert [t.sites for t in ex.tasks if t.round == 0] == [["A"], ["A", "B"], ["B", "C"]]
    step = {("A",): 1.0, ("A", "B"): (2 * 1 + 6 * 10) / 8, ("B", "C"): (6 * 10 + 12 * 100) / 18}
    for before, after in zip(ex.tasks, ex.tasks[1:], strict=False):
        assert after.weights["w"][0] == pytest.approx(before.weights["w"][0] + step[tuple(before.sites)]), \
            (before.stage, before.round)


def test_executors_aggregate_retained_sites_by_examples() -> None:
    """The in-process and the Flower executor average the same way (their own `aggregate`)."""
    from types import SimpleNamespace

    from ted_fl.federated.server_app import FlowerExecutor
    from ted_fl.schedule.in_process import LocalExecutor

    results = [TrainResult("B", 0, {"w": np.array([10.0], np.float32)}, 6, {}, None),
               TrainResult("C", 0, {"w": np.array([100.0], np.float32)}, 12, {}, None)]
    want = (6 * 10 + 12 * 100) / 18
    local = LocalExecutor.aggregate(SimpleNamespace(dp=None), None, results)  # type: ignore[arg-type]
    flower = FlowerExecutor.aggregate(SimpleNamespace(cfg=ExperimentConfig(), _aggregated=None),  # type: ignore[arg-type]
                                      None, results)  # type: ignore[arg-type]
    assert float(local["w"][0]) == pytest.approx(want) and float(flower["w"][0]) == pytest.approx(want)


def test_hd95_is_a_95th_percentile_not_the_maximum() -> None:
    """A 20 x 20 square predicted exactly plus one stray pixel 31 px away: 1 of the prediction's 77
    surface pixels is far, so the 95th percentile is 0 (the maximum, HD100, would be 31)."""
    gt = np.zeros((1, 64, 64), dtype=bool)
    gt[0, 10:30, 10:30] = True
    pred = gt.copy()
    pred[0, 20, 60] = True  # 31 px right of the square's right edge (column 29)
    assert _hd95(pred, gt) < 1.0
    assert hd95_pooled_slice(pred[0], gt[0]) < 1.0 and _hd95_pooled(pred, gt) < 1.0
    many = gt.copy()
    many[0, 10:30, 60] = True  # a whole stray column (20 of 96 surface pixels): now the tail counts
    assert _hd95(many, gt) == pytest.approx(31.0)
