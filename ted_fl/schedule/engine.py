"""The arrival schedule shared by the centralized reference run and the federated server.

One loop decides, for every approach and seed, which sites train in which stage and round,
when the teacher is frozen, which SKA probes are drawn, which round is kept, and what gets
evaluated and written. *Where* the training and the evaluation run is an `Executor`: in-process
for `ted_fl.centralized`, Flower messages to Ray-scheduled clients for `ted_fl.federated`.
Sharing this loop is what makes the simulator match the reference run.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from ted_fl.config import UPPER_BOUND, ExperimentConfig
from ted_fl.continual.approaches import Approach, get_approach
from ted_fl.continual.metrics import continual_summary, r_matrix
from ted_fl.continual.networks import build_model
from ted_fl.continual.strategies import server_step, validates_locally
from ted_fl.continual.training import lr_for, set_determinism
from ted_fl.continual.weights import Weights, load_weights, model_weights  # noqa: F401 (re-exported)
from ted_fl.privacy.mechanisms import epsilon_spent
from ted_fl.run.directory import MEAN_LABEL, RunDir, label_metric, labels_of, select_label
from ted_fl.schedule.seeds import derive_seed  # noqa: F401 (re-exported)
from ted_fl.schedule.worker import WORK_KEYS

# Held while a schedule draws from the process's global generators (its initial model): schedules of a
# ServerApp run as threads of one process (ted_fl.schedule.cells), and another's seeding must not land in between.
GLOBAL_RNG = threading.RLock()


def fedavg(results: list[tuple[Weights, int]]) -> Weights:
    """Example-weighted mean of float arrays (FedAvg); integer buffers (BN counters) take the max."""
    if len(results) == 1:
        return results[0][0]
    total = float(sum(n for _, n in results)) or 1.0
    out: Weights = {}
    for key, first in results[0][0].items():
        if np.issubdtype(first.dtype, np.floating):
            acc = np.zeros_like(first, dtype=np.float64)
            for w, n in results:
                acc += w[key].astype(np.float64) * (n / total)
            out[key] = acc.astype(first.dtype)
        else:
            out[key] = np.max(np.stack([w[key] for w, _ in results]), axis=0)
    return out


@dataclass
class TrainTask:
    """What one round asks of the training sites (all of it travels in the federated case)."""

    approach: str
    seed: int
    stage: int
    round: int
    sites: list[str]  # the sites that train this round
    weights: Weights
    teacher: Weights | None
    aux: dict[str, np.ndarray]
    steps: int
    lr: float
    probe_seed: int | None  # SKA probes are make_probes(probe_seed, probe_count, probe_shape)
    probe_count: int
    probe_shape: tuple[int, ...]
    want_val: bool  # ask the (single) trainer to report validation metrics of its result
    stage_rounds: int = 1  # rounds of this stage (DP calibrates its noise over the whole stage)


@dataclass
class TrainResult:
    site: str
    client: int
    weights: Weights
    num_examples: int
    metrics: dict[str, float]
    val: dict[str, float] | None = None


class Executor(Protocol):
    """Runs what the schedule decides: in-process (centralized) or on Flower clients."""

    sites: list[str]
    train_sizes: dict[str, int]
    image_shape: tuple[int, ...]  # (C, H, W)
    bytes_sent: int
    bytes_received: int

    def train(self, task: TrainTask) -> list[TrainResult]: ...

    def aggregate(self, task: TrainTask, results: list[TrainResult]) -> Weights:
        """The round's global model from its results: FedAvg (`fedavg`), or client-level DP's noised
        mean of the released updates (Flower's DP strategy) where the executor applies it."""
        ...

    def evaluate(self, weights: Weights, split: str, sites: list[str]) -> dict[str, dict[str, float]]: ...

    def importance(self, approach: str, weights: Weights, site: str) -> dict[str, np.ndarray]: ...

    def leakage(self, weights: Weights, references: dict[str, Weights], seed: int) -> dict[str, dict[str, float]]:
        """Membership-inference scores of `weights` per site (ted_fl.privacy.mia), each site against
        its reference model (one that never saw it); every site computes its own, metrics only."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class ScheduleState:
    """Everything needed to resume after the last completed round."""

    stage: int = 0
    round: int = 0  # next round to run in `stage`
    weights: Weights | None = None
    teacher: Weights | None = None
    aux: dict[str, np.ndarray] = field(default_factory=dict)
    best_score: float = -math.inf
    best_weights: Weights | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    initial_done: bool = False
    wall: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    executor: dict[str, Any] = field(default_factory=dict)
    server_opt: dict[str, Any] = field(default_factory=dict)  # federated.strategy's server moments (this stage)
    done: bool = False


def active_sites(order: list[str], stage: int, retention: int, joint: bool) -> list[str]:
    """Who trains in `stage`: the arriving site, plus the last `retention` earlier ones (-1: all)."""
    if joint or retention < 0:
        return order[: stage + 1]
    return order[max(0, stage - retention) : stage + 1]


def steps_for(cfg: ExperimentConfig, n_train: int) -> int:
    return cfg.train.steps_per_round or max(1, math.ceil(n_train / cfg.train.batch_size))


def run_schedule(
    cfg: ExperimentConfig,
    approach_name: str,
    seed: int,
    executor: Executor,
    run: RunDir,
    progress: ProgressFn | None = None,
) -> ScheduleState:
    """Run (or resume) the whole site sequence for one approach and seed."""
    return Schedule(cfg, approach_name, seed, executor, run, progress).run()


@dataclass
class StagePlan:
    """What every round of one stage shares: who trains, how long, how many probes."""

    stage: int
    site: str
    sites: list[str]
    n_rounds: int
    steps: int
    probe_count: int


def plan_stage(cfg: ExperimentConfig, approach: Approach, one_run: bool, order: list[str],
               sizes: dict[str, int], stage: int) -> StagePlan:
    """Stage `stage`'s plan: who trains, how many rounds of how many steps, how many probes."""
    site = order[stage]
    sites = list(order) if one_run else active_sites(order, stage, cfg.federated.retention, approach.joint)
    n_rounds = cfg.train.rounds
    if approach.joint:
        n_rounds = max(1, round(cfg.train.rounds * cfg.train.joint_rounds_factor))
    steps = steps_for(cfg, sum(sizes[s] for s in sites) if approach.joint else sizes[site])
    probe_count = (cfg.loss.ska_count or cfg.train.batch_size) * steps
    return StagePlan(stage, site, sites, n_rounds, steps, probe_count)


def plan_stages(cfg: ExperimentConfig, approach_name: str, order: list[str],
                sizes: dict[str, int]) -> list[StagePlan]:
    """Every stage the schedule runs for one approach (one stage over all sites for a one-run joint,
    protocol "reference"): what `bench protocol` counts without running it."""
    approach = get_approach(approach_name, cfg.loss)
    one_run = approach.joint and cfg.protocol == "reference"
    return [plan_stage(cfg, approach, one_run, order, sizes, k) for k in range(1 if one_run else len(order))]


class Schedule:
    """One approach and seed through the site sequence: stages of rounds, checkpointed every round.

    `run` walks the stages, `run_stage` its rounds, `train_round` one exchange with the executor
    and `end_stage` the best-round restore, importances and the test evaluation; every result is a
    tidy row (`rows`) and the state after every round is a checkpoint a resumed run continues from.
    """

    def __init__(self, cfg: ExperimentConfig, approach_name: str, seed: int, executor: Executor,
                 run: RunDir, progress: ProgressFn | None = None) -> None:
        self.cfg, self.name, self.seed, self.executor, self.run_dir = cfg, approach_name, seed, executor, run
        self.progress = progress
        self.approach: Approach = get_approach(approach_name, cfg.loss)
        # protocol "reference": joint is one run over every site, its best round chosen on the first
        # site's validation split (the reference's main.py); seq keeps lr_first on every site.
        self.one_run = self.approach.joint and cfg.protocol == "reference"
        self.constant_lr = cfg.protocol == "reference" and self.approach.keeps_first_lr
        self.order = list(executor.sites)
        self.tag = dict(approach=approach_name, seed=seed)
        saved = run.load_checkpoint(approach_name, seed, "last")
        self.resumed = bool(saved)
        self.st = ScheduleState(**saved) if saved else ScheduleState()
        self.t_start = 0.0

    def run(self) -> ScheduleState:
        st, executor = self.st, self.executor
        if st.done:
            return st
        executor.load_state_dict(st.executor)  # empty on a fresh start: optimizers start anew
        executor.bytes_sent, executor.bytes_received = st.bytes_sent, st.bytes_received
        if self.resumed:
            self.run_dir.log(f"{self.name} seed {self.seed}: resumed at stage {st.stage} round {st.round}")
        with GLOBAL_RNG:
            set_determinism(self.seed, self.cfg.train.threads)
            if st.weights is None:
                torch.manual_seed(self.seed)
                st.weights = model_weights(build_model(self.cfg.model))
        self.t_start = time.perf_counter() - st.wall
        if not st.initial_done:
            # The untrained model's scores: the baseline b_i of forward transfer.
            self.rows(-1, -1, "test", executor.evaluate(st.weights, "test", self.order))
            st.initial_done = True
            self.checkpoint()
        while st.stage < (1 if self.one_run else len(self.order)):
            self.run_stage(self.plan(st.stage))
        if self.cfg.privacy.mia:
            self.leakage()
        st.done = True
        self.checkpoint()
        return st

    def leakage(self, seed_tag: int = 0x31A) -> None:
        """The membership-inference attack on the final model (split "privacy" rows, per site).

        Site i's reference model is the one kept after stage i - 1 (it never saw site i; the
        untrained model for the first site, and for every site of the one-run joint).
        """
        st, last = self.st, len(self.order) - 1
        with GLOBAL_RNG:
            torch.manual_seed(self.seed)
            initial = model_weights(build_model(self.cfg.model))
        refs: dict[str, Weights] = {}
        for i, site in enumerate(self.order):
            kept = self.run_dir.load_checkpoint(self.name, self.seed, f"stage{i - 1}") if i and not self.one_run else None
            refs[site] = kept["weights"] if kept else initial
        scores = self.executor.leakage(st.weights, refs, derive_seed(self.seed, seed_tag))
        self.rows(last, -1, "privacy", scores)

    def rows(self, stage: int, rnd: int, split: str, scores: dict[str, dict[str, float]]) -> None:
        stage_site = self.order[stage] if stage >= 0 else "init"
        for site, metrics in scores.items():
            for key, value in metrics.items():
                label, metric = label_metric(key, split)
                self.st.rows.append(dict(**self.tag, stage=stage, stage_site=stage_site, round=rnd, site=site,
                                         split=split, label=label, metric=metric, value=float(value)))

    def checkpoint(self) -> None:
        st, executor = self.st, self.executor
        st.wall = time.perf_counter() - self.t_start
        st.bytes_sent, st.bytes_received = executor.bytes_sent, executor.bytes_received
        st.executor = executor.state_dict()
        self.run_dir.save_checkpoint(self.name, self.seed, "last", st.__dict__)

    def plan(self, stage: int) -> StagePlan:
        return plan_stage(self.cfg, self.approach, self.one_run, self.order, self.executor.train_sizes, stage)

    def run_stage(self, plan: StagePlan) -> None:
        st = self.st
        t_stage = time.perf_counter()
        while st.round < plan.n_rounds:
            rnd = st.round
            t0 = time.perf_counter()
            results = self.train_round(plan, rnd)
            st.round += 1
            self.checkpoint()
            if self.cfg.output.checkpoints == "all":  # every round's model too, when asked
                self.run_dir.save_checkpoint(self.name, self.seed, f"round-s{plan.stage}-r{rnd}",
                                             {"weights": st.weights, "site": plan.site})
            if self.progress:
                self.progress(dict(**self.tag, stage=plan.stage, site=plan.site, round=rnd, rounds=plan.n_rounds,
                                   stages=len(self.order), seconds=time.perf_counter() - t0,
                                   loss=float(np.mean([r.metrics.get("total", np.nan) for r in results]))))
        self.end_stage(plan, t_stage)

    def train_round(self, plan: StagePlan, rnd: int) -> list[TrainResult]:
        """One round: train, average, record, score on the arriving site's validation split."""
        cfg, approach, executor, st = self.cfg, self.approach, self.executor, self.st
        stage, site = plan.stage, plan.site
        if rnd == 0 and stage > 0 and approach.needs_teacher and st.teacher is None:
            st.teacher = {k: v.copy() for k, v in st.weights.items()}
        uses_probes = approach.needs_probes and st.teacher is not None
        task = TrainTask(
            approach=self.name, seed=self.seed, stage=stage, round=rnd, sites=plan.sites,
            weights=st.weights, teacher=st.teacher if approach.needs_teacher else None,
            aux=st.aux, steps=plan.steps, lr=lr_for(stage, rnd, cfg.train, self.constant_lr),
            probe_seed=derive_seed(self.seed, stage, rnd, 0x5CA) if uses_probes else None,
            probe_count=plan.probe_count if uses_probes else 0,
            probe_shape=tuple(executor.image_shape),
            want_val=cfg.train.select_best and validates_locally(cfg.federated),
            stage_rounds=plan.n_rounds,
        )
        t0 = time.perf_counter()
        sent0, recv0 = executor.bytes_sent, executor.bytes_received
        results = executor.train(task)
        train_s = time.perf_counter() - t0
        st.weights = executor.aggregate(task, results)
        # federated.strategy: a server optimizer's step over the mean (FedAdam, ...), the same in both executors
        st.weights = server_step(cfg.federated, st.server_opt, stage, rnd + 1, task.weights, st.weights)
        split_clients = len({r.site for r in results}) < len(results)
        for r in results:
            key = f"{r.site}/{r.client}" if split_clients else r.site
            work = {k: r.metrics.pop(k) for k in WORK_KEYS if k in r.metrics}  # a client's own work: time rows
            self.rows(stage, rnd, "train", {key: r.metrics})
            if work:
                self.rows(stage, rnd, "time", {key: work})
        if cfg.train.select_best:
            self.select(stage, rnd, site, results)
        if cfg.train.eval_every_round:
            self.rows(stage, rnd, "test_round", executor.evaluate(st.weights, "test", self.order))
        # Wall times (split "time"): the training call, and the whole round with its selection.
        self.rows(stage, rnd, "time", {site: {"train_s": train_s, "round_s": time.perf_counter() - t0}})
        # Payload bytes of the round's messages, per direction (0 for the centralized run).
        self.rows(stage, rnd, "comm", {site: {"bytes_down": executor.bytes_sent - sent0,
                                              "bytes_up": executor.bytes_received - recv0}})
        return results

    def select(self, stage: int, rnd: int, site: str, results: list[TrainResult]) -> None:
        """Score the round on the arriving site's validation split and keep the best round."""
        st = self.st
        if len(results) == 1 and results[0].val is not None and results[0].site == site:
            val = results[0].val
        else:
            val = self.executor.evaluate(st.weights, "val", [site])[site]
        self.rows(stage, rnd, "val", {site: val})
        if val["dice"] > st.best_score:
            st.best_score, st.best_weights = val["dice"], st.weights

    def end_stage(self, plan: StagePlan, t_stage: float) -> None:
        """Keep the best round, let the site leave its importances, evaluate every site."""
        cfg, approach, executor, st = self.cfg, self.approach, self.executor, self.st
        stage, site, last = plan.stage, plan.site, plan.n_rounds - 1
        if cfg.train.select_best and st.best_weights is not None:
            st.weights = st.best_weights
        if approach.importance:
            new = executor.importance(self.name, st.weights, site)
            st.aux = approach.merge_state(
                {k: torch.from_numpy(v) for k, v in st.aux.items()},
                {k: torch.from_numpy(v) for k, v in new.items()},
            )
            st.aux = {k: v.detach().cpu().numpy() for k, v in st.aux.items()}
        t_eval = time.perf_counter()
        sent0, recv0 = executor.bytes_sent, executor.bytes_received
        scores = executor.evaluate(st.weights, "test", self.order)
        self.rows(stage, last, "test", scores)
        for later in range(1, len(self.order)) if self.one_run else ():  # the one joint model after every stage
            self.rows(later, last, "test", scores)
            self.run_dir.save_checkpoint(self.name, self.seed, f"stage{later}",
                                         {"weights": st.weights, "site": self.order[later]})
        self.rows(stage, last, "comm", {site: {"eval_bytes_down": executor.bytes_sent - sent0,
                                               "eval_bytes_up": executor.bytes_received - recv0}})
        # Stage times (a resumed stage counts from the resume): its test evaluation and all of it.
        self.rows(stage, last, "time", {site: {"eval_s": time.perf_counter() - t_eval,
                                                "stage_s": time.perf_counter() - t_stage}})
        self.account(stage)
        if cfg.train.eval_val_all:  # validation R matrix, for tuning on val rather than on test
            self.rows(stage, last, "val_stage", executor.evaluate(st.weights, "val", self.order))
        self.run_dir.save_checkpoint(self.name, self.seed, f"stage{stage}", {"weights": st.weights, "site": site})
        st.stage, st.round = stage + 1, 0
        st.teacher, st.best_score, st.best_weights = None, -math.inf, None
        self.checkpoint()


    def account(self, stage: int) -> None:
        """Differential privacy spent per site (or client) in this stage and in total so far (split "privacy").

        The trainers report each round's (noise multiplier, sample rate, steps) as train metrics:
        DP-SGD's per site, or one release per round at rate 1 for client-level DP. Opacus' RDP accountant
        composes them: "epsilon" over this stage's rounds, "epsilon_total" over every stage the site
        trained in (retention), both at privacy.delta.
        """
        p = self.cfg.privacy
        if p.dp == "off":
            return
        for site, acc in stage_privacy(self.st.rows, stage, p.delta).items():
            self.rows(stage, -1, "privacy", {site: {**acc, "delta": p.delta}})
            self.run_dir.log(f"privacy: {self.name} seed {self.seed} stage {stage} {site}: epsilon {acc['epsilon']:.4g} "
                             f"(total {acc['epsilon_total']:.4g}) at delta {p.delta:g}, dp = {p.dp}, noise multiplier "
                             f"{acc['noise_multiplier']:.4g}, {acc['steps']:.0f} steps")


DP_KEYS = ("dp_noise_multiplier", "dp_sample_rate", "dp_steps")  # a round's accounting inputs (train metrics)


def stage_privacy(rows: list[dict[str, Any]], stage: int, delta: float) -> dict[str, dict[str, float]]:
    """Per site (or client) that trained in `stage`: epsilon over this stage's rounds, epsilon_total over
    every stage up to it it trained in, the noise multiplier and the steps, from one schedule's train rows.

    One event per (stage, round) and site: a round's metrics are recorded once, whatever the retries,
    and nothing outside these rows (another approach, seed or process) enters. A round with partial
    accounting inputs counts as unbounded (inf): an unknown spend is no guarantee.
    """
    hist: dict[str, dict[int, dict[int, dict[str, float]]]] = {}
    for r in rows:
        if r["split"] == "train" and r["metric"] in DP_KEYS:
            hist.setdefault(r["site"], {}).setdefault(r["stage"], {}).setdefault(r["round"], {})[r["metric"]] = r["value"]

    def events(rounds: dict[int, dict[str, float]]) -> list[tuple[float, float, int]]:
        return [(m["dp_noise_multiplier"], m["dp_sample_rate"], int(m["dp_steps"])) if len(m) == len(DP_KEYS)
                else (0.0, 1.0, 1) for m in rounds.values()]  # sigma 0: epsilon inf

    out = {}
    for site, by_stage in hist.items():
        if stage not in by_stage:
            continue
        here = events(by_stage[stage])
        everything = [e for st in sorted(by_stage) if st <= stage for e in events(by_stage[st])]
        out[site] = {"epsilon": epsilon_spent(here, delta), "epsilon_total": epsilon_spent(everything, delta),
                     "noise_multiplier": here[0][0] if here else 0.0, "steps": float(sum(n for _, _, n in here))}
    return out


def privacy_columns(metrics: pd.DataFrame, approach: str, seed: int) -> dict[str, float]:
    """summary.csv's `epsilon` / `delta`: the largest total epsilon any site (client) spent, at delta;
    inf and empty without DP (no split "privacy" rows)."""
    if "split" not in metrics.columns:
        return {"epsilon": math.inf, "delta": math.nan}
    rows = metrics[(metrics["split"] == "privacy") & (metrics["approach"] == approach) & (metrics["seed"] == seed)]
    tot, delta = rows[rows["metric"] == "epsilon_total"]["value"], rows[rows["metric"] == "delta"]["value"]
    if tot.empty:
        return {"epsilon": math.inf, "delta": math.nan}
    return {"epsilon": float(tot.max()), "delta": float(delta.max())}


LABEL_COLUMNS = ("avg", "bwt", "forgetting", "plasticity")  # per-label columns of summary.csv


def summarize(metrics: pd.DataFrame, extras: dict[tuple[str, int], dict[str, Any]]) -> pd.DataFrame:
    """One row per approach and seed: Avg, rAvg (vs a joint run), BWT, rBWT, FWT, forgetting, cost.

    The scores are the mean label's (the mean over the site set's classes and regions); with
    several labels, LABEL_COLUMNS are added per label as `avg[LV]`, `bwt[LV]`, ...
    """
    all_test = metrics[metrics["split"] == "test"]
    all_trained = all_test[all_test["stage"] >= 0]
    labels = [lab for lab in labels_of(metrics) if lab != MEAN_LABEL]
    test = select_label(all_test)
    rows = []
    joint = None
    if (test["approach"] == UPPER_BOUND).any():
        jt = test[test["approach"] == UPPER_BOUND]
        jr = [r_matrix(g[g["stage"] >= 0], "dice") for _, g in jt.groupby("seed")]
        joint = sum(r.iloc[-1] for r in jr) / len(jr)
    for (approach, seed), g in test.groupby(["approach", "seed"], sort=False):
        trained = g[g["stage"] >= 0]
        init = g[g["stage"] < 0]
        init_dice = init[init["metric"] == "dice"].set_index("site")["value"] if len(init) else None
        R = r_matrix(trained, "dice")
        s = continual_summary(R, joint=joint, initial=init_dice)
        hd = r_matrix(trained, "hd95")
        row = dict(approach=approach, seed=int(seed), **{k: float(v) for k, v in s.items()})
        row["hd95"] = float(hd.iloc[-1].mean())
        if len(labels) > 1:  # several classes / regions: the headline per label, e.g. avg[LV]
            for lab in labels:
                sl = continual_summary(r_matrix(all_trained[(all_trained["approach"] == approach)
                                                            & (all_trained["seed"] == seed)], "dice", label=lab))
                row.update({f"{k}[{lab}]": float(sl[k]) for k in LABEL_COLUMNS})
        row.update(privacy_columns(metrics, approach, seed))
        row.update(leakage_columns(metrics, approach, int(seed)))
        row.update(extras.get((approach, int(seed)), {}))
        rows.append(row)
    return pd.DataFrame(rows)


MIA_COLUMNS = ("mia_auc", "mia_auc_cal", "mia_adv")  # means over sites; per site as mia_auc@SITE, mia_auc_cal@SITE


def leakage_columns(metrics: pd.DataFrame, approach: str, seed: int) -> dict[str, float]:
    """The membership-inference scores (split "privacy") of one approach and seed: each metric's
    mean over sites, and both attacks' AUC per site (`mia_auc@SITE`, `mia_auc_cal@SITE`); {} without one."""
    p = metrics[(metrics["split"] == "privacy") & (metrics["approach"] == approach) & (metrics["seed"] == seed)]
    if p.empty:
        return {}
    out = {m: float(p[p["metric"] == m]["value"].mean()) for m in MIA_COLUMNS if (p["metric"] == m).any()}
    for metric in ("mia_auc", "mia_auc_cal"):
        for site, v in p[p["metric"] == metric].set_index("site")["value"].items():
            out[f"{metric}@{site}"] = float(v)
    return out
