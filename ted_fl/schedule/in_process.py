"""The in-process executor: trains and evaluates every site in this process (the centralized
reference run and the bare loop the simulator's overhead is measured against)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ted_fl.config import ExperimentConfig
from ted_fl.continual.approaches import get_approach
from ted_fl.data import set_out_channels
from ted_fl.data.types import SiteData, Split
from ted_fl.errors import TedFlError
from ted_fl.privacy.mechanisms import prepare_privacy
from ted_fl.privacy.policies import PROBE_SITE_TAG, REPLAY_TAG, gets_teacher, replay_buffer, uses_replay
from ted_fl.schedule.engine import TrainResult, TrainTask, Weights, derive_seed, fedavg
from ted_fl.schedule.worker import SiteWorker, probes_for


class LocalExecutor:
    """Trains and evaluates every site in this process, one after another."""

    def __init__(self, cfg: ExperimentConfig, sites: list[SiteData]):
        if cfg.privacy.secagg:  # SecAgg+ is a protocol between Flower clients and server (ted_fl.federated.secagg)
            raise TedFlError("privacy.secagg = true runs in the Flower simulation or deployment (python -m "
                             "ted_fl.simulate, study --federated), not in-process; set privacy.secagg = false")
        set_out_channels(cfg, sites[0].labels, cfg.data.sites)  # the network follows the sites' classes

        prepare_privacy(cfg)  # idempotent: the runners call it at run start (model.norm, checks)
        self.cfg = cfg
        self.data = {s.name: s for s in sites}
        self.sites = [s.name for s in sites]
        self.train_sizes = {s.name: len(s.train) for s in sites}
        self.image_shape = tuple(sites[0].train.images.shape[1:])
        self.worker = SiteWorker(cfg)
        self.optim: dict[str, tuple[int, dict[str, Any]]] = {}
        self.bytes_sent = self.bytes_received = 0
        # privacy.dp = "client": every site (joint group) is one client; what it releases is clipped and noised
        # as Flower's DP strategy and mods do in the federated run (ted_fl.federated.dp.StageDP)
        self.dp: Any = None
        if cfg.privacy.dp == "client":
            from ted_fl.federated.dp import StageDP

            self.dp = StageDP(cfg.privacy)
        self._released: list[tuple[Weights, bool]] = []
        # Derived training splits (replay buffers, a joint group's union) are built once and reused
        # round after round: the same arrays, so a GPU keeps one device copy of each (device.on_device).
        self._derived: dict[tuple, tuple[list[Split], Split]] = {}

    def train(self, task: TrainTask) -> list[TrainResult]:
        appr = get_approach(task.approach, self.cfg.loss)
        cfg = self.cfg
        teacher = self.worker.set_teacher((task.approach, task.seed, task.stage), task.teacher)
        probes = probes_for(cfg, task.probe_seed, task.probe_count, task.probe_shape)
        groups = [task.sites] if appr.joint else [[s] for s in task.sites]
        results = []
        if self.dp is not None:
            self.dp.stage(task.approach, task.seed, task.stage, len(groups), task.stage_rounds)
            self._released = []
        for group in groups:
            site = group[-1]
            index = self.sites.index(site)
            key = "+".join(group)
            stage_opt = self.optim.get(key)
            opt_state = stage_opt[1] if stage_opt and stage_opt[0] == task.stage else None
            # The policies of [privacy], as the Flower client applies them (ted_fl.privacy.policies).
            holds = teacher is not None and (appr.joint or gets_teacher(cfg, index, task.stage))
            site_probes = probes
            if holds and cfg.privacy.teacher == "site" and task.probe_count:
                site_probes = probes_for(cfg, derive_seed(task.seed, task.stage, task.round, index, 0, PROBE_SITE_TAG),
                                         task.probe_count, task.probe_shape)
            out = self.worker.train_round(
                approach=task.approach,
                data=self._union([self._train_split(s, task) for s in group]),
                weights=task.weights, teacher=teacher if holds else None, aux=task.aux,
                steps=task.steps, lr=task.lr,
                seed=derive_seed(task.seed, task.stage, task.round, index, 0),
                probes=site_probes if holds else None, optimizer_state=opt_state,
                # client-level DP: the released (noised) model is scored by evaluate, not the raw local one
                val=self.data[site].val if task.want_val and len(groups) == 1 and self.dp is None else None,
                per_volume=self.data[site].per_volume, labels=self.data[site].labels.labels(),
                stage_rounds=task.stage_rounds,
            )
            self.optim[key] = (task.stage, out.optimizer_state)
            weights, metrics = out.weights, dict(out.metrics)
            if self.dp is not None:
                from ted_fl.federated.dp import reply_metrics

                weights, bit = self.dp.release(task.weights, out.weights)
                self._released.append((weights, bit))
                metrics.update(reply_metrics(self.dp.accounted_sigma()))
            results.append(TrainResult(site, 0, weights, out.num_examples, metrics, out.val))
        return results

    def _train_split(self, site: str, task: TrainTask) -> Split:
        """The site's training split, or its replay buffer when it trains after its own stage."""
        index = self.sites.index(site)
        if not uses_replay(self.cfg, index, task.stage):
            return self.data[site].train
        key = ("replay", site, task.seed)
        if key not in self._derived:
            buf = replay_buffer(self.data[site].train, self.cfg.privacy.replay,
                                derive_seed(task.seed, index, REPLAY_TAG, 0))
            self._derived[key] = ([], buf)
        return self._derived[key][1]

    def _union(self, parts: list[Split]) -> Split:
        """`Split.concat(parts)`, the same object while the parts are the same (a joint stage's rounds)."""
        if len(parts) == 1:
            return parts[0]
        key = ("union", *(id(p) for p in parts))
        hit = self._derived.get(key)
        if hit is None or any(a is not b for a, b in zip(hit[0], parts, strict=True)):
            for k in [k for k in self._derived if k[0] == "union"]:
                del self._derived[k]  # one union at a time: the previous stage's is done
            hit = self._derived[key] = (parts, Split.concat(parts))
        return hit[1]

    def aggregate(self, task: TrainTask, results: list[TrainResult]) -> Weights:
        """The round's global model: client-level DP's noised uniform mean of the released weights, else FedAvg."""
        if self.dp is not None:
            return self.dp.aggregate_weights(task.weights, self._released)

        return fedavg([(r.weights, r.num_examples) for r in results])

    def evaluate(self, weights: Weights, split: str, sites: list[str]) -> dict[str, dict[str, float]]:
        return {
            s: self.worker.evaluate(weights, self.data[s].splits[split], self.data[s].per_volume,
                                    self.data[s].labels.labels())
            for s in sites
        }

    def leakage(self, weights: Weights, references: dict[str, Weights], seed: int) -> dict[str, dict[str, float]]:
        return {s: self.worker.leakage(weights, references[s], self.data[s].train, self.data[s].test,
                                       derive_seed(seed, i))
                for i, s in enumerate(self.sites)}

    def importance(self, approach: str, weights: Weights, site: str) -> dict[str, np.ndarray]:
        return self.worker.importance(approach, weights, self.data[site].train)

    def state_dict(self) -> dict[str, Any]:
        return {"optim": self.optim, "dp": self.dp.state_dict() if self.dp is not None else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optim = dict(state.get("optim", {}))
        if self.dp is not None:
            self.dp.load_state_dict(state.get("dp", {}))  # the adaptive clip norm a resumed stage goes on from
