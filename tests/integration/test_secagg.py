"""SecAgg+ (privacy.secagg): Flower's protocol between the production client mods and `SecureRound`, over an
in-process Grid (real keys, shares and masks; no Ray: seconds). The secure mean is FedAvg's within the stated
quantisation error; a client dropped within the threshold still lets the round finish; the server receives
masked vectors and the sum only; under client-level DP the clients clip and the server noises the sum."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from ted_fl.config import ExperimentConfig, dump_toml, set_key, to_dict
from ted_fl.errors import TedFlError
from ted_fl.federated import client_app as production
from ted_fl.federated import messages as M
from ted_fl.federated import secagg
from ted_fl.federated.message_log import audit_mod
from tests.integration.simulation_helpers import run_dir_of, simulate, write_config

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # Messages outside a running app

GLOBAL = {"conv.w": np.linspace(-1, 1, 60, dtype=np.float32).reshape(3, 4, 5), "conv.b": np.zeros(7, np.float32),
          "bn.num_batches_tracked": np.array(5, dtype=np.int64)}
EXAMPLES = {11: 30, 12: 50, 13: 20}  # node -> training examples (FedAvg's weights)


def _updates() -> dict[int, dict[str, np.ndarray]]:
    g = np.random.default_rng(7)
    return {n: {k: (0.05 * g.standard_normal(v.shape)).astype(np.float32) for k, v in GLOBAL.items()
                if v.dtype.kind == "f"} for n in EXAMPLES}


UPDATES = _updates()


def _config(**privacy: object) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.federated.clients_per_site = 3
    set_key(cfg, "privacy.secagg", True)
    for k, v in privacy.items():
        set_key(cfg, f"privacy.{k}", v)
    return cfg


def _client(drop: int | None = None, scale: float = 1.0) -> ClientApp:
    """The production mods around a train handler whose local weights are the global ones plus a known update."""
    app = ClientApp(mods=[audit_mod, production.secure_mod, production.privacy_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        if node == drop:
            raise RuntimeError("injected dropout")
        sent = M.from_record(msg.content[M.WEIGHTS])
        local = {k: (v + scale * UPDATES[node][k] if k in UPDATES[node] else v + 20) for k, v in sent.items()}
        return Message(RecordDict({M.WEIGHTS: M.to_record(local),
                                   M.METRICS: MetricRecord({"num_examples": EXAMPLES[node], "total": 0.5})}),
                       reply_to=msg)

    return app


class LoopbackGrid(Grid):
    """Flower's Grid over in-process nodes: every message is copied (as a transport would), handled by the
    node's ClientApp, and an exception becomes an error reply (as Flower's simulation reports it)."""

    def __init__(self, app: ClientApp, cfg: ExperimentConfig) -> None:
        toml = dump_toml(to_dict(cfg))
        self.app, self.replies = app, {}
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(
            {"experiment": ConfigRecord({"toml": toml})}), run_config={}) for n in EXAMPLES}

    def set_run(self, run: object) -> None: ...

    @property
    def run(self) -> None:  # type: ignore[override]
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:  # type: ignore[override]
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(EXAMPLES)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())
            sent = copy.deepcopy(msg)
            try:
                self.replies[mid] = self.app(sent, self.contexts[msg.metadata.dst_node_id])
            except Exception as e:  # noqa: BLE001 (the client's failure is the reply)
                self.replies[mid] = Message(Error(code=0, reason=str(e)), reply_to=sent)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _round(cfg: ExperimentConfig, drop: int | None = None, scale: float = 1.0,
           nodes: Iterable[int] = tuple(EXAMPLES), weights: dict | None = None) -> tuple[secagg.RoundOutcome, list[tuple]]:
    seen: list[tuple] = []
    rounder = secagg.SecureRound(LoopbackGrid(_client(drop, scale), cfg), cfg.privacy, 5.0,
                                 observe=lambda *a: seen.append((a[0], a[1], a[2], copy.deepcopy(a[3]))))
    contents = {n: RecordDict({M.WEIGHTS: M.to_record(weights or GLOBAL), M.CONFIG: ConfigRecord({"round": 0})})
                for n in nodes}
    dp = cfg.privacy.dp == "client"
    sigma = 1.0 if dp else 0.0
    out = rounder.run(contents, 1.0 if dp else max(EXAMPLES[n] for n in contents), len(contents) if dp else 0,
                      sigma)
    return out, seen


def _fedavg(nodes: Iterable[int], scale: float = 1.0) -> list[np.ndarray]:
    nodes = list(nodes)
    total = sum(EXAMPLES[n] for n in nodes)
    return [sum(scale * UPDATES[n][k].astype(np.float64) * EXAMPLES[n] / total for n in nodes)
            for k in secagg.float_keys(GLOBAL)]


def _bound(cfg: ExperimentConfig, nodes: Iterable[int]) -> float:
    """The stated error: n x step / sum(r), step = 2 clipping_range / quantization_range, r = n_i / max_weight
    (the largest training split of the round's clients, the dropped one included)."""
    p, nodes = cfg.privacy, list(nodes)
    step = 2 * p.secagg_clipping_range / p.secagg_quantization_range
    r = [EXAMPLES[n] / max(EXAMPLES.values()) for n in nodes]
    return len(nodes) * step / sum(r)


def test_secure_mean_is_fedavg_within_the_quantisation_error() -> None:
    cfg = _config()
    out, _ = _round(cfg)
    assert out.mean_update is not None and set(out.results) == set(EXAMPLES) and not out.failed
    bound = _bound(cfg, EXAMPLES)
    for got, want in zip(out.mean_update, _fedavg(EXAMPLES), strict=True):
        err = np.abs(got.reshape(want.shape) - want).max()
        assert err <= bound, (err, bound)
    # the unweighted mean differs by far more than the bound: the test sees the examples' weighting
    plain = [np.mean([UPDATES[n][k] for n in EXAMPLES], axis=0) for k in secagg.float_keys(GLOBAL)]
    assert max(np.abs(g.reshape(p.shape) - p).max() for g, p in zip(out.mean_update, plain, strict=True)) > 100 * bound
    new = secagg.apply_update(GLOBAL, out.mean_update)
    assert new["bn.num_batches_tracked"] == GLOBAL["bn.num_batches_tracked"]  # integer buffers stay global
    assert all(r.metrics[secagg.CLIPPED_KEY] == 0.0 for r in out.results.values())


def test_a_dropped_client_within_the_threshold_lets_the_round_finish() -> None:
    cfg = _config()
    out, _ = _round(cfg, drop=12)
    assert set(out.results) == {11, 13} and set(out.failed) == {12} and "injected dropout" in out.failed[12]
    for got, want in zip(out.mean_update, _fedavg([11, 13]), strict=True):  # type: ignore[arg-type]
        assert np.abs(got.reshape(want.shape) - want).max() <= _bound(cfg, [11, 13])


def test_the_server_receives_masked_vectors_and_the_sum_only() -> None:
    cfg = _config()
    out, seen = _round(cfg)
    ups = [(stage, node, content) for stage, node, d, content in seen if d == "up"]
    assert {s for s, _, _ in ups} == {Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK}
    p = cfg.privacy
    step = 2 * p.secagg_clipping_range / p.secagg_quantization_range
    masked = []
    for stage, _node, content in ups:
        for rec in content.array_records.values():
            assert len(rec) == 0  # no array reaches the server in the clear (FitRes' parameters are emptied)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            vec = [bytes_to_ndarray(b) for b in content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
            masked.append(np.concatenate([v.ravel() for v in vec[1:]]).astype(np.float64))
    assert len(masked) == len(EXAMPLES)
    mx = max(EXAMPLES.values())
    for vec in masked:  # read as if unmasked, it is no client's update (nor close to one)
        for n, upd in UPDATES.items():
            true = np.concatenate([upd[k].ravel() for k in secagg.float_keys(GLOBAL)]) * EXAMPLES[n] / mx
            as_update = vec * step - p.secagg_clipping_range
            assert np.abs(as_update - true).max() > 1.0
            assert abs(np.corrcoef(as_update, true)[0, 1]) < 0.5
    # what the server can read is the sum: its mean is FedAvg's
    want = np.concatenate([w.ravel() for w in _fedavg(EXAMPLES)])
    got = np.concatenate([g.ravel() for g in out.mean_update])  # type: ignore[union-attr]
    assert np.abs(got - want).max() <= _bound(cfg, EXAMPLES)


def test_client_dp_clips_on_the_client_and_noises_the_sum() -> None:
    """fl-dp-sa's combination: fixedclipping_mod before masking (norm 0.01 here clips every update), the legacy
    DifferentialPrivacyClientSideFixedClipping adds N(0, (sigma clip / n)^2) to the unmasked plain mean."""
    cfg = _config(dp="client", epsilon=4.0, clip_norm=0.01)
    np.random.seed(0)
    floats = {k: v for k, v in GLOBAL.items() if v.dtype.kind == "f"}  # DP runs group norm: no integer buffers
    out, seen = _round(cfg, weights=floats)
    assert out.mean_update is not None and out.noise_multiplier == 1.0
    downs = [c for s, _, d, c in seen if d == "down" and s == Stage.COLLECT_MASKED_VECTORS]
    assert all(float(c[M.CONFIG]["clipping_norm"]) == 0.01 for c in downs)  # the wrapper's norm reached the mods
    clipped = []
    for n in EXAMPLES:
        u = np.concatenate([UPDATES[n][k].ravel() for k in secagg.float_keys(GLOBAL)]).astype(np.float64)
        clipped.append(u * min(1.0, 0.01 / np.linalg.norm(u)))
    mean = np.mean(clipped, axis=0)  # every client counts once under DP
    got = np.concatenate([g.ravel() for g in out.mean_update])
    noise = got - mean
    std = 1.0 * 0.01 / len(EXAMPLES)
    assert 0.7 * std < noise.std() < 1.3 * std  # the noise has the calibrated std (67 values)


def test_updates_beyond_the_clipping_range_are_reported() -> None:
    cfg = _config(secagg_clipping_range=0.01)
    out, _ = _round(cfg)
    assert max(r.metrics[secagg.CLIPPED_KEY] for r in out.results.values()) > 0.1


def test_a_round_of_one_client_is_refused() -> None:
    with pytest.raises(TedFlError, match="federated.clients_per_site"):
        _round(_config(), nodes=[11])


def test_a_plain_train_message_is_refused_by_a_secagg_client() -> None:
    cfg = _config()
    grid = LoopbackGrid(_client(), cfg)
    msg = Message(RecordDict({M.WEIGHTS: M.to_record(GLOBAL), M.CONFIG: ConfigRecord({"round": 0})}),
                  dst_node_id=11, message_type="train")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "outside a SecAgg+ round" in reply.error.reason


def test_the_audit_stops_a_masked_vector_that_is_not_model_shaped() -> None:
    """The client's audit reads SecAgg+'s reply: only protocol keys, a masked vector of the model's float shapes."""
    from flwr.common import ndarray_to_bytes

    from ted_fl.federated.message_log import secagg_violations

    shapes = {tuple(v.shape) for v in GLOBAL.values()}
    good = [ndarray_to_bytes(np.array([3]))] + [ndarray_to_bytes(np.zeros(v.shape, np.int64)) for v in GLOBAL.values()]
    assert secagg_violations(RECORD_KEY_CONFIGS, ConfigRecord({Key.MASKED_PARAMETERS: good}), shapes) == []
    image = good + [ndarray_to_bytes(np.zeros((64, 64), np.int64))]
    assert secagg_violations(RECORD_KEY_CONFIGS, ConfigRecord({Key.MASKED_PARAMETERS: image}), shapes)
    assert secagg_violations(RECORD_KEY_CONFIGS, ConfigRecord({"pixels": b"x"}), shapes)
    assert secagg_violations("fitres.metrics", ConfigRecord({"loss": 0.5}), shapes) == []
    assert secagg_violations("fitres.metrics", ConfigRecord({"img": [b"x"]}), shapes)


@pytest.mark.slow
def test_simulate_with_secagg_and_client_dp(tmp_path: Path) -> None:
    """End to end in Flower's simulation: 2 sites x 2 clients, client-level DP over SecAgg+ (fl-dp-sa's way);
    the epsilon is accounted as without SecAgg+, the audit shows no update leaving a client unmasked, and
    the teacher still travels once per node and stage."""
    cfg_path = write_config(tmp_path, data__order=["RUNMC", "BMC"])  # 2 sites x 2 clients: 4 SuperNodes
    proc = simulate("--config", str(cfg_path), "--approach", "kd", "--set", "federated.clients_per_site=2",
                    "--set", "privacy.secagg=true", "--set", 'privacy.dp="client"', "--set", "privacy.epsilon=8",
                    "--set", "train.rounds=2", "--set", "train.steps_per_round=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = run_dir_of(proc.stdout)
    assert 7.5 < float(run.summary()["epsilon"].iloc[0]) <= 8.1
    audit = pd.read_csv(run.path / "audit.csv")
    up = audit[(audit["kind"] == "train") & (audit["direction"] == "up")]
    assert set(up["record"]) == {"secaggplus_configs", "fitres.metrics", "fitres.num_examples", "fitres.parameters",
                                 "fitres.status"}
    assert (up[up["record"] == "fitres.parameters"]["bytes"] == 0).all()  # the update left in the masked vector
    assert {"train", "secagg"} <= set(audit["kind"])
    teacher = audit[(audit["kind"] == "train") & (audit["record"] == "teacher")]
    assert int(teacher["messages"].sum()) == 2  # once per node and stage (stage 2's 2 clients), not per round


def test_study_needs_federated_cells_for_secagg(tmp_path: Path) -> None:
    from ted_fl.studies.privacy_utility import study

    base = ExperimentConfig()
    base.federated.clients_per_site = 2
    with pytest.raises(TedFlError, match="add --federated"):
        study(base, [float("inf")], tmp_path / "s", grid={"privacy.secagg": [False, True]}, approaches=["seq"],
              seeds=[0], federated=False)
    assert not (tmp_path / "s").exists()


def test_round_costs_read_the_cells_time_and_comm_rows(tmp_path: Path) -> None:
    """rounds.csv: per round, the training call's wall time, the slowest client's work, their difference, KB."""
    from ted_fl.studies.grid import Cell
    from ted_fl.studies.privacy_utility import round_costs

    cell = Cell("seq", 0, {"privacy.secagg": True}, [], ExperimentConfig())
    (tmp_path / "cells" / cell.name).mkdir(parents=True)
    rows = []
    for rnd, (train_s, works, down, up) in enumerate([(2.0, (1.0, 1.5), 3000, 1000), (4.0, (3.0, 2.0), 5000, 3000)]):
        rows += [("seq", 0, 0, "A", rnd, "A", "time", "", "train_s", train_s),
                 ("seq", 0, 0, "A", rnd, "A", "comm", "", "bytes_down", down),
                 ("seq", 0, 0, "A", rnd, "A", "comm", "", "bytes_up", up)]
        rows += [("seq", 0, 0, "A", rnd, f"A/{k}", "time", "", "work_s", w) for k, w in enumerate(works)]
    rows.append(("seq", 0, -1, "init", -1, "A", "test", "mean", "dice", 0.1))
    cols = ["approach", "seed", "stage", "stage_site", "round", "site", "split", "label", "metric", "value"]
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "cells" / cell.name / "metrics.csv", index=False)
    (row,) = round_costs([cell], tmp_path).to_dict("records")
    assert row["rounds"] == 2 and row["train_s"] == 3.0 and row["work_s"] == 2.25
    assert row["overhead_s"] == pytest.approx(0.75) and row["kb_down"] == 4.0 and row["kb_up"] == 2.0
    assert row["privacy.secagg"] is True


def test_settings_flower_rejects_are_one_line_errors() -> None:
    """The config check refuses them first; should one reach the workflow, Flower's ValueError becomes one line."""
    cfg = _config(secagg_shares=3, secagg_reconstruction_threshold=3)
    with pytest.raises(TedFlError, match="privacy.secagg_.*rejects") as err:
        secagg.SecureRound(LoopbackGrid(_client(), cfg), cfg.privacy, 5.0).workflow(1.0)
    assert "\n" not in str(err.value)
