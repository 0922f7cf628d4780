"""Benchmarks: accuracy on real data, and what the federation costs (`python -m ted_fl.bench`).

Subcommands: accuracy, sweep, cells, overhead, scaling, probes, step, gpu, protocol, cli. Each prints a short table and ends with one
headline line; without --quick (or with --doc PATH) it rewrites its own section of
docs/benchmarks.md from the run outputs.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ted_fl.errors import exit_code

# Subcommand -> its one-line help; the module ted_fl.bench.<name> adds its options. Only the chosen
# subcommand's module is imported (several import torch): `--help` answers before torch loads.
COMMANDS = {
    "accuracy": "tuned accuracy of seq/kd/ted/ted_gugf/joint (real retina + prostate twin)",
    "sweep": "a grid in parallel on Ray vs its cells one after another",
    "cells": "the default command with 1 vs N cells at once: wall time, identical numbers",
    "overhead": "simulator vs centralized run: wall time end to end, per round, memory",
    "scaling": "3..48 synthetic sites: time per stage and peak memory",
    "probes": "SKA probes as pixels vs as a seed: bytes and time per round",
    "step": "per-approach step time against a seq step and the TED floor",
    "gpu": "GPU path per approach: step time, images/s, peak memory, clients per GPU",
    "protocol": "estimate the wall time and memory of a full protocol from measured steps",
    "cli": "time to --help and to a bad-input error, per entry point",
}


def build_parser(only: str | None = "") -> argparse.ArgumentParser:
    """The parser; `only` names the one subcommand whose module is loaded (None: none, "": all)."""
    import importlib

    p = argparse.ArgumentParser(prog="python -m ted_fl.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in COMMANDS.items():
        if only == "" or only == name:
            importlib.import_module(f"ted_fl.bench.{name}").add_parser(sub)
        else:
            sub.add_parser(name, help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    # Undefined ratios (rBWT with a zero diagonal, rAvg without a joint run) are NaN by design.
    warnings.filterwarnings("ignore", category=RuntimeWarning, message="invalid value encountered")
    return exit_code(lambda: args.func(args, argv))
