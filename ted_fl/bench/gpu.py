"""`gpu`: the GPU path per approach (step time, images/s, peak memory, clients per GPU) and the
simulator's per-round overhead against the bare loop.

Each approach trains rounds through `SiteWorker.train_round`, the call a Flower client makes:
the split kept on the device, bf16 autocast (`train.amp = "auto"`), channels-last and cuDNN
autotuning (`train.cudnn_benchmark`), the teacher under inference mode, one teacher forward
over batch and probes. Figures are from the second round (the first pays the autotuning and
the device copies). Clients per GPU: how many such clients fit, by `federated.num_gpus`
(Ray packs 1/num_gpus clients on a GPU) and by memory (the GPU's memory over the client's peak,
`torch.cuda.max_memory_allocated`, plus a CUDA context). A table says, switch by switch, whether
the path was on and what it measured; without a GPU each GPU-only switch says that it is absent
and why, and the same code runs on the CPU. The switches are read from what the steps used (the
worker's `trace`): "split kept on the device" is on when every measured round drew its batches from
one device tensor (it read "off" on the H200 because it looked the split up under "cuda" while the
cache held it under "cuda:0"); channels-last is read on a kernel wider than 1 x 1 (a 1 x 1 head's
layout is ambiguous, which made reference_unet read "off") and on the step's input batch.

Per approach the step is timed eager and with `train.compile = on` (`--compiled`; the compiled first
round pays the compilation), and evaluation under eval.bn = "batch" one slice a forward against
batches of eval.batch_size (eval.slices), with the largest logit difference and the share of equal
labels between the two. One vs N concurrent cells is the concurrent runner's benchmark (issue 22
item 1); this command says whether it is there.

Simulator per-round overhead against the bare loop. The same workload (one approach, three
sites, three rounds a site, one training client a round) runs through `python -m
ted_fl.centralized` (the bare loop: the shared schedule with an in-process executor) and `python -m
ted_fl.simulate` (the same schedule, Flower messages to ClientApps on Ray, clients given
`federated.num_gpus`). Both do the same work per round: `SiteWorker.train_round` (the steps and
the arriving site's validation), timed by the worker itself (`work_s` wall, `work_cpu_s` CPU of
its thread) and written next to the schedule's `round_s` in the run's metrics.csv. Ray and
Flower's start, the first round of each stage and the stage-end test evaluation are excluded
(steady rounds only). Then, medians over the steady rounds of each run:

    added per round   = (round_s - work_s) of the simulator - (round_s - work_s) of the bare loop
    overhead ratio    = (W + simulator's round_s - work_s) / (W + bare loop's round_s - work_s),
                        W = the simulator's work_s: its round over the bare loop's for the same work

Both terms are differences taken inside one run, so the work cancels, and with it the load that
a shared machine puts on it. Comparing the two runs' round_s directly does not: the runs are
minutes apart, and on a loaded 2-core machine the CPU share a single-threaded process gets
changes several-fold between them (that comparison gave a ratio of 0.41, the simulator "faster"
than the bare loop). The work's CPU seconds per round must agree between the two runs (the same
arithmetic): the command prints their ratio as the check that both sides did the same work.
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
import psutil
import torch

from ted_fl.bench import common as C
from ted_fl.config import Compile, EvalSlices, ExperimentConfig, choices, split_seed_of
from ted_fl.data import load_sites, site_order

CUDA_CONTEXT_MIB = 500.0  # what a process's CUDA context and allocator reserve besides tensors (typical)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("gpu", help="GPU path per approach: step time, images/s, peak memory, clients per GPU")
    C.add_arguments(p, quick="tiny workload (the test suite's; runs on CPU too)")
    p.add_argument("--approach", nargs="+", default=["seq", "kd", "ted_gugf"], help="approaches")
    p.add_argument("--steps", type=int, help="steps per measured round (default 50; --quick 3)")
    p.add_argument("--repeats", type=int, help="centralized/simulate pairs for the overhead (default 2; --quick 1)")
    p.add_argument("--compiled", nargs="*",
                   help="approaches also timed with train.compile = on (default: all; --quick: the first; "
                        "none: --compiled with no name)")
    p.add_argument("--num-gpus", type=float, default=0.25,
                   help="federated.num_gpus per client on a GPU (default 0.25: four clients per GPU)")
    p.set_defaults(func=run)


def workload(args: argparse.Namespace) -> ExperimentConfig:
    return C.workload(args, order=["RUNMC", "BMC"], rounds=2, steps=3, batch=4)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB)"
    return "CPU (no GPU found)"


def step_costs(cfg: ExperimentConfig, approaches: list[str], steps: int,
               compiled: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per approach and train.compile setting ("off"; "on" for the approaches in `compiled`):
    seconds per step, images/s and peak device memory of a client's round; and the GPU path's
    switches as the steps really used them (`path_report`, from the worker's trace)."""
    from ted_fl.continual.approaches import get_approach
    from ted_fl.continual.device import amp_dtype_for
    from ted_fl.schedule.engine import model_weights
    from ted_fl.schedule.worker import SiteWorker, probes_for

    site = load_sites(cfg.data, split_seed_of(cfg))[0]
    worker = SiteWorker(cfg)
    dev = worker.device
    weights = model_weights(worker.student)
    count = (cfg.loss.ska_count or cfg.train.batch_size) * steps
    shape = tuple(site.train.images.shape[1:])
    rows, traces = [], []
    compiled = list(approaches if compiled is None else compiled)
    for name in approaches:
        appr = get_approach(name, cfg.loss)
        teacher = worker.set_teacher((name, 0), weights) if appr.needs_teacher else None
        probes = probes_for(cfg, 1, count, shape) if appr.needs_probes else None
        for setting in choices(Compile) if name in compiled else ["off"]:
            worker.cfg = copy.deepcopy(cfg)
            worker.cfg.train.compile = setting  # type: ignore[assignment]
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
                traces.append(dict(worker.trace, approach=name, compile=setting, round=rnd))
            step_s = times[-1] / steps
            peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else float("nan")
            amp = amp_dtype_for(cfg.train.amp, dev)
            rows.append(dict(approach=name, compile=setting, step_ms=1000 * step_s,
                             images_per_s=cfg.train.batch_size / step_s,
                             peak_gpu_mib=peak, rss_mib=psutil.Process().memory_info().rss / 2**20,
                             precision=str(amp).replace("torch.", "") if amp else "float32",
                             first_round_s=times[0]))
    worker.cfg = cfg
    df = pd.DataFrame(rows)
    return df, path_report(cfg, worker, traces, float(df["peak_gpu_mib"].max()))


