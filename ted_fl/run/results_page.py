"""Write a Markdown results page from run directories: `python -m ted_fl.results_doc RUN_DIR ... --out FILE`.

Every number on the page is computed here from the runs' own files (metrics.csv, config.toml,
command.txt, machine.json) with `ted_fl.continual.metrics`, so a page can be regenerated, never
hand-edited: per run the command, the machine, the configuration, and per approach the Dice R
matrix plus Avg, BWT, FWT, forgetting and plasticity (on the mean over the site set's classes and
regions; multi-class sets add a per-label table and R matrices).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ted_fl.config import ApproachName, ExperimentConfig, choices, dump_toml, to_dict
from ted_fl.continual.metrics import continual_summary, r_matrix
from ted_fl.errors import TedFlError
from ted_fl.run.directory import MEAN_LABEL, RunDir, labels_of, select_label, site_learning, verdict
from ted_fl.run.findings import headline_findings
from ted_fl.run.markdown import marked_sections, md_table

SUMMARY_COLUMNS = ["avg", "ravg", "bwt", "fwt", "forgetting", "plasticity"]


class PooledRun(RunDir):
    """Several run directories of one configuration that differ only in their seeds, read as one
    run (`RUN_DIR+RUN_DIR+...` on the command line): metrics and summaries concatenated, seeds
    united, commands listed one per line. Refused when anything but the seeds differs."""

    def __init__(self, parts: list[RunDir]) -> None:
        self.parts = parts
        super().__init__(parts[0].path.parent / "+".join(r.path.name for r in parts))
        base = to_dict(parts[0].read_config())
        for r in parts[1:]:
            other = to_dict(r.read_config())
            if {k: v for k, v in other.items() if k not in ("seeds", "out")} != {
                    k: v for k, v in base.items() if k not in ("seeds", "out")}:  # `out`: only where it was written
                raise TedFlError(f"{r.path}: its configuration differs from {parts[0].path} beyond the seeds; "
                                 "pool only runs of one configuration")
        seeds = [s for r in parts for s in r.read_config().seeds]
        if len(set(seeds)) != len(seeds):
            raise TedFlError(f"pooled runs repeat a seed ({seeds}); pool runs of distinct seeds")

    def read_config(self) -> ExperimentConfig:
        cfg = self.parts[0].read_config()
        cfg.seeds = [s for r in self.parts for s in r.read_config().seeds]
        return cfg

    def metrics(self) -> pd.DataFrame:
        return pd.concat([r.metrics() for r in self.parts], ignore_index=True)

    def summary(self) -> pd.DataFrame:
        return pd.concat([r.summary() for r in self.parts], ignore_index=True)


class SweepRun(RunDir):
    """A sweep folder (`python -m ted_fl.sweep --out FOLDER`) read as one run: its finished cells
    (one approach x one seed each, `cells/<cell>/cell.json` written) pooled, approaches and seeds
    united, the command taken from the sweep's report.md. Unfinished cells are left out and counted
    (`missing`), so a sweep still running can be read. Refused when the cells differ beyond the
    approach and the seed (a grid or several site orders: read each point's cells on their own)."""

    IGNORED = ("approaches", "seeds", "out")

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        cells = sorted(p for p in (folder / "cells").iterdir() if p.is_dir())
        done = [RunDir(p) for p in cells if (p / "cell.json").is_file() and (p / "summary.csv").is_file()]
        rank = {a: i for i, a in enumerate(choices(ApproachName))}  # the schema's order: seq, joint, kd, ...

        def key(r: RunDir) -> tuple[int, list[int]]:
            c = r.read_config()
            return min(rank.get(a, len(rank)) for a in c.approaches), list(c.seeds)

        self.parts = sorted(done, key=key)
        self.missing = len(cells) - len(self.parts)
        if not self.parts:
            raise TedFlError(f"{folder}: no finished cell under cells/ yet; wait for the sweep or pass a run directory")
        base = {k: v for k, v in to_dict(self.parts[0].read_config()).items() if k not in self.IGNORED}
        for r in self.parts[1:]:
            other = {k: v for k, v in to_dict(r.read_config()).items() if k not in self.IGNORED}
            if other != base:
                keys = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
                raise TedFlError(f"{r.path}: this cell's configuration differs from {self.parts[0].path.name}'s "
                                 f"beyond the approach and the seed (in {', '.join(keys)}); a sweep with a grid or "
                                 "several orders cannot be read as one run")

    @staticmethod
    def is_sweep(path: Path) -> bool:
        return (path / "cells").is_dir() and not (path / "config.toml").is_file()

    def read_config(self) -> ExperimentConfig:
        cfg = self.parts[0].read_config()
        cfgs = [r.read_config() for r in self.parts]
        cfg.approaches = list(dict.fromkeys(a for c in cfgs for a in c.approaches))
        cfg.seeds = sorted({s for c in cfgs for s in c.seeds})
        return cfg

    def metrics(self) -> pd.DataFrame:
        return pd.concat([r.metrics() for r in self.parts], ignore_index=True)

    def summary(self) -> pd.DataFrame:
        return pd.concat([r.summary() for r in self.parts], ignore_index=True)

    def command(self) -> str | None:
        """The sweep's command line, from the `Command: `...`` line its report.md opens with."""
        report = self.path / "report.md"
        if not report.is_file():
            return None
        for line in report.read_text().splitlines():
            if line.startswith("Command: `") and line.rstrip().endswith("`"):
                return line.rstrip()[len("Command: `"):-1]
        return None


def open_run(spec: str | Path) -> RunDir:
    """A run directory, or several joined by '+' (one configuration, different seeds) pooled."""
    if "+" not in str(spec) and SweepRun.is_sweep(Path(spec)):
        return SweepRun(Path(spec))
    parts = [RunDir.open(p) for p in str(spec).split("+")]
    for part in parts:
        part.refuse_if_failed()
    return parts[0] if len(parts) == 1 else PooledRun(parts)


def _read(run: RunDir, name: str) -> str | None:
    if isinstance(run, SweepRun):
        if name == "command.txt":
            return run.command() or (f"(the sweep in {run.path} has not finished: its report.md, which "
                                     "records the command, is written when every cell is done)")
        return _read(run.parts[0], name)
    if isinstance(run, PooledRun):
        texts = [_read(r, name) for r in run.parts]
        if name == "command.txt":
            return "\n".join(t for t in texts if t) or None
        return texts[0]
    p = run.path / name
    return p.read_text().strip() if p.is_file() else None


def per_seed_rows(run: RunDir, label: str = MEAN_LABEL) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Per approach the Dice R matrix (mean over seeds, 'untrained' row first), and one row per
    approach and seed: `continual_summary` of that seed's R matrix (approach, seed, avg, ravg, bwt,
    fwt, forgetting, plasticity). The summary table and the paired comparisons both read these rows.

    rAvg uses the run's own joint approach when it has one. `label` picks a class or region of the
    site set; the default is the mean over them.
    """
    m = run.metrics()
    test = m[m["split"] == "test"]
    if test.empty:
        raise TedFlError(f"{run.path}: metrics.csv has no test rows; is the run finished?")
    if label != MEAN_LABEL:
        select_label(test, label)  # a clear error for a label the run does not have
    test = test[test["label"] == label]
    order = list(dict.fromkeys(test.loc[test["stage"] >= 0, "site"]))
    joint = None
    jt = test[(test["approach"] == "joint") & (test["stage"] >= 0)]
    if not jt.empty:
        joint = sum(r_matrix(g, "dice", order, label).iloc[-1] for _, g in jt.groupby("seed")) / jt["seed"].nunique()
    matrices: dict[str, pd.DataFrame] = {}
    rows = []
    for approach, g in test.groupby("approach", sort=False):
        trained, init = g[g["stage"] >= 0], g[g["stage"] < 0]
        r = r_matrix(trained, "dice", order, label)
        stage_sites = trained.drop_duplicates("stage").set_index("stage")["stage_site"]
        r.index = [f"after {stage_sites[s]}" for s in r.index]
        if not init.empty:
            r0 = r_matrix(init, "dice", order, label)
            r0.index = ["untrained"]
            r = pd.concat([r0, r])
        matrices[str(approach)] = r
        for seed, gs in g.groupby("seed"):
            tr, ini = gs[gs["stage"] >= 0], gs[(gs["stage"] < 0) & (gs["metric"] == "dice")]
            b = ini.set_index("site")["value"] if len(ini) else None
            s = continual_summary(r_matrix(tr, "dice", order, label), joint=joint, initial=b)
            rows.append({"approach": str(approach), "seed": seed, **{k: s[k] for k in SUMMARY_COLUMNS}})
    return matrices, pd.DataFrame(rows, columns=["approach", "seed", *SUMMARY_COLUMNS])


def run_tables(run: RunDir, label: str = MEAN_LABEL) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Per approach the Dice R matrix (mean over seeds, 'untrained' row first) and a summary table.

    The summary has one row per approach: the metrics of `continual_summary` per seed
    (`per_seed_rows`), averaged over the seeds, with their standard deviation (`<metric>_sd`).
    """
    matrices, seeds = per_seed_rows(run, label)
    rows = []
    for approach, g in seeds.groupby("approach", sort=False):
        s, n = g[SUMMARY_COLUMNS].mean(), len(g)
        sd = g[SUMMARY_COLUMNS].std(ddof=1) if n > 1 else pd.Series(dtype=float)
        rows.append({"approach": approach, "seeds": int(g["seed"].nunique()), **{k: s[k] for k in SUMMARY_COLUMNS},
                     **{f"{k}_sd": float(sd.get(k, float("nan"))) for k in SUMMARY_COLUMNS}})
    summary = pd.DataFrame(rows).set_index("approach")
    if not (seeds["approach"] == "joint").any():
        summary = summary.drop(columns=["ravg", "ravg_sd"])
    try:
        wall = run.summary().groupby("approach")["wall_s"].mean()
        summary["wall_s"] = wall.reindex(summary.index)
    except (FileNotFoundError, KeyError):
        pass
    return matrices, summary


