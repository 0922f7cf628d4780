"""`gpu`: the GPU path per approach (step time, images/s, peak memory, clients per GPU) and the
simulator's per-round overhead against the bare loop.

Each approach trains rounds through `SiteWorker.train_round`, the call a Flower client makes:
the split kept on the device, bf16 autocast (`train.amp = "auto"`), channels-last and cuDNN
autotuning (`train.cudnn_benchmark`), the teacher under inference mode, one teacher forward
over batch and probes. Figures are from the second round (the first pays the autotuning and
the device copies). Clients per GPU: how many such clients fit, by `federated.num_gpus`
(Ray packs 1/num_gpus clients on a GPU) and by memory (the GPU's memory over the client's peak
plus a CUDA context). The overhead part runs the same small workload through
`python -m ted_fl.centralized` (the bare loop) and `python -m ted_fl.simulate` (Flower + Ray, clients
given `federated.num_gpus`) and compares their median steady round times. Without a GPU the same
code runs on the CPU and the command says so; the memory columns are then left empty.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ted_fl.bench import common as C
from ted_fl.config import ExperimentConfig, load_experiment

CUDA_CONTEXT_MIB = 500.0  # what a process's CUDA context and allocator reserve besides tensors (typical)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("gpu", help="GPU path per approach: step time, images/s, peak memory, clients per GPU")
    p.add_argument("--quick", action="store_true", help="tiny workload (the test suite's; runs on CPU too)")
    p.add_argument("--config", default="quick", help="workload: an experiment file (default quick.toml)")
    p.add_argument("--approach", nargs="+", default=["seq", "kd", "ted_gugf"], help="approaches")
    p.add_argument("--steps", type=int, help="steps per measured round (default 50; --quick 3)")
    p.add_argument("--repeats", type=int, help="centralized/simulate pairs for the overhead (default 2; --quick 1)")
    p.add_argument("--num-gpus", type=float, default=0.25,
                   help="federated.num_gpus per client on a GPU (default 0.25: four clients per GPU)")
    p.add_argument("--out", default="runs/bench", help="folder for the run directories")
    p.add_argument("--doc", help="write the section here (default docs/benchmarks.md unless --quick)")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    cfg = load_experiment(args.config)
    cfg.seeds = cfg.seeds[:1]
    if args.quick:
        cfg.data.order, cfg.data.size, cfg.data.synthetic_volumes = ["RUNMC", "BMC"], 32, 4
        cfg.model.channels, cfg.model.strides = [4, 8, 16], [2, 2]
        cfg.train.rounds, cfg.train.steps_per_round, cfg.train.batch_size = 2, 3, 4
    return cfg


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    return "CPU (no GPU found)"


def step_costs(cfg: ExperimentConfig, approaches: list[str], steps: int) -> pd.DataFrame:
    """Per approach: seconds per step, images/s and peak device memory of a client's round."""
    import psutil

    from ted_fl.continual.approaches import get_approach
    from ted_fl.continual.learner import amp_dtype_for
    from ted_fl.data import load_sites
    from ted_fl.engine import model_weights
    from ted_fl.worker import SiteWorker, probes_for

    site = load_sites(cfg.data, cfg.data.split_seed)[0]
    worker = SiteWorker(cfg)
    dev = worker.device
    weights = model_weights(worker.student)
    count = (cfg.loss.ska_count or cfg.train.batch_size) * steps
    shape = tuple(site.train.images.shape[1:])
    rows = []
    for name in approaches:
        appr = get_approach(name, cfg.loss)
        teacher = worker.set_teacher((name, 0), weights) if appr.needs_teacher else None
        probes = probes_for(cfg, 1, count, shape) if appr.needs_probes else None
        times = []
        clock = time.perf_counter if dev.type == "cuda" else time.process_time  # CPU: the work, not the load
        for rnd in range(2):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = clock()
            worker.train_round(approach=name, data=site.train, weights=weights, teacher=teacher, aux={},
                               steps=steps, lr=1e-4, seed=rnd, probes=probes, optimizer_state=None, val=None,
                               per_volume=site.per_volume)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(clock() - t0)
        step_s = times[-1] / steps
        peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
        amp = amp_dtype_for(cfg.train.amp, dev)
        rows.append(dict(approach=name, step_ms=1000 * step_s, images_per_s=cfg.train.batch_size / step_s,
                         peak_gpu_mib=peak, rss_mib=psutil.Process().memory_info().rss / 2**20,
                         precision=str(amp).replace("torch.", "") if amp else "float32",
                         first_round_s=times[0]))
    return pd.DataFrame(rows)


