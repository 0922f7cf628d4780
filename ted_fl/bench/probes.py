"""`probes`: SKA probes sent as pixels versus regenerated on the client from a seed.

The same workload runs twice in one Flower simulation (`federated.probes = "pixels"`, then
`"seed"`); bytes come from the server's per-kind counters (`bytes_by_kind` in each
checkpoints/<approach>-seed<k>/last.pt) and summary.csv's bytes_sent, time from the
schedule's `round_s` rows. The same counters show how often the teacher travelled: in seed
mode a training message is the weights plus a few config scalars, so whatever is left over
is the teacher, once per stage.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ted_fl.bench import common as C
from ted_fl.bench.federated import simulate_groups
from ted_fl.config import ExperimentConfig, ProbeTransport, choices
from ted_fl.data import site_order
from ted_fl.run.directory import RunDir


def add_parser(sub: Any) -> None:
    p = sub.add_parser("probes", help="SKA probes as pixels vs as a seed: bytes and time per round")
    C.add_arguments(p, quick="tiny workload (the test suite's)")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    cfg = C.workload(args, order=["RUNMC", "BMC", "I2CVB"], rounds=3, steps=5, batch=4)
    cfg.approaches = ["ted_gugf"]
    return cfg


def model_bytes(cfg: ExperimentConfig) -> int:
    """Bytes of the model as one ArrayRecord (as Flower counts them: arrays with their headers)."""
    from ted_fl.continual.networks import build_model
    from ted_fl.continual.weights import model_weights
    from ted_fl.federated.messages import to_record

    return int(to_record(model_weights(build_model(cfg.model))).count_bytes())


def measure(run: RunDir, cfg: ExperimentConfig) -> dict[str, Any]:
    st = run.checkpoint("ted_gugf", cfg.seeds[0], "last")
    kinds = st["executor"]["bytes_by_kind"]
    t = C.time_rows(run)
    rounds = t[t["metric"] == "round_s"]
    later = rounds[rounds["stage"] >= 1]  # stages with a teacher: the rounds that carry probes
    summary = run.summary()
    return dict(
        probes=cfg.federated.probes, bytes_sent=int(summary["bytes_sent"].sum()),
        bytes_received=int(summary["bytes_received"].sum()), train_down=int(kinds.get("train_down", 0)),
        rounds=len(rounds), probe_rounds=len(later),
        round_s_median=float(later[later["round"] > 0]["value"].median()),
        train_down_per_round=float(kinds.get("train_down", 0)) / max(len(rounds), 1),
        teacher_bytes=int(kinds.get("train_down.teacher", 0)), probe_bytes=int(kinds.get("train_down.probes", 0)),
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    base = workload(args)
    work = Path(args.out) / time.strftime("probes-%Y%m%d-%H%M%S")
    pairs = []
    for mode in choices(ProbeTransport):
        cfg = copy.deepcopy(base)
        cfg.federated.probes = mode
        pairs.append((cfg, RunDir.create(work, f"probes-{mode}")))
    t0 = time.perf_counter()
    simulate_groups(pairs)
    wall = time.perf_counter() - t0
    rows = [measure(run, cfg) for cfg, run in pairs]
    df = pd.DataFrame(rows)
    pix, seed = rows

    n_stages = len(site_order(base.data))
    probe_bytes = pix["probe_bytes"] / max(pix["probe_rounds"], 1)
    count = (base.loss.ska_count or base.train.batch_size) * base.train.steps_per_round
    expected = count * base.data.size**2 * 4
    w = model_bytes(base)
    teacher_sends = seed["teacher_bytes"] / w  # the teacher record is the model's arrays
    df["probe_mb_per_round"] = df["probe_bytes"] / df["probe_rounds"].clip(lower=1) / 1e6
    df["teacher_mb"] = df["teacher_bytes"] / 1e6
    df["bytes_sent_mb"] = df["bytes_sent"] / 1e6
    shown = df[["probes", "bytes_sent_mb", "train_down_per_round", "probe_mb_per_round", "teacher_mb",
                "round_s_median", "rounds", "probe_rounds"]].copy()
    shown["train_down_per_round"] = shown["train_down_per_round"] / 1e6
    shown = shown.rename(columns={"train_down_per_round": "train_down_mb_per_round"})
    C.print_table("probes: pixels vs seed (ted_gugf)", shown)
    ratio = pix["bytes_sent"] / seed["bytes_sent"]
    time_ratio = pix["round_s_median"] / seed["round_s_median"]
    facts = (f"Probe payload per round with a teacher: {probe_bytes / 1e6:.2f} MB measured, "
             f"{expected / 1e6:.2f} MB expected ({count} probes x {base.data.size}x{base.data.size} float32). "
             f"Model: {w / 1e6:.3f} MB; teacher bytes sent / model bytes = {teacher_sends:.2f} for "
             f"{n_stages - 1} stages with a teacher (train_down.teacher counter): the teacher travels once a stage.")
    print(facts)
    line = (f"probes: bytes sent ratio pixels/seed {ratio:.2f}, steady round time ratio {time_ratio:.2f}, "
            f"teacher sent {int(np.round(teacher_sends))}x for {n_stages - 1} stages with a teacher")
    body = (
        f"{C.section_head('probes', argv, wall)}\n\n"
        f"Workload: `{args.config}` with approach ted_gugf ({base.data.size} px, {n_stages} sites, "
        f"{base.train.rounds} rounds x {base.train.steps_per_round} steps), run with "
        "`federated.probes = \"pixels\"` then `\"seed\"` in one Flower simulation. Bytes from the "
        "server's counters (`bytes_by_kind` in checkpoints last.pt, summary bytes_sent); round time = "
        "median `round_s` of the rounds after a stage's first, in stages with a teacher.\n\n"
        f"{C.md_table(shown)}\n\n{facts}\n\n`{line}`"
    )
    return C.finish(args, "probes", line, body)
