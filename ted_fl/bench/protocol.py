"""`protocol`: what a full paper protocol costs, estimated from a few measured steps before starting it.

    python -m ted_fl.bench protocol --config simulations/prostate-ted.toml

The protocol's schedule is counted exactly (the engine's own rules: sites in order, rounds a
stage, steps a round = ceil(train images / batch) when steps_per_round = 0, joint on the union
of the sites seen for joint_rounds_factor times the rounds, approaches x seeds). The time of
one training step is *measured* per approach at the protocol's image size, batch, model and
precision on this machine's device (a teacher-free seq step on the first site, where no
approach has a teacher yet), and so is the evaluation time per image (forward, Dice, IoU,
HD95 per volume). The estimate multiplies:

    train = sum over approaches, seeds, stages: rounds x steps x step time (seq's on stage 0)
    eval  = images evaluated x eval time per image: the initial test of every site, every
            round's validation of the arriving site (select_best), every stage's test of all
            sites (and the validation of all sites with eval_val_all)
    importances (ewc, mas) = one pass over the site per stage at seq's step time

Memory: the measured peak of a training process (RSS on CPU, allocated memory on a GPU) and
the data every site holds in memory. On a CPU the measured times are the process's CPU
time (one torch thread: the work itself, whatever else shares the machine), i.e. the wall time
on an otherwise idle core. The figures are for one process running every cell in turn; `python -m ted_fl.sweep` divides the wall time by the cells it runs at once.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import pandas as pd
import torch

from ted_fl.bench import common as C
from ted_fl.config import ExperimentConfig, load_experiment


def add_parser(sub: Any) -> None:
    p = sub.add_parser("protocol", help="estimate the wall time and memory of a full protocol from measured steps")
    p.add_argument("--config", default="prostate-ted", help="the protocol: an experiment file (default prostate-ted)")
    p.add_argument("--quick", action="store_true", help="small images and model, one timed step (the test suite's)")
    p.add_argument("--data-dir", help="real data folder (default: the config's, else the synthetic twin's sizes)")
    p.add_argument("--train-per-site", type=int,
                   help="count this many training images a site instead of the loaded data's (val/test scaled alike)")
    p.add_argument("--steps", type=int, help="timed steps per approach (default 5; --quick 1)")
    p.add_argument("--out", default="runs/bench", help="unused (accepted like every subcommand)")
    p.add_argument("--doc", help="write the section here (default docs/benchmarks.md unless --quick)")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_experiment(args.config)
    if args.data_dir is not None:
        cfg.data.data_dir = args.data_dir
    if args.quick:
        cfg.data.size, cfg.data.synthetic_volumes = 32, 4
        cfg.model.channels, cfg.model.strides = [4, 8, 16], [2, 2]
    return cfg


def schedule(cfg: ExperimentConfig, sizes: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Per approach, per seed: training steps (with / without teacher), images evaluated, importance passes."""
    from ted_fl.continual.approaches import get_approach
    from ted_fl.engine import active_sites, steps_for

    order = list(sizes)
    rows = []
    for name in cfg.approaches:
        appr = get_approach(name, cfg.loss)
        rounds = max(1, round(cfg.train.rounds * cfg.train.joint_rounds_factor)) if appr.joint else cfg.train.rounds
        plain = taught = evals = imp = 0
        evals += sum(s["test"] for s in sizes.values())  # the untrained model's test: FWT's baseline
        for stage, site in enumerate(order):
            sites = active_sites(order, stage, cfg.federated.retention, appr.joint)
            n = sum(sizes[s]["train"] for s in sites) if appr.joint else sizes[site]["train"]
            steps = rounds * steps_for(cfg, n) * (1 if appr.joint else len(sites))
            if stage > 0 and appr.needs_teacher:
                taught += steps
            else:
                plain += steps
            if cfg.train.select_best:
                evals += rounds * sizes[site]["val"]
            if cfg.train.eval_every_round:
                evals += rounds * sum(s["test"] for s in sizes.values())
            evals += sum(s["test"] for s in sizes.values())
            if cfg.train.eval_val_all:
                evals += sum(s["val"] for s in sizes.values())
            if appr.importance:
                imp += math.ceil(sizes[site]["train"] / cfg.train.batch_size)
        rows.append(dict(approach=name, rounds_a_stage=rounds, seq_steps=plain, teacher_steps=taught,
                         images_evaluated=evals, importance_batches=imp))
    return pd.DataFrame(rows)


def measure_steps(cfg: ExperimentConfig, approaches: list[str], steps: int) -> tuple[dict[str, float], float, str]:
    """Seconds per step per approach (with a teacher), the training process's peak memory (MiB), its kind."""
    import psutil

    from ted_fl.bench.step import Bench
    from ted_fl.continual.learner import amp_dtype_for
    from ted_fl.worker import pick_device

    device = pick_device(cfg.train.device)
    bench = Bench(cfg, device)
    amp = amp_dtype_for(cfg.train.amp, device)
    out: dict[str, float] = {}
    peak_rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for name in dict.fromkeys(["seq", *approaches]):
        bench.timed(lambda name=name: bench.step(name, amp=amp), 1)  # warm-up
        out[name] = bench.timed(lambda name=name: bench.step(name, amp=amp), steps)
        peak_rss = max(peak_rss, psutil.Process().memory_info().rss)
    if device.type == "cuda":
        return out, torch.cuda.max_memory_allocated() / 2**20, "GPU memory allocated"
    return out, peak_rss / 2**20, "process RSS"


