"""The ServerApp: the arrival schedule over Flower's Message API, with the teacher held server-side.

`FlowerExecutor` implements the schedule's executor with messages: it finds which node serves
which site (a hello query that returns counts only), sends each round's training instructions
to the arriving site's nodes only, the stage's frozen teacher once per node and stage, the SKA
probes it synthesises itself (as pixels, or as the seed they are regenerated from), and asks
every site's node for test metrics. It retries, skips or aborts on a failing client as
configured, and counts the payload bytes of every message in both directions.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ted_fl.config import ExperimentConfig, dump_toml, to_dict
from ted_fl.continual.probes import make_probes
from ted_fl.data import resolve_out_channels, site_order
from ted_fl.errors import TedFlError
from ted_fl.federated import dp, secagg
from ted_fl.federated import messages as M
from ted_fl.federated.dp import StageDP
from ted_fl.federated.message_log import record_message
from ted_fl.privacy.mechanisms import prepare_privacy
from ted_fl.privacy.policies import gets_teacher
from ted_fl.run import processes
from ted_fl.run.directory import RunDir
from ted_fl.schedule.engine import TrainResult, TrainTask, Weights, derive_seed, fedavg, run_schedule


def short_reason(reason: str) -> str:
    """The client's own message, without Ray's wrapping of remote tracebacks."""
    text = reason.rsplit("Message: ", 1)[-1] if "Message: " in reason else reason
    lines = [ln.strip() for ln in text.strip().strip("'>").splitlines() if ln.strip()]
    return (lines[-1] if lines else text).strip("'>\" ")


def simulated_federation() -> bool:
    """Whether this ServerApp runs inside Flower's simulation (all nodes exist from the start)."""
    return os.path.basename(sys.argv[0]).startswith("flwr-simulation")


PULL_MIN_S = 0.002  # first polls for replies: a round's reply is seen within ~2 ms of its arrival
PULL_MAX_S = 0.1  # never slower than Flower's own send_and_receive (pull_interval 0.1 s)
PULL_SHARE = 0.02  # later polls: every 2% of the time waited so far, so a long wait polls rarely


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """`Grid.send_and_receive` with a shorter wait for the replies, on Flower's public Grid API.

    Flower's own sleeps `pull_interval` (0.1 s) between pulls: on average 50 ms lost per exchange,
    i.e. per round. Here the interval grows with the wait, from PULL_MIN_S to PULL_MAX_S (PULL_SHARE
    of the time waited so far), so a reply is seen within max(2 ms, 2% of the round), and the
    number of pulls (an RPC each on a deployed SuperLink) grows with the log of the wait."""
    ids = set(grid.push_messages(messages))
    start = time.monotonic()
    end = start + timeout
    out: list[Message] = []
    while ids:
        got = list(grid.pull_messages(ids))
        out.extend(got)
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not ids or now >= end:
            break
        time.sleep(min(end - now, PULL_MAX_S, max(PULL_MIN_S, PULL_SHARE * (now - start))))
    return out


class ClientFailure(TedFlError):
    """A client that raised or did not answer, after the configured retries."""


