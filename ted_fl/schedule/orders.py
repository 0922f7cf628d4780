"""A site's round described once: the `SiteOrder` and the one function that plans a round's orders.

What one site (or one of its clients, or a joint group) does in one round used to be decided three
times: by the in-process executor, by the Flower server and by the Flower client. `plan_round` now
holds every rule (who holds the teacher, where the probes come from, who trains on a replay buffer,
which DP applies, who validates); the executors only carry the orders out. The in-process executor
loops over them; the Flower server encodes them (`ted_fl.federated.codec`), the client decodes and
runs them (`SiteWorker.run`). The parts of an order that never travel (the replay buffer, DP-SGD's
parameters, a site's own probe seed) are derived by the same helpers here on either side, from the
experiment configuration every node has and the node's own identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ted_fl.config import ExperimentConfig
from ted_fl.continual.approaches import get_approach
from ted_fl.continual.strategies import sample_clients
from ted_fl.privacy.mechanisms import SampleDPArgs, client_noise_multiplier, sample_dp_args
from ted_fl.privacy.policies import PROBE_SITE_TAG, REPLAY_TAG, gets_teacher, replay_share, uses_replay
from ted_fl.schedule.seeds import derive_seed


class RoundTask(Protocol):
    """What the planner reads of the schedule's round (`ted_fl.schedule.engine.TrainTask`)."""

    approach: str
    seed: int
    stage: int
    round: int
    sites: list[str]
    steps: int
    lr: float
    probe_seed: int | None
    probe_count: int
    probe_shape: tuple[int, ...]
    want_val: bool
    stage_rounds: int

    @property
    def teacher(self) -> object: ...  # only whether there is one (read-only: any weights type will do)


ProbeSource = Literal["none", "sent", "seeded", "site"]
DPMode = Literal["none", "sample", "client"]


@dataclass(frozen=True)
class TeacherOrder:
    """The stage's frozen teacher: held or not (`key` "" = not held), and whether the site freezes
    this round's weights as the teacher itself (privacy.teacher = "site", the stage's first round)."""

    key: str = ""
    from_weights: bool = False

    @property
    def held(self) -> bool:
        return bool(self.key)


@dataclass(frozen=True)
class ProbeOrder:
    """The SKA probes: none; sent as pixels by the server; regenerated from the server's seed; or drawn
    by the site from its own seed (neither pixels nor a seed travel). A "sent" order's seed stays on the
    server (the pixels travel), so the order a client decodes has seed None."""

    source: ProbeSource = "none"
    seed: int | None = None
    count: int = 0
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class Replay:
    """What one site of the order trains on: its whole share (`size` 0) or a seeded replay buffer of
    at most `size` images (an earlier site training again in a later stage, privacy.replay)."""

    site: str
    size: int = 0
    seed: int = 0


@dataclass(frozen=True)
class DPOrder:
    """Differential privacy of the round: none; DP-SGD (sample: its sigma follows from the site's own
    example count, which the server does not need); or client-level (the noise multiplier LocalDpMod
    uses; the clipping norm is the strategy's, added to the message by Flower's DP wrapper)."""

    mode: DPMode = "none"
    epsilon: float = math.inf
    delta: float = 0.0
    max_grad_norm: float = 0.0
    noise_multiplier: float = 0.0

    def sgd_args(self, n: int, batch_size: int, steps: int, stage_rounds: int) -> SampleDPArgs | None:
        """DP-SGD's arguments for a round on `n` examples (ted_fl.privacy.mechanisms.sample_dp_args)."""
        if self.mode != "sample":
            return None
        return sample_dp_args(_SampleDP(self.epsilon, self.delta, self.max_grad_norm), n, batch_size, steps,
                              stage_rounds)


@dataclass(frozen=True)
class _SampleDP:
    """The privacy keys sample_dp_args reads."""

    epsilon: float
    delta: float
    max_grad_norm: float
    dp: str = "sample"


@dataclass(frozen=True)
class SiteOrder:
    """Everything one site, client or joint group does in one round."""

    approach: str
    seed: int
    stage: int
    round: int
    stage_rounds: int
    site_index: int  # the (last) site's place in the arrival order
    client: int
    steps: int
    lr: float
    sites: tuple[str, ...]  # the sites whose data it trains on (a joint group's union in-process)
    teacher: TeacherOrder = field(default_factory=TeacherOrder)
    probes: ProbeOrder = field(default_factory=ProbeOrder)
    replay: tuple[Replay, ...] = ()
    dp: DPOrder = field(default_factory=DPOrder)
    validate: bool = False

    @property
    def site(self) -> str:
        return self.sites[-1]

    @property
    def train_seed(self) -> int:
        """The seed of the round's local training (batches, augmentation, DP-SGD's noise)."""
        return derive_seed(self.seed, self.stage, self.round, self.site_index, self.client)


