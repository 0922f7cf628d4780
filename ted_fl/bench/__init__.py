"""Benchmarks: accuracy on real data, and what the federation costs (`python -m ted_fl.bench`).

Subcommands: accuracy, sweep, overhead, scaling, probes, step, gpu, protocol, cli. Each prints a short table and ends with one
headline line; without --quick (or with --doc PATH) it rewrites its own section of
docs/benchmarks.md from the run outputs.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ted_fl.errors import exit_code


def build_parser() -> argparse.ArgumentParser:
    from ted_fl.bench import accuracy, cli, gpu, overhead, probes, protocol, scaling, step, sweep

    p = argparse.ArgumentParser(prog="python -m ted_fl.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for mod in (accuracy, sweep, overhead, scaling, probes, step, gpu, protocol, cli):
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # Undefined ratios (rBWT with a zero diagonal, rAvg without a joint run) are NaN by design.
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="invalid value encountered")
    return exit_code(lambda: args.func(args, argv))