def clients_per_gpu(peak_mib: float, num_gpus: float, device: torch.device) -> tuple[float, float]:
    """(by federated.num_gpus, by memory); NaN where it does not apply (no GPU, no fraction)."""
    by_fraction = math.floor(1.0 / num_gpus + 1e-9) if num_gpus > 0 else float("nan")
    if device.type != "cuda" or not math.isfinite(peak_mib):
        return by_fraction, float("nan")
    total = torch.cuda.get_device_properties(device).total_memory / 2**20
    return by_fraction, math.floor(total / (peak_mib + CUDA_CONTEXT_MIB))


def overhead(cfg: ExperimentConfig, work: Path, repeats: int) -> dict[str, float]:
    """Median steady round time of the simulator and of the centralized bare loop, runs alternated
    (centralized, simulate, centralized, ...) so that a shared machine's load hits both alike."""
    from ted_fl.bench.overhead import steady_rounds

    rounds: dict[str, list[float]] = {"centralized": [], "simulate": []}
    for i in range(repeats):
        for mode in rounds:
            m = C.run_cli(mode, cfg, work, f"{mode}-{i}")
            rounds[mode].extend(steady_rounds(m.run).tolist())
    return {mode: float(pd.Series(v).median()) for mode, v in rounds.items()}


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ted_fl.worker import pick_device

    t_all = time.perf_counter()
    cfg = workload(args)
    device = pick_device(cfg.train.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print("no GPU found: running the GPU path's code on the CPU (memory columns empty)", flush=True)
    steps = args.steps or (3 if args.quick else 50)
    df = step_costs(cfg, list(args.approach), steps)
    num_gpus = args.num_gpus if on_gpu else 0.0
    packed = [clients_per_gpu(p, num_gpus, device) for p in df["peak_gpu_mib"]]
    df["clients_per_gpu_by_num_gpus"] = [a for a, _ in packed]
    df["clients_per_gpu_by_memory"] = [b for _, b in packed]
    C.print_table(f"gpu: {device_name(device)}, {cfg.data.size} px, batch {cfg.train.batch_size}, "
                  f"{steps} steps a round", df)
    sim_cfg = copy.deepcopy(cfg)
    sim_cfg.approaches = [a for a in args.approach if a != "joint"][-1:] or ["seq"]
    sim_cfg.federated.num_gpus = num_gpus
    if not args.quick:  # three sites, three rounds: enough steady rounds, a few minutes on a CPU
        from ted_fl.data import site_order

        sim_cfg.data.order, sim_cfg.train.rounds = site_order(cfg.data)[:3], 3
    work = Path(args.out) / time.strftime("gpu-%Y%m%d-%H%M%S")
    load = os.getloadavg()[0]
    rounds = overhead(sim_cfg, work, args.repeats or (1 if args.quick else 2))
    over_ms = 1000 * (rounds["simulate"] - rounds["centralized"])
    ratio = rounds["simulate"] / rounds["centralized"]
    over = (f"simulator per-round overhead ({sim_cfg.approaches[0]}, {sim_cfg.train.steps_per_round} steps a "
            f"round): {over_ms:.0f} ms ({1000 * rounds['simulate']:.0f} ms a round vs "
            f"{1000 * rounds['centralized']:.0f} ms for the bare loop, ratio {ratio:.2f}; wall time, load average "
            f"{load:.1f} when it started)")
    print(over)
    t = df.set_index("approach")
    ted = t["images_per_s"].get("ted_gugf", float("nan"))
    line = (f"gpu: {device_name(device)}; " + ", ".join(f"{a} {r.step_ms:.1f} ms/step"
                                                       for a, r in t.iterrows())
            + f"; ted_gugf {ted:.0f} images/s; simulator round overhead {over_ms:.0f} ms")
    doc = C.doc_target(args)
    if doc:
        note = ("" if on_gpu else "**No GPU was found on this machine**: these figures are the GPU path's code "
                "running on the CPU (full precision, no cuDNN); rerun the command on a GPU machine for the "
                "GPU figures. ")
        body = (
            "## gpu\n\n"
            f"Command: `{C.command_line(argv)}` ({time.perf_counter() - t_all:.0f} s).\n\n{C.machine_md()} "
            f"Device: **{device_name(device)}**.\n\n{note}Workload: `{args.config}` ({cfg.data.size} px, batch "
            f"{cfg.train.batch_size}, channels {cfg.model.channels}), a client's round of {steps} steps through "
            f"`SiteWorker.train_round` (amp {cfg.train.amp}, cudnn_benchmark {cfg.train.cudnn_benchmark}); "
            "figures of the second round (on a CPU: the process's CPU time). Clients per GPU: by `federated.num_gpus` "
            f"({num_gpus:g} per client here) and by memory (GPU memory / (peak + {CUDA_CONTEXT_MIB:.0f} MiB "
            f"of CUDA context)).\n\n{C.md_table(df)}\n\nOverhead: {over}; runs in `{work}`.\n\n`{line}`"
        )
        C.write_section("gpu", body, doc)
        print(f"wrote the gpu section of {doc}")
    print(line)
    return 0
