"""Write a Markdown results page from run directories: `python -m ted_fl.results_doc RUN_DIR ... --out FILE`.

The command line of ted_fl.run.results_page; `--headline NAME` writes one data set's headline block
(ted_fl.run.headline) into a page instead. A RUN_DIR may also be a sweep folder (its cells pooled)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ted_fl.errors import TedFlError, exit_code
from ted_fl.run.directory import RunDir
from ted_fl.run.headline import headline_block
from ted_fl.run.markdown import write_section
from ted_fl.run.results_page import open_run, readme_block, write_doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ted_fl.results_doc", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories printed by a run; RUN_DIR+RUN_DIR+... pools runs of one "
                        "configuration that differ only in their seeds")
    p.add_argument("--out", help="Markdown file to write (default: results.md in the run directory, when "
                                 "there is one; never a path relative to where the command runs, such as "
                                 "a checkout's docs/results.md)")
    p.add_argument("--title", default="Results", help="page title")
    p.add_argument("--intro", default="", help="a file whose text goes under the title")
    p.add_argument("--readme", metavar="FILE",
                   help="instead of a page, write the (single) run's figures into FILE's "
                        "<!-- results:default-run --> block, e.g. README.md")
    p.add_argument("--headline", metavar="NAME",
                   help="instead of a page, write the (single) run's or sweep's headline (one table, budget, "
                        "command, findings with paired comparisons) into the <!-- headline:NAME --> block "
                        "of --out, leaving the rest of that file as it is")
    args = p.parse_args(argv)
    return exit_code(lambda: _write(args))


def default_out(runs: list[str]) -> Path:
    """Without --out: results.md inside the one run directory; several (or pooled) runs have no
    folder of their own, so the page's place must be named."""
    if len(runs) == 1 and "+" not in runs[0]:
        return RunDir.open(runs[0]).path / "results.md"
    raise TedFlError(f"{len(runs)} run directories (or pooled runs) share no folder; name the page with "
                     "--out FILE (e.g. --out docs/results.md from a checkout)")


def _write(args: argparse.Namespace) -> int:
    if args.readme:
        if len(args.runs) != 1:
            raise TedFlError("--readme takes exactly one run directory")
        target = Path(args.readme)
        write_section(target, "default-run", readme_block(open_run(args.runs[0]), args.readme), tag="results")
        print(f"wrote the default-run block of {target}")
        return 0
    if args.headline:
        if len(args.runs) != 1 or args.out is None:
            raise TedFlError("--headline takes exactly one run directory (or sweep folder, or RUN+RUN pooled "
                             "seeds) and --out FILE, e.g. --out docs/results.md")
        if not re.fullmatch(r"[\w.-]+", args.headline):
            raise TedFlError(f"--headline {args.headline!r}: use letters, digits, '.', '_' or '-' (it names a block)")
        target = Path(args.out)
        regen = f"python -m ted_fl.results_doc {args.runs[0]} --headline {args.headline} --out {args.out}"
        block = headline_block(open_run(args.runs[0]), args.headline, regen)
        write_section(target, args.headline, block, tag="headline")
        print(f"wrote the {args.headline} headline block of {target}")
        return 0
    intro = ""
    if args.intro:
        ip = Path(args.intro)
        if not ip.is_file():
            raise TedFlError(f"--intro {ip}: no such file; pass a Markdown file or omit --intro")
        intro = ip.read_text()
    path = write_doc(args.runs, default_out(args.runs) if args.out is None else args.out, args.title, intro,
                     args.intro)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
