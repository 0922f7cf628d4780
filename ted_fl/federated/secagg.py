"""Secure aggregation of a round's training updates with Flower's SecAgg+ (`privacy.secagg = true`).

Flower 1.41's SecAgg+ exists on the legacy path only: `SecAggPlusWorkflow` (server) drives the four-stage
protocol (setup, share keys, collect masked vectors, unmask) through a `LegacyContext` and a legacy
`flwr.server.strategy` strategy's `configure_fit` / `aggregate_fit`, and `secaggplus_mod` (client) reads
the app's reply in the legacy FitRes layout. Both run beside the Message-API code of the same version.

Why the workflow is driven once per round from the schedule (`FlowerExecutor.train` -> `train_round`)
rather than by a separate legacy ServerApp (`DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`): a
TED round sends more than a `FitIns` can carry (the stage's teacher, importances and SKA probes), and the
schedule (stages, retention, evaluation, checkpoints, resume, faults, byte counts) stays the one the plain
path runs; only the aggregation of the training clients' updates changes. `SecureRound` writes the two
state records the workflow reads (`config` with `current_round`, and `parameters`), hands it a Grid view
(`RoundGrid`) that adds the round's TED records to the masked-vector stage's train messages and reports
every message to the executor's byte counts and audit, and a legacy FedAvg (`RoundFedAvg`) whose
`configure_fit` names the round's nodes (no client-manager thread: the round's nodes are known, so
`start_update_client_manager_thread`, an internal Flower helper that polls the Grid, is not needed).

What is summed: clients send UPDATES (local minus the round's global float weights), not weights, since
Flower quantises each value after clipping it to +-`privacy.secagg_clipping_range`. Flower weights by
examples itself: a client uploads [q(r), q(r x update)] with r = num_examples / max_weight, and the server
divides the unmasked sum by the summed q(r); `max_weight` is the round's largest training split, so r <= 1
and the largest client's update keeps the full precision. Quantisation error of the secure mean, per
coordinate: at most n x step / sum(r) with step = 2 x clipping_range / quantization_range (stochastic
rounding: within one step per client; 3.8e-6 at the defaults, n equal clients). Integer buffers (batch
norm's counters) keep the round's global value. Under client-level DP every client counts once (r = 1),
the clients clip (Flower's `fixedclipping_mod`, ted_fl.federated.dp.client_mod, before masking) and the
legacy `DifferentialPrivacyClientSideFixedClipping` adds noise to the unmasked mean, as Flower's
`examples/fl-dp-sa` does. What SecAgg+ does not hide: the train metrics and the number of examples in
the FitRes layout (as in the plain path), and which clients took part.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy  # what the workflow hands aggregate_fit back
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from ted_fl.config import SECAGG_MODULUS, ExperimentConfig, PrivacyConfig
from ted_fl.continual.weights import Weights
from ted_fl.errors import TedFlError
from ted_fl.federated import messages as M
from ted_fl.federated.message_log import record_message
from ted_fl.privacy.mechanisms import client_noise_multiplier
from ted_fl.schedule.engine import TrainResult, TrainTask

MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD = "config", "parameters"  # flwr.server.workflow.constant (what it reads)
FIT_INS = ("fitins.parameters", "fitins.config")  # compat.fitins_to_recorddict's records, replaced by TED's
CLIPPED_KEY = "secagg_clipped"  # share of the update's values clipped to the clipping range (client metric)
Observer = Callable[[str, int, str, RecordDict], None]  # (stage, node, "down" | "up", content)
Send = Callable[[Grid, list[Message], float], list[Message]]


def float_keys(weights: Weights | ArrayRecord) -> list[str]:
    """The arrays SecAgg+ sums, in the record's order: the floating ones (integer buffers stay global)."""
    items = weights.items()
    return [k for k, v in items if np.issubdtype(np.dtype(v.dtype) if isinstance(v.dtype, str) else v.dtype,
                                                 np.floating)]