def data_path(traces: list[dict[str, Any]], device: torch.device) -> tuple[str, str]:
    """(split kept on the device, channels-last input), read from the tensors the steps used (each
    round's `trace`): the batches' source tensor on `device` and one storage across every round
    (one copy of the split, reused); the last batch in channels-last layout."""
    found = [t.get("source") for t in traces]
    sources = [s for s in found if s is not None]
    if not sources or len(sources) < len(found):
        kept = "off: batches built from the numpy arrays each step"
    elif any(s.device.type != device.type for s in sources):
        kept = f"off: the split was on {sources[0].device}, not {device}"
    else:
        copies = len({s.data_ptr() for s in sources})
        kept = ("on: one device copy of the split across " f"{len(sources)} rounds" if copies == 1 else
                f"off: {copies} copies of the split in {len(sources)} rounds (copied again each round)")
    batch = traces[-1].get("batch") if traces else None
    if batch is None:
        layout = "off: no batch"
    else:
        cl = batch.is_contiguous(memory_format=torch.channels_last)
        state = ("either: one channel, both layouts are the same bytes" if cl and batch.is_contiguous()
                 else "on" if cl else "off")
        layout = f"{state}: the step's input {tuple(batch.shape)} on {batch.device}"
    return kept, layout


def weights_channels_last(model: torch.nn.Module) -> bool:
    """Whether the model's convolutions hold channels-last weights: read on a kernel wider than
    1 x 1 (a 1 x 1 kernel's layout is ambiguous: both contiguous and channels-last, which made
    reference_unet, whose last conv is its 1 x 1 head, read "off")."""
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] * p.shape[-2] > 1]
    if not convs:
        return False
    w = convs[-1]
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def path_report(cfg: ExperimentConfig, worker: Any, traces: list[dict[str, Any]], peak_mib: float) -> pd.DataFrame:
    """Each switch of the GPU path, its setting and what it did in the measured rounds (read back
    from the tensors the steps used, the model, torch's flags), or why it is absent on this device."""
    from ted_fl.continual.device import amp_dtype_for

    dev = worker.device
    gpu = dev.type == "cuda"
    absent = "absent: no GPU"
    amp = amp_dtype_for(cfg.train.amp, dev)
    kept, layout = data_path(traces, dev)
    compiled = [t for t in traces if t.get("compile") == "on"]
    rows = [
        ("bf16 autocast", f"train.amp = {cfg.train.amp}",
         f"on: {str(amp).replace('torch.', '')}" if amp else
         "off: full precision (auto is bf16 only on a GPU that supports it)"),
        ("channels-last weights", f"train.cudnn_benchmark = {cfg.train.cudnn_benchmark}",
         ("on" if weights_channels_last(worker.student) else "off") if gpu
         else f"{absent} (a CPU model keeps its layout)"),
        ("channels-last input", f"train.cudnn_benchmark = {cfg.train.cudnn_benchmark}",
         layout if gpu else f"{absent} ({layout})"),
        ("cuDNN autotuning", f"train.cudnn_benchmark = {cfg.train.cudnn_benchmark}",
         f"torch.backends.cudnn.benchmark = {torch.backends.cudnn.benchmark}" if gpu else absent),
        ("split kept on the device", "always on a GPU (device.on_device)",
         kept if gpu else f"{absent} ({kept})"),
        ("compiled step", "train.compile = on (rows compile = on)",
         compiled[-1]["compiled"] if compiled else "not measured"),
        ("peak memory", "torch.cuda.max_memory_allocated",
         f"{peak_mib:.0f} MiB" if gpu and math.isfinite(peak_mib) else f"{absent} (process RSS in the table)"),
        ("clients per GPU", "federated.num_gpus",
         "by num_gpus and by memory (table)" if gpu else f"{absent}: clients get num_gpus = 0 and run on CPU"),
    ]
    return pd.DataFrame(rows, columns=["switch", "setting", "state"])


