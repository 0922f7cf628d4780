"""Client-level differential privacy with Flower 1.41's own Message-API pieces (thin adapters).

Server: one of `flwr.serverapp.strategy.DifferentialPrivacy{ClientSide,ServerSide}{Fixed,Adaptive}Clipping`
wraps the stage's strategy (`ted_fl.federated.stage_strategy.StageStrategy`, a FedAvg whose configure_train
returns the round's orders: the arriving site's nodes, and any retained ones), aggregating them uniformly
(the wrappers' noise std sigma * clip / n assumes a plain mean). Client: `fixedclipping_mod` / `adaptiveclipping_mod` (clip_on =
"client") or `LocalDpMod` (noise = "client") run on the train message's weights.

Flower's mods require exactly one ArrayRecord and one ConfigRecord in the incoming message, but a TED train
message also carries the teacher, importances and probes; `client_mod` therefore hands the mod a view with
only the weights and the config, and lets the real message through to the app. The strategies keep their
state (adaptive clip norm) per approach, seed and stage; they do not account (Flower's optional
accountant needs Google's dp-accounting, and equal weights): ted-fl accounts with Opacus' RDP accountant
(`ted_fl.privacy.mechanisms.epsilon_spent`) from the noise multiplier and rounds reported per result.

`StageDP` holds one stage's strategy for both executors and saves the adaptive clip norm with the checkpoint
(a resumed run goes on with the norm it had reached). `release` / `aggregate_weights` are the in-process
runner's client-level DP (centralized, sweeps; one client per site or joint group): the same strategy object
and Flower's own clipping and noise functions, applied to weight dicts instead of messages, in the order
the mods and wrappers apply them (tests/unit/test_privacy_client.py checks it against the message path).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import (
    adaptive_clip_inputs_inplace,
    add_gaussian_noise_inplace,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
    compute_stdv,
)

from ted_fl.config import PrivacyConfig
from ted_fl.continual.weights import Weights
from ted_fl.errors import TedFlError
from ted_fl.federated import messages as M
from ted_fl.federated.stage_strategy import StageStrategy
from ted_fl.privacy.mechanisms import client_noise_multiplier

STRATEGIES = {
    ("client", "fixed"): DifferentialPrivacyClientSideFixedClipping,
    ("client", "adaptive"): DifferentialPrivacyClientSideAdaptiveClipping,
    ("server", "fixed"): DifferentialPrivacyServerSideFixedClipping,
    ("server", "adaptive"): DifferentialPrivacyServerSideAdaptiveClipping,
}


def make_strategy(privacy: PrivacyConfig, n_clients: int, stage_rounds: int,
                  clip_norm: float | None = None) -> tuple[Strategy | None, float]:
    """(the DP strategy wrapper, or None for local DP; sigma) for one stage of `n_clients` clients;
    `clip_norm`: the adaptive clip norm to start from (a resumed stage), else privacy.clip_norm."""
    sigma = client_noise_multiplier(float(privacy.epsilon), float(privacy.delta), stage_rounds)
    if privacy.noise == "client":
        return None, sigma
    cls = STRATEGIES[(privacy.clip_on, privacy.clipping)]
    if privacy.clipping == "adaptive":
        try:
            return cls(StageStrategy(uniform=True), sigma, n_clients,
                       initial_clipping_norm=float(clip_norm or privacy.clip_norm)), sigma
        except ValueError as e:  # the clipped count's noise (n / 20) cannot carry this noise multiplier
            raise TedFlError(f"privacy.clipping = 'adaptive' with {n_clients} client(s) in a stage and noise "
                             f"multiplier {sigma:.3g} (epsilon {privacy.epsilon:g}): {e}; set privacy.clipping = "
                             "'fixed', or raise privacy.epsilon / the clients per stage") from None
    return cls(StageStrategy(uniform=True), sigma, float(privacy.clip_norm), n_clients), sigma


class StageDP:
    """The client-level DP state of the stage being trained, for either executor: the strategy (None: local
    DP), sigma, and the adaptive clip norm kept across a resume via the executor's state_dict."""

    def __init__(self, privacy: PrivacyConfig) -> None:
        self.privacy = privacy
        self.key = ""
        self.strategy: Strategy | None = None
        self.sigma = 0.0
        self.n = 0
        self.saved: dict[str, float] = {}  # key -> adaptive clip norm reached (from a checkpoint)

    def stage(self, approach: str, seed: int, stage: int, n_clients: int, stage_rounds: int) -> StageDP:
        key = f"{approach}|{seed}|{stage}"
        if key != self.key:
            self.key, self.n = key, n_clients
            self.strategy, self.sigma = make_strategy(self.privacy, n_clients, stage_rounds, self.saved.get(key))
        return self

    def accounted_sigma(self) -> float:
        """The noise multiplier the mechanism runs at, read back from it (the accountant composes this, so
        a mechanism without noise reports epsilon inf). Local DP: the sigma client_mod sets LocalDpMod's
        std from. Adaptive clipping: Flower raises the update's multiplier to z = (sigma^-2 - (2 c)^-2)^-1/2
        for the clipped count's std c; together they are one Gaussian release at sigma = (z^-2 + (2 c)^-2)^-1/2."""
        s = self.strategy
        if s is None:
            return self.sigma
        z = float(s.noise_multiplier)  # type: ignore[attr-defined]
        if self.privacy.clipping == "adaptive" and z > 0:
            return float((z**-2 + (2 * float(s.clipped_count_stddev)) ** -2) ** -0.5)  # type: ignore[attr-defined]
        return z

    def state_dict(self) -> dict[str, float]:
        norm = getattr(self.strategy, "clipping_norm", None)
        return {self.key: float(norm)} if self.key and self.privacy.clipping == "adaptive" and norm else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.saved, self.key, self.strategy = dict(state), "", None

    # ------------------------------------------------------------------ in-process runner
    def release(self, current: Weights, local: Weights) -> tuple[Weights, bool]:
        """What leaves one client: its weights after the client-side mod (LocalDpMod, fixed- or
        adaptiveclipping_mod), and the adaptive mod's norm bit (the update was clipped)."""
        p, keys = self.privacy, list(local)
        new = [np.array(local[k], copy=True) for k in keys]
        cur = [np.asarray(current[k]) for k in keys]
        bit = False
        if p.noise == "client":  # LocalDpMod with client_mod's arguments: std 2 * sigma * clip
            compute_clip_model_update(new, cur, float(p.clip_norm))
            add_gaussian_noise_inplace(new, 2 * self.sigma * float(p.clip_norm))
        elif p.clip_on == "client":
            norm = float(self.strategy.clipping_norm)  # type: ignore[union-attr]  # what configure sends
            if p.clipping == "adaptive":
                bit = compute_adaptive_clip_model_update(new, cur, norm)
            else:
                compute_clip_model_update(new, cur, norm)
        return dict(zip(keys, new, strict=True)), bit

    def aggregate_weights(self, current: Weights, released: list[tuple[Weights, bool]]) -> Weights:
        """The wrapper's aggregate_train on released weights: server-side clipping, the adaptive norm's
        update from the (noised) clipped count, the uniform mean, then Gaussian noise sigma * clip / n."""
        p, s = self.privacy, self.strategy
        keys = list(current)
        cur = [np.asarray(current[k]) for k in keys]
        arrays = [[np.array(w[k], copy=True) for k in keys] for w, _ in released]
        bits = [b for _, b in released]
        if s is not None and p.clip_on == "server":
            for i, a in enumerate(arrays):
                if p.clipping == "adaptive":
                    upd = [x - c for x, c in zip(a, cur, strict=True)]
                    bits[i] = adaptive_clip_inputs_inplace(upd, float(s.clipping_norm))  # type: ignore[attr-defined]
                    arrays[i] = [c + u for c, u in zip(cur, upd, strict=True)]
                else:
                    compute_clip_model_update(a, cur, float(s.clipping_norm))  # type: ignore[attr-defined]
        if s is not None and p.clipping == "adaptive":
            s._geometric_update(s._noisy_fraction(sum(map(int, bits)), len(bits)))  # type: ignore[attr-defined]
        mean = [np.mean([a[j] for a in arrays], axis=0).astype(cur[j].dtype) for j in range(len(keys))]
        if s is not None:
            add_gaussian_noise_inplace(mean, compute_stdv(float(s.noise_multiplier),  # type: ignore[attr-defined]
                                                          float(s.clipping_norm), self.n))  # type: ignore[attr-defined]
        return dict(zip(keys, mean, strict=True))


# ------------------------------------------------------------------------------------ client
def client_mod(privacy: PrivacyConfig, msg: Message, ctx: Context, call_next: Any) -> Message:
    """Run Flower's client-side DP mod on the train message's weights (see the module docstring)."""
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