# ------------------------------------------------------------------------------------------- server
class RoundFedAvg(FedAvg):
    """The legacy strategy the workflow calls: `configure_fit` names this round's nodes (the TED content
    is added by `RoundGrid`), `aggregate_fit` keeps what came back. Every result carries the workflow's
    unmasked weighted mean (it writes it into each FitRes), so that is the aggregate."""

    def __init__(self, proxies: list[ClientProxy]) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=2, min_evaluate_clients=0,
                         min_available_clients=2, accept_failures=True)
        self.proxies = proxies
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return [(p, FitIns(parameters, {})) for p in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:
        self.results, self.failures = list(results), list(failures)
        if not results:
            return None, {}
        return results[0][1].parameters, {}


class RoundGrid:
    """The Grid as the workflow sees it for one round: the masked-vector stage's train messages get the
    round's TED records (weights, config with what the strategy configured, teacher, probes) in place of
    the empty FitIns, and every message in both directions goes to `observe` (bytes, audit, tests)."""

    def __init__(self, grid: Grid, contents: dict[int, RecordDict], send: Send, observe: Observer | None,
                 timeout: float) -> None:
        self.grid, self.contents, self.send, self.observe, self.timeout = grid, contents, send, observe, timeout
        self.failed: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        stage_of: dict[int, str] = {}
        for m in msgs:
            node = m.metadata.dst_node_id
            configs = m.content[RECORD_KEY_CONFIGS]
            stage = str(configs.get(Key.STAGE, Stage.SETUP))
            stage_of[node] = stage
            if stage == Stage.COLLECT_MASKED_VECTORS:
                ins = m.content.get("fitins.config")
                for name in FIT_INS:
                    if name in m.content:
                        del m.content[name]
                for name, rec in self.contents[node].items():
                    m.content[name] = rec
                for key, value in (ins or {}).items():  # e.g. the DP wrapper's clipping norm for the client's mod
                    m.content[M.CONFIG][key] = value
            if self.observe:
                self.observe(stage, node, "down", m.content)
        replies = self.send(self.grid, msgs, float(timeout if timeout is not None else self.timeout))
        answered = set()
        for r in replies:
            node = r.metadata.src_node_id
            answered.add(node)
            if r.has_error():
                self.failed[node] = f"{stage_of.get(node, '?')}: {r.error.reason}"
            elif self.observe:
                self.observe(stage_of.get(node, "?"), node, "up", r.content)
        for node, stage in stage_of.items():
            if node not in answered:
                self.failed.setdefault(node, f"{stage}: no reply within {self.timeout:g} s")
        return replies


@dataclass
class RoundOutcome:
    """What one secure round gave the server: the examples-weighted mean update (None: the protocol
    halted), and per node that took part to the end its FitRes (metrics, examples); failures by node."""

    mean_update: list[np.ndarray] | None
    results: dict[int, FitRes] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    noise_multiplier: float = 0.0
    seconds: float = 0.0


class _QuietProtocol(logging.Filter):
    """Drops the INFO lines Flower's SecAgg+ workflow and legacy DP wrapper log every round (the executor
    reports the round); their warnings and errors still show. A filter, not a level: schedules of one
    simulation run rounds in several threads."""

    SOURCES = ("secure_aggregation", "dp_fixed_clipping")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(s in record.pathname for s in self.SOURCES)


_QUIET = _QuietProtocol()


class SecureRound:
    """Runs Flower's SecAggPlusWorkflow for one round of the schedule over the round's nodes."""

    def __init__(self, grid: Grid, privacy: PrivacyConfig, timeout: float, send: Send | None = None,
                 observe: Observer | None = None) -> None:
        flwr_log = logging.getLogger("flwr")
        if _QUIET not in flwr_log.filters:
            flwr_log.addFilter(_QUIET)
        self.grid, self.privacy, self.timeout, self.observe = grid, privacy, timeout, observe
        self.send: Send = send or (lambda g, ms, t: list(g.send_and_receive(ms, timeout=t)))
        self.count = 0  # rounds run: the workflow's current_round (the messages' group id)

    def workflow(self, max_weight: float) -> SecAggPlusWorkflow:
        p = self.privacy
        try:
            return SecAggPlusWorkflow(int(p.secagg_shares), int(p.secagg_reconstruction_threshold),
                                      max_weight=float(max_weight), clipping_range=float(p.secagg_clipping_range),
                                      quantization_range=int(p.secagg_quantization_range),
                                      modulus_range=SECAGG_MODULUS, timeout=self.timeout)
        except (TypeError, ValueError) as e:  # ted_fl.privacy.checks refuses these first; a run never gets here
            raise TedFlError(f"privacy.secagg_*: Flower's SecAgg+ rejects the settings: {e}; see docs/privacy.md") from None

    def run(self, contents: dict[int, RecordDict], max_weight: float, dp_clients: int = 0,
            sigma: float = 0.0) -> RoundOutcome:
        """One secure aggregation of the updates of `contents`' nodes. `dp_clients` > 0: central DP over that
        many clients at noise multiplier `sigma` (Flower's legacy client-side fixed-clipping wrapper)."""
        if len(contents) < 2:
            raise TedFlError(f"privacy.secagg = true: a round with {len(contents)} training client(s) has no sum to "
                             "hide an update in; set federated.clients_per_site = 2 or more")
        levels = len(contents) * int(self.privacy.secagg_quantization_range)
        if levels >= SECAGG_MODULUS:  # the unmasked sum would wrap around Flower's modulus
            raise TedFlError(f"privacy.secagg_quantization_range = {self.privacy.secagg_quantization_range} with "
                             f"{len(contents)} clients in a round overflows Flower's modulus 2**32; lower it")
        self.count += 1
        run_id = int(getattr(getattr(self.grid, "run", None), "run_id", 0) or 0)
        grid = RoundGrid(self.grid, contents, self.send, self.observe, self.timeout)
        inner = RoundFedAvg([GridClientProxy(n, self.grid, run_id) for n in contents])
        strategy: Strategy = inner
        if dp_clients:
            strategy = DifferentialPrivacyClientSideFixedClipping(inner, float(sigma), float(self.privacy.clip_norm),
                                                                  int(dp_clients))
        context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                                        run_config={}), strategy=strategy)
        # The two records SecAggPlusWorkflow reads (DefaultWorkflow writes them in Flower's own loop); the round's
        # weights travel in the TED train record, so the legacy parameters record is empty.
        context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": self.count})
        context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
        start = time.perf_counter()
        self.workflow(max_weight)(grid, context)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        results = {int(proxy.node_id): res for proxy, res in inner.results}  # type: ignore[attr-defined]
        mean = None
        if inner.results and MAIN_PARAMS_RECORD in context.state and len(context.state[MAIN_PARAMS_RECORD]):
            # the strategy's (noised, under DP) aggregate, written back by the workflow
            mean = parameters_to_ndarrays(compat.arrayrecord_to_parameters(context.state[MAIN_PARAMS_RECORD], True))
        failed = {n: r for n, r in grid.failed.items() if n not in results}
        return RoundOutcome(mean, results, failed, float(sigma) if dp_clients else 0.0, seconds)