def eval_seconds_per_image(cfg: ExperimentConfig, site: Any) -> float:
    """Evaluation (forward, Dice, IoU, HD95) seconds per image, on a site's test split."""
    from ted_fl.continual.learner import evaluate
    from ted_fl.continual.networks import build_model
    from ted_fl.worker import pick_device

    device = pick_device(cfg.train.device)
    model = build_model(cfg.model).to(device)
    evaluate(model, site.val, per_volume=site.per_volume)  # warm-up
    clock = time.process_time if device.type == "cpu" else time.perf_counter  # as the step times
    t0 = clock()
    evaluate(model, site.test, per_volume=site.per_volume)
    return (clock() - t0) / len(site.test)


def hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ted_fl.continual.approaches import get_approach
    from ted_fl.continual.networks import build_model
    from ted_fl.data import load_sites
    from ted_fl.engine import model_weights
    from ted_fl.worker import pick_device

    t_all = time.perf_counter()
    cfg = workload(args)
    sites = load_sites(cfg.data, cfg.data.split_seed)
    sizes = {s.name: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for s in sites}
    if args.train_per_site:
        for v in sizes.values():
            f = args.train_per_site / v["train"]
            v.update(train=args.train_per_site, val=math.ceil(v["val"] * f), test=math.ceil(v["test"] * f))
    data_mib = sum(s.train.images.nbytes + s.val.images.nbytes + s.test.images.nbytes
                   + s.train.masks.nbytes + s.val.masks.nbytes + s.test.masks.nbytes for s in sites) / 2**20
    steps = args.steps or (1 if args.quick else 5)
    step_s, peak_mib, peak_kind = measure_steps(cfg, list(cfg.approaches), steps)
    eval_s = eval_seconds_per_image(cfg, sites[0])
    sched = schedule(cfg, sizes)
    seeds = len(cfg.seeds)
    rows = []
    for r in sched.itertuples():
        appr = get_approach(r.approach, cfg.loss)
        taught_s = step_s[r.approach] if appr.needs_teacher else step_s["seq"]
        train = r.seq_steps * (step_s["seq"] if appr.needs_teacher else step_s[r.approach]) \
            + r.teacher_steps * taught_s + r.importance_batches * step_s["seq"]
        ev = r.images_evaluated * eval_s
        rows.append(dict(approach=r.approach, steps=r.seq_steps + r.teacher_steps, step_ms=1000 * step_s[r.approach],
                         ratio_to_seq=step_s[r.approach] / step_s["seq"], images_evaluated=r.images_evaluated,
                         train_s=train * seeds, eval_s=ev * seeds, total_s=(train + ev) * seeds))
    df = pd.DataFrame(rows)
    total = float(df["total_s"].sum())
    device = pick_device(cfg.train.device)
    model_mib = sum(v.nbytes for v in model_weights(build_model(cfg.model)).values()) / 2**20
    ckpt_mib = model_mib * len(cfg.approaches) * seeds * (len(sites) + 4)  # stage<k>.pt + last.pt (3 models)
    shown = df.copy()
    for k in ("train_s", "eval_s", "total_s"):
        shown[k.replace("_s", "")] = [hours(v) for v in df[k]]
    shown = shown.drop(columns=["train_s", "eval_s", "total_s"])
    counts = ", ".join(f"{k} {v['train']}/{v['val']}/{v['test']}" for k, v in sizes.items())
    how = (f"Extrapolation: {len(sites)} sites ({counts} "
           f"train/val/test images{', train counts from --train-per-site' if args.train_per_site else ''}), "
           f"{cfg.train.rounds} rounds a stage, steps a round = "
           + (f"ceil(train images / {cfg.train.batch_size})" if not cfg.train.steps_per_round
              else str(cfg.train.steps_per_round))
           + f", {seeds} seed(s). Step times: mean of {steps} timed step(s) after one warm-up, per approach with "
           f"a teacher and {cfg.loss.ska_count or cfg.train.batch_size} SKA probes, on {device.type} at "
           f"{cfg.data.size} px, batch {cfg.train.batch_size} (stage 0 and teacher-free steps at seq's time). "
           f"Evaluation: {1000 * eval_s:.1f} ms an image measured on {sites[0].name}'s test split, times the "
           f"images the schedule evaluates. train = steps x step time (+ importance passes for ewc/mas); "
           f"total = (train + eval) x seeds.")
    mem = (f"Memory: peak {peak_kind} of a training process {peak_mib:.0f} MiB (with the data of every site "
           f"loaded: {data_mib:.0f} MiB); model {model_mib:.2f} MiB; checkpoints about {ckpt_mib:.0f} MiB on disk.")
    C.print_table(f"protocol {cfg.name}: {len(cfg.approaches)} approaches x {seeds} seed(s), one process", shown)
    print(how)
    print(mem)
    line = (f"protocol: {cfg.name} about {hours(total)} in one process on this {device.type} "
            f"(peak {peak_mib:.0f} MiB {peak_kind})")
    doc = C.doc_target(args)
    if doc:
        body = (
            "## protocol\n\n"
            f"Command: `{C.command_line(argv)}` ({time.perf_counter() - t_all:.0f} s).\n\n{C.machine_md()}\n\n"
            f"Protocol `{args.config}`: {len(cfg.approaches)} approaches, seeds {cfg.seeds}, {cfg.data.size} px, "
            f"U-Net channels {cfg.model.channels} ({cfg.model.norm} norm), batch {cfg.train.batch_size}, "
            f"{cfg.train.rounds} rounds a site, data: "
            f"{cfg.data.data_dir or 'the synthetic twin (the real data would change the image counts)'}.\n\n"
            f"{C.md_table(shown)}\n\n{how}\n\n{mem}\n\n`{line}`"
        )
        C.write_section("protocol", body, doc)
        print(f"wrote the protocol section of {doc}")
    print(line)
    return 0
