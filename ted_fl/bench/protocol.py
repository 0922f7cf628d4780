"""`protocol`: what a full paper protocol costs, estimated from a few measured steps before starting it.

    python -m ted_fl.bench protocol --config simulations/prostate-ted.toml

The protocol's schedule is counted exactly, stage by stage, from the engine's own plan
(`engine.plan_stages`: sites in order, rounds a stage, steps a round = ceil(train images / batch)
when steps_per_round = 0, approaches x seeds). Joint follows the config's protocol: under
protocol = "reference" it is one run over all sites (joint_rounds_factor times the rounds, steps
over the union of every site), under "ted-fl" a stage per site on the union of the sites seen. The time of
one training step is *measured* per approach at the protocol's image size, batch, model and
precision on this machine's device (a teacher-free seq step on the first site, where no
approach has a teacher yet), and so is the evaluation time per image (forward, Dice, IoU,
HD95 per volume). The estimate multiplies:

    train = sum over approaches, seeds, stages: rounds x steps x step time (seq's where no teacher)
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
import copy
import math
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd
import psutil
import torch

from ted_fl.bench import common as C
from ted_fl.bench.step import Bench
from ted_fl.config import ExperimentConfig, load_experiment, split_seed_of
from ted_fl.data import load_sites, resolve_out_channels


def add_parser(sub: Any) -> None:
    p = sub.add_parser("protocol", help="estimate the wall time and memory of a full protocol from measured steps")
    C.add_arguments(p, quick="small images and model, one timed step (the test suite's)", config="prostate-ted",
                    config_help="the protocol: an experiment file", out="unused (accepted like every subcommand)")
    p.add_argument("--data-dir", help="real data folder (default: the config's, else the synthetic twin's sizes)")
    p.add_argument("--train-per-site", type=int,
                   help="count this many training images a site instead of the loaded data's (val/test scaled alike)")
    p.add_argument("--steps", type=int, help="timed steps per approach (default 5; --quick 1)")
    p.add_argument("--compiled", nargs="*",
                   help="approaches also timed with train.compile = on (default: all; --quick: seq; the others "
                        "are scaled by seq's compiled/eager ratio)")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_experiment(args.config)
    if args.data_dir is not None:
        cfg.data.data_dir = args.data_dir
    if args.quick:
        C.tiny(cfg).model.name = "monai_unet"
    return cfg


ONE_RUN = "all sites (one run)"  # the stage column of joint under protocol "reference"


def schedule(cfg: ExperimentConfig, sizes: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Per approach and stage (the engine's own `plan_stages`, so a one-run joint under protocol
    "reference" is one stage over every site): rounds, steps a round, training steps with / without
    teacher, images evaluated (the untrained model's test counted on the first stage) and importance
    batches. Per seed."""
    from ted_fl.continual.approaches import get_approach
    from ted_fl.schedule.engine import plan_stages

    order = list(sizes)
    all_test = sum(s["test"] for s in sizes.values())
    rows = []
    for name in cfg.approaches:
        appr = get_approach(name, cfg.loss)
        plans = plan_stages(cfg, name, order, {k: v["train"] for k, v in sizes.items()})
        for plan in plans:
            steps = plan.n_rounds * plan.steps * (1 if appr.joint else len(plan.sites))
            taught = plan.stage > 0 and appr.needs_teacher
            evals = all_test if plan.stage == 0 else 0  # the untrained model's test: FWT's baseline
            if cfg.train.select_best:
                evals += plan.n_rounds * sizes[plan.site]["val"]
            if cfg.train.eval_every_round:
                evals += plan.n_rounds * all_test
            evals += all_test
            if cfg.train.eval_val_all:
                evals += sum(s["val"] for s in sizes.values())
            imp = math.ceil(sizes[plan.site]["train"] / cfg.train.batch_size) if appr.importance else 0
            rows.append(dict(approach=name, stage=plan.stage,
                             stage_site=ONE_RUN if len(plans) == 1 and len(order) > 1 else plan.site,
                             sites=len(plan.sites), rounds=plan.n_rounds, steps_a_round=plan.steps,
                             seq_steps=0 if taught else steps, teacher_steps=steps if taught else 0,
                             images_evaluated=evals, importance_batches=imp))
    return pd.DataFrame(rows)


