"""Flower's strategies inside a stage, as plain numpy: what `federated.strategy` and
`federated.fraction_train` do, the same arithmetic for the centralized runner and the Flower server.

- fedavg: the example-weighted mean (`ted_fl.schedule.engine.fedavg`); nothing here runs.
- fedprox: FedAvg on the server; every local step adds mu/2 ||w - w_global||^2 (`terms.Proximal`,
  added to the approach by `with_proximal`), as Flower's FedProx asks its clients to.
- fedadam / fedyogi / fedadagrad: Flower's FedOpt family (Reddi et al. 2021, arXiv:2003.00295), a
  server optimizer over the averaged update delta = mean - w_global (`ServerOptimizer`), its moments
  m, v kept across the rounds of one stage and started anew at the next (a stage is one federated run).
- fraction_train: each round, each training site lets max(1, floor(k * fraction)) of its k clients
  train (`sample_clients`), drawn from the seed, stage, round and site (Flower draws
  max(floor(n * fraction), min_train_nodes) nodes, unseeded).

tests/unit/test_strategies.py feeds the same replies to Flower's own strategies and to these.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ted_fl.config import FederatedConfig, StrategyName, choices
from ted_fl.continual import terms as T
from ted_fl.continual.approaches import Approach, WeightedTerm
from ted_fl.continual.weights import Weights
from ted_fl.errors import TedFlError

STRATEGIES = choices(StrategyName)
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad")  # the strategies that step on the server

# Flower 1.41's defaults (flwr.serverapp.strategy.FedAdam / FedYogi / FedAdagrad.__init__; FedAdagrad
# fixes beta_1 = beta_2 = 0). tests/unit/test_strategies.py reads them back from Flower's signatures.
FLOWER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 1e-1, "beta_1": 0.0, "beta_2": 0.0, "tau": 1e-3},
}
SAMPLE_TAG = 0xF7A  # keeps the client draw's seed apart from every other seed derived from (seed, stage, round)


def server_settings(fed: FederatedConfig) -> dict[str, float]:
    """eta, beta_1, beta_2, tau of the configured server optimizer: each key as set, else Flower's default."""
    if fed.strategy not in SERVER_OPTIMIZERS:
        return {}
    out = dict(FLOWER_DEFAULTS[fed.strategy])
    for key in out:
        value = getattr(fed, key)
        if value != "flower":
            if fed.strategy == "fedadagrad" and key.startswith("beta"):
                raise TedFlError(f"federated.{key} = {value}: FedAdagrad has no moment decay (Flower fixes it at 0); "
                                 f"remove federated.{key} or set federated.strategy = 'fedadam' / 'fedyogi'")
            out[key] = float(value)
    return out


