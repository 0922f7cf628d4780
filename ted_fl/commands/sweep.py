"""Run a grid of independent simulations in parallel and report across them.

    python -m ted_fl.sweep --config quick --grid loss.lambda_d=0.01,0.1 --approach seq kd ted_gugf \
        --seed 0 1 --order RUNMC,BMC,I2CVB --order BMC,RUNMC,I2CVB --out runs/sweep-quick

Every cell (approach x seed x grid point x order) runs on Ray's resources (federated.num_cpus /
num_gpus per cell); rerunning with the same --out reuses the finished cells. Writes
metrics.csv, summary.csv and report.md (selection on validation, results on test) in --out.
The work is done by `ted_fl.studies.grid`; this is its command line.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ted_fl.config import ExperimentConfig, load_experiment, parse_override, set_key
from ted_fl.errors import TedFlError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ted_fl.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="experiment file: simulations/NAME.toml or NAME (default: the defaults)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis over any config key, e.g. --grid loss.lambda_d=0.01,0.1 (repeatable)")
    p.add_argument("--approach", nargs="+", help="approaches (default: the config's)")
    p.add_argument("--seed", type=int, nargs="+", help="seeds (default: the config's)")
    p.add_argument("--order", action="append", default=[], metavar="A,B,C",
                   help="a site order, comma-separated (repeatable; default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="sweep folder (default runs/sweep-NAME); the same folder reuses finished cells")
    p.add_argument("--serial", action="store_true", help="run the cells one after another in this process")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ted_fl.studies.grid import parse_grid, sweep  # after parsing: --help answers before torch

    try:
        cfg = load_experiment(args.config) if args.config else ExperimentConfig()
        for item in args.set:
            set_key(cfg, *parse_override(item))
        grid = parse_grid(args.grid)
        orders = [[s.strip() for s in o.split(",") if s.strip()] for o in args.order] or None
        folder = args.out or f"{cfg.out}/sweep-{cfg.name}"
        argv_used = sys.argv[1:] if argv is None else list(argv)
        out = sweep(cfg, grid, folder, approaches=args.approach, seeds=args.seed, orders=orders,
                    parallel=not args.serial, quiet=args.quiet, num_cpus=args.cpus,
                    command=shlex.join(["python", "-m", "ted_fl.sweep", *argv_used]))
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    test = out["test"]
    print(test.to_string(index=False))
    print(f"{len(out['cells'])} cells ({out['ran']} run, {out['reused']} reused) in {out['wall_s']:.1f} s")
    print(f"report: {out['report']}")
    print(f"sweep directory: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
