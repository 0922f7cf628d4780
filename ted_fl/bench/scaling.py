"""`scaling`: 3 to 48 synthetic sites through the simulator: time per stage and peak memory.

Sites are data: for N sites the benchmark writes a site-set TOML that cycles the prostate
twin's six sites with varied acquisition parameters, and points `data.sites` at it. Every
stage trains one site (its rounds), then evaluates the model on *every* site's test split (the
R matrix row), so the evaluation part of a stage grows with N by design; train and evaluation
times per stage are reported separately. Ray runs cores / federated.num_cpus ClientApp actors
whatever N is; the N nodes are contexts served by those actors.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import tomllib
from pathlib import Path
from typing import Any, cast

import pandas as pd

from ted_fl.bench import common as C
from ted_fl.config import ApproachName, ExperimentConfig, dump_toml, project_root


def add_parser(sub: Any) -> None:
    p = sub.add_parser("scaling", help="3..48 synthetic sites: time per stage and peak memory")
    p.add_argument("--quick", action="store_true", help="2 and 4 sites only (the test suite's)")
    p.add_argument("--sites", type=int, nargs="+", help="site counts (default 3 6 12 24 48)")
    p.add_argument("--approach", default="ted_gugf", help="approach (default ted_gugf: teacher + probes)")
    p.add_argument("--out", default="runs/bench", help="folder for the run directories")
    p.add_argument("--doc", help="write the section here (default docs/benchmarks.md unless --quick)")
    p.set_defaults(func=run)


def site_set_toml(n: int) -> str:
    """A site set of `n` synthetic prostate sites: the six twins cycled, each copy shifted a bit."""
    base = tomllib.loads((project_root() / "sites" / "prostate.toml").read_text())
    sites = base.pop("sites")
    base["name"] = f"scaling{n}"
    base["description"] = f"{n} synthetic prostate sites (the prostate twin cycled with varied parameters)"
    base["sites"] = []
    for i in range(n):
        cycle, site = divmod(i, len(sites))
        entry = copy.deepcopy(sites[site])
        entry["name"] = entry["folder"] = f"{entry['name']}-{cycle}"
        syn = entry.setdefault("synthetic", {})
        # Varied acquisitions: each cycle a little noisier, darker and differently framed.
        syn["noise_std"] = float(syn.get("noise_std", 0.02)) * (1.0 + 0.25 * cycle)
        syn["gamma"] = float(syn.get("gamma", 1.0)) * (1.0 + 0.05 * cycle)
        syn["zoom"] = float(syn.get("zoom", 1.0)) * (1.0 - 0.03 * cycle)
        base["sites"].append(entry)
    return dump_toml(base)


def workload(n: int, work: Path, approach: str) -> ExperimentConfig:
    path = work / f"sites-{n}.toml"
    path.write_text(site_set_toml(n))
    cfg = ExperimentConfig()
    cfg.name = f"scaling{n}"
    cfg.approaches, cfg.seeds = [cast(ApproachName, approach)], [0]
    cfg.data.sites, cfg.data.cache_dir = str(path), str(work / "cache")
    C.tiny(cfg, rounds=2, steps=5, batch=4)
    cfg.train.lr_first, cfg.train.lr_later = 1e-3, 5e-4
    cfg.loss.lambda_d = 1.0
    return cfg


def run(args: argparse.Namespace, argv: list[str]) -> int:
    counts = args.sites or ([2, 4] if args.quick else [3, 6, 12, 24, 48])
    work = Path(args.out) / time.strftime("scaling-%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in counts:
        cfg = workload(n, work, args.approach)
        m = C.run_cli("simulate", cfg, work, f"sites{n}")
        t = C.time_rows(m.run)
        per_stage = t.pivot_table(index="stage", columns="metric", values="value", aggfunc="sum")
        # train per stage = the rounds' time; eval = the stage-end test evaluation of all N sites
        stages = per_stage[per_stage.index >= 1] if len(per_stage) > 1 else per_stage  # stage 0 warms up
        rows.append(dict(
            sites=n, actors=int((os.cpu_count() or 1) // max(cfg.federated.num_cpus, 1e-9)),
            train_s_per_stage=float(stages["round_s"].median()), eval_s_per_stage=float(stages["eval_s"].median()),
            eval_s_per_site=float(stages["eval_s"].median() / n), stage_s=float(stages["stage_s"].median()),
            wall_s=m.wall_s, peak_rss_mib=C.mib(m.peak_rss), driver_peak_mib=C.mib(m.root_peak_rss),
            processes=m.peak_procs,
        ))
        print(f"  {n} sites: train {rows[-1]['train_s_per_stage']:.2f} s/stage, eval "
              f"{rows[-1]['eval_s_per_stage']:.2f} s/stage, peak {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    df = pd.DataFrame(rows)
    C.print_table("scaling: per stage, medians over stages 2..N (stage 1 warms the actors up)", df)
    first, last = df.iloc[0], df.iloc[-1]
    train_ratio = last["train_s_per_stage"] / first["train_s_per_stage"]
    mem_ratio = last["peak_rss_mib"] / first["peak_rss_mib"]
    line = (f"scaling: {int(first['sites'])} -> {int(last['sites'])} sites, train time per stage ratio "
            f"{train_ratio:.2f}, eval time per site ratio {last['eval_s_per_site'] / first['eval_s_per_site']:.2f}, "
            f"peak memory ratio {mem_ratio:.2f}")
    cfg = workload(counts[0], work, args.approach)
    body = (
        f"{C.section_head('scaling', argv)}\n\n"
        f"Workload: N synthetic prostate sites (the six twins of `sites/prostate.toml` cycled, each "
        f"cycle noisier, darker and framed differently; the site-set TOML is generated per N), "
        f"{cfg.data.size} px, {cfg.data.synthetic_volumes} volumes a site, U-Net channels "
        f"{cfg.model.channels}, approach {args.approach}, {cfg.train.rounds} rounds x "
        f"{cfg.train.steps_per_round} steps a stage, one `python -m ted_fl.simulate` per N with "
        f"{int(first['actors'])} ClientApp actors (cores / federated.num_cpus). Per stage, medians over "
        "stages 2..N: train = the stage's rounds (`round_s`), eval = the stage-end evaluation of "
        "every site's test split (`eval_s`), which grows with N by design (the R matrix has N "
        "columns). Peak RSS: summed over the whole process tree (driver with the server and Flower's "
        "node contexts, Ray's GCS/raylet, the actors); driver = the launcher process alone.\n\n"
        f"{C.md_table(df)}\n\n`{line}`"
    )
    return C.finish(args, "scaling", line, body + NOTE)


NOTE = ""