def countable(content: RecordDict) -> RecordDict:
    """`content` with the protocol's empty lists left out (e.g. no dead nodes): Flower 1.41's
    ConfigRecord.count_bytes fails on an empty list; they carry no payload bytes."""
    out = RecordDict()
    for name, rec in content.items():
        if isinstance(rec, ConfigRecord):
            rec = ConfigRecord({k: v for k, v in rec.items() if not (isinstance(v, list) and not v)})
        out[name] = rec
    return out


def apply_update(weights: Weights, mean_update: list[np.ndarray]) -> Weights:
    """The round's global weights plus the securely aggregated mean update (float arrays, in
    `float_keys` order); integer buffers keep their global value."""
    keys = float_keys(weights)
    if len(keys) != len(mean_update):
        raise RuntimeError(f"secure aggregate has {len(mean_update)} arrays, the model {len(keys)} float ones")
    out = dict(weights)
    for k, u in zip(keys, mean_update, strict=True):
        out[k] = (weights[k].astype(np.float64) + np.asarray(u, np.float64).reshape(weights[k].shape)).astype(
            weights[k].dtype)
    return out


def train_round(executor: Any, task: TrainTask, contents: dict[int, RecordDict],
                trainers: list[tuple[str, int, int]], send: Send) -> list[TrainResult]:
    """`FlowerExecutor.train` under privacy.secagg: the round's training clients' updates are aggregated
    by SecAgg+; every client's TrainResult carries the round's new global weights (the server never has a
    client's own), and the executor's `aggregate` returns them."""
    cfg: ExperimentConfig = executor.cfg
    t = executor.transport  # ted_fl.federated.transport.Transport: byte counts, audit, faults
    p = cfg.privacy
    rounder: SecureRound | None = getattr(executor, "_secure", None)
    if rounder is None:
        def observe(stage: str, node: int, direction: str, content: RecordDict) -> None:
            kind = "train" if stage == Stage.COLLECT_MASKED_VECTORS else "secagg"
            content = countable(content)
            t.count(kind, M.record_bytes(content), up=direction == "up")
            if node in t.site_of:
                record_message(t.audit, t.site_of[node][0], kind, direction, content)
        rounder = SecureRound(executor.grid, p, float(cfg.federated.timeout), send, observe)
        executor._secure = rounder
    sizes = {node: n for s in task.sites for node, _, n in executor.nodes[s]}
    client_dp = p.dp == "client"
    sigma, dp_clients = 0.0, 0
    if client_dp:
        sigma = client_noise_multiplier(float(p.epsilon), float(p.delta), task.stage_rounds)
        for content in contents.values():
            content[M.CONFIG]["dp_noise_multiplier"] = float(sigma)  # LocalDpMod's noise (noise = "client")
        dp_clients = len(contents) if p.noise == "server" else 0
    max_weight = 1.0 if client_dp else float(max(sizes[n] for n in contents))
    weights = M.from_record(next(iter(contents.values()))[M.WEIGHTS])
    out = rounder.run(contents, max_weight, dp_clients, sigma)
    where = f"in stage {task.stage} round {task.round}"
    for node, reason in out.failed.items():
        t.note(f"{t.label(node)} dropped out of secure aggregation {where}: {reason}")
        t.faults.append(dict(site=t.site(node), node=node, label=t.label(node),
                                    where=where, type="train.secagg", attempt=1, reason=reason,
                                    outcome="unrecovered"))
    if out.mean_update is None:
        raise TedFlError(f"secure aggregation halted {where}: {len(out.results)} of {len(contents)} clients "
                         f"completed it (privacy.secagg_reconstruction_threshold = {p.secagg_reconstruction_threshold}"
                         + ("; client-level DP needs every client's update" if dp_clients else "")
                         + "); see federated.timeout, federated.on_failure")
    clipped = max((float(r.metrics.get(CLIPPED_KEY, 0.0)) for r in out.results.values()), default=0.0)
    if clipped > 0:
        t.note(f"secure aggregation {where}: {clipped:.2%} of a client's update values exceeded "
                       f"privacy.secagg_clipping_range = {p.secagg_clipping_range:g} and were clipped; raise it")
    executor._aggregated = apply_update(weights, out.mean_update)
    for node in out.results:  # as FlowerExecutor._exchange_train: the stage's teacher travels once per node
        if contents[node][M.CONFIG].get("teacher_key"):
            executor.teacher_sent[node] = str(contents[node][M.CONFIG]["teacher_key"])
    results = []
    for site, node, client in trainers:
        if node not in out.results:
            continue
        res = out.results[node]
        metrics = {k: float(v) for k, v in res.metrics.items()}  # type: ignore[arg-type]
        n = int(metrics.pop("num_examples", res.num_examples))
        if client_dp:
            metrics.update({"dp_noise_multiplier": float(sigma), "dp_sample_rate": 1.0, "dp_steps": 1.0})
        results.append(TrainResult(site, client, executor._aggregated, n, metrics, None))
    return results