def eval_costs(cfg: ExperimentConfig) -> tuple[pd.DataFrame, dict[str, float]]:
    """eval.bn = "batch" on the first site's test split: one slice a forward (eval.slices = "one")
    against batches of eval.batch_size ("batched"): seconds per image and whether the two agree
    (the largest logit difference, the share of equal labels, the Dice of each)."""
    from ted_fl.continual.device import batch_statistics
    from ted_fl.continual.evaluation import _predict, evaluate
    from ted_fl.schedule.worker import SiteWorker

    site = load_sites(cfg.data, split_seed_of(cfg))[0]
    model = SiteWorker(cfg).student
    split = site.test
    dev = next(model.parameters()).device
    clock = time.perf_counter if dev.type == "cuda" else time.process_time
    rows, labels = [], {}
    for slices in choices(EvalSlices):  # one (the reference) first
        evaluate(model, site.val, per_volume=site.per_volume, bn="batch", slices=slices,
                 batch_size=cfg.eval.batch_size)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        scores = evaluate(model, split, per_volume=site.per_volume, bn="batch", slices=slices,
                          batch_size=cfg.eval.batch_size)
        t_eval = clock() - t0
        t0 = clock()
        labels[slices] = _predict(model, split.images, cfg.eval.batch_size, "batch", slices)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_fwd = clock() - t0
        rows.append(dict(slices=slices, forward_ms_per_image=1000 * t_fwd / len(split),
                         eval_ms_per_image=1000 * t_eval / len(split), dice=scores["dice"]))
    x = torch.as_tensor(split.images[: cfg.eval.batch_size], device=dev)
    with torch.no_grad():
        with batch_statistics(model):
            one = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        with batch_statistics(model, batched=True):
            many = model(x)
    df = pd.DataFrame(rows)
    t = df.set_index("slices")
    figures = dict(speedup=float(t.loc["one", "forward_ms_per_image"] / t.loc["batched", "forward_ms_per_image"]),
                   max_logit_diff=float((one - many).abs().max()),
                   labels_equal=float((labels["one"] == labels["batched"]).mean()),
                   dice_diff=float(abs(t.loc["one", "dice"] - t.loc["batched", "dice"])),
                   images=float(len(split)))
    return df, figures


def compile_speedups(df: pd.DataFrame) -> pd.DataFrame:
    """Per approach timed both ways: eager and compiled ms a step, their ratio, the compiled first round."""
    rows = []
    for name, g in df.groupby("approach", sort=False):
        by = g.set_index("compile")
        if "on" in by.index:
            rows.append(dict(approach=name, off_ms=by.loc["off", "step_ms"], on_ms=by.loc["on", "step_ms"],
                             speedup=by.loc["off", "step_ms"] / by.loc["on", "step_ms"],
                             on_first_round_s=by.loc["on", "first_round_s"]))
    return pd.DataFrame(rows)


def concurrent_cells_note() -> str:
    """One vs N concurrent cells (issue 22 item 1) is measured by its own runner's benchmark."""
    try:
        import ted_fl.bench.cells  # noqa: F401 - present once the concurrent runner has landed
    except ImportError:
        return ("one vs N concurrent cells: not measured here; the concurrent runner (issue 22 item 1, "
                "ted_fl/bench/cells.py) has not landed on this branch")
    return "one vs N concurrent cells: `python -m ted_fl.bench cells` (throughput and peak memory per cell)"