def label_table(run: RunDir, spread: bool = False) -> pd.DataFrame:
    """Per approach and label (each class, each region, the mean): Avg, BWT, forgetting, plasticity;
    with `spread`, as "mean ± std" over seeds (text, 3 decimals) where a run holds several."""
    frames = []
    for lab in labels_of(run.metrics()):
        _, summary = run_tables(run, lab)
        cols = ["avg", "bwt", "forgetting", "plasticity"]
        part = (shown(summary) if spread else summary)[cols].copy()
        part.insert(0, "label", lab)
        frames.append(part)
    return pd.concat(frames).reset_index().set_index(["approach", "label"]).sort_index(level=0, sort_remaining=False)


def shown(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as printed: "mean ± std" over seeds when a run has several, plain means otherwise."""
    out = summary[[c for c in summary.columns if not c.endswith("_sd")]].copy().astype(object)
    for k in SUMMARY_COLUMNS:
        if k in out.columns and f"{k}_sd" in summary.columns:
            out[k] = [f"{m:.3f} ± {d:.3f}" if n > 1 and pd.notna(d) else f"{m:.3f}"
                      for m, d, n in zip(summary[k], summary[f"{k}_sd"], summary["seeds"], strict=True)]
    return out


def machine_line(run: RunDir) -> str:
    text = _read(run, "machine.json")
    if not text:
        return "(not recorded: the run predates machine.json)"
    mi = json.loads(text)
    return (f"{mi.get('processor', '?')}, {mi.get('cpus', '?')} CPUs, {mi.get('platform', '?')}, "
            f"Python {mi.get('python', '?')}, torch {mi.get('torch', '?')}"
            f"{', CUDA' if mi.get('cuda') else ', no GPU'}")


def run_verdict(run: RunDir) -> list[str]:
    """`ted_fl.run.directory.verdict` on the run's summary.csv rows (paired by seed), [] without one."""
    try:
        per_seed = run.summary()
    except FileNotFoundError:
        return []
    return verdict(per_seed, site_learning(run.metrics()))


MACHINE_SPECIFIC = ("These figures are specific to the machine above: the same command and seeds on another CPU "
                    "(or a GPU) give slightly different numbers, since floating-point results depend on the "
                    "hardware and its math libraries.")


def readme_block(run: RunDir, target: str) -> str:
    """The measured figures of one run, compact enough for a README, with how to regenerate them."""
    _, summary = run_tables(run)
    command = _read(run, "command.txt") or "(not recorded)"
    parts = run.parts if isinstance(run, PooledRun) else [run]
    secs = []
    for r in parts:
        done = [ln for ln in (_read(r, "run.log") or "").splitlines() if " done in " in ln]
        secs += [float(done[-1].split(" done in ")[1].split()[0])] if done else []
    ray = " (Ray start included)" if "simulate" in (_read(run, "command.txt") or "") else ""
    whole = "" if len(secs) != len(parts) else (
        f", {secs[0]:.0f} s in all{ray}" if len(secs) == 1 else
        f", {sum(secs):.0f} s in all over {len(secs)} runs run side by side ({', '.join(f'{x:.0f}' for x in secs)} s)")
    command = "`, `".join(command.splitlines())  # pooled runs: one command per run
    return "\n".join([
        f"Measured with `{command}` on {machine_line(run)}{whole} (run `{run.path.name}`; this block is "
        f"written by `python -m ted_fl.results_doc RUN_DIR --readme {target}`):",
        "",
        md_table(shown(summary), index=True, index_name="approach"),
        "",
        MACHINE_SPECIFIC,
        "",
        *(f"- {line}" for line in run_verdict(run)),
    ])


def eval_bn_lines(run: RunDir) -> list[str]:
    """The run's `python -m ted_fl.diagnose eval-bn` outputs, if any: each mode's summary."""
    from ted_fl.run.diagnostics import summarize_modes

    out: list[str] = []
    for part in run.parts if isinstance(run, PooledRun) else [run]:
        for csv in sorted((part.path / "diagnostics").glob("eval_bn-*.csv")):
            df = pd.read_csv(csv)
            out += [f"`python -m ted_fl.diagnose eval-bn` on `{part.path.name}` ({csv.stem[8:]}): the same "
                    "stage checkpoints scored under both `eval.bn` modes:", "",
                    md_table(summarize_modes(df)), ""]
    return out


def run_section(run: RunDir, heading_level: int = 2) -> str:
    h = "#" * heading_level
    cfg = run.read_config()
    matrices, summary = run_tables(run)
    command = _read(run, "command.txt") or "(not recorded: the run predates command.txt)"
    machine = machine_line(run)
    order = " -> ".join(next(iter(matrices.values())).columns)
    out = [
        f"{h} {cfg.name}: {cfg.data.sites} ({order})",
        "",
        f"Run directory `{run.path.name}`; approaches {', '.join(cfg.approaches)}; seeds "
        f"{', '.join(map(str, cfg.seeds))}."
        + (f" **{run.missing} cell(s) of this sweep had not finished when this page was written**; the "
           "tables hold the finished ones." if isinstance(run, SweepRun) and run.missing else ""),
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {machine}.",
        "",
        "Summary after the last site (Dice; Avg = mean over all sites of the last row of R, BWT = mean "
        "change on earlier sites since each was learnt, FWT = mean zero-shot gain over the untrained "
        "model on each site before it is trained on, forgetting = mean drop from each earlier site's "
        "best, plasticity = mean of R's diagonal; `wall_s` per approach):",
        "",
        md_table(shown(summary), index=True, index_name="approach"),
        "",
        "Findings (paired by seed, `ted_fl.run.findings`: mean difference of the per-seed values, 95% "
        "Student-t interval, and the seeds a paired t-test at 5 % with power 0.8 needs to detect 0.02 at "
        "the observed spread):",
        "",
        *(f"- {line}" for line in headline_findings(per_seed_rows(run)[1], site_learning(run.metrics()))),
        "",
        "Every metric against seq, paired by seed (`ted_fl.run.directory.verdict`: mean difference, 95% "
        "t-interval):",
        "",
        *(f"- {line}" for line in run_verdict(run)),
        "",
        "Dice R matrices (row: after training that site; column: test split of that site):",
        "",
    ]
    for approach, r in matrices.items():
        out += [f"**{approach}**", "", md_table(r, index=True, index_name="stage"), ""]
    labels = labels_of(run.metrics())
    if len(labels) > 2:  # several classes / regions (a one-class set's class equals the mean)
        out += [
            "Per class and region (the tables above use the mean over them):",
            "",
            md_table(label_table(run, spread=True).reset_index().set_index("approach"), index=True, index_name="approach"),
            "",
        ]
        for lab in labels[:-1]:
            out += [f"<details><summary>Dice R matrices of {lab}</summary>", ""]
            for approach, r in run_tables(run, lab)[0].items():
                out += [f"**{approach}**", "", md_table(r, index=True, index_name="stage"), ""]
            out += ["</details>", ""]
    out += eval_bn_lines(run)
    out += [
        "<details><summary>Resolved configuration (config.toml)</summary>",
        "",
        "```toml",
        dump_toml(to_dict(cfg)).strip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(out)


def write_doc(run_dirs: list[str | Path], out: str | Path, title: str = "Results", intro: str = "",
              intro_path: str = "") -> Path:
    runs = [open_run(d) for d in run_dirs]
    regen = "python -m ted_fl.results_doc " + " ".join(map(str, run_dirs)) + f" --out {out}"
    if intro_path:
        regen += f" --intro {intro_path}"
    parts = [
        f"# {title}",
        "",
        "<!-- Generated by ted_fl.results_doc from run directories; do not edit by hand. -->",
        "",
        f"Generated from the run directories below with `{regen}"
        + (f" --title '{title}'" if title != "Results" else "") + "`.",
        "",
    ]
    if intro:
        parts += [intro.strip(), ""]
    for run in runs:
        parts.append(run_section(run))
    path = Path(out)
    if path.is_file():  # blocks written by other generators (e.g. the GKD section) stay
        parts += ["", *marked_sections(path.read_text())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts).rstrip() + "\n")
    return path
