"""Flower's own floor: what one exchange costs on the simulation engine when the client does nothing.

`python -m ted_fl.bench overhead` runs it beside the simulator and the bare loop, so the part of a
round's overhead that is Flower's (its message hand-over thread, polled every 0.1 s, and the Ray
actor call) is measured on the same engine, not assumed. A module of its own: `bench --help` must
not import Flower.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ted_fl.config import ExperimentConfig
from ted_fl.federated.simulation import launch

BUSY_S = 0.2  # the busy rows: the client works (sleeps) a seeded uniform 0..BUSY_S before it answers

# A bare ClientApp on the same engine: it echoes what it gets, nothing else (no data, no model),
# after sleeping the seconds its "busy" config asks for (a stand-in for a round's training).
floor_app = ClientApp()


@floor_app.query("echo")
def _echo(msg: Message, context: Context) -> Message:
    if "busy" in msg.content:
        time.sleep(float(msg.content["busy"]["s"]))  # type: ignore[arg-type]
    return Message(msg.content, reply_to=msg)


def _floor_serve(grid: Any, rounds: int, payload: Any) -> list[dict[str, Any]]:
    """The ServerApp of the floor: `rounds` exchanges of one message with one node, per variant."""
    from ted_fl.federated.server_app import send_and_receive

    deadline = time.monotonic() + 600
    while not list(grid.get_node_ids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    node = next(iter(grid.get_node_ids()))
    exchanges = {"Flower's Grid.send_and_receive (pull_interval 0.1 s)":
                 lambda m: list(grid.send_and_receive(m, timeout=600)),
                 "ted-fl's exchange (server_app.send_and_receive)": lambda m: send_and_receive(grid, m, 600)}
    busy = np.random.default_rng(0).uniform(0, BUSY_S, rounds + 1)

    def busy_content(i: int) -> RecordDict:
        return RecordDict({"busy": ConfigRecord({"s": float(busy[i])})})

    payloads = {"empty message": lambda i: RecordDict(), "the workload's weights, both ways": lambda i: payload(),
                f"empty, the client busy 0-{1000 * BUSY_S:.0f} ms (its work subtracted)": busy_content}
    rows = []
    for what, content in payloads.items():
        for name, exchange in exchanges.items():
            times = []
            for i in range(rounds + 1):  # the first exchange starts the actor: not counted
                t0 = time.perf_counter()
                (reply,) = exchange([Message(content(i), dst_node_id=node, message_type="query.echo")])
                times.append(time.perf_counter() - t0 - (float(busy[i]) if what.startswith("empty,") else 0.0))
                if reply.has_error():
                    raise RuntimeError(f"the floor's echo failed: {reply.error.reason}")
            rows.append(dict(payload=what, exchange=name, ms_median=1000 * float(np.median(times[1:])),
                             ms_mean=1000 * float(np.mean(times[1:])),
                             ms_p10=1000 * float(np.percentile(times[1:], 10)),
                             ms_p90=1000 * float(np.percentile(times[1:], 90))))
    return rows


def flower_floor(cfg: ExperimentConfig, rounds: int, engines: tuple[bool, ...] = (False, True)) -> pd.DataFrame:
    """What one exchange costs on Flower's simulation engine beside the client's work: the same
    `launch` (Ray, one ClientApp actor per core) as `simulate`, one node, messages that are empty,
    carry the workload's weights down and back, or ask the client to be busy a random 0-200 ms
    (as a round's training would be: the time the message waits for Flower's 0.1 s hand-over then
    varies as in a real run); with Flower's own engine, then with the `federated.fast_polling`
    patch; each with Flower's `send_and_receive` and with ted-fl's. Each row: the round trip as the
    ServerApp sees it, less the client's busy time (ms). `engines`: which of the two (False: Flower's
    own, True: the patch) to launch; `--quick` launches one, to keep the test suite short."""
    from ted_fl.continual.networks import build_model
    from ted_fl.continual.weights import model_weights
    from ted_fl.federated import messages as M

    weights = model_weights(build_model(cfg.model))

    def payload() -> RecordDict:
        return RecordDict({M.WEIGHTS: M.to_record(weights)})

    frames = []
    for fast in engines:
        c = copy.deepcopy(cfg)
        c.federated.fast_polling = fast
        rows = launch(c, floor_app, 1, lambda grid: _floor_serve(grid, rounds, payload))
        frames.append(pd.DataFrame(rows).assign(
            engine="federated.fast_polling (patched hand-over)" if fast else "Flower's own (hand-over polled every 0.1 s)"))
    df = pd.concat(frames, ignore_index=True)
    return df[["engine", "payload", "exchange", "ms_median", "ms_mean", "ms_p10", "ms_p90"]]