# ------------------------------------------------------------------------------------------- client
def fitres_content(sent: Weights, reply: RecordDict, uniform: bool, state: ConfigRecord | None) -> RecordDict:
    """The app's train reply in the FitRes layout secaggplus_mod reads: the update (reply weights minus the
    weights the server sent, float arrays) and the number of examples Flower weights it by (1 each under
    client-level DP, whose noise assumes a plain mean); the real count and the metrics stay metrics."""
    local = M.from_record(reply[M.WEIGHTS])
    keys = float_keys(sent)
    update = [local[k].astype(np.float64) - sent[k].astype(np.float64) for k in keys]
    metrics: dict[str, Any] = {k: float(v) for k, v in dict(reply[M.METRICS]).items()}  # type: ignore[arg-type]
    n = int(metrics["num_examples"])
    weight = 1 if uniform else n
    if state is not None and "clipping_range" in state and "max_weight" in state:
        bound = float(state["clipping_range"]) * float(state["max_weight"]) / weight  # type: ignore[arg-type]
        total = sum(u.size for u in update) or 1
        metrics[CLIPPED_KEY] = float(sum(int((np.abs(u) > bound).sum()) for u in update)) / total
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), weight, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def client_mod(cfg: ExperimentConfig, msg: Message, ctx: Context, call_next: Any) -> Message:
    """privacy.secagg on a client: Flower's `secaggplus_mod` answers the protocol's stages; in the
    masked-vector stage it calls the app (behind the privacy mod, which clips under DP) and masks the
    update `fitres_content` derives from the reply. A train message outside the protocol is refused:
    this client's update never leaves it unmasked."""
    if RECORD_KEY_CONFIGS not in msg.content:
        raise RuntimeError("privacy.secagg = true: a train message outside a SecAgg+ round; this client sends "
                           "its update only masked")
    uniform = cfg.privacy.dp == "client"

    def app(m: Message, c: Context) -> Message:
        sent = M.from_record(m.content[M.WEIGHTS])
        out = call_next(m, c)
        if out.has_error():
            raise RuntimeError(out.error.reason)
        state = c.state.config_records.get(RECORD_KEY_STATE)
        return Message(fitres_content(sent, out.content, uniform, state), reply_to=m)

    return secaggplus_mod(msg, ctx, app)
