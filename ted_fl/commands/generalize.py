"""`python -m ted_fl.generalize`: single-source domain generalisation by distillation (GKD), federated.

    python -m ted_fl.generalize --sites retina --data-dir ../shared/data/retinal_vessels \\
        --source CHASEDB1 [--teacher NAME] [--student NAME] [--approach A [A ...]] [--seed N [N ...]] \\
        [--set gkd.steps_teacher=300 ...]
    python -m ted_fl.generalize --config gkd-fair        # the fair rows on a GPU (simulations/gkd-fair.toml)
    python -m ted_fl.generalize --config gkd-fair-cpu    # the same rows at a CPU budget

The source site trains the spec's stages (teacher, plain student, P-SAE, alignment networks,
distillation); every other site of the set is an unseen target that only scores the models it
receives. Writes a run directory (config.toml, splits.json, tidy metrics.csv with Dice, Se, Sp,
Acc, AUC, mIoU, FSD per site, params / MACs / latency, summary.csv, report.md, checkpoints of the
teachers for the continual combination) and prints the report.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ted_fl.config import (
    ExperimentConfig,
    GKDApproachName,
    choices,
    load_experiment,
    parse_override,
    set_key,
    split_seed_of,
)
from ted_fl.errors import TedFlError, unknown

DEFAULTS = {"sites": "retina", "data_dir": "", "source": "CHASEDB1", "size": 128, "seed": [0], "out": "runs"}


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The run's config: `--config FILE` (simulations/gkd-*.toml) or the defaults, then the options
    given on the command line, then `--set`."""
    from ted_fl.continual.gkd import GKD_APPROACHES
    from ted_fl.continual.networks import NETWORKS

    def given(name: str) -> bool:
        return getattr(args, name, None) is not None

    if getattr(args, "config", ""):
        cfg = load_experiment(args.config)
    else:
        cfg = ExperimentConfig(name=f"gkd-{args.sites or DEFAULTS['sites']}")
        cfg.federated.timeout = 7200.0  # a whole stage is one round by default
        for key in ("sites", "data_dir", "size", "out", "seed", "source"):
            if not given(key):
                setattr(args, key, DEFAULTS[key])
    if given("sites"):
        cfg.data.sites = args.sites
    if given("data_dir"):
        cfg.data.data_dir = args.data_dir
    if given("size"):
        cfg.data.size = args.size
    if given("out"):
        cfg.out = args.out
    if given("approach"):
        for a in args.approach:
            if a not in GKD_APPROACHES:
                raise unknown("approach", a, GKD_APPROACHES, "--approach")
        cfg.gkd.approaches = list(args.approach)
    if given("seed"):
        cfg.seeds = list(args.seed)
    if given("source"):
        cfg.gkd.source = args.source
    if args.teacher:
        cfg.gkd.teacher = args.teacher
    if args.student:
        cfg.gkd.student = args.student
    for text in args.set or []:
        key, value = parse_override(text)
        set_key(cfg, key, value)
    for role, name in (("teacher", cfg.gkd.teacher), ("student", cfg.gkd.student)):
        if name not in NETWORKS:
            raise unknown(f"{role} network", name, NETWORKS, f"--{role}")
    if not cfg.seeds:
        raise TedFlError("--seed needs at least one seed")
    check_networks(cfg)
    return cfg


def check_networks(cfg: ExperimentConfig) -> None:
    """Build teacher and student and run one image of the run's size, before Ray starts."""
    import torch

    from ted_fl.federated.gkd_client import build_part

    for part, key in (("teacher", "gkd.teacher"), ("student", "gkd.student")):
        try:
            with torch.no_grad():
                build_part(part, cfg.gkd, (1, cfg.data.size, cfg.data.size)).eval()(
                    torch.zeros(1, 1, cfg.data.size, cfg.data.size))
        except (RuntimeError, ValueError) as exc:
            raise TedFlError(f"{key} = '{getattr(cfg.gkd, part)}' does not run on {cfg.data.size} x {cfg.data.size} "
                             f"images ({str(exc).splitlines()[0]}); use a --size that is a multiple of 32 or check "
                             f"{key}_channels") from None