def measure_steps(cfg: ExperimentConfig, approaches: list[str], steps: int,
                  compile: str = "off") -> tuple[dict[str, float], float, str]:  # noqa: A002
    """Seconds per step per approach (with a teacher), the training process's peak memory (MiB), its kind;
    `compile` "on": the steps with train.compile's compiled forwards (the warm-up step pays the compilation)."""
    from ted_fl.continual.device import amp_dtype_for
    from ted_fl.schedule.worker import pick_device

    device = pick_device(cfg.train.device)
    bench = Bench(cfg, device)
    amp = amp_dtype_for(cfg.train.amp, device)
    out: dict[str, float] = {}
    peak_rss = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for name in dict.fromkeys(["seq", *approaches]):
        bench.timed(lambda name=name: bench.step(name, amp=amp, compile=compile), 1)  # warm-up
        out[name] = bench.timed(lambda name=name: bench.step(name, amp=amp, compile=compile), steps)
        peak_rss = max(peak_rss, psutil.Process().memory_info().rss)
    if device.type == "cuda":
        return out, torch.cuda.max_memory_allocated() / 2**20, "GPU memory allocated"
    return out, peak_rss / 2**20, "process RSS"


def eval_seconds_per_image(cfg: ExperimentConfig, site: Any, slices: str | None = None) -> float:
    """Evaluation (forward, Dice, IoU, HD95) seconds per image, on a site's test split, as the protocol
    evaluates (eval.bn, its rescale and HD95); `slices` overrides eval.slices ("one": the reference's loop)."""
    from ted_fl.continual.evaluation import eval_options, evaluate
    from ted_fl.continual.networks import build_model
    from ted_fl.schedule.worker import pick_device

    device = pick_device(cfg.train.device)
    resolve_out_channels(cfg)
    model = build_model(cfg.model).to(device)
    opts: dict[str, Any] = {**eval_options(cfg), **({"slices": slices} if slices else {})}
    evaluate(model, site.val, per_volume=site.per_volume, **opts)  # warm-up
    clock = time.process_time if device.type == "cpu" else time.perf_counter  # as the step times
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    evaluate(model, site.test, per_volume=site.per_volume, **opts)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - t0) / len(site.test)


def costs(cfg: ExperimentConfig, sched: pd.DataFrame, step_s: Mapping[str, float], eval_s: float,
          seeds: int) -> pd.DataFrame:
    """Each stage's seconds (all seeds): steps x the measured step time (seq's for an approach's
    teacher-free steps, its own with a teacher), importance batches at seq's step time, and images
    evaluated x the measured evaluation time per image."""
    from ted_fl.continual.approaches import get_approach

    out = sched.copy()
    plain, taught = [], []
    for a in out["approach"]:
        appr = get_approach(a, cfg.loss)
        plain.append(step_s["seq"] if appr.needs_teacher else step_s[a])
        taught.append(step_s[a])
    out["steps"] = out["seq_steps"] + out["teacher_steps"]
    out["train_s"] = seeds * (out["seq_steps"] * plain + out["teacher_steps"] * taught
                              + out["importance_batches"] * step_s["seq"])
    out["eval_s"] = seeds * out["images_evaluated"] * eval_s
    out["total_s"] = out["train_s"] + out["eval_s"]
    return out


