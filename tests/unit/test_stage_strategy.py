"""The stage's aggregation is a Flower Message-API strategy: configure_train returns the round's encoded
orders (with what a wrapper adds), aggregate_train is FedAvg's, and Flower's DP wrappers wrap it as is."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from ted_fl.federated import messages as M
from ted_fl.federated.stage_strategy import StageOrders, StageStrategy, inner, stage_strategy

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # Messages outside a running app


def _orders() -> dict[int, RecordDict]:
    return {n: RecordDict({M.WEIGHTS: M.to_record({"w": np.zeros(2, np.float32)}),
                           M.CONFIG: ConfigRecord({"round": 0, "site_index": n})}) for n in (3, 5)}


def _reply(to: Message, w: float, n: int) -> Message:
    return Message(RecordDict({M.WEIGHTS: M.to_record({"w": np.full(2, w, np.float32)}),
                               M.METRICS: MetricRecord({"num_examples": n})}), reply_to=to)


def test_configure_train_returns_the_orders_as_they_are() -> None:
    s = StageStrategy()
    s.orders = _orders()
    msgs = list(s.configure_train(1, M.to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), None))  # type: ignore[arg-type]
    assert [m.metadata.dst_node_id for m in msgs] == [3, 5] and {m.metadata.message_type for m in msgs} == {"train"}
    assert [dict(m.content[M.CONFIG]) for m in msgs] == [{"round": 0, "site_index": 3}, {"round": 0, "site_index": 5}]


def test_flowers_dp_wrapper_wraps_it_unchanged() -> None:
    """The client-side clipping wrapper adds its clipping norm to every order (for the clients' mod)."""
    wrapped = DifferentialPrivacyClientSideFixedClipping(StageStrategy(uniform=True), 0.5, 1.5, 2)
    inner(wrapped).orders = _orders()
    msgs = list(wrapped.configure_train(1, M.to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), None))  # type: ignore[arg-type]
    assert all(float(m.content[M.CONFIG]["clipping_norm"]) == 1.5 for m in msgs)
    np.random.seed(0)
    arrays, _ = wrapped.aggregate_train(1, [_reply(msgs[0], 1.0, 10), _reply(msgs[1], 3.0, 30)])
    assert arrays is not None
    noise = M.from_record(arrays)["w"] - 2.0  # the uniform mean (not 2.5, the example-weighted one), plus noise
    assert 0 < np.abs(noise).max() < 5 * 0.5 * 1.5 / 2


def test_aggregate_train_is_fedavg() -> None:
    s = StageStrategy()
    s.orders = _orders()
    msgs = list(s.configure_train(1, M.to_record({"w": np.zeros(2, np.float32)}), ConfigRecord(), None))  # type: ignore[arg-type]
    arrays, _ = s.aggregate_train(1, [_reply(msgs[0], 1.0, 10), _reply(msgs[1], 3.0, 30)])
    assert arrays is not None and M.from_record(arrays)["w"] == pytest.approx([2.5, 2.5])  # (10 + 90) / 40
    u = StageStrategy(uniform=True)
    arrays, _ = u.aggregate_train(1, [_reply(msgs[0], 1.0, 10), _reply(msgs[1], 3.0, 30)])
    assert arrays is not None and M.from_record(arrays)["w"] == pytest.approx([2.0, 2.0])


def test_another_flower_base_class() -> None:
    s = stage_strategy(FedProx, proximal_mu=0.1)
    assert isinstance(s, FedProx) and isinstance(s, StageOrders) and type(s).__name__ == "StageFedProx"
    assert type(stage_strategy(FedProx)) is type(s) and type(stage_strategy()) is StageStrategy
    assert isinstance(stage_strategy(FedAvg), StageStrategy)
