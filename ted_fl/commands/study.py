"""Privacy studies: the privacy-utility grid over epsilon and the privacy policies.

    python -m ted_fl.study privacy --sites prostate --epsilon 1 4 16 inf --approach seq kd ted_gugf \
        --seed 0 1 [--grid privacy.teacher=server,site] [--set KEY=V ...] [--federated] [--out DIR] [--doc FILE]

Each cell (approach x seed x epsilon x policy point) is one run with the membership-inference
attack; epsilon = inf runs without DP (privacy.dp = "off"), a finite one with --dp (sample-level
DP-SGD by default). Rerunning with the same --out reuses finished cells. Writes study.csv,
study_mean.csv, report.md and report.html in --out (and audit.csv with --federated); --doc also
writes report.md as the section `privacy-<sites>` of a Markdown page (e.g. docs/results-privacy.md).
The work is done by `ted_fl.studies.privacy_utility`; this is its command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ted_fl.config import (
    ApproachName,
    DPLevel,
    ExperimentConfig,
    choices,
    load_experiment,
    parse_override,
    set_key,
)
from ted_fl.errors import exit_code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ted_fl.study", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="kind", required=True, metavar="privacy")
    q = sub.add_parser("privacy", help="privacy-utility study: Avg, BWT and attack AUC against epsilon")
    q.add_argument("--sites", help="site set (python -m ted_fl.sites --help lists them) or a sites TOML")
    q.add_argument("--data-dir", help="root of the real data (omit for the synthetic twin)")
    q.add_argument("--config", help="experiment file: simulations/NAME.toml or NAME (default: the defaults)")
    q.add_argument("--epsilon", nargs="+", default=["inf"], metavar="EPS",
                   help="target epsilons per site and stage; inf = no DP (default: inf)")
    levels = [d for d in choices(DPLevel) if d != "off"]  # the schema's levels that are on
    q.add_argument("--dp", default="sample", choices=levels, metavar="LEVEL",
                   help=f"DP level of the finite epsilons: {' | '.join(levels)} (default sample)")
    q.add_argument("--approach", nargs="+", choices=choices(ApproachName), metavar="APPROACH",
                   help="approaches (default: the config's)")
    q.add_argument("--seed", type=int, nargs="+", help="seeds (default: the config's)")
    q.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a policy axis, e.g. privacy.teacher=server,site or federated.probes=pixels,seed (repeatable)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    q.add_argument("--federated", action="store_true",
                   help="run the cells in one Flower simulation (audited bytes per kind) instead of Ray tasks")
    q.add_argument("--out", help="study folder (default runs/study-privacy-SITES); the same folder reuses cells")
    q.add_argument("--doc", metavar="FILE", help="also write the report as a marked section of FILE (e.g. docs/results-privacy.md)")
    q.add_argument("--section", help="that section's name (default privacy-<sites>)")
    q.add_argument("--serial", action="store_true", help="centralized cells one after another in this process")
    q.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    q.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: _privacy(args, sys.argv[1:] if argv is None else list(argv)))


def _privacy(args: argparse.Namespace, argv: list[str]) -> int:
    from ted_fl.data import resolve_out_channels
    from ted_fl.run.markdown import write_section
    from ted_fl.studies.grid import parse_grid
    from ted_fl.studies.privacy_utility import parse_epsilons, study

    cfg = load_experiment(args.config) if args.config else ExperimentConfig()
    if args.sites:
        set_key(cfg, "data.sites", args.sites, "--sites")
    if args.data_dir:
        set_key(cfg, "data.data_dir", args.data_dir, "--data-dir")
    for item in args.set:
        set_key(cfg, *parse_override(item))
    resolve_out_channels(cfg)  # an unknown site set or bad labels fail here, before anything runs
    epsilons = parse_epsilons(args.epsilon)
    folder = Path(args.out or f"{cfg.out}/study-privacy-{Path(cfg.data.sites).stem}")
    command = shlex.join(["python", "-m", "ted_fl.study", *argv])
    out = study(cfg, epsilons, folder, dp=args.dp, grid=parse_grid(args.grid), approaches=args.approach,
                seeds=args.seed, federated=args.federated, parallel=not args.serial, quiet=args.quiet,
                num_cpus=args.cpus, command=command)
    print(out["shown"].to_string(index=False))
    print(f"{len(out['cells'])} cells ({out['ran']} run, {out['reused']} reused)")
    if args.doc:
        name = args.section or f"privacy-{Path(cfg.data.sites).stem}"
        first, rest = out["markdown"].split("\n", 1)
        body = f"## Privacy study `{name}`: {first.split(': ', 1)[-1]}\n{rest}"
        write_section(Path(args.doc), name, body)
        print(f"wrote section {name} of {args.doc}")
    print(f"report: {out['report']}")
    print(f"study directory: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
