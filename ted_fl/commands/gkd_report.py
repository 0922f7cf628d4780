"""The GKD section of the results page: `python -m ted_fl.gkd_report RUN_DIR [--doc docs/results-gkd.md]`;
with `--headline NAME --doc docs/results.md`, GKD's short block among the page's headlines.

The command line of ted_fl.run.gkd_page."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ted_fl.errors import TedFlError
from ted_fl.run.directory import RunDir
from ted_fl.run.gkd_page import headline, read_config, section
from ted_fl.run.markdown import md_table, write_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ted_fl.gkd_report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories of python -m ted_fl.generalize (e.g. one per seed)")
    parser.add_argument("--doc", default="", help="also write the section into this markdown page")
    parser.add_argument("--section", default="gkd", help="name of the marked block in --doc (default gkd)")
    parser.add_argument("--title", default="", help="heading of the section (default: from the runs)")
    parser.add_argument("--networks", action="store_true", help="add the size/speed table of every registered network")
    parser.add_argument("--command", default="", help="the command that produced the run (shown in the section)")
    parser.add_argument("--headline", metavar="NAME", default="",
                        help="instead of the long section, write the short headline block (one table, budget, "
                             "command, paired findings) into the <!-- headline:NAME --> block of --doc "
                             "(e.g. docs/results.md)")
    args = parser.parse_args(argv)
    try:
        runs = [RunDir.open(r) for r in args.runs]
        if args.headline:
            if not re.fullmatch(r"[\w.-]+", args.headline):
                raise TedFlError(f"--headline {args.headline!r}: use letters, digits, '.', '_' or '-' (it names a block)")
            if not args.doc:
                raise TedFlError("--headline writes a block of a page: add --doc PAGE (e.g. --doc docs/results.md)")
            regen = f"python -m ted_fl.gkd_report {' '.join(args.runs)} --headline {args.headline} --doc {args.doc}"
            text = headline(runs, args.headline, args.command, regen)
        else:
            text = section(runs, args.command, title=args.title)
    except TedFlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.headline:
        write_section(Path(args.doc), args.headline, text, header="# Results\n", tag="headline")
        print(text)
        return 0
    if args.networks:
        from ted_fl.continual.networks import NETWORKS
        from ted_fl.continual.profiling import profile_table

        size = read_config(RunDir.open(args.runs[0])).data.size
        table = profile_table(sorted(NETWORKS), size, 5)
        text += (f"\n\nEvery registered network at {size} x {size} (`python -m ted_fl.networks --size {size}`; "
                 "CPU time of a single-threaded forward, the fastest of 5):\n\n" + md_table(table))
    if args.doc:
        write_section(Path(args.doc), args.section, text, header="# Results\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
