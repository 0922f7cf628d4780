"""The ServerApp of `python -m ted_fl.generalize`: the GKD stages over Flower's Message API.

The server holds every model between stages (teacher, scratch student, P-SAE, TAN, SAN, each
distilled student) and never an image. Per seed: the source site trains stage 1 (teacher), 2
(scratch student = the plain "student" row), 3 (P-SAE), 4 (ACT: TAN, SAN) and, per approach, 5
(a fresh student with the approach's terms); the frozen parts a stage needs travel to the source's
nodes once per seed. Then every site, the source and each unseen target, scores each model on its
own test split and returns metrics and the sums (n, sum z, sum z z^T) of the model's codes, from
which the server computes FSD(teacher, student) per site and FSD(source, target) per model.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from ted_fl.config import ExperimentConfig
from ted_fl.continual import gkd as G
from ted_fl.continual.fsd import GaussStats, fsd, packed_lengths
from ted_fl.continual.profiling import count_macs, latency_ms, param_count
from ted_fl.continual.training import set_determinism
from ted_fl.errors import TedFlError, unknown
from ted_fl.federated import messages as M
from ted_fl.federated.gkd_client import FROZEN, build_part
from ted_fl.federated.gkd_client import app as client_app
from ted_fl.federated.simulation import launch
from ted_fl.federated.transport import ClientFailure, Transport
from ted_fl.run.directory import MEAN_LABEL, RunDir
from ted_fl.schedule.engine import derive_seed, fedavg, model_weights

STAGES = {"teacher": 1, "student": 2, "psae": 3, "act_teacher": 4, "act_student": 4, "distill": 5}


class GKDExecutor:
    """Sends the stages to the source site's nodes and the scoring to every site's first node, through the
    schedule's transport (discovery, retries, byte counts and audit: ted_fl.federated.transport)."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunDir | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.transport = t = Transport(grid, cfg, run)
        self.sites, self.nodes, self.image_shape = t.sites, t.nodes, t.image_shape
        self._exchange, self._label = t.exchange, t.label
        if cfg.gkd.source not in self.sites:
            raise unknown("source site", cfg.gkd.source, self.sites, "--source / gkd.source")
        self.frozen_sent: dict[tuple[int, str], str] = {}
        self.quiet = True  # False: progress lines on stderr too (serve_generalize's caller decides)

    def fit(self, task: str, weights: M.Weights, seed: int, *, approach: str = "",
            frozen: dict[str, M.Weights] | None = None) -> tuple[M.Weights, dict[str, float]]:
        """`gkd.rounds` rounds of one stage at the source; FedAvg when the source has several nodes."""
        g = self.cfg.gkd
        steps = {"teacher": g.steps_teacher, "psae": g.steps_psae, "act_teacher": g.steps_act,
                 "act_student": g.steps_act}.get(task, g.steps_student)
        key = f"seed{seed}"
        nodes = [(node, client) for node, client, _ in self.nodes[g.source]]
        metrics: dict[str, float] = {}
        for rnd in range(max(1, g.rounds)):
            contents = {}
            for node, _client in nodes:
                names = sorted(frozen or {})
                c = {"task": task, "approach": approach, "seed": seed, "stage": STAGES[task], "round": rnd,
                     "steps": steps, "frozen": ",".join(names), "frozen_key": key}
                content = RecordDict({M.WEIGHTS: M.to_record(weights), M.CONFIG: M.config_record(c)})
                for name in names:
                    if self.frozen_sent.get((node, name)) != key:  # once per node and seed
                        content[f"frozen.{name}"] = M.to_record(frozen[name])  # type: ignore[index]
                contents[node] = content
            where = f"in stage {task}{'/' + approach if approach else ''} round {rnd} "
            replies = self._exchange(contents, "train", "default", {n: self._label(n) for n in contents}, where)
            for node in replies:
                for name in frozen or {}:
                    self.frozen_sent[(node, name)] = key
            parts = []
            for reply in replies.values():
                m = dict(reply.content[M.METRICS])
                n = int(m.pop("num_examples"))
                parts.append((M.from_record(reply.content[M.WEIGHTS]), n))
                metrics = {k: float(v) for k, v in m.items()}
            if not parts:
                raise ClientFailure(f"no source node answered {where}")
            weights = fedavg(parts)
            self._note_progress(f"seed {seed} {task}{' ' + approach if approach else ''} round {rnd}: "
                                + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return weights, metrics

    def score(self, part: str, weights: M.Weights, msan: M.Weights | None
              ) -> dict[str, tuple[dict[str, float], GaussStats | None]]:
        """Every site scores `weights` on its test split; with `msan`, the sums of its codes too."""
        rec = M.to_record(weights)
        nodes = {self.nodes[s][0][0]: s for s in self.sites}
        cfg = {"part": part, "split": "test", "stats_lengths": sorted(packed_lengths(self.cfg.gkd.code_dim))}
        contents = {}
        for n in nodes:
            content = RecordDict({M.WEIGHTS: rec, M.CONFIG: ConfigRecord(cfg)})
            if msan is not None:
                content["msan"] = M.to_record(msan)
            contents[n] = content
        replies = self._exchange(contents, "evaluate", "default", {n: self._label(n) for n in nodes},
                                 f"scoring the {part} ")
        out: dict[str, tuple[dict[str, float], GaussStats | None]] = {}
        for node, site in nodes.items():
            if node not in replies:
                out[site] = ({}, None)
                continue
            r = replies[node].content
            m = {k: float(v) for k, v in dict(r[M.METRICS]).items() if k != "num_examples"}
            stats = GaussStats.from_arrays(M.from_record(r[M.STATS])) if M.STATS in r else None
            out[site] = (m, stats)
        return out

    def _note_progress(self, text: str) -> None:
        if self.run is not None:
            self.run.log(text)
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


def _init(part: str, cfg: ExperimentConfig, shape: tuple[int, ...], seed: int, salt: int) -> torch.nn.Module:
    torch.manual_seed(derive_seed(seed, salt))
    return build_part(part, cfg.gkd, shape)


def profile(part: str, cfg: ExperimentConfig, shape: tuple[int, ...]) -> dict[str, float]:
    """params, MACs and CPU latency (ms) per image of the teacher or the student network."""
    model = build_part(part, cfg.gkd, shape)
    return {"params": float(param_count(model)), "macs": float(count_macs(model, shape)),
            "latency_ms": latency_ms(model, shape, cfg.gkd.latency_repeats)}


def serve_generalize(grid: Grid, cfg: ExperimentConfig, run: RunDir, quiet: bool = True) -> list[dict[str, Any]]:
    """Every seed and approach of the protocol; returns the tidy metric rows (also written)."""
    ex = GKDExecutor(grid, cfg, run)
    ex.quiet = quiet
    g = cfg.gkd
    shape = tuple(ex.image_shape)
    rows: list[dict[str, Any]] = []
    sizes = {p: profile(p, cfg, shape) for p in ("teacher", "student")}
    need_align = any(a in G.NEEDS_ALIGNMENT for a in cfg.gkd.approaches)
    want_fsd = need_align or "student" in cfg.gkd.approaches

    def add(approach: str, seed: int, site: str, metric: str, value: float) -> None:
        rows.append({"approach": approach, "seed": seed, "stage": 0, "stage_site": g.source, "round": -1,
                     "site": site, "split": "test", "label": MEAN_LABEL, "metric": metric, "value": float(value)})

    for seed in cfg.seeds:
        t0 = time.monotonic()
        set_determinism(seed, cfg.train.threads)
        teacher, _ = ex.fit("teacher", model_weights(_init("teacher", cfg, shape, seed, 1)), seed)
        scratch, _ = ex.fit("student", model_weights(_init("student", cfg, shape, seed, 2)), seed)
        run.save_checkpoint("teacher", seed, "teacher", {"name": g.teacher, "channels": list(g.teacher_channels),
                                                         "in_channels": shape[0], "out_channels": 2, "weights": teacher})
        tan = san = None
        if want_fsd:
            psae, _ = ex.fit("psae", model_weights(_init("psae", cfg, shape, seed, 3)), seed)
            tan, _ = ex.fit("act_teacher", model_weights(_init("tan", cfg, shape, seed, 4)), seed,
                            frozen={"teacher": teacher, "psae": psae})
            san, _ = ex.fit("act_student", model_weights(_init("san", cfg, shape, seed, 5)), seed,
                            frozen={"scratch": scratch, "psae": psae})
        t_scores = ex.score("teacher", teacher, tan)
        _write_scores(add, "teacher", seed, t_scores, sizes["teacher"], None, g.source)
        frozen = {"teacher": teacher}
        if tan is not None and san is not None:
            frozen.update(tan=tan, san=san)
        for approach in cfg.gkd.approaches:
            if approach == G.SCRATCH_ROW:
                weights = scratch
            else:
                fresh = model_weights(_init("student", cfg, shape, seed, 2))  # the scratch student's init
                needed = {k: v for k, v in frozen.items() if k == "teacher" or approach in G.NEEDS_ALIGNMENT}
                weights, losses = ex.fit("distill", fresh, seed, approach=approach, frozen=needed)
                for k, v in losses.items():  # mean unweighted term values of the last round (why a term matters)
                    rows.append({"approach": approach, "seed": seed, "stage": 0, "stage_site": g.source,
                                 "round": max(1, g.rounds) - 1, "site": g.source, "split": "train", "label": "",
                                 "metric": k if k.startswith("entropy_") else f"loss_{k}", "value": float(v)})
            s_scores = ex.score("student", weights, san)
            _write_scores(add, approach, seed, s_scores, sizes["student"], t_scores, g.source)
            run.write_metrics(rows)
        run.log(f"seed {seed} done in {time.monotonic() - t0:.0f} s")
    run.write_json("bytes.json", {"sent": ex.transport.bytes_sent, "received": ex.transport.bytes_received,
                                  "by_kind": ex.transport.bytes_by_kind})
    if not rows:
        raise TedFlError("the protocol produced no result")
    return rows


def _write_scores(add: Any, approach: str, seed: int, scores: dict[str, tuple[dict[str, float], GaussStats | None]],
                  size: dict[str, float], teacher: dict[str, tuple[dict[str, float], GaussStats | None]] | None,
                  source: str) -> None:
    for site, (m, stats) in scores.items():
        for k, v in m.items():
            add(approach, seed, site, k, v)
        if stats is not None and stats.n > 1:
            # ||mu||^2 / E||z||^2: near 1 when the codes are nearly parallel, which leaves DCGD's
            # cosine graphs uniform (nothing to distil)
            mu = stats.mean()
            add(approach, seed, site, "code_mean_share", float(mu @ mu) / max(float(np.trace(stats.s2)) / stats.n, 1e-30))
        if stats is not None and teacher is not None and teacher[site][1] is not None:
            add(approach, seed, site, "fsd_teacher", fsd(teacher[site][1], stats))  # type: ignore[arg-type]
        if stats is not None and scores[source][1] is not None:
            add(approach, seed, site, "fsd_source", fsd(scores[source][1], stats))  # type: ignore[arg-type]
    for k, v in size.items():
        add(approach, seed, "all", k, v)


def simulate_generalize(cfg: ExperimentConfig, run: RunDir, num_nodes: int, quiet: bool = True) -> list[dict]:
    """Run the protocol in one Flower simulation on Ray: one ClientApp node per site (and client)."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return launch(cfg, client_app, num_nodes, lambda grid: serve_generalize(grid, cfg, run, quiet))


__all__ = ["FROZEN", "GKDExecutor", "serve_generalize", "simulate_generalize"]
