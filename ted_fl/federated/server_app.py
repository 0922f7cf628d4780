"""The ServerApp: the arrival schedule over Flower's Message API, with the teacher held server-side.

`FlowerExecutor` implements the schedule's executor with messages. Each round it plans the sites'
orders (`ted_fl.schedule.orders.plan_round`), encodes them (`ted_fl.federated.codec`: the stage's
frozen teacher once per node and stage, the SKA probes as pixels or as their seed), lets the stage's
Flower strategy configure them (`ted_fl.federated.stage_strategy`, wrapped by Flower's DP wrapper under
client-level DP), and exchanges them through its `Transport` (`ted_fl.federated.transport`: which
node serves which site, retries, skips or aborts on a failing client as configured, the payload
bytes of every message in both directions and the audit log).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ted_fl.config import ExperimentConfig, dump_toml, to_dict
from ted_fl.data import site_order
from ted_fl.errors import TedFlError
from ted_fl.federated import codec, dp, secagg
from ted_fl.federated import messages as M
from ted_fl.federated.dp import StageDP
from ted_fl.federated.stage_strategy import StageStrategy, inner
from ted_fl.federated.transport import (  # noqa: F401 (re-exported: the exchange's names where they were)
    PULL_MAX_S,
    PULL_MIN_S,
    PULL_SHARE,
    ClientFailure,
    Transport,
    fault_counts,
    send_and_receive,
    short_reason,
    simulated_federation,
)
from ted_fl.run.directory import RunDir
from ted_fl.schedule.engine import TrainResult, TrainTask, Weights, derive_seed, fedavg, run_schedule
from ted_fl.schedule.orders import SiteOrder, plan_round


class FlowerExecutor:
    """Runs the schedule's rounds on Flower clients through a Grid."""

    SETTLE_S = Transport.SETTLE_S  # a simulated federation whose node count held this long is complete

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunDir | None = None,
                 simulated: bool | None = None, nodes: list[int] | None = None) -> None:
        """`nodes`: the SuperNodes this schedule may use (its block of a simulation that runs several
        schedules at once, `node_blocks`); default: every node the federation has."""
        self.cfg, self.run, self.grid = cfg, run, grid
        self.transport = Transport(grid, cfg, run, simulated, nodes, settle_s=self.SETTLE_S)
        t = self.transport
        self.sites, self.train_sizes, self.image_shape, self.nodes = t.sites, t.train_sizes, t.image_shape, t.nodes
        self.teacher_sent: dict[int, str] = {}
        self._teacher: tuple[Weights, dict] | None = None  # this round's teacher, for retries
        self._dp: StageDP | None = None  # client-level DP: the stage's DP wrapper and its state
        if cfg.privacy.dp == "client":
            self._dp = StageDP(cfg.privacy)
        self._strategy = StageStrategy()  # FedAvg over the round's orders (aggregation: `aggregate` below)
        self._local_dp_strategy = StageStrategy(uniform=True)  # local DP: the uniform mean of noised updates
        self._aggregated: Weights | None = None

    @property
    def bytes_sent(self) -> int:
        return self.transport.bytes_sent

    @bytes_sent.setter
    def bytes_sent(self, n: int) -> None:  # the schedule restores the counters on a resume
        self.transport.bytes_sent = n

    @property
    def bytes_received(self) -> int:
        return self.transport.bytes_received

    @bytes_received.setter
    def bytes_received(self, n: int) -> None:
        self.transport.bytes_received = n

    @property
    def bytes_by_kind(self) -> dict[str, int]:
        return self.transport.bytes_by_kind

    def _exchange(self, contents: dict[int, RecordDict], category: str, action: str, labels: dict[int, str],
                  where: str = "") -> dict[int, Message]:
        """The transport's exchange; a train message that failed gets the stage's teacher again."""
        return self.transport.exchange(contents, category, action, labels, where,
                                       self._resend_teacher if category == "train" else None)

    def _resend_teacher(self, node: int, content: RecordDict) -> None:
        """A node that lost the stage's teacher (a restarted client) gets it again on the retry."""
        self.teacher_sent.pop(node, None)
        wants = M.CONFIG in content and content[M.CONFIG].get("teacher_key") \
            and not content[M.CONFIG].get("teacher_from_weights")
        if self._teacher and wants and M.TEACHER not in content:
            content[M.TEACHER] = M.to_record(self._teacher[0])
            content[M.AUX] = M.to_record(self._teacher[1])

    def _label(self, node: int) -> str:
        return self.transport.label(node)

    # -------------------------------------------------------------- executor
    def train(self, task: TrainTask) -> list[TrainResult]:
        """Plan the round's orders (ted_fl.schedule.orders), let the stage's Flower strategy configure them
        (ted_fl.federated.stage_strategy, wrapped by Flower's DP wrapper under client-level DP), exchange
        them, decode the replies; under client-level DP the strategy aggregates them too."""
        orders = plan_round(task, self.cfg, self.sites, {s: [c for _, c, _ in self.nodes[s]] for s in task.sites})
        weights = M.to_record(task.weights)
        if self.cfg.privacy.secagg:  # Flower's SecAgg+: the server gets the round's sum, never one update
            contents = self._encode(task, orders, weights)
            trainers = [(o.site, self.transport.node_of[(o.site, o.client)], o.client) for o in orders]
            return secagg.train_round(self, task, contents, trainers, send_and_receive)
        strategy = self._stage_strategy(task, len(orders))
        inner(strategy).orders = self._encode(task, orders, weights)
        messages = strategy.configure_train(task.round + 1, weights, ConfigRecord(), self.grid)
        contents = {m.metadata.dst_node_id: m.content for m in messages}
        replies = self._exchange_train(contents, task)
        results = [self._result(o, replies[self.transport.node_of[(o.site, o.client)]]) for o in orders
                   if self.transport.node_of[(o.site, o.client)] in replies]
        if not results:
            raise ClientFailure(f"no training site answered in stage {task.stage} round {task.round}")
        if self._dp is not None:
            if len(replies) != len(contents):
                raise ClientFailure(f"client-level DP needs every client's update in stage {task.stage} round "
                                    f"{task.round} (the noise is calibrated to {len(contents)} clients); "
                                    "see federated.on_failure")
            arrays, _ = strategy.aggregate_train(task.round + 1, [replies[n] for n in contents])
            if arrays is None:
                raise ClientFailure("client-level DP aggregation failed (a reply was missing or inconsistent)")
            self._aggregated = M.from_record(arrays)
        return results

    def _stage_strategy(self, task: TrainTask, n_clients: int) -> Strategy:
        """The stage's strategy: Flower's DP wrapper around it under client-level DP (its state: StageDP)."""
        if self._dp is None:
            return self._strategy
        stage_dp = self._dp.stage(task.approach, task.seed, task.stage, n_clients, task.stage_rounds)
        return stage_dp.strategy or self._local_dp_strategy  # noise = "client": the clients' mods add it

    def _result(self, order: SiteOrder, reply: Message) -> TrainResult:
        """A train reply as the schedule's result (with the round's DP accounting inputs)."""
        r = reply.content
        metrics = dict(r[M.METRICS])
        n = int(metrics.pop("num_examples"))
        if self._dp is not None:
            metrics.update(dp.reply_metrics(self._dp.accounted_sigma()))
        return TrainResult(order.site, order.client, M.from_record(r[M.WEIGHTS]), n,
                           {k: float(v) for k, v in metrics.items()}, dict(r[M.VAL]) if M.VAL in r else None)

    def _encode(self, task: TrainTask, orders: list[SiteOrder], weights: ArrayRecord) -> dict[int, RecordDict]:
        """Each order's train message (ted_fl.federated.codec), with the teacher and the probes' pixels where
        they travel; per-kind byte counts of both. Each record is built once a round and shared."""
        state_dir = str(self.run.client_state_dir) if self.run else ""
        built: dict[str, ArrayRecord | None] = {}

        def once(name: str, make: Callable[[], ArrayRecord | None]) -> ArrayRecord | None:
            if name not in built:
                built[name] = make()
            return built[name]

        contents: dict[int, RecordDict] = {}
        for order in orders:
            node = self.transport.node_of[(order.site, order.client)]
            teacher = aux = None
            if order.teacher.held and self.teacher_sent.get(node) != order.teacher.key:  # once per node and stage
                if not order.teacher.from_weights:  # (the site freezes this round's weights itself)
                    teacher = once(M.TEACHER, lambda: M.to_record(task.teacher))  # type: ignore[arg-type]
                if task.aux or teacher is not None:
                    aux = once(M.AUX, lambda: M.to_record(task.aux))
            probes = (once(M.PROBES, lambda o=order: codec.probe_pixels(o, self.cfg))  # type: ignore[misc]
                      if order.probes.source == "sent" else None)
            contents[node] = codec.encode_train(order, weights, teacher=teacher, aux=aux, probes=probes,
                                                state_dir=state_dir)
            self._count_parts(contents[node])
        self._teacher = (task.teacher, task.aux) if task.teacher is not None else None  # for a retry
        return contents

    def _count_parts(self, content: RecordDict) -> None:
        """Breakdown of train_down (counted there when sent): what the teacher and the probes cost."""
        kinds = self.transport.bytes_by_kind
        for part in (M.TEACHER, M.PROBES):
            if part in content:
                kinds[f"train_down.{part}"] = kinds.get(f"train_down.{part}", 0) + content[part].count_bytes()

    def aggregate(self, task: TrainTask, results: list[TrainResult]) -> Weights:
        """The round's global model: Flower's DP strategy's noised mean under client-level DP, SecAgg+'s
        (ted_fl.federated.secagg), else FedAvg."""
        if self._aggregated is not None:  # client-level DP's noised mean, or SecAgg+'s mean
            out, self._aggregated = self._aggregated, None
            return out

        return fedavg([(r.weights, r.num_examples) for r in results])

    def _exchange_train(self, contents: dict[int, RecordDict], task: TrainTask) -> dict[int, Message]:
        where = f"in stage {task.stage} round {task.round} "
        labels = {n: self._label(n) for n in contents}
        replies = self._exchange(contents, "train", "default", labels, where)
        for node in replies:
            cfg_rec = contents[node][M.CONFIG]
            if cfg_rec.get("teacher_key"):
                self.teacher_sent[node] = str(cfg_rec["teacher_key"])
        return replies

    def evaluate(self, weights: Weights, split: str, sites: list[str]) -> dict[str, dict[str, float]]:
        rec = M.to_record(weights)
        # Each site's first node evaluates the site's whole split (the site's evaluation node).
        nodes = {self.nodes[s][0][0]: s for s in sites}
        contents = {n: RecordDict({M.WEIGHTS: rec, M.CONFIG: ConfigRecord({"split": split})}) for n in nodes}
        replies = self._exchange(contents, "evaluate", "default", {n: self._label(n) for n in nodes},
                                 f"evaluating {split} ")
        out: dict[str, dict[str, float]] = {}
        for node, site in nodes.items():
            if node in replies:
                m = dict(replies[node].content[M.METRICS])
                m.pop("num_examples", None)
                out[site] = {k: float(v) for k, v in m.items()}
            else:  # recorded as missing, never dropped silently
                out[site] = {"dice": float("nan"), "iou": float("nan"), "hd95": float("nan")}
        return out

    def importance(self, approach: str, weights: Weights, site: str) -> dict[str, np.ndarray]:
        rec = M.to_record(weights)
        nodes = [node for node, _, _ in self.nodes[site]]
        contents = {n: RecordDict({M.WEIGHTS: rec, M.CONFIG: ConfigRecord({"approach": approach})}) for n in nodes}
        replies = self._exchange(contents, "query", "importance", {n: self._label(n) for n in nodes},
                                 "computing importances ")
        parts = [(M.from_record(r.content[M.AUX]), int(r.content[M.METRICS]["num_examples"]))
                 for r in replies.values()]

        return fedavg(parts) if parts else {}

    def leakage(self, weights: Weights, references: dict[str, Weights], seed: int) -> dict[str, dict[str, float]]:
        """Each site's first node attacks the model on its own images; only the scores come back."""
        rec = M.to_record(weights)
        nodes = {self.nodes[s][0][0]: s for s in self.sites}
        contents = {n: RecordDict({M.WEIGHTS: rec, M.REFERENCE: M.to_record(references[s]),
                                   M.CONFIG: ConfigRecord({"seed": derive_seed(seed, self.sites.index(s))})})
                    for n, s in nodes.items()}
        replies = self._exchange(contents, "query", "leakage", {n: self._label(n) for n in nodes},
                                 "measuring leakage ")
        out: dict[str, dict[str, float]] = {}
        for node, site in nodes.items():
            if node in replies:
                out[site] = {k: float(v) for k, v in dict(replies[node].content[M.METRICS]).items()}
            else:
                out[site] = {"mia_auc": float("nan")}
        return out

    def state_dict(self) -> dict[str, Any]:
        t = self.transport
        return {"faults": list(t.faults), "bytes_by_kind": dict(t.bytes_by_kind),
                "audit": copy.deepcopy(t.audit), "audit_hello": copy.deepcopy(t.audit_hello),
                "dp": self._dp.state_dict() if self._dp else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.transport
        t.faults = list(state.get("faults", []))
        t.bytes_by_kind = dict(state.get("bytes_by_kind", {}))
        t.audit = copy.deepcopy(state.get("audit", {}))
        if self._dp:
            self._dp.load_state_dict(state.get("dp", {}))  # the adaptive clip norm a resumed stage goes on from
        self.teacher_sent = {}


def node_blocks(grid: Grid, cfg: ExperimentConfig, blocks: int, run: RunDir | None = None) -> list[list[int]]:
    """The simulated SuperNodes in `blocks` blocks of sites x clients_per_site, by partition id: block b
    serves every site again (`client_app.identity`), for the b-th schedule running at the same time.

    One hello to every node (the counts-only identity query; what travels is audited by each
    schedule's own hello to its block, as before).
    """
    per = len(site_order(cfg.data)) * cfg.federated.clients_per_site
    probe = Transport(grid, cfg, run, simulated=True, discover=False)  # only the hello: no schedule state
    node_ids = probe.wait_for_nodes(per * blocks, f"{blocks} blocks of {per}")
    content = {n: RecordDict({M.CONFIG: ConfigRecord({"experiment_toml": dump_toml(to_dict(cfg))})})
               for n in node_ids}
    replies = probe.exchange(content, "query", "hello", {n: f"node {n}" for n in node_ids})
    out: list[list[int]] = [[] for _ in range(blocks)]
    for node, reply in replies.items():
        pid = int(reply.content[M.IDENTITY].get("partition", -1))
        if 0 <= pid < per * blocks:
            out[pid // per].append(node)
    if any(len(b) != per for b in out):
        raise TedFlError(f"the simulation has {len(node_ids)} SuperNodes; {blocks} schedules at once need "
                         f"{per * blocks} ({per} each)")
    probe.say(f"federation: {per * blocks} SuperNodes serve {per} sites x clients for {blocks} schedules at once")
    return out


def serve_one(grid: Grid, cfg: ExperimentConfig, run: RunDir, approach: str, seed: int, progress: Any = None,
              simulated: bool | None = None, nodes: list[int] | None = None) -> dict[str, Any]:
    """One (approach, seed) schedule over `nodes` (its block) or the whole federation: its fault columns.
    `cfg` is resolved (`ted_fl.schedule.experiment.resolve` at the entry point) and not checked again."""
    executor = FlowerExecutor(grid, cfg, run, simulated, nodes)
    record = run.record  # processes.ProcessRecord: Ray's processes are up now
    if record is not None:
        record.update(f"{approach} seed {seed}")
    st = run_schedule(cfg, approach, seed, executor, run, progress)
    return fault_counts(st.executor.get("faults", []), executor.sites)


def serve(grid: Grid, cfg: ExperimentConfig, run: RunDir, progress: Any = None, simulated: bool | None = None) -> dict:
    """The server's main loop: every approach and seed in turn, over one set of nodes (`cfg` resolved at
    the entry point, `ted_fl.schedule.experiment.resolve`, and not checked again)."""
    executor = FlowerExecutor(grid, cfg, run, simulated)
    extras: dict[tuple[str, int], dict[str, Any]] = {}
    for approach in cfg.approaches:
        for seed in cfg.seeds:
            record = run.record  # processes.ProcessRecord: Ray's processes are up now
            if record is not None:
                record.update(f"{approach} seed {seed}")
            st = run_schedule(cfg, approach, seed, executor, run, progress)
            extras[(approach, seed)] = fault_counts(st.executor.get("faults", []), executor.sites)
    return extras
