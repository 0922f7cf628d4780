"""The benchmarks' arithmetic, without running anything: what `bench protocol` counts and how
`bench gpu` turns round times into the simulator's overhead."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from ted_fl.bench.gpu import overhead_summary
from ted_fl.bench.protocol import ONE_RUN, costs, schedule
from ted_fl.config import ExperimentConfig

SIZES = {"A": {"train": 8, "val": 2, "test": 3}, "B": {"train": 12, "val": 4, "test": 5},
         "C": {"train": 4, "val": 1, "test": 2}}


def protocol_cfg(protocol: str) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.protocol = protocol  # type: ignore[assignment]
    cfg.approaches = ["seq", "ted_gugf", "ewc", "joint"]
    cfg.train.rounds, cfg.train.steps_per_round, cfg.train.batch_size = 3, 0, 4
    cfg.train.joint_rounds_factor, cfg.train.select_best = 2.0, True
    return cfg


def test_protocol_joint_is_one_run_under_reference_and_a_stage_per_site_otherwise() -> None:
    ref = schedule(protocol_cfg("reference"), SIZES).set_index("approach")
    joint = ref.loc[["joint"]]
    assert len(joint) == 1 and joint["stage_site"].item() == ONE_RUN
    # 6 rounds (3 x 2) of ceil(24 / 4) = 6 steps over the union of every site
    assert joint["rounds"].item() == 6 and joint["steps_a_round"].item() == 6 and joint["seq_steps"].item() == 36
    # the untrained test (10 images), 6 rounds x the FIRST site's validation (2), one test (10)
    assert joint["images_evaluated"].item() == 10 + 6 * 2 + 10
    ours = schedule(protocol_cfg("ted-fl"), SIZES).set_index("approach").loc["joint"]
    assert list(ours["stage_site"]) == ["A", "B", "C"]
    assert list(ours["steps_a_round"]) == [2, 5, 6]  # ceil(8/4), ceil(20/4), ceil(24/4)
    assert int(ours["seq_steps"].sum()) == 6 * (2 + 5 + 6)


def test_protocol_counts_teacher_steps_and_importances_per_stage() -> None:
    s = schedule(protocol_cfg("reference"), SIZES)
    ted = s[s["approach"] == "ted_gugf"]
    assert list(ted["seq_steps"]) == [3 * 2, 0, 0] and list(ted["teacher_steps"]) == [0, 3 * 3, 3 * 1]
    assert list(s[s["approach"] == "ewc"]["importance_batches"]) == [2, 3, 1]
    step_s = {"seq": 1.0, "ted_gugf": 3.0, "ewc": 1.5, "joint": 1.0}
    c = costs(protocol_cfg("reference"), s, step_s, eval_s=0.5, seeds=2).set_index(["approach", "stage"])
    # stage 1 of ted_gugf: 9 teacher steps at its own time; stage 0: 6 steps at seq's; eval 0.5 s an image
    assert c.loc[("ted_gugf", 1), "train_s"] == pytest.approx(2 * 9 * 3.0)
    assert c.loc[("ted_gugf", 0), "train_s"] == pytest.approx(2 * 6 * 1.0)
    # ewc has no teacher: its own step time, plus one importance pass at seq's step time
    assert c.loc[("ewc", 1), "train_s"] == pytest.approx(2 * (9 * 1.5 + 3 * 1.0))
    assert c.loc[("ted_gugf", 2), "eval_s"] == pytest.approx(2 * 0.5 * (3 * 1 + 10))


def test_gpu_overhead_is_taken_inside_each_run() -> None:
    """The simulator's added time is (round - work) of its run minus that of the bare loop's run,
    whatever load slowed either run's work: a bare loop three times slower changes nothing."""
    def rounds(mode: str, work: float, extra: float) -> pd.DataFrame:
        return pd.DataFrame(dict(mode=mode, round_s=[work + extra] * 3, work_s=[work] * 3, work_cpu_s=[0.5] * 3,
                                 overhead_s=[extra] * 3, end_to_end_s=[9.0] * 3))

    df = pd.concat([rounds("centralized", 3.0, 0.01), rounds("simulate", 1.0, 0.11)])
    table, fig = overhead_summary(df)
    assert fig["added_s"] == pytest.approx(0.10)
    assert fig["ratio"] == pytest.approx((1.0 + 0.11) / (1.0 + 0.01))
    assert fig["raw_ratio"] == pytest.approx(1.11 / 3.01) and fig["work_cpu_ratio"] == pytest.approx(1.0)
    assert list(table.columns) == ["measure", "bare_loop", "simulator", "note"]


def test_bench_arguments_are_shared() -> None:
    from ted_fl.bench import build_parser

    p = build_parser()
    for cmd in ("gpu", "protocol", "probes", "overhead", "step", "sweep"):
        args = p.parse_args([cmd, "--quick", "--doc", "x.md"])
        assert isinstance(args, argparse.Namespace) and args.quick and args.doc == "x.md" and args.out == "runs/bench"
