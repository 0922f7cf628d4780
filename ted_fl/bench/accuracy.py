"""`accuracy`: seq, kd, ted, ted_gugf and joint on real retina and the synthetic prostate twin.

Fair tuning first: every distilling approach gets its distillation weights chosen on the
*validation* splits from a small grid, by the centralized runner (the same schedule, step and
evaluation as the simulator; `tests/integration/test_simulation.py::test_matches_centralized`
checks that their R matrices agree). Selection criterion ("val mean-seen Dice"): after each
stage t, the mean validation Dice over the sites seen so far (1..t), averaged over the stages;
it rewards learning the new site and keeping the old ones alike. Then every approach runs
with its selected weights, on several seeds, through the federated simulator (Flower + Ray),
and the test figures are reported as mean +- std over the seeds.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from ted_fl.bench import common as C
from ted_fl.bench.federated import simulate_groups
from ted_fl.config import ApproachName, ExperimentConfig, project_root
from ted_fl.data import site_order
from ted_fl.errors import TedFlError
from ted_fl.run.directory import RunDir
from ted_fl.studies.grid import Cell, run_cells
from ted_fl.studies.grid import val_score as score

APPROACHES = ["seq", "kd", "ted", "ted_gugf", "joint"]
TUNED = {"kd": ("lambda_d",), "ted": ("lambda_d", "w_akt"), "ted_gugf": ("lambda_d", "w_akt")}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("accuracy", help="tuned accuracy of seq/kd/ted/ted_gugf/joint (real retina + prostate twin)")
    p.add_argument("--quick", action="store_true", help="tiny synthetic run (the test suite's)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the final federated runs (default 3)")
    p.add_argument("--datasets", nargs="+", choices=["retina", "prostate"],
                   help="default: retina and prostate (--quick: prostate)")
    p.add_argument("--retina-dir", default=str(project_root().parent / "shared/data/retinal_vessels"))
    p.add_argument("--lambdas", type=float, nargs="+", help="lambda_d grid (default 0.01 0.1 1)")
    p.add_argument("--w-akt", type=float, nargs="+", help="w_akt grid for ted/ted_gugf (default 1 0.1)")
    p.add_argument("--approaches", nargs="+", choices=APPROACHES, help=f"default: {' '.join(APPROACHES)}")
    p.add_argument("--retina-size", type=int, default=0,
                   help="retina image size in px (default 0: each site at half its camera's resolution, "
                        "sites/retina.toml; a common size removes the resolution shift and seq does not forget)")
    p.add_argument("--retina-steps", type=int, default=50, help="retina steps per round, 8 rounds (default 50)")
    p.add_argument("--out", default="runs/bench", help="folder for the run directories")
    p.add_argument("--resume", metavar="DIR", help="an earlier accuracy folder: reuse its finished runs")
    p.add_argument("--doc", help="write the section here (default docs/benchmarks.md unless --quick)")
    p.set_defaults(func=run)


def base_config(dataset: str, args: argparse.Namespace) -> ExperimentConfig:
    """The workload per dataset: small enough for a 2-core CPU, large enough to learn."""
    cfg = ExperimentConfig()
    cfg.name = f"bench-{dataset}"
    cfg.model.channels, cfg.model.strides = [8, 16, 32, 64, 128], [2, 2, 2, 2]
    cfg.train.lr_first, cfg.train.lr_later = 1e-3, 5e-4
    if args.quick:
        cfg.data.sites = "prostate"
        C.tiny(cfg, ["RUNMC", "BMC", "I2CVB"], rounds=2, steps=10, batch=4)
    elif dataset == "retina":
        path = Path(args.retina_dir)
        if not path.is_dir():
            raise TedFlError(f"--retina-dir {path} not found; pass the folder holding DRIVE/STARE/CHASEDB1 "
                             "or --datasets prostate")
        cfg.data.sites, cfg.data.data_dir, cfg.data.size = "retina", str(path.resolve()), args.retina_size
        # simulations/retina.toml's schedule: 8 rounds, batch 4, rates 3e-3 / 2e-3
        cfg.train.rounds, cfg.train.steps_per_round, cfg.train.batch_size = 8, args.retina_steps, 4
        cfg.train.lr_first, cfg.train.lr_later = 3e-3, 2e-3
    else:  # the quick.toml workload: 6 synthetic prostate sites, 64 px, 100 steps a site
        cfg.data.sites, cfg.data.size = "prostate", 64
        cfg.train.rounds, cfg.train.steps_per_round, cfg.train.batch_size = 4, 25, 8
    return cfg


def grid(approach: str, args: argparse.Namespace) -> list[dict[str, float]]:
    lambdas = args.lambdas or ([0.1, 1.0] if args.quick else [0.01, 0.1, 1.0])
    w_akt = args.w_akt or ([1.0] if args.quick else [1.0, 0.1])
    if approach not in TUNED:
        return [{}]
    if "w_akt" in TUNED[approach]:
        return [{"lambda_d": lam, "w_akt": w} for lam, w in itertools.product(lambdas, w_akt)]
    return [{"lambda_d": lam} for lam in lambdas]


def with_loss(cfg: ExperimentConfig, loss: dict[str, float]) -> ExperimentConfig:
    out = copy.deepcopy(cfg)
    for k, v in loss.items():
        setattr(out.loss, k, float(v))
    return out


def val_score(rows: list[dict[str, Any]], order: list[str]) -> float:
    """Mean over stages of the mean validation Dice of the sites seen so far (`ted_fl.studies.grid`)."""
    return score(rows, order)


def tune(dataset: str, base: ExperimentConfig, approaches: list[str], args: argparse.Namespace,
         work: Path) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Centralized runs of the grid (seed 0) scored on validation; the best point per approach.

    The grid's cells are independent: they run in parallel through `ted_fl.studies.grid` (Ray tasks,
    one CPU each), and a rerun with --resume reuses every finished cell (by the hash of its
    resolved configuration; run directories of the older per-point layout are reused too).
    """
    order = site_order(base.data)
    cells: list[Cell] = []
    runs: dict[tuple[str, int], RunDir] = {}
    points_of: dict[str, list[dict[str, float]]] = {}
    chosen: dict[str, dict[str, float]] = {}
    for approach in approaches:
        points = grid(approach, args)
        if points == [{}]:
            chosen[approach] = {}
            continue
        points_of[approach] = points
        for i, point in enumerate(points):
            cfg = with_loss(base, point)
            cfg.approaches, cfg.seeds, cfg.train.eval_val_all = [cast(ApproachName, approach)], [0], True
            label = "-".join(f"{k}{v:g}" for k, v in point.items())
            old = finished(work / "tune", f"{dataset}-{approach}-{label}-", approach)
            if old is not None:
                runs[(approach, i)] = old
                continue
            cell = Cell(approach, 0, {f"loss.{k}": v for k, v in point.items()}, list(base.data.order), cfg)
            cells.append(cell)
            runs[(approach, i)] = RunDir(work / "tune" / dataset / "cells" / cell.name)
    if cells:
        run_cells(cells, work / "tune" / dataset, parallel=not getattr(args, "serial", False))
    rows = []
    for approach, points in points_of.items():
        scores = []
        for i, point in enumerate(points):
            label = "-".join(f"{k}{v:g}" for k, v in point.items())
            st = runs[(approach, i)].checkpoint(approach, 0, "last")
            score = val_score(st["rows"], order)
            scores.append(score)
            rows.append(dict(approach=approach, **point, val_score=score, seconds=float(st["wall"])))
            print(f"  tune {dataset} {approach} {label}: val mean-seen Dice {score:.4f}", flush=True)
        best = int(np.nanargmax(scores))
        chosen[approach] = points[best]
        for r in rows[-len(points):]:
            r["selected"] = "yes" if all(r.get(k) == v for k, v in points[best].items()) else ""
    df = pd.DataFrame(rows)
    cols = ["approach", "lambda_d", "w_akt", "val_score", "selected", "seconds"]
    return df[[c for c in cols if c in df.columns]], chosen