def best_settings(cfg: ExperimentConfig, args: argparse.Namespace, site: Any, sizes: dict[str, dict[str, int]],
                  eager: dict[str, float], steps: int, seeds: int) -> tuple[float, str, pd.DataFrame]:
    """The protocol's total with the faster of eager and compiled steps per approach and the batched
    per-slice evaluation (eval.slices = "batched"): (seconds, a line saying how, the per-approach table).
    Approaches not timed compiled (--compiled) take their eager time x seq's compiled / eager ratio."""
    timed = list(dict.fromkeys(["seq", *(args.compiled if args.compiled is not None else
                                         (["seq"] if args.quick else cfg.approaches))]))
    on, _, _ = measure_steps(cfg, [a for a in timed if a != "seq"], steps, compile="on")
    ratio = on["seq"] / eager["seq"]
    rows: list[dict[str, Any]] = []
    best_step: dict[str, float] = {}
    for a in dict.fromkeys(["seq", *cfg.approaches]):
        compiled_s = on.get(a, eager[a] * ratio)
        best_step[a] = min(eager[a], compiled_s)
        rows.append(dict(approach=a, eager_ms=1000 * eager[a], compiled_ms=1000 * compiled_s,
                         compiled="timed" if a in on else "scaled by seq's ratio",
                         best="compiled" if compiled_s < eager[a] else "eager"))
    one = eval_seconds_per_image(cfg, site, "one")
    batched = eval_seconds_per_image(cfg, site, "batched")
    total = float(costs(cfg, schedule(cfg, sizes), best_step, min(one, batched), seeds)["total_s"].sum())
    line = (f"Best settings: each approach's faster step (table; train.compile = on was timed for "
            f"{', '.join(on)}), evaluation {1000 * min(one, batched):.1f} ms an image "
            f"(eval.slices = {'batched' if batched <= one else 'one'}; one slice a forward: {1000 * one:.1f} ms, "
            f"batched: {1000 * batched:.1f} ms): about {hours(total)} in one process.")
    return total, line, pd.DataFrame(rows)


def hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s")



