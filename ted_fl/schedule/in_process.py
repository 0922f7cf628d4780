"""The in-process executor: trains and evaluates every site in this process (the centralized
reference run and the bare loop the simulator's overhead is measured against)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ted_fl.config import ExperimentConfig
from ted_fl.data.types import SiteData, Split
from ted_fl.errors import TedFlError
from ted_fl.privacy.policies import replay_buffer
from ted_fl.schedule.engine import TrainResult, TrainTask, Weights, derive_seed, fedavg
from ted_fl.schedule.orders import Replay, plan_round
from ted_fl.schedule.worker import SiteWorker

if TYPE_CHECKING:
    from ted_fl.federated.dp import StageDP


class LocalExecutor:
    """Trains and evaluates every site in this process, one after another."""

    def __init__(self, cfg: ExperimentConfig, sites: list[SiteData]):
        """`cfg`: a resolved experiment's (ted_fl.schedule.experiment.resolve), checked there once."""
        if cfg.privacy.secagg:  # SecAgg+ is a protocol between Flower clients and server (ted_fl.federated.secagg)
            raise TedFlError("privacy.secagg = true runs in the Flower simulation or deployment (python -m "
                             "ted_fl.simulate, study --federated), not in-process; set privacy.secagg = false")
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
        self.dp: StageDP | None = None
        if cfg.privacy.dp == "client":
            from ted_fl.federated.dp import StageDP

            self.dp = StageDP(cfg.privacy)
        self._released: list[tuple[Weights, bool]] = []
        # Derived training splits (replay buffers, a joint group's union) are built once and reused
        # round after round: the same arrays, so a GPU keeps one device copy of each (device.on_device).
        self._derived: dict[tuple, tuple[list[Split], Split]] = {}

    def train(self, task: TrainTask) -> list[TrainResult]:
        """Carry out the round's orders (ted_fl.schedule.orders.plan_round) one after another."""
        orders = plan_round(task, self.cfg, self.sites)
        results = []
        if self.dp is not None:
            self.dp.stage(task.approach, task.seed, task.stage, len(orders), task.stage_rounds)
            self._released = []
        for order in orders:
            site, key = order.site, "+".join(order.sites)
            stage_opt = self.optim.get(key)
            out = self.worker.run(
                order, data=self._union([self._train_split(r, task.seed) for r in order.replay]),
                weights=task.weights, teacher=task.teacher, teacher_id=(task.approach, task.seed, task.stage),
                aux=task.aux, optimizer_state=stage_opt[1] if stage_opt and stage_opt[0] == task.stage else None,
                val=self.data[site].val, per_volume=self.data[site].per_volume, labels=self.data[site].labels.labels(),
            )
            self.optim[key] = (task.stage, out.optimizer_state)
            weights, metrics = out.weights, dict(out.metrics)
            if self.dp is not None:  # what leaves the client: Flower's client-side mod, applied to the weights
                from ted_fl.federated.dp import reply_metrics

                weights, bit = self.dp.release(task.weights, out.weights)
                self._released.append((weights, bit))
                metrics.update(reply_metrics(self.dp.accounted_sigma()))
            results.append(TrainResult(site, 0, weights, out.num_examples, metrics, out.val))
        return results

    def _train_split(self, replay: Replay, seed: int) -> Split:
        """The site's training split, or the replay buffer its order names (an earlier site, privacy.replay)."""
        if not replay.size:
            return self.data[replay.site].train
        key = ("replay", replay.site, seed)
        if key not in self._derived:
            self._derived[key] = ([], replay_buffer(self.data[replay.site].train, replay.size, replay.seed))
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