def finished(folder: Path, prefix: str, approach: str) -> RunDir | None:
    """A finished run directory named prefix* in `folder` (for --resume), else None."""
    for p in sorted(folder.glob(f"{prefix}*")) if folder.is_dir() else []:
        rest = p.name[len(prefix):]
        if not rest[:1].isdigit():  # 'ted-lambda_d0.1-' must not match 'ted_gugf-...'
            continue
        st = RunDir(p).load_checkpoint(approach, 0, "last")
        if st and st.get("done"):
            return RunDir(p)
    return None


def loss_text(point: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in point.items()) or "-"


def final_runs(dataset: str, base: ExperimentConfig, chosen: dict[str, dict[str, float]], seeds: list[int],
               work: Path) -> list[RunDir]:
    """Every approach with its selected weights, all seeds, through one Flower simulation."""
    groups: dict[tuple, list[str]] = {}
    free = [a for a, p in chosen.items() if not p]  # seq, joint: no distillation weight to choose
    for a, p in chosen.items():
        if p:
            groups.setdefault(tuple(sorted(p.items())), []).append(a)
    if not groups:
        groups[()] = []
    first = next(iter(groups))
    groups[first] = free + groups[first]
    pairs: list[tuple[ExperimentConfig, RunDir]] = []
    runs_done: list[RunDir] = []
    for key, approaches in groups.items():
        cfg = with_loss(base, dict(key))
        cfg.approaches = [cast(ApproachName, a) for a in APPROACHES if a in approaches]
        cfg.seeds = seeds
        label = "-".join(f"{k}{v:g}" for k, v in key) or "default"
        found = sorted((work / "final").glob(f"{dataset}-{label}-2*")) if (work / "final").is_dir() else []
        old = [RunDir(p) for p in found if (p / "summary.csv").is_file()]
        if old and set(old[-1].summary()["approach"]) == set(cfg.approaches):
            runs_done.append(old[-1])
        else:
            pairs.append((cfg, RunDir.create(work / "final", f"{dataset}-{label}")))
    if pairs:
        simulate_groups(pairs)
    return runs_done + [run for _, run in pairs]