class FlowerExecutor:
    """Runs the schedule's rounds on Flower clients through a Grid."""

    SETTLE_S = 3.0  # a simulated federation whose node count held this long is complete

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunDir | None = None,
                 simulated: bool | None = None, nodes: list[int] | None = None) -> None:
        """`nodes`: the SuperNodes this schedule may use (its block of a simulation that runs several
        schedules at once, `node_blocks`); default: every node the federation has."""
        self.grid, self.cfg, self.run = grid, cfg, run
        self.only = list(nodes) if nodes is not None else None
        self.simulated = simulated_federation() if simulated is None else simulated
        self.experiment_toml = dump_toml(to_dict(cfg))
        self.bytes_sent = self.bytes_received = 0
        self.bytes_by_kind: dict[str, int] = {}
        self.faults: list[dict[str, Any]] = []  # one entry per failed attempt (see fault_counts)
        self.teacher_sent: dict[int, str] = {}
        self.audit: dict[str, dict[str, Any]] = {}  # what travelled, per site, kind, direction and record
        self.audit_hello: dict[str, dict[str, Any]] = {}
        self.site_of: dict[int, tuple[str, int]] = {}
        self._teacher: tuple[Weights, dict] | None = None  # this round's teacher, for retries
        self._dp: Any = None  # client-level DP: the stage's strategy (ted_fl.federated.dp.StageDP)
        if cfg.privacy.dp == "client":
            self._dp = StageDP(cfg.privacy)
        self._aggregated: Weights | None = None
        self._discover()

    # ------------------------------------------------------------------ nodes
    def wait_for_nodes(self, expected: int, what: str) -> list[int]:
        """The federation's node ids once `expected` have connected (a simulated one: once its count holds)."""
        wait = max(self.cfg.federated.timeout, self.cfg.federated.connect_timeout)
        simulated = self.simulated
        deadline = time.monotonic() + wait
        node_ids: list[int] = []
        seen, stable_since = -1, time.monotonic()

        stop = processes.STOP
        while time.monotonic() < deadline:
            if stop.is_set():
                raise processes.Terminated("stopped")
            node_ids = list(self.grid.get_node_ids()) if self.only is None else list(self.only)
            if len(node_ids) >= expected:
                break
            if len(node_ids) != seen:
                seen, stable_since = len(node_ids), time.monotonic()
            # A simulated federation registers all its nodes at once: no more will come.
            if simulated and node_ids and time.monotonic() - stable_since > self.SETTLE_S:
                break
            time.sleep(0.5)
        if len(node_ids) < expected:
            need = f"this experiment needs {expected} SuperNodes ({what})"
            if simulated:
                raise TedFlError(f"{need}, the federation simulates {len(node_ids)}; run "
                                 f"`flwr run . --stream --federation-config num-supernodes={expected}`")
            raise TedFlError(
                f"{need}; only {len(node_ids)} connected within {wait:.0f} s; start one SuperNode per site and client"
            )
        return node_ids

    def _discover(self) -> None:
        order = site_order(self.cfg.data)
        k = self.cfg.federated.clients_per_site
        expected = len(order) * k
        node_ids = self.wait_for_nodes(expected, f"{len(order)} sites x {k} client(s) per site")
        if self.only is None:  # a block's schedule: node_blocks has said it for the whole federation
            self._say(f"federation: {expected} SuperNodes serve {len(order)} sites x {k} client(s)"
                      + (f"; {len(node_ids) - expected} more stay idle" if len(node_ids) > expected else ""))
        content = {n: RecordDict({M.CONFIG: ConfigRecord({"experiment_toml": self.experiment_toml})})
                   for n in node_ids}
        replies = self._exchange(content, "query", "hello", {n: f"node {n}" for n in node_ids})
        hello_sites = {n: str(r.content[M.IDENTITY]["site"]) for n, r in replies.items()}
        for n, r in replies.items():
            record_message(self.audit_hello, hello_sites[n], "hello", "down", content[n])
            record_message(self.audit_hello, hello_sites[n], "hello", "up", r.content)
        self.nodes: dict[str, list[tuple[int, int, int]]] = {s: [] for s in order}
        self.sizes: dict[str, tuple[int, int, int]] = {}
        shape: tuple[int, ...] | None = None
        self.partition_of = {n: int(r.content[M.IDENTITY].get("partition", -1)) for n, r in replies.items()}
        for node, reply in replies.items():
            ident = reply.content[M.IDENTITY]
            site = str(ident["site"])
            if bool(ident.get("idle", False)):  # an idle node of a larger simulated federation
                continue
            if self.only is None and self.partition_of[node] >= expected:  # another block's: idle here
                continue
            if site not in self.nodes:
                raise TedFlError(f"node {node} serves unknown site '{site}'; sites: {', '.join(order)}")
            self.nodes[site].append((node, int(ident["client"]), int(ident["n_train"])))
            shape = tuple(int(x) for x in ident["image_shape"])  # type: ignore[union-attr]
        missing = [s for s, v in self.nodes.items() if not v]
        if missing:
            raise TedFlError(f"no client node serves site(s) {', '.join(missing)}")
        for v in self.nodes.values():
            v.sort(key=lambda t: t[1])
        self.sites = order
        self.train_sizes = {s: sum(n for _, _, n in v) for s, v in self.nodes.items()}
        self.image_shape = shape or (1, self.cfg.data.size, self.cfg.data.size)
        self.site_of = {node: (site, client) for site, v in self.nodes.items() for node, client, _ in v}

    # --------------------------------------------------------------- messages
    def _count(self, kind: str, nbytes: int, up: bool) -> None:
        if up:
            self.bytes_received += nbytes
        else:
            self.bytes_sent += nbytes
        key = f"{kind}_{'up' if up else 'down'}"
        self.bytes_by_kind[key] = self.bytes_by_kind.get(key, 0) + nbytes

    def _exchange(self, contents: dict[int, RecordDict], category: str, action: str,
                  labels: dict[int, str], where: str = "") -> dict[int, Message]:
        """Send, wait (never longer than the timeout), retry failures; return replies by node."""
        fed = self.cfg.federated
        mtype = category if action == "default" else f"{category}.{action}"
        pending = dict(contents)
        got: dict[int, Message] = {}
        reasons: dict[int, str] = {}
        attempts = 1 + (fed.retries if fed.on_failure == "retry" else 0)
        # The hello also waits for the clients to start (Ray actors, imports, reading the data).
        timeout = max(fed.timeout, fed.connect_timeout) if action == "hello" else fed.timeout
        for attempt in range(attempts):
            msgs = [Message(content, dst_node_id=node, message_type=mtype) for node, content in pending.items()]
            kind = action if action != "default" else category
            for node, content in pending.items():
                self._count(kind, M.record_bytes(content), up=False)
                if node in self.site_of:
                    record_message(self.audit, self.site_of[node][0], kind, "down", content)
            replies = send_and_receive(self.grid, msgs, timeout)
            by_node = {r.metadata.src_node_id: r for r in replies}
            failed: dict[int, RecordDict] = {}
            for node, content in pending.items():
                reply = by_node.get(node)
                if reply is None:
                    reasons[node] = f"no reply within {timeout:g} s"
                    failed[node] = content
                elif reply.has_error():
                    reasons[node] = short_reason(reply.error.reason)
                    failed[node] = content
                else:
                    self._count(kind, M.record_bytes(reply.content), up=True)
                    if node in self.site_of:
                        record_message(self.audit, self.site_of[node][0], kind, "up", reply.content)
                    got[node] = reply
            for node in failed:
                retry = attempt + 1 < attempts
                text = (f"{labels[node]} failed {where}({mtype}, attempt {attempt + 1}/{attempts}): {reasons[node]}"
                        + ("; retrying" if retry else ""))
                self._note(text)
                self.faults.append(dict(site=self._site(node), node=node, label=labels[node], where=where.strip(),
                                        type=mtype, attempt=attempt + 1, reason=reasons[node],
                                        outcome="retried" if retry else "unrecovered"))
            pending = failed
            if not pending:
                break
            # A node that lost the stage's teacher (a restarted client) gets it again on the retry.
            for node, content in pending.items():
                self.teacher_sent.pop(node, None)
                wants = M.CONFIG in content and content[M.CONFIG].get("teacher_key") \
                    and not content[M.CONFIG].get("teacher_from_weights")
                if category == "train" and self._teacher and wants and M.TEACHER not in content:
                    content[M.TEACHER] = M.to_record(self._teacher[0])
                    content[M.AUX] = M.to_record(self._teacher[1])
        for node in pending:
            if fed.on_failure == "abort" or (fed.on_failure != "skip" and len(pending) == len(contents)):
                raise ClientFailure(f"{labels[node]} failed {where}({mtype}) after {attempts} attempt(s): "
                                    f"{reasons[node]}; see federated.retries, federated.on_failure")
        return got

    def _say(self, text: str) -> None:
        print(text, flush=True)
        if self.run is not None:
            self.run.log(text)

    def _note(self, text: str) -> None:
        print(f"warning: {text}", file=sys.stderr)
        if self.run is not None:
            self.run.log(f"warning: {text}")

    def _site(self, node: int) -> str:
        return self.site_of[node][0] if hasattr(self, "site_of") and node in self.site_of else f"node {node}"

    def _label(self, node: int) -> str:
        site, client = self.site_of[node]
        return f"site {site}" + (f" client {client}" if self.cfg.federated.clients_per_site > 1 else "")

    # -------------------------------------------------------------- executor
    def train(self, task: TrainTask) -> list[TrainResult]:
        fed = self.cfg.federated
        weights = M.to_record(task.weights)
        trainers = [(s, node, client) for s in task.sites for node, client, _ in self.nodes[s]]
        single = len(trainers) == 1
        client_dp = self.cfg.privacy.dp == "client"
        teacher_key = f"{task.approach}|{task.seed}|{task.stage}" if task.teacher is not None else ""
        teacher_rec = aux_rec = probes_rec = None
        base: dict[str, Any] = dict(
            approach=task.approach, seed=task.seed, stage=task.stage, round=task.round,
            steps=task.steps, lr=task.lr, stage_rounds=task.stage_rounds,
            # client-level DP: the released (noised) model is scored by the server's evaluate, not the raw local one
            want_val=bool(task.want_val and single and not client_dp),
            client_state_dir=str(self.run.client_state_dir) if self.run else "",
        )
        site_held = self.cfg.privacy.teacher == "site"
        if task.probe_seed is not None and not site_held:
            if fed.probes == "pixels":
                probes = make_probes(task.probe_seed, task.probe_count, task.probe_shape, self.cfg.loss)
                probes_rec = ArrayRecord({"probes": Array(probes.numpy())})
            else:
                base.update(probe_seed=task.probe_seed, probe_count=task.probe_count,
                            probe_shape=list(task.probe_shape))
        contents: dict[int, RecordDict] = {}
        for site, node, _client in trainers:
            index = self.sites.index(site)
            # privacy.teacher = "site": only the arriving site holds the teacher (ted_fl.privacy.policies)
            holds = bool(teacher_key) and gets_teacher(self.cfg, index, task.stage)
            node_cfg: dict[str, Any] = {**base, "site_index": index, "teacher_key": teacher_key if holds else ""}
            content = RecordDict({M.WEIGHTS: weights})
            if holds and self.teacher_sent.get(node) != teacher_key:
                if site_held and task.round == 0:
                    # The round's weights are the stage's teacher: the site freezes them itself.
                    node_cfg["teacher_from_weights"] = True
                    if task.aux:
                        aux_rec = aux_rec or M.to_record(task.aux)
                        content[M.AUX] = aux_rec
                else:
                    teacher_rec = teacher_rec or M.to_record(task.teacher)  # type: ignore[arg-type]
                    aux_rec = aux_rec or M.to_record(task.aux)
                    content[M.TEACHER] = teacher_rec
                    content[M.AUX] = aux_rec
            if site_held and holds and task.probe_seed is not None:
                # The site draws its own probes from its own seed: neither pixels nor a seed travel.
                node_cfg.update(probe_local=True, probe_count=task.probe_count, probe_shape=list(task.probe_shape))
            if probes_rec is not None:
                content[M.PROBES] = probes_rec
            content[M.CONFIG] = M.config_record(node_cfg)
            contents[node] = content
            # Breakdown of train_down (already counted there): what the teacher and the probes cost.
            for part in (M.TEACHER, M.PROBES):
                if part in content:
                    key = f"train_down.{part}"
                    self.bytes_by_kind[key] = self.bytes_by_kind.get(key, 0) + content[part].count_bytes()
        self._teacher = (task.teacher, task.aux) if teacher_key else None
        if self.cfg.privacy.secagg:  # Flower's SecAgg+: the server gets the round's sum, never one update
            return secagg.train_round(self, task, contents, trainers, send_and_receive)
        if client_dp:
            stage_dp = self._dp.stage(task.approach, task.seed, task.stage, len(trainers), task.stage_rounds)
            strategy, sigma = stage_dp.strategy, stage_dp.sigma
            dp.configure(strategy, task.round + 1, weights, contents, sigma)
        replies = self._exchange_train(contents, task)
        results = []
        for site, node, client in trainers:
            if node not in replies:
                continue
            r = replies[node].content
            metrics = dict(r[M.METRICS])
            n = int(metrics.pop("num_examples"))
            val = dict(r[M.VAL]) if M.VAL in r else None
            if client_dp:
                metrics.update(dp.reply_metrics(stage_dp.accounted_sigma()))
            results.append(TrainResult(site, client, M.from_record(r[M.WEIGHTS]), n,
                                       {k: float(v) for k, v in metrics.items()}, val))
        if not results:
            raise ClientFailure(f"no training site answered in stage {task.stage} round {task.round}")
        if client_dp:
            if len(replies) != len(contents):
                raise ClientFailure(f"client-level DP needs every client's update in stage {task.stage} round "
                                    f"{task.round} (the noise is calibrated to {len(contents)} clients); "
                                    "see federated.on_failure")
            self._aggregated = M.from_record(dp.aggregate(strategy, task.round + 1, [replies[n] for n in contents]))
        return results

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
        return {"faults": list(self.faults), "bytes_by_kind": dict(self.bytes_by_kind),
                "audit": copy.deepcopy(self.audit), "audit_hello": copy.deepcopy(self.audit_hello),
                "dp": self._dp.state_dict() if self._dp else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.faults = list(state.get("faults", []))
        self.bytes_by_kind = dict(state.get("bytes_by_kind", {}))
        self.audit = copy.deepcopy(state.get("audit", {}))
        if self._dp:
            self._dp.load_state_dict(state.get("dp", {}))  # the adaptive clip norm a resumed stage goes on from
        self.teacher_sent = {}


def fault_counts(faults: list[dict[str, Any]], sites: list[str]) -> dict[str, int]:
    """summary.csv's fault columns: failed attempts seen, retried, and messages never answered
    (unrecovered), in all and per site (`faults_seen[BMC]`, ...)."""
    out: dict[str, int] = {}
    for scope in [None, *sites]:
        mine = [f for f in faults if scope is None or f.get("site") == scope]
        tag = "" if scope is None else f"[{scope}]"
        out[f"faults_seen{tag}"] = len(mine)
        out[f"faults_retried{tag}"] = sum(f.get("outcome") == "retried" for f in mine)
        out[f"faults_unrecovered{tag}"] = sum(f.get("outcome", "unrecovered") == "unrecovered" for f in mine)
    return out


def node_blocks(grid: Grid, cfg: ExperimentConfig, blocks: int, run: RunDir | None = None) -> list[list[int]]:
    """The simulated SuperNodes in `blocks` blocks of sites x clients_per_site, by partition id: block b
    serves every site again (`client_app.identity`), for the b-th schedule running at the same time.

    One hello to every node (the counts-only identity query; what travels is audited by each
    schedule's own hello to its block, as before).
    """
    per = len(site_order(cfg.data)) * cfg.federated.clients_per_site
    probe = FlowerExecutor.__new__(FlowerExecutor)  # only the hello of a full executor: no schedule state
    probe.grid, probe.cfg, probe.run, probe.only, probe.simulated = grid, cfg, run, None, True
    probe.bytes_sent = probe.bytes_received = 0
    probe.bytes_by_kind, probe.faults, probe.audit, probe.site_of = {}, [], {}, {}
    node_ids = probe.wait_for_nodes(per * blocks, f"{blocks} blocks of {per}")
    content = {n: RecordDict({M.CONFIG: ConfigRecord({"experiment_toml": dump_toml(to_dict(cfg))})})
               for n in node_ids}
    replies = probe._exchange(content, "query", "hello", {n: f"node {n}" for n in node_ids})
    out: list[list[int]] = [[] for _ in range(blocks)]
    for node, reply in replies.items():
        pid = int(reply.content[M.IDENTITY].get("partition", -1))
        if 0 <= pid < per * blocks:
            out[pid // per].append(node)
    if any(len(b) != per for b in out):
        raise TedFlError(f"the simulation has {len(node_ids)} SuperNodes; {blocks} schedules at once need "
                         f"{per * blocks} ({per} each)")
    probe._say(f"federation: {per * blocks} SuperNodes serve {per} sites x clients for {blocks} schedules at once")
    return out


def serve_one(grid: Grid, cfg: ExperimentConfig, run: RunDir, approach: str, seed: int, progress: Any = None,
              simulated: bool | None = None, nodes: list[int] | None = None) -> dict[str, Any]:
    """One (approach, seed) schedule over `nodes` (its block) or the whole federation: its fault columns."""
    resolve_out_channels(cfg)  # before the hello carries the config to the clients (TOML only, no data)
    prepare_privacy(cfg)  # model.norm under DP, impossible combinations (idempotent; logged at run start)
    executor = FlowerExecutor(grid, cfg, run, simulated, nodes)
    record = getattr(run, "record", None)  # processes.ProcessRecord: Ray's processes are up now
    if record is not None:
        record.update(f"{approach} seed {seed}")
    st = run_schedule(cfg, approach, seed, executor, run, progress)
    return fault_counts(st.executor.get("faults", []), executor.sites)


def serve(grid: Grid, cfg: ExperimentConfig, run: RunDir, progress: Any = None, simulated: bool | None = None) -> dict:
    """The server's main loop: every approach and seed in turn, over one set of nodes."""
    resolve_out_channels(cfg)  # before the hello carries the config to the clients (TOML only, no data)
    prepare_privacy(cfg)  # model.norm under DP, impossible combinations (idempotent; logged at run start)
    executor = FlowerExecutor(grid, cfg, run, simulated)
    extras: dict[tuple[str, int], dict[str, Any]] = {}
    for approach in cfg.approaches:
        for seed in cfg.seeds:
            record = getattr(run, "record", None)  # processes.ProcessRecord: Ray's processes are up now
            if record is not None:
                record.update(f"{approach} seed {seed}")
            st = run_schedule(cfg, approach, seed, executor, run, progress)
            extras[(approach, seed)] = fault_counts(st.executor.get("faults", []), executor.sites)
    return extras
