"""`python -m ted_fl.bench cli`: how fast every entry point answers `--help` and a bad input.

Each case runs in a fresh interpreter (as a user would type it), `--repeat` times; the table shows
the median wall time and whether torch, Flower or Ray were imported on the way (they must not be:
the command lines parse and validate first). The target is 1 s on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ted_fl.config import ExperimentConfig, dump_toml, to_dict

HEAVY = ("torch", "flwr", "ray")

# (entry point, arguments): --help, then an input error each (a bad key, a bad value, a missing file).
CASES: list[tuple[str, list[str]]] = [
    ("ted_fl.simulate", ["--help"]),
    ("ted_fl.simulate", ["--set", "train.rounds.x=1"]),
    ("ted_fl.simulate", ["--set", "train.rounds=0"]),
    ("ted_fl.simulate", ["--data-dir", "{file}"]),
    ("ted_fl.simulate", ["--resume", "{finished}"]),
    ("ted_fl.centralized", ["--help"]),
    ("ted_fl.centralized", ["--approach", "sq"]),
    ("ted_fl.sites", ["--help"]),
    ("ted_fl.sites", ["check", "nope"]),
    ("ted_fl.report", ["--help"]),
    ("ted_fl.generalize", ["--help"]),
    ("ted_fl.sweep", ["--help"]),
    ("ted_fl.bench", ["--help"]),
]

PROBE = """
import runpy, sys, json, os
sys.argv = [sys.argv[1], *sys.argv[2:]]
code = 0
try:
    runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
heavy = [m for m in {heavy!r} if m in sys.modules]
os.write(int(os.environ["TED_FL_BENCH_FD"]), json.dumps({{"code": code, "heavy": heavy}}).encode())
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cli", help="time to --help and to a bad-input error, per entry point")
    p.add_argument("--repeat", type=int, default=3, help="runs per case (the median is shown)")
    p.set_defaults(func=run)


def measure(module: str, args: list[str], env: dict[str, str]) -> tuple[float, int, list[str]]:
    r, w = os.pipe()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), module, *args],
                          env={**env, "TED_FL_BENCH_FD": str(w)},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(w,))
    wall = time.perf_counter() - t0
    os.close(w)
    with os.fdopen(r) as fh:
        text = fh.read()
    out: dict[str, Any] = json.loads(text) if text else {"code": proc.returncode, "heavy": ["?"]}
    return wall, int(out["code"]), list(out["heavy"])


def run(args: argparse.Namespace, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryDirectory() as tmp:
        a_file = Path(tmp) / "data.txt"
        a_file.write_text("a file, not a folder")
        finished = Path(tmp) / "finished"
        finished.mkdir()
        (finished / "config.toml").write_text(dump_toml(to_dict(ExperimentConfig())))
        (finished / "summary.csv").write_text("approach,seed,avg\nseq,0,0.5\n")
        rows = []
        for module, raw in CASES:
            case = [a.format(file=a_file, finished=finished) for a in raw]
            runs = [measure(module, case, env) for _ in range(max(1, args.repeat))]
            wall = statistics.median(r[0] for r in runs)
            code, heavy = runs[-1][1], sorted({m for r in runs for m in r[2]})
            rows.append((f"python -m {module} {' '.join(raw)}", wall, code, heavy))
    width = max(len(r[0]) for r in rows)
    print(f"{'command':<{width}}  {'median s':>8}  exit  heavy imports")
    for cmd, wall, code, heavy in rows:
        print(f"{cmd:<{width}}  {wall:8.2f}  {code:4d}  {', '.join(heavy) or '-'}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    worst = max(r[1] for r in rows)
    heavy_any = [r[0] for r in rows if r[3]]
    print(f"cli: slowest first answer {worst:.2f} s (target 1 s; load average {load:.1f}); "
          + (f"{len(heavy_any)} case(s) imported torch/Flower/Ray" if heavy_any else "none imported torch/Flower/Ray"))
    return 0