def results_table(runs: list[RunDir], chosen: dict[str, dict[str, float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per approach, mean +- std over seeds of the test figures, and the training diagnostics."""
    summary = pd.concat([r.summary() for r in runs], ignore_index=True)
    metrics = pd.concat([r.metrics() for r in runs], ignore_index=True)
    train = metrics[(metrics["split"] == "train") & (metrics["stage"] >= 1)]
    rows, raw = [], []
    for a in [x for x in APPROACHES if x in set(summary["approach"])]:
        s = summary[summary["approach"] == a]
        row: dict[str, Any] = dict(approach=a, weights=loss_text(chosen.get(a, {})), seeds=len(s))
        for k in ("avg", "bwt", "fwt", "plasticity", "forgetting"):
            row[k] = f"{s[k].mean():.3f} ± {s[k].std(ddof=1) if len(s) > 1 else 0.0:.3f}"
            row[f"_{k}"] = float(s[k].mean())
            row[f"_{k}_sd"] = float(s[k].std(ddof=1)) if len(s) > 1 else 0.0
        for k in ("akt_mask_frac", "u_mean"):
            v = train[(train["approach"] == a) & (train["metric"] == k)]["value"]
            row[k] = float(v.mean()) if len(v) else float("nan")
        rows.append(row)
        raw.append(s)
    table = pd.DataFrame(rows)
    return table, pd.concat(raw, ignore_index=True)


def verdict(dataset: str, table: pd.DataFrame, tuning: pd.DataFrame) -> str:
    """TED against KD in words, with the cause when TED does not win (from the same numbers)."""
    t = table.set_index("approach")
    if not {"kd", "ted_gugf"} <= set(t.index):
        return ""
    kd, ted = t.loc["kd"], t.loc["ted_gugf"]
    ratio = ted["_avg"] / kd["_avg"] if kd["_avg"] else float("nan")
    noise = max(ted["_avg_sd"], kd["_avg_sd"])
    notes = []
    if "seq" in t.index and t.loc["seq", "_bwt"] >= 0:
        notes.append(f"Fine-tuning does not forget on this sequence at these settings (seq BWT "
                     f"{t.loc['seq', '_bwt']:+.3f}: later sites even help the earlier ones), so "
                     "distillation has nothing to protect here.")
    sel = tuning[tuning.get("selected", "") == "yes"] if "selected" in tuning else tuning.iloc[0:0]
    if len(sel) and "lambda_d" in tuning and (sel["lambda_d"] == tuning["lambda_d"].min()).all():
        notes.append("Validation selected the smallest lambda_d of the grid for every distilling "
                     "approach: the weakest distillation scores best.")
    mask = (f"AKT acts on the {100 * ted['akt_mask_frac']:.1f} % of pixels where student and teacher "
            f"disagree (mean akt_mask_frac), weighted by GUGF's uncertainty (mean u_mean "
            f"{ted['u_mean']:.3f}).")
    head = (f"Avg Dice {ted['_avg']:.3f} ± {ted['_avg_sd']:.3f} vs {kd['_avg']:.3f} ± {kd['_avg_sd']:.3f}, "
            f"ratio {ratio:.2f}; BWT {ted['_bwt']:.3f} vs {kd['_bwt']:.3f}; plasticity "
            f"{ted['_plasticity']:.3f} vs {kd['_plasticity']:.3f}")
    if abs(ted["_avg"] - kd["_avg"]) <= noise:
        text = (f"{dataset}: TED (ted_gugf) and KD are within one standard deviation over seeds ({head}): "
                "no difference can be claimed.")
    elif ted["_avg"] > kd["_avg"]:
        text = f"{dataset}: TED (ted_gugf) beats KD ({head})."
    else:
        cause = []
        if ted["_plasticity"] < kd["_plasticity"]:
            cause.append("it learns the arriving site less well (plasticity)")
        if ted["_bwt"] < kd["_bwt"]:
            cause.append("it forgets more (BWT)")
        text = (f"{dataset}: TED (ted_gugf) does **not** beat KD ({head}): "
                + ("; ".join(cause) or "neither plasticity nor BWT explains it alone") + ".")
    return " ".join([text, mask, *notes, ordering(dataset, t)])


def ordering(dataset: str, t: pd.DataFrame) -> str:
    """The paper's claim, TED < KD < seq in forgetting at about equal plasticity, checked in words."""
    if not {"seq", "kd", "ted_gugf"} <= set(t.index):
        return ""
    f = {a: t.loc[a, "_forgetting"] for a in ("ted_gugf", "kd", "seq")}
    sd = {a: t.loc[a, "_forgetting_sd"] for a in f}
    pl = {a: t.loc[a, "_plasticity"] for a in f}
    strict = f["ted_gugf"] + max(sd["ted_gugf"], sd["kd"]) < f["kd"] and f["kd"] + max(sd["kd"], sd["seq"]) < f["seq"]
    plast = max(pl.values()) - min(pl.values())
    got = "is" if strict else "is **not**"
    return (f"Paper's ordering on {dataset}: forgetting ted_gugf {f['ted_gugf']:.3f} ± {sd['ted_gugf']:.3f}, "
            f"kd {f['kd']:.3f} ± {sd['kd']:.3f}, seq {f['seq']:.3f} ± {sd['seq']:.3f} (plasticity spread "
            f"{plast:.3f}): TED < KD < seq beyond one standard deviation {got} reproduced.")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    t_all = time.perf_counter()
    datasets = args.datasets or (["prostate"] if args.quick else ["retina", "prostate"])
    seeds = list(range(args.seeds if not args.quick else min(args.seeds, 2)))
    work = Path(args.resume) if args.resume else Path(args.out) / time.strftime("accuracy-%Y%m%d-%H%M%S")
    sections, headline = [], []
    t_sched = 0.0
    for dataset in datasets:
        base = base_config(dataset, args)
        print(f"[{dataset}] tuning on validation (centralized runner, seed 0)", flush=True)
        tuning, chosen = tune(dataset, base, args.approaches or APPROACHES, args, work)
        t_tune = float(tuning["seconds"].sum()) if len(tuning) else 0.0
        C.print_table(f"{dataset}: validation grid", tuning)
        print(f"[{dataset}] final runs: seeds {seeds}, federated simulator", flush=True)
        runs = final_runs(dataset, base, chosen, seeds, work)
        t_final = float(pd.concat([r.summary() for r in runs])["wall_s"].sum())  # the schedules' wall time
        t_sched += t_tune + t_final
        table, _ = results_table(runs, chosen)
        shown = table[[c for c in table.columns if not c.startswith("_")]]
        C.print_table(f"{dataset}: test, mean ± std over {len(seeds)} seeds", shown)
        text = verdict(dataset, table, tuning)
        if text:
            print(text)
        t = table.set_index("approach")
        if {"kd", "ted_gugf"} <= set(t.index):
            headline.append(f"{dataset} {t.loc['ted_gugf', '_avg'] / t.loc['kd', '_avg']:.2f}")

        settings = (f"sites {base.data.sites} ({' -> '.join(site_order(base.data))}), "
                    f"{f'{base.data.size} px' if base.data.size else 'per-site sizes'}, U-Net channels {base.model.channels}, {base.train.rounds} rounds x "
                    f"{base.train.steps_per_round} steps of batch {base.train.batch_size} per site "
                    f"(joint x{base.train.joint_rounds_factor:g}), lr {base.train.lr_first:g} then "
                    f"{base.train.lr_later:g}, select_best on the arriving site's val split")
        sections.append(
            f"### {dataset}\n\nSettings: {settings}.\n\n"
            f"Tuning (centralized runner, seed 0, {t_tune:.0f} s): criterion = mean over stages of the "
            f"validation Dice of all sites seen so far.\n\n{C.md_table(tuning)}\n\n"
            f"Test, federated simulator (Flower + Ray), seeds {seeds}, {t_final:.0f} s of schedule wall time; "
            "plasticity = "
            f"Dice on the site just learned, akt_mask_frac / u_mean = means over training steps of "
            f"stages >= 2:\n\n{C.md_table(shown)}\n\n{text}\n\nRun directories: "
            + ", ".join(f"`{r.path}`" for r in runs)
        )
    line = "accuracy: Avg Dice ratio ted_gugf/kd " + ", ".join(headline)
    body = (
        "## accuracy\n\n"
        f"Command: `{C.command_line(argv)}` "
        + (f"(outputs of an earlier invocation reused from `{work}`; " if args.resume else
           f"({time.perf_counter() - t_all:.0f} s in all; ")
        + f"{t_sched:.0f} s of schedule wall time, tuning and test runs).\n\n"
        f"{C.machine_md()}\n\n"
        "Each distilling approach's weights are *selected* on the validation splits by the "
        "command itself (grid: lambda_d for kd; lambda_d x w_akt for ted and ted_gugf), using "
        "the centralized runner, which runs the simulator's schedule, step and evaluation in one "
        "process (its R matrix equals the simulator's: "
        "`tests/integration/test_simulation.py::test_matches_centralized`). The test figures "
        "come from the federated simulator. Avg = mean final test Dice over all sites; BWT, FWT, "
        "forgetting and plasticity as in `ted_fl.continual.metrics.continual_summary`.\n\n"
        + "\n\n".join(sections) + f"\n\n`{line}`"
    )
    return C.finish(args, "accuracy", line, body)
