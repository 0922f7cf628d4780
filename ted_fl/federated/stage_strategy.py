"""The stage's aggregation as a Flower Message-API strategy (`flwr.serverapp.strategy`).

`configure_train` returns the round's train messages: the sites' orders, planned by
`ted_fl.schedule.orders.plan_round` and encoded by `ted_fl.federated.codec`, each with whatever a
wrapping strategy put into the round's `config` (Flower's `DifferentialPrivacy*Clipping` wrappers put
the clipping norm there, for the clients' mods). `aggregate_train` is the base strategy's own (FedAvg's
example- or uniform-weighted mean). So Flower's DP wrappers wrap it unchanged. The executor's transport
sends the messages (retries, fault counts, byte counts and audit) and hands the replies back.

Only the round's nodes are asked (the arriving site's and any retained ones): the strategy samples no
node itself. `stage_strategy(base)` builds the same strategy over another Flower base class (FedProx,
FedAdam, ...) for `federated.strategy`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from ted_fl.federated import messages as M

UNIFORM_KEY = "dp_weight"  # client-level DP: every client counts once in the mean (set on each reply here)
EXAMPLES_KEY = "num_examples"  # otherwise: FedAvg's weight, the example count every reply carries


class StageOrders:
    """The part of a stage strategy that is ted-fl's: the round's messages are the executor's orders."""

    def __init__(self, *args: Any, uniform: bool = False, **kwargs: Any) -> None:
        kwargs = {"fraction_train": 1.0, "min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1,
                  "weighted_by_key": UNIFORM_KEY if uniform else EXAMPLES_KEY, "arrayrecord_key": M.WEIGHTS,
                  "configrecord_key": M.CONFIG, **kwargs}
        super().__init__(*args, **kwargs)
        self.uniform = uniform
        self.orders: dict[int, RecordDict] = {}  # node -> the encoded order of the round being configured

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The round's encoded orders as train messages, with what a wrapper added to `config`."""
        messages = []
        for node, content in self.orders.items():
            order = content.config_records[M.CONFIG]
            for key, value in config.items():
                order[key] = value
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The base strategy's aggregation; under client-level DP every reply weighs the same (the
        wrappers' noise std sigma * clip / n assumes a plain mean)."""
        replies = list(replies)
        if self.uniform:
            for r in replies:
                r.content.metric_records[M.METRICS][UNIFORM_KEY] = 1.0
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


def stage_strategy(base: type[Strategy] = FedAvg, **kwargs: Any) -> Strategy:
    """A stage strategy over the Flower base class `base` (its keyword arguments in `kwargs`)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"Stage{base.__name__}", (StageOrders, base), {})
    return cls(**kwargs)


class StageStrategy(StageOrders, FedAvg):
    """FedAvg over the round's orders (the default stage strategy)."""


_CLASSES: dict[type[Strategy], type] = {FedAvg: StageStrategy}


def inner(strategy: Strategy) -> StageOrders:
    """The stage strategy inside any wrappers (Flower's wrappers keep the wrapped one as `.strategy`)."""
    s: Any = strategy
    while not isinstance(s, StageOrders):
        s = s.strategy
    return s
