"""Client-level differential privacy with Flower 1.41's own Message-API pieces (thin adapters).

Server: one of `flwr.serverapp.strategy.DifferentialPrivacy{ClientSide,ServerSide}{Fixed,Adaptive}Clipping`
wraps `StageFedAvg`, a FedAvg over the messages `FlowerExecutor` built for one round of one stage (the
arriving site's nodes, and any retained ones), aggregating them uniformly (the wrappers' noise std
sigma * clip / n assumes a plain mean). Client: `fixedclipping_mod` / `adaptiveclipping_mod` (clip_on =
"client") or `LocalDpMod` (noise = "client") run on the train message's weights.

Flower's mods require exactly one ArrayRecord and one ConfigRecord in the incoming message, but a TED train
message also carries the teacher, importances and probes; `client_mod` therefore hands the mod a view with
only the weights and the config, and lets the real message through to the app. The strategies keep their
state (adaptive clip norm) per approach, seed and stage; they do not account (Flower's optional
accountant needs Google's dp-accounting, and equal weights): ted-fl accounts with Opacus' RDP accountant
(`ted_fl.continual.privacy.epsilon_spent`) from the noise multiplier and rounds reported per result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from ted_fl.config import PrivacyConfig
from ted_fl.continual.privacy import client_noise_multiplier
from ted_fl.federated import messages as M

WEIGHT_KEY = "dp_weight"  # every client counts once in the DP mean (set by the server on each reply)

STRATEGIES = {
    ("client", "fixed"): DifferentialPrivacyClientSideFixedClipping,
    ("client", "adaptive"): DifferentialPrivacyClientSideAdaptiveClipping,
    ("server", "fixed"): DifferentialPrivacyServerSideFixedClipping,
    ("server", "adaptive"): DifferentialPrivacyServerSideAdaptiveClipping,
}


class StageFedAvg(FedAvg):
    """FedAvg over the executor's own messages of one round: no node sampling, uniform weights."""

    def __init__(self) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_evaluate_nodes=1,
                         min_available_nodes=1, weighted_by_key=WEIGHT_KEY, arrayrecord_key=M.WEIGHTS,
                         configrecord_key=M.CONFIG)
        self.contents: dict[int, RecordDict] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Put what the DP wrapper added to `config` (the clipping norm) into the executor's messages, which
        the executor sends itself (with its retries and byte counts): nothing to return."""
        for content in self.contents.values():
            for key, value in config.items():
                content[M.CONFIG][key] = value
        return []


def make_strategy(privacy: PrivacyConfig, n_clients: int, stage_rounds: int) -> tuple[Strategy | None, float]:
    """(the DP strategy wrapper, or None for local DP; sigma) for one stage of `n_clients` clients."""
    sigma = client_noise_multiplier(float(privacy.epsilon), float(privacy.delta), stage_rounds)
    if privacy.noise == "client":
        return None, sigma
    cls = STRATEGIES[(privacy.clip_on, privacy.clipping)]
    if privacy.clipping == "adaptive":
        return cls(StageFedAvg(), sigma, n_clients, initial_clipping_norm=float(privacy.clip_norm)), sigma
    return cls(StageFedAvg(), sigma, float(privacy.clip_norm), n_clients), sigma


def configure(strategy: Strategy | None, server_round: int, weights: ArrayRecord,
              contents: dict[int, RecordDict], sigma: float) -> None:
    """Let the wrapper configure the round's messages in place (e.g. the clipping norm for the mods)."""
    for content in contents.values():
        content[M.CONFIG]["dp_noise_multiplier"] = float(sigma)  # LocalDpMod's noise (noise = "client")
    if strategy is None:
        return
    inner: StageFedAvg = strategy.strategy  # type: ignore[attr-defined]
    inner.contents = contents
    strategy.configure_train(server_round, weights, ConfigRecord({}), None)  # type: ignore[arg-type]


def aggregate(strategy: Strategy | None, server_round: int, replies: list[Message]) -> ArrayRecord:
    """The noised mean of the replies' weights (central DP), or their plain mean (local DP: already noised)."""
    for r in replies:
        r.content[M.METRICS][WEIGHT_KEY] = 1.0
    if strategy is None:
        arrays, _ = StageFedAvg().aggregate_train(server_round, replies)
    else:
        arrays, _ = strategy.aggregate_train(server_round, replies)
    if arrays is None:
        raise RuntimeError("client-level DP aggregation failed (a reply was missing or inconsistent)")
    return arrays


# ------------------------------------------------------------------------------------ client
def client_mod(privacy: PrivacyConfig, msg: Message, ctx: Context, call_next: Any) -> Message:
    """Run Flower's client-side DP mod on the train message's weights (see the module docstring)."""
    from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod

    full = msg.content
    view = RecordDict({M.WEIGHTS: full[M.WEIGHTS], M.CONFIG: full[M.CONFIG]})

    def app(m: Message, c: Context) -> Message:  # the mod has read the weights it clips against: run the app
        m.content = full
        return call_next(m, c)

    if privacy.noise == "client":
        # Gaussian noise of std sensitivity * sqrt(2 ln(1.25 / delta)) / eps: with sensitivity 2 * clip (any
        # change of the client's data moves its clipped update by <= 2 clip) and eps chosen so that the std
        # is 2 * sigma * clip, each release is the Gaussian mechanism at noise multiplier sigma.
        sigma = float(msg.content[M.CONFIG]["dp_noise_multiplier"])
        eps = math.sqrt(2 * math.log(1.25 / privacy.delta)) / sigma if sigma > 0 else math.inf
        clip = float(privacy.clip_norm)
        mod: Any = LocalDpMod(clipping_norm=clip, sensitivity=2 * clip if sigma > 0 else 0.0,
                              epsilon=eps if math.isfinite(eps) else 1.0, delta=privacy.delta)
    elif privacy.clip_on == "server":
        return call_next(msg, ctx)  # the server's wrapper clips
    else:
        mod = adaptiveclipping_mod if privacy.clipping == "adaptive" else fixedclipping_mod
    msg.content = view  # the mod sees one ArrayRecord and one ConfigRecord (a Message needs a run to be built)
    try:
        out = mod(msg, ctx, app)
    finally:
        msg.content = full
    if out.has_error():
        raise RuntimeError(out.error.reason)
    return out


def reply_metrics(sigma: float) -> MetricRecord:
    """The accounting inputs of one client-level release (one round): sigma, q = 1, one step."""
    return MetricRecord({"dp_noise_multiplier": float(sigma), "dp_sample_rate": 1.0, "dp_steps": 1.0})