def clients_per_gpu(peak_mib: float, num_gpus: float, device: torch.device) -> tuple[float, float]:
    """(by federated.num_gpus, by memory); NaN where it does not apply (no GPU, no fraction)."""
    by_fraction = math.floor(1.0 / num_gpus + 1e-9) if num_gpus > 0 else float("nan")
    if device.type != "cuda" or not math.isfinite(peak_mib):
        return by_fraction, float("nan")
    total = torch.cuda.get_device_properties(device).total_memory / 2**20
    return by_fraction, math.floor(total / (peak_mib + CUDA_CONTEXT_MIB))


def overhead_runs(cfg: ExperimentConfig, work: Path, repeats: int) -> pd.DataFrame:
    """The bare loop and the simulator alternated (centralized, simulate, centralized, ...): their
    steady rounds (`common.steady_rounds`), one row per round, tagged with the mode and the repeat."""
    frames = []
    for i in range(repeats):
        for mode in ("centralized", "simulate"):
            m = C.run_cli(mode, cfg, work, f"{mode}-{i}")
            frames.append(C.steady_rounds(m.run).assign(mode=mode, repeat=i, end_to_end_s=m.wall_s))
    return pd.concat(frames, ignore_index=True)


def overhead_summary(rounds: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """The comparison table (bare loop, simulator) and the figures defined in the module's doc."""
    med = rounds.groupby("mode")[["round_s", "work_s", "work_cpu_s", "overhead_s", "end_to_end_s"]].median()
    bare, sim = med.loc["centralized"], med.loc["simulate"]
    added = sim["overhead_s"] - bare["overhead_s"]
    w = sim["work_s"]
    figures = dict(added_s=float(added), ratio=float((w + sim["overhead_s"]) / (w + bare["overhead_s"])),
                   work_cpu_ratio=float(sim["work_cpu_s"] / bare["work_cpu_s"]),
                   raw_ratio=float(sim["round_s"] / bare["round_s"]))
    rows = [
        ("round_s: the whole round (median s)", bare["round_s"], sim["round_s"], "wall, each run under its own load"),
        ("work_s: the client's train_round (median s)", bare["work_s"], sim["work_s"],
         "wall; steps + validation of the arriving site"),
        ("work_cpu_s: its CPU time (median s)", bare["work_cpu_s"], sim["work_cpu_s"],
         f"same work: ratio {figures['work_cpu_ratio']:.2f}"),
        ("round_s - work_s (median s)", bare["overhead_s"], sim["overhead_s"],
         f"simulator adds {1000 * added:.0f} ms a round, ratio {figures['ratio']:.2f}"),
        ("end to end, Ray start included (s)", bare["end_to_end_s"], sim["end_to_end_s"], "not part of the ratio"),
    ]
    table = pd.DataFrame(rows, columns=["measure", "bare_loop", "simulator", "note"])
    return table, figures


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from ted_fl.schedule.worker import pick_device

    t_all = time.perf_counter()
    cfg = workload(args)
    device = pick_device(cfg.train.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print("no GPU found: running the GPU path's code on the CPU (memory columns empty)", flush=True)
    steps = args.steps or (3 if args.quick else 50)
    compiled = list(args.approach[:1] if args.quick else args.approach) if args.compiled is None else args.compiled
    df, path = step_costs(cfg, list(args.approach), steps, compiled)
    num_gpus = args.num_gpus if on_gpu else 0.0
    packed = [clients_per_gpu(p, num_gpus, device) for p in df["peak_gpu_mib"]]
    df["clients_per_gpu_by_num_gpus"] = [a for a, _ in packed]
    df["clients_per_gpu_by_memory"] = [b for _, b in packed]
    C.print_table(f"gpu: {device_name(device)}, {cfg.data.size} px, batch {cfg.train.batch_size}, "
                  f"{steps} steps a round, {cfg.train.threads} torch thread(s)", df)
    C.print_table("gpu path: each switch in the measured rounds", path)
    speed = compile_speedups(df)
    if not speed.empty:
        C.print_table("compiled step against eager (train.compile = on / off; first round: the compilation)", speed)
    ev, evf = eval_costs(cfg)
    ev_title = (f"evaluation under eval.bn = batch, {int(evf['images'])} test images: one slice a forward against "
                f"eval.batch_size = {cfg.eval.batch_size} (eval.slices)")
    C.print_table(ev_title, ev)
    ev_line = (f"batched per-slice evaluation: {evf['speedup']:.1f}x the forwards' speed; largest logit difference "
               f"{evf['max_logit_diff']:.1e}, labels equal {100 * evf['labels_equal']:.2f}%, "
               f"Dice difference {evf['dice_diff']:.1e}")
    print(ev_line)
    cells = concurrent_cells_note()
    print(cells)
    sim_cfg = copy.deepcopy(cfg)
    sim_cfg.approaches = [a for a in args.approach if a != "joint"][-1:] or ["seq"]
    sim_cfg.federated.num_gpus, sim_cfg.federated.retention = num_gpus, 0  # one training client a round
    if not args.quick:  # three sites, three rounds: enough steady rounds, a few minutes on a CPU

        sim_cfg.data.order, sim_cfg.train.rounds = site_order(cfg.data)[:3], 3
    work = Path(args.out) / time.strftime("gpu-%Y%m%d-%H%M%S")
    load = os.getloadavg()[0]
    table, fig = overhead_summary(overhead_runs(sim_cfg, work, args.repeats or (1 if args.quick else 2)))
    title = (f"simulator vs bare loop ({sim_cfg.approaches[0]}, {len(sim_cfg.data.order or [])} sites x "
             f"{sim_cfg.train.rounds} rounds x {sim_cfg.train.steps_per_round} steps, steady rounds; "
             f"load average {load:.1f} at the start)")
    C.print_table(title, table)
    over = (f"simulator per-round overhead: {1000 * fig['added_s']:.0f} ms a round, ratio {fig['ratio']:.2f} "
            f"(work CPU simulator/bare {fig['work_cpu_ratio']:.2f}; raw round_s ratio across the two runs, "
            f"load-dependent: {fig['raw_ratio']:.2f})")
    print(over)
    t = df[df["compile"] == "off"].set_index("approach")
    ted = t["images_per_s"].get("ted_gugf", float("nan"))
    fast = "".join(f", compiled {r.approach} {r.on_ms:.1f} ms/step" for r in speed.itertuples())
    line = (f"gpu: {device_name(device)}; " + ", ".join(f"{a} {r.step_ms:.1f} ms/step"
                                                       for a, r in t.iterrows())
            + f"{fast}; ted_gugf {ted:.0f} images/s; batched evaluation {evf['speedup']:.1f}x; "
              f"simulator round overhead {1000 * fig['added_s']:.0f} ms (ratio {fig['ratio']:.2f})")
    note = ("" if on_gpu else "**No GPU was found on this machine**: these figures are the GPU path's code "
            "running on the CPU (full precision, no cuDNN); rerun the command on a GPU machine for the "
            "GPU figures. ")
    body = (
        f"{C.section_head('gpu', argv, time.perf_counter() - t_all)} Device: **{device_name(device)}**.\n\n"
        f"{note}Workload: `{args.config}` ({cfg.data.size} px, batch {cfg.train.batch_size}, channels "
        f"{cfg.model.channels}, {cfg.train.threads} torch thread(s)), a client's round of {steps} steps through "
        f"`SiteWorker.train_round` (amp {cfg.train.amp}, cudnn_benchmark {cfg.train.cudnn_benchmark}); "
        "figures of the second round (on a CPU: the process's CPU time). Clients per GPU: by `federated.num_gpus` "
        f"({num_gpus:g} per client here) and by memory (GPU memory / (peak + {CUDA_CONTEXT_MIB:.0f} MiB "
        f"of CUDA context)).\n\n{C.md_table(df)}\n\nThe GPU path, switch by switch:\n\n{C.md_table(path)}\n\n"
        + (f"Compiled step (`train.compile = on`) against eager, second round of each:\n\n{C.md_table(speed)}\n\n"
           if not speed.empty else "")
        + f"Evaluation: {ev_title}; time per image of the forwards alone and of the whole evaluation "
        f"(forwards, Dice, IoU, HD95):\n\n{C.md_table(ev)}\n\n{ev_line}.\n\n{cells}.\n\n"
        f"Simulator per-round overhead against the bare loop: {title}. Per run, the median over its steady "
        "rounds; `round_s - work_s` is what a round costs besides the client's own work (`work_s`, timed by "
        "the worker in both runs), so the difference between the two runs' is the simulator's overhead "
        "whatever load each run met; `round_s` itself is not comparable across the runs on a shared "
        f"machine (see `ted_fl/bench/gpu.py`).\n\n{C.md_table(table)}\n\n{over}; runs in `{work}`.\n\n`{line}`"
    )
    return C.finish(args, "gpu", line, body)
