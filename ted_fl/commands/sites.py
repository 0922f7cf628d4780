"""`python -m ted_fl.sites`: list the site sets and check that a set's data loads, before a long run.

`check` loads every site exactly as a run would and prints counts, sizes, label values and every
warning, so a missing mask or a wrong folder shows up here rather than hours into training.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ted_fl.config import DataConfig
from ted_fl.errors import exit_code

PIPE_WIDTH = 1000  # columns of a table printed to a pipe or a file (a table takes what it needs)


def _console() -> Any:
    """A rich Console for the tables: a terminal's width on a terminal; piped or redirected, wide
    enough that no name is cut to fit 80 columns ('Domai…'), since a file or grep wants them whole."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def _cmd_list() -> int:
    from rich.table import Table

    from ted_fl.data import list_site_sets, load_site_set_spec

    table = Table(title="site sets (sites/*.toml)")
    for col in ("set", "sites (arrival order)", "layouts", "evaluation", "synthetic twin"):
        table.add_column(col)
    for name in list_site_sets():
        spec = load_site_set_spec(name)
        layouts = sorted({s.layout for s in spec.sites})
        table.add_row(name, " -> ".join(spec.site_names), ", ".join(layouts), f"per {spec.evaluation}",
                      spec.synthetic.generator or "no")
    _console().print(table)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ted_fl.data import check_sites, size_note

    cfg = DataConfig(sites=args.set, data_dir=args.data_dir or "", size=args.size, target=args.target or "",
                     cache_dir=args.cache_dir or "")
    report = check_sites(cfg, seed=args.seed)
    where = report.data_dir or "synthetic twin"
    labels = report.labels
    what = ""
    if labels is not None:
        what = f", classes {', '.join(labels.classes)}" + (
            f", regions {', '.join(n for n, _ in labels.regions)}" if labels.regions else "")
    table = Table(title=escape(f"site set '{report.set_name}' ({where}), size {args.size}{what}"))
    for col in ("site", "train img/vol", "val img/vol", "test img/vol", "validation", "image", "labels", "fg %",
                "status"):
        table.add_column(col)
    for s in report.sites:
        cells = [f"{s.counts[k][0]}/{s.counts[k][1]}" if k in s.counts else "-" for k in ("train", "val", "test")]
        status = "[green]ok[/]" if s.usable else "[red]UNUSABLE[/]"
        if s.usable and s.warnings:
            status = f"[yellow]ok, {len(s.warnings)} warning(s)[/]"
        val = {"yes": "[green]yes[/]", "no": "[yellow]no[/]"}.get(s.validation, "-")
        table.add_row(escape(s.name), *cells, val, "x".join(map(str, s.size)) or "-",
                      ",".join(map(str, s.label_values)) or "-", f"{100 * s.foreground:.1f}", status)
    console = _console()
    console.print(table)
    for s in report.sites:
        for p in s.problems:
            # escaped: a message naming a TOML table ([sites.labels]) must not be eaten as markup
            console.print(f"[red]problem[/] {escape(s.name)}: {escape(p)}", markup=True, highlight=False,
                          soft_wrap=True)
        for w in s.warnings:
            console.print(f"[yellow]warning[/] {escape(s.name)}: {escape(w)}", markup=True, highlight=False,
                          soft_wrap=True)
    note = size_note(cfg, "--size")
    if note:
        console.print(f"[cyan]note[/]: {escape(note)}", markup=True, highlight=False, soft_wrap=True)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ted_fl.sites", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the site sets and their sites")
    chk = sub.add_parser("check", help="load every site of a set and report counts and problems")
    chk.add_argument("set", help="a site-set name (see list) or a path to a TOML file")
    chk.add_argument("--data-dir", default="", help="the set's data folder (default: the synthetic twin)")
    chk.add_argument("--size", type=int, default=64,
                     help="in-plane size every site is resampled to, as data.size (default 64; 0: each site's "
                          "preprocess.size)")
    chk.add_argument("--target", default="", help="keep one class of a multi-class set (mnms: lv, myo, rv)")
    chk.add_argument("--seed", type=int, default=0)
    chk.add_argument("--cache-dir", default="", help="where the synthetic twin is written")
    args = parser.parse_args(argv)
    return exit_code(lambda: _cmd_list() if args.cmd == "list" else _cmd_check(args))


if __name__ == "__main__":
    sys.exit(main())