def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ted_fl.continual.approaches import get_approach
    from ted_fl.continual.networks import build_model
    from ted_fl.schedule.engine import model_weights
    from ted_fl.schedule.worker import pick_device

    t_all = time.perf_counter()
    cfg = workload(args)
    sites = load_sites(cfg.data, split_seed_of(cfg))
    sizes = {s.name: {"train": len(s.train), "val": len(s.val), "test": len(s.test)} for s in sites}
    if args.train_per_site:
        for v in sizes.values():
            f = args.train_per_site / v["train"]
            v.update(train=args.train_per_site, val=math.ceil(v["val"] * f), test=math.ceil(v["test"] * f))
    data_mib = sum(s.train.images.nbytes + s.val.images.nbytes + s.test.images.nbytes
                   + s.train.masks.nbytes + s.val.masks.nbytes + s.test.masks.nbytes for s in sites) / 2**20
    steps = args.steps or (1 if args.quick else 5)
    step_s, peak_mib, peak_kind = measure_steps(cfg, list(cfg.approaches), steps)
    eval_s = eval_seconds_per_image(cfg, sites[0])  # as the config evaluates (eval.slices)
    seeds = len(cfg.seeds)
    stages = costs(cfg, schedule(cfg, sizes), step_s, eval_s, seeds)
    best, best_line, best_table = best_settings(cfg, args, sites[0], sizes, step_s, steps, seeds)
    df = stages.groupby("approach", sort=False).agg(
        stages=("stage", "count"), steps=("steps", "sum"), images_evaluated=("images_evaluated", "sum"),
        train_s=("train_s", "sum"), eval_s=("eval_s", "sum"), total_s=("total_s", "sum")).reset_index()
    total = float(df["total_s"].sum())
    measured = pd.DataFrame([dict(approach=a, step_ms=1000 * step_s[a], ratio_to_seq=step_s[a] / step_s["seq"],
                                  teacher="yes" if get_approach(a, cfg.loss).needs_teacher else "no")
                             for a in dict.fromkeys(["seq", *cfg.approaches])])
    per_stage = stages.pivot_table(index="approach", columns="stage_site", values="total_s", aggfunc="sum",
                                   sort=False)
    per_stage = per_stage[[c for c in [*sizes, ONE_RUN] if c in per_stage.columns]]
    per_stage = per_stage.map(lambda v: hours(v) if pd.notna(v) else "–").reset_index()
    per_stage.columns.name = None
    device = pick_device(cfg.train.device)
    resolve_out_channels(cfg)
    model_mib = sum(v.nbytes for v in model_weights(build_model(cfg.model)).values()) / 2**20
    ckpt_mib = model_mib * len(cfg.approaches) * seeds * (len(sites) + 4)  # stage<k>.pt + last.pt (3 models)
    shown = df.drop(columns=["train_s", "eval_s", "total_s"]).assign(
        train=[hours(v) for v in df["train_s"]], eval=[hours(v) for v in df["eval_s"]],
        total=[hours(v) for v in df["total_s"]])
    counts = ", ".join(f"{k} {v['train']}/{v['val']}/{v['test']}" for k, v in sizes.items())
    how = (f"Extrapolation: {len(sites)} sites ({counts} "
           f"train/val/test images{', train counts from --train-per-site' if args.train_per_site else ''}), "
           f"{cfg.train.rounds} rounds a stage, steps a round = "
           + (f"ceil(train images / {cfg.train.batch_size})" if not cfg.train.steps_per_round
              else str(cfg.train.steps_per_round))
           + f", {seeds} seed(s). Step times: mean of {steps} timed step(s) after one warm-up, per approach with "
           f"a teacher and {cfg.loss.ska_count or cfg.train.batch_size} SKA probes, on {device.type} at "
           f"{cfg.data.size} px, batch {cfg.train.batch_size} (the teacher-free steps of a teacher approach, stage 0, at seq's time). "
           f"Evaluation: {1000 * eval_s:.1f} ms an image measured on {sites[0].name}'s test split, times the "
           f"images the schedule evaluates. train = steps x step time (+ importance passes for ewc/mas); "
           f"total = (train + eval) x seeds.")
    joint = ""
    if "joint" in cfg.approaches:
        j = stages[stages["approach"] == "joint"]
        other = copy.deepcopy(cfg)
        other.protocol = "ted-fl" if cfg.protocol == "reference" else "reference"
        alt = int(schedule(other, sizes).query("approach == 'joint'")[["seq_steps", "teacher_steps"]].sum().sum())
        kind = ("one run over all sites" if len(j) == 1 and len(sites) > 1 else
                "a stage per site on the union of the sites seen so far")
        joint = (f"Joint under protocol \"{cfg.protocol}\" (the engine's `plan_stages`): {kind}, "
                 + "; ".join(f"{r.rounds} rounds x {r.steps_a_round} steps on {r.sites} site(s)"
                             for r in j.itertuples())
                 + f" = {int(j['steps'].sum())} steps (protocol \"{other.protocol}\" would count {alt}).")
    mem = (f"Memory: peak {peak_kind} of a training process {peak_mib:.0f} MiB (with the data of every site "
           f"loaded: {data_mib:.0f} MiB); model {model_mib:.2f} MiB; checkpoints about {ckpt_mib:.0f} MiB on disk.")
    C.print_table(f"protocol {cfg.name}: measured step times on this {device.type} (ms)", measured)
    C.print_table(f"protocol {cfg.name}: time per stage (train + eval, {seeds} seed(s))", per_stage)
    C.print_table(f"protocol {cfg.name}: {len(cfg.approaches)} approaches x {seeds} seed(s), one process", shown)
    C.print_table("protocol: the step and the evaluation with the best settings", best_table)
    for text in (how, joint, mem, best_line):
        if text:
            print(text)
    line = (f"protocol: {cfg.name} about {hours(total)} in one process on this {device.type} "
            f"(peak {peak_mib:.0f} MiB {peak_kind}); best settings {hours(best)}")
    body = (
        f"{C.section_head('protocol', argv, time.perf_counter() - t_all)}\n\n"
        f"Protocol `{args.config}` (protocol = \"{cfg.protocol}\"): {len(cfg.approaches)} approaches, seeds "
        f"{cfg.seeds}, {cfg.data.size} px, U-Net channels {cfg.model.channels} ({cfg.model.norm} norm), batch "
        f"{cfg.train.batch_size}, {cfg.train.rounds} rounds a site, data: "
        f"{cfg.data.data_dir or 'the synthetic twin (the real data would change the image counts)'}.\n\n"
        f"Measured step times (ms) on this {device.type}, the basis of the estimate:\n\n{C.md_table(measured)}\n\n"
        f"Per stage (train + eval, all seeds):\n\n{C.md_table(per_stage)}\n\nPer approach:\n\n"
        f"{C.md_table(shown)}\n\n{how}\n\n" + (f"{joint}\n\n" if joint else "") + f"{mem}\n\n"
        f"The same protocol with the best settings (train.compile, eval.slices), per approach:\n\n"
        f"{C.md_table(best_table)}\n\n{best_line}\n\n`{line}`"
    )
    return C.finish(args, "protocol", line, body)
