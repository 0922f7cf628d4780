"""A `SiteOrder` (ted_fl.schedule.orders) as a Flower train message, and back.

What travels is what travelled before the orders existed, key for key: the round's scalars and the
order's decisions in the ConfigRecord, the weights, and, when the transport says a node lacks them,
the teacher, its importances and the probes' pixels. What an order holds but never travels (the
replay buffer, DP-SGD's parameters, a site's own probe seed) the client derives from the experiment
configuration and its own identity, with the planner's own helpers; so `decode_train(encode_train(o))`
gives `o` back (a "sent" order's probe seed stays on the server: its pixels travel instead).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ted_fl.config import ExperimentConfig
from ted_fl.continual.probes import make_probes
from ted_fl.federated import messages as M
from ted_fl.schedule.orders import (
    DPOrder,
    ProbeOrder,
    SiteOrder,
    TeacherOrder,
    dp_order,
    replay_order,
    site_probe_seed,
)


def order_config(order: SiteOrder, state_dir: str = "") -> ConfigRecord:
    """The order's ConfigRecord (`state_dir`: where the site keeps its optimizer state and teacher)."""
    c: dict[str, object] = dict(
        approach=order.approach, seed=order.seed, stage=order.stage, round=order.round, steps=order.steps,
        lr=order.lr, stage_rounds=order.stage_rounds, want_val=order.validate, client_state_dir=state_dir,
    )
    p = order.probes
    if p.source == "seeded":
        c.update(probe_seed=p.seed, probe_count=p.count, probe_shape=list(p.shape))
    c.update(site_index=order.site_index, teacher_key=order.teacher.key)
    if order.teacher.from_weights:
        c["teacher_from_weights"] = True  # the round's weights are the stage's teacher: the site freezes them
    if p.source == "site":  # the site draws its own probes: neither pixels nor a seed travel
        c.update(probe_local=True, probe_count=p.count, probe_shape=list(p.shape))
    if order.dp.mode == "client":
        c["dp_noise_multiplier"] = float(order.dp.noise_multiplier)  # LocalDpMod's noise (privacy.noise = "client")
    return M.config_record(c)


def probe_pixels(order: SiteOrder, cfg: ExperimentConfig) -> ArrayRecord | None:
    """The probes' pixels of a "sent" order (drawn on the server from the round's seed)."""
    p = order.probes
    if p.source != "sent" or p.seed is None:
        return None
    return ArrayRecord({"probes": Array(make_probes(p.seed, p.count, p.shape, cfg.loss).numpy())})


def encode_train(order: SiteOrder, weights: ArrayRecord, *, teacher: ArrayRecord | None = None,
                 aux: ArrayRecord | None = None, probes: ArrayRecord | None = None,
                 state_dir: str = "") -> RecordDict:
    """The train message's content: the weights, then what the transport attaches (the teacher and its
    importances once per node and stage, the probes' pixels), then the order's ConfigRecord."""
    content = RecordDict({M.WEIGHTS: weights})
    if teacher is not None:
        content[M.TEACHER] = teacher
    if aux is not None:
        content[M.AUX] = aux
    if probes is not None:
        content[M.PROBES] = probes
    content[M.CONFIG] = order_config(order, state_dir)
    return content


def decode_train(content: RecordDict, cfg: ExperimentConfig, site: str, client: int) -> SiteOrder:
    """The order a node received (`site`, `client`: the node's own identity, which does not travel)."""
    c: dict[str, Any] = dict(content.config_records[M.CONFIG])
    seed, stage, rnd, index = int(c["seed"]), int(c["stage"]), int(c["round"]), int(c["site_index"])
    stage_rounds = int(c.get("stage_rounds", 1))
    if M.PROBES in content:
        shape = tuple(int(x) for x in content.array_records[M.PROBES]["probes"].shape)
        probes = ProbeOrder("sent", None, shape[0], shape[1:])
    elif c.get("probe_local"):
        probes = ProbeOrder("site", site_probe_seed(seed, stage, rnd, index, client), int(c["probe_count"]),
                            tuple(int(x) for x in c["probe_shape"]))
    elif c.get("probe_seed") is not None and int(c.get("probe_count", 0)):
        probes = ProbeOrder("seeded", int(c["probe_seed"]), int(c["probe_count"]),
                            tuple(int(x) for x in c["probe_shape"]))
    else:
        probes = ProbeOrder()
    dp: DPOrder = dp_order(cfg, stage_rounds)
    if dp.mode == "client" and "dp_noise_multiplier" in c:  # the server's figure, as LocalDpMod reads it
        dp = DPOrder("client", dp.epsilon, dp.delta, noise_multiplier=float(c["dp_noise_multiplier"]))
    return SiteOrder(
        approach=str(c["approach"]), seed=seed, stage=stage, round=rnd, stage_rounds=stage_rounds,
        site_index=index, client=client, steps=int(c["steps"]), lr=float(c["lr"]), sites=(site,),
        teacher=TeacherOrder(str(c.get("teacher_key", "")), bool(c.get("teacher_from_weights", False))),
        probes=probes,
        replay=(replay_order(cfg, site, index, stage, seed, client, cfg.federated.clients_per_site),),
        dp=dp, validate=bool(c.get("want_val", False)),
    )


def sent_probes(content: RecordDict) -> torch.Tensor | None:
    """The probes' pixels a message carries, as a tensor (None: none travelled)."""
    if M.PROBES not in content:
        return None
    return torch.from_numpy(content.array_records[M.PROBES]["probes"].numpy())
