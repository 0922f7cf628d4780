"""`python -m ted_fl.report RUN_DIR [RUN_DIR ...]`: the run report's command line (the page: ted_fl.run.html_report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ted_fl.errors import exit_code
from ted_fl.run.directory import MEAN_LABEL, RunDir  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ted_fl.report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html for one run, report.html otherwise)")
    p.add_argument("--no-samples", action="store_true", help="leave out the sample predictions (no data needed)")
    p.add_argument("--png", action="store_true", help="also write each figure as PNG (needs Chromium)")
    p.add_argument("--shared-plotlyjs", action="store_true",
                   help="load plotly.js from one file beside the page (shared by the reports of a folder) "
                        "instead of embedding it (4.8 MB)")
    p.add_argument("--label", default=MEAN_LABEL,
                   help="class or region whose Dice the figures show (default: the mean over them)")
    return p


def check_runs(runs: list[Path]) -> None:
    """Every argument is a run directory: one line naming the one that is not."""
    for r in runs:
        RunDir.open(r).refuse_if_failed()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = [Path(r) for r in args.runs]
    out = Path(args.out) if args.out else (runs[0] / "report.html" if len(runs) == 1 else Path("report.html"))

    def body() -> int:
        check_runs(runs)
        # numpy, pandas, plotly and torch load after --help and the folder check (a fast answer)
        from ted_fl.run.html_report import shared_plotlyjs, write_report

        js = shared_plotlyjs(out.resolve().parent.parent if len(runs) == 1 and args.out is None else out.parent) \
            if args.shared_plotlyjs else None
        path = write_report(runs, out, samples=not args.no_samples, png=args.png, label=args.label, plotlyjs=js)
        print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0

    return exit_code(body)


if __name__ == "__main__":
    raise SystemExit(main())