def check_sites(cfg: ExperimentConfig) -> list:
    """Load every site once here (clear errors before Ray starts) and return them for splits.json."""
    from ted_fl.data import load_sites, resolve_out_channels, site_order

    labels = resolve_out_channels(cfg)
    if labels.out_channels != 2:
        raise TedFlError(f"site set '{cfg.data.sites}' has {labels.out_channels - 1} classes; the GKD protocol is binary: "
                         "pick one structure with data.target (--set data.target=...)")
    order = site_order(cfg.data)
    if cfg.gkd.source not in order:
        raise unknown("source site", cfg.gkd.source, order, f"site set '{cfg.data.sites}' (--source)")
    if len(order) < 2:
        raise TedFlError(f"site set '{cfg.data.sites}' has one site: no unseen target to test on")
    sites = load_sites(cfg.data, split_seed_of(cfg))
    for s in sites:
        for split in ("train", "test"):
            if len(s.splits[split]) == 0:
                raise TedFlError(f"site {s.name} has no {split} images; check the site set's files")
    return sites


def summary_table(rows: list[dict]):  # noqa: ANN201 - a pandas frame
    """One row per approach and seed: the scores averaged over the unseen targets, and the source's."""
    import pandas as pd

    df = pd.DataFrame(rows)
    return df[df["site"] != "all"].pivot_table(index=["approach", "seed"], columns="metric", values="value",
                                               aggfunc="mean").reset_index()


def main(argv: list[str] | None = None) -> int:
    GKD_APPROACHES = choices(GKDApproachName)  # noqa: N806 (ted_fl.continual.gkd builds these; no torch to parse)
    p = argparse.ArgumentParser(prog="python -m ted_fl.generalize", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="", help="experiment file (simulations/NAME.toml or NAME, e.g. gkd-fair); "
                   "the options below override it")
    p.add_argument("--sites", default=None, help="site set (sites/<name>.toml or a path; default retina)")
    p.add_argument("--data-dir", default=None, help="the set's data folder (empty: its synthetic twin)")
    p.add_argument("--source", default=None, help="the training site; the others are unseen targets (default CHASEDB1)")
    p.add_argument("--teacher", default="", help="teacher network (default gkd.teacher: basic_unet)")
    p.add_argument("--student", default="", help="student network (default gkd.student: mobilenetv2_unet)")
    p.add_argument("--approach", nargs="+", default=None, help=f"student rows to train (default: gkd.approaches, "
                   f"all of {', '.join(GKD_APPROACHES)})")
    p.add_argument("--seed", nargs="+", type=int, default=None, help="seeds (default 0, or the config's)")
    p.add_argument("--size", type=int, default=None,
                   help="image side (multiple of 32 for the MobileNet/B0 students; default 128)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. gkd.crop=64")
    p.add_argument("--out", default=None, help="parent folder of the run directory (default runs)")
    p.add_argument("--doc", default="", help="also write the report section into this markdown page")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = build_config(args)
        sites = check_sites(cfg)
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from ted_fl.federated.gkd_server import simulate_generalize
    from ted_fl.run.directory import RunDir, atomic_write_bytes
    from ted_fl.run.gkd_page import section
    from ted_fl.run.markdown import write_section

    os.environ.setdefault("PYTHONPATH", os.getcwd())
    run = RunDir.create(cfg.out, cfg.name)
    run.write_config(cfg)
    run.write_json("splits.json", {s.name: s.manifest for s in sites})
    command = "python -m ted_fl.generalize " + " ".join(argv if argv is not None else sys.argv[1:])
    run.log(command)
    try:
        rows = simulate_generalize(cfg, run, len(sites) * cfg.federated.clients_per_site, args.quiet)
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        run.log(f"error: {exc}")
        return 2
    run.write_metrics(rows)
    run.write_summary(summary_table(rows))
    text = section(run, command)
    atomic_write_bytes(run.path / "report.md", (text + "\n").encode())
    if args.doc:
        write_section(Path(args.doc), "gkd", text, header="# Results\n")
    if not args.quiet:
        print(text)
    print(f"run directory: {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
