"""Prepare once, then freeze: an experiment resolved and validated at its entry point.

Every entry point (`ted_fl.simulate` / `ted_fl.centralized` and their --resume and --check, the
deployment engine's ServerApp, each sweep or study cell, the benchmark's federated groups) calls
`resolve` exactly once, before anything runs. It checks the [privacy] keys (`ted_fl.privacy.checks`),
sets the network's outputs from the site set, converts the network for DP and returns a frozen
`ResolvedExperiment`. Everything below (the run directory, the executors, the schedule, the
ServerApp's hello that carries the configuration to the clients) receives its `cfg` and checks
nothing again. The caller's configuration is never changed: `resolve` works on a copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ted_fl.config import ExperimentConfig, federated_split_seed, strategy_conflicts
from ted_fl.data import resolve_out_channels
from ted_fl.data.spec import LabelSet
from ted_fl.privacy import checks


@dataclass(frozen=True)
class ResolvedExperiment:
    """A validated experiment, as it runs: its configuration with every derived value filled in.

    `cfg` is this object's own copy (model.out_channels set, model.norm "group" under DP); code
    below reads it and never writes it (tests/unit/test_privacy_checks.py checks a run leaves it as
    resolved). `notes` say what resolving changed and what the privacy settings mean (run.log).
    """

    cfg: ExperimentConfig
    labels: LabelSet
    notes: tuple[str, ...] = ()

    @property
    def out_channels(self) -> int:
        """The network's outputs: the site set's classes + background."""
        return self.labels.out_channels

    @property
    def dp_converted(self) -> bool:
        """Whether resolving changed the network for DP (batch norm -> group norm)."""
        return any(checks.DP_NORM_NOTE in n for n in self.notes)


def resolve(cfg: ExperimentConfig, *, federated: bool = False) -> ResolvedExperiment:
    """Validate `cfg` and return it resolved (a converted copy; `cfg` itself is unchanged).

    Order, cheapest first, so a bad input is one line before the data load: the Flower run's
    one-split-per-run rule (`federated`); the site set's classes (model.out_channels; a contradiction
    is an error); the network under DP (group norm); then every [privacy] rule, the network's last
    (Opacus' validator on the converted network: torch is imported only when privacy.dp != "off").
    Errors are TedFlError lines naming the key and the fix (the commands exit 2).
    """
    if federated:
        federated_split_seed(cfg)
    strategy_conflicts(cfg)  # federated.* keys the chosen federated.strategy would not read
    out = copy.deepcopy(cfg)
    labels = resolve_out_channels(out)
    out.model, notes = checks.dp_model(out)
    checks.check(out)  # every [privacy] rule, the network's on the network as it will run
    return ResolvedExperiment(cfg=out, labels=labels, notes=tuple(notes + checks.describe(out)))