# ------------------------------------------------------------------------------------ the rules
def holds_teacher(cfg: ExperimentConfig, site_index: int, stage: int, has_teacher: bool, joint_group: bool) -> bool:
    """Whether an order's site holds the stage's teacher: under privacy.teacher = "site" only the
    arriving site does (a joint group holds it whole)."""
    return has_teacher and (joint_group or gets_teacher(cfg, site_index, stage))


def probe_order(cfg: ExperimentConfig, task: RoundTask, site_index: int, client: int, holds: bool) -> ProbeOrder:
    """Where a teacher-holding site's probes come from (none without the teacher or without probes)."""
    if not holds or task.probe_seed is None or not task.probe_count:
        return ProbeOrder()
    shape = tuple(int(x) for x in task.probe_shape)
    if cfg.privacy.teacher == "site":
        return ProbeOrder("site", site_probe_seed(task.seed, task.stage, task.round, site_index, client),
                          task.probe_count, shape)
    return ProbeOrder("sent" if cfg.federated.probes == "pixels" else "seeded", task.probe_seed, task.probe_count,
                      shape)


def site_probe_seed(seed: int, stage: int, rnd: int, site_index: int, client: int) -> int:
    """The seed a site draws its own probes from (privacy.teacher = "site")."""
    return derive_seed(seed, stage, rnd, site_index, client, PROBE_SITE_TAG)


def replay_order(cfg: ExperimentConfig, site: str, site_index: int, stage: int, seed: int, client: int,
                 clients_per_site: int) -> Replay:
    """An earlier site training in a later stage keeps only its replay buffer (n // k per client)."""
    if not uses_replay(cfg, site_index, stage):
        return Replay(site)
    return Replay(site, replay_share(cfg.privacy.replay, clients_per_site),
                  derive_seed(seed, site_index, REPLAY_TAG, client))


def dp_order(cfg: ExperimentConfig, stage_rounds: int) -> DPOrder:
    """The round's DP from [privacy]: DP-SGD's budget, or client-level DP's noise multiplier for the stage."""
    p = cfg.privacy
    if p.dp == "sample":
        return DPOrder("sample", float(p.epsilon), float(p.delta), float(p.max_grad_norm))
    if p.dp == "client":
        return DPOrder("client", float(p.epsilon), float(p.delta),
                       noise_multiplier=client_noise_multiplier(float(p.epsilon), float(p.delta), stage_rounds))
    return DPOrder()


def plan_round(task: RoundTask, cfg: ExperimentConfig, sites: Sequence[str],
               clients: Mapping[str, Sequence[int]] | None = None) -> list[SiteOrder]:
    """The orders of one round, in the order the results come back.

    `sites`: every site in arrival order (an order's site index). `clients`: the client indices
    serving each site (the Flower executor: one order per client); None: the in-process executor,
    one order per site, or one for the whole group when the approach trains on the sites' union.
    """
    joint = get_approach(task.approach, cfg.loss).joint
    if clients is None:
        groups: list[tuple[tuple[str, ...], int]] = ([(tuple(task.sites), 0)] if joint
                                                     else [((s,), 0) for s in task.sites])
        per_site = 1
    else:
        # federated.fraction_train: the clients of each site that train this round (all of them at 1.0)
        groups = [((s,), c) for s in task.sites
                  for c in sample_clients(task.seed, task.stage, task.round, list(sites).index(s), list(clients[s]),
                                          cfg.federated.fraction_train)]
        per_site = cfg.federated.clients_per_site
    dp = dp_order(cfg, task.stage_rounds)
    validate = bool(task.want_val and len(groups) == 1 and dp.mode != "client")  # DP: the released model is scored
    orders = []
    for group, client in groups:
        index = list(sites).index(group[-1])
        holds = holds_teacher(cfg, index, task.stage, task.teacher is not None, len(group) > 1)
        teacher = TeacherOrder(f"{task.approach}|{task.seed}|{task.stage}" if holds else "",
                               holds and cfg.privacy.teacher == "site" and task.round == 0)
        orders.append(SiteOrder(
            approach=task.approach, seed=task.seed, stage=task.stage, round=task.round,
            stage_rounds=task.stage_rounds, site_index=index, client=client, steps=task.steps, lr=float(task.lr),
            sites=group, teacher=teacher, probes=probe_order(cfg, task, index, client, holds),
            replay=tuple(replay_order(cfg, s, list(sites).index(s), task.stage, task.seed, client, per_site)
                         for s in group),
            dp=dp, validate=validate,
        ))
    return orders