class ServerOptimizer:
    """FedAdam / FedYogi / FedAdagrad's server step, as Flower 1.41's FedOpt strategies compute it.

    With delta = aggregated - current (the FedAvg mean minus the round's global model) and t the
    round within the stage counted from 1 (Flower's server_round):
        m = beta_1 m + (1 - beta_1) delta                              (m = delta for FedAdagrad)
        FedAdam:    v = beta_2 v + (1 - beta_2) delta^2;   w = current + eta_t m / (sqrt(v) + tau),
                    eta_t = eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))  (Flower's bias correction)
        FedYogi:    v = v - (1 - beta_2) delta^2 sign(v - delta^2);  w = current + eta m / (sqrt(v) + tau)
        FedAdagrad: v = v + delta^2;                                 w = current + eta m / (sqrt(v) + tau)
    m and v start at 0 in the first round of each stage. Floating arrays only: integer buffers (batch
    norm's counters) keep the aggregate's value. Computed in float64, returned in each array's dtype.
    """

    def __init__(self, strategy: str, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        if strategy not in SERVER_OPTIMIZERS:
            raise TedFlError(f"federated.strategy = '{strategy}' has no server optimizer; one of {SERVER_OPTIMIZERS}")
        self.strategy, self.eta, self.beta_1, self.beta_2, self.tau = strategy, eta, beta_1, beta_2, tau
        self.stage: Any = None
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @classmethod
    def of(cls, fed: FederatedConfig) -> ServerOptimizer | None:
        """The configured server optimizer; None for fedavg and fedprox (the plain FedAvg mean)."""
        settings = server_settings(fed)
        return cls(fed.strategy, **settings) if settings else None

    def step(self, stage: Any, server_round: int, current: Weights, aggregated: Weights) -> Weights:
        """The round's new global model from the stage's `current` one and the clients' FedAvg mean;
        `server_round` counts from 1 within the stage; a new `stage` starts m and v at zero."""
        if stage != self.stage:
            self.stage, self.m, self.v = stage, {}, {}
        b1 = 0.0 if self.strategy == "fedadagrad" else self.beta_1
        b2 = self.beta_2
        eta = self.eta
        if self.strategy == "fedadam":
            eta = self.eta * np.sqrt(1 - b2 ** (server_round + 1.0)) / (1 - b1 ** (server_round + 1.0))
        out: Weights = {}
        for key, agg in aggregated.items():
            if not np.issubdtype(agg.dtype, np.floating):
                out[key] = agg
                continue
            cur = np.asarray(current[key], dtype=np.float64)
            delta = np.asarray(agg, dtype=np.float64) - cur
            m = self.m.get(key, np.zeros_like(delta))
            v = self.v.get(key, np.zeros_like(delta))
            m = b1 * m + (1 - b1) * delta
            d2 = delta**2
            if self.strategy == "fedadam":
                v = b2 * v + (1 - b2) * d2
            elif self.strategy == "fedyogi":
                v = v - (1 - b2) * d2 * np.sign(v - d2)
            else:
                v = v + d2
            self.m[key], self.v[key] = m, v
            out[key] = (cur + eta * m / (np.sqrt(v) + self.tau)).astype(agg.dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The moments reached in the current stage (a resumed stage goes on from them)."""
        return {"stage": self.stage, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = state.get("stage")
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))


def server_step(fed: FederatedConfig, state: dict[str, Any], stage: Any, server_round: int,
                current: Weights, aggregated: Weights) -> Weights:
    """The schedule's seam: `aggregated` (FedAvg's mean) for fedavg / fedprox, else the server optimizer's
    step, its moments read from and written back to `state` (a field of the checkpointed schedule state)."""
    opt = ServerOptimizer.of(fed)
    if opt is None:
        return aggregated
    opt.load_state_dict(state)
    out = opt.step(stage, server_round, current, aggregated)
    state.clear()
    state.update(opt.state_dict())
    return out


def validates_locally(fed: FederatedConfig) -> bool:
    """Whether a lone trainer's validation of its own result scores the round's global model: not when
    a server optimizer moves the mean away from it."""
    return fed.strategy not in SERVER_OPTIMIZERS


def sample_clients(seed: int, stage: int, rnd: int, site: int, clients: list[int], fraction: float) -> list[int]:
    """The clients of site `site` that train in (stage, rnd): max(1, floor(len(clients) * fraction)) of
    them, drawn without replacement from (seed, stage, rnd, site), in their original order. fraction 1:
    all of them, no draw (today's behaviour)."""
    if not 0 < fraction <= 1:
        raise TedFlError(f"federated.fraction_train = {fraction} must be in (0, 1]")
    k = max(1, int(len(clients) * fraction))
    if k >= len(clients):
        return list(clients)
    parts = [seed, stage, rnd, site, SAMPLE_TAG]
    rng = np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))
    chosen = set(rng.choice(len(clients), size=k, replace=False).tolist())
    return [c for i, c in enumerate(clients) if i in chosen]


def sample_trainers(trainers: list[tuple[str, int, int]], seed: int, stage: int, rnd: int, order: list[str],
                    fraction: float) -> list[tuple[str, int, int]]:
    """The (site, node, client) triples of `trainers` that train in (stage, rnd): each site's clients
    drawn by `sample_clients`, the site numbered by its place in `order` (the Flower server's seam)."""
    if fraction == 1:
        return list(trainers)
    keep = {site: set(sample_clients(seed, stage, rnd, order.index(site),
                                     sorted({c for s, _, c in trainers if s == site}), fraction))
            for site in {s for s, _, _ in trainers}}
    return [t for t in trainers if t[2] in keep[t[0]]]


def with_proximal(approach: Approach, model: torch.nn.Module, fed: FederatedConfig) -> Approach:
    """fedprox: the approach plus mu/2 ||w - w_global||^2, w_global the parameters `model` holds now (the
    round's global model, loaded before local training); other strategies: the approach unchanged."""
    if fed.strategy != "fedprox":
        return approach
    anchor = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return dataclasses.replace(approach, terms=[*approach.terms, WeightedTerm(T.Proximal(anchor), fed.proximal_mu)])
