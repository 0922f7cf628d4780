"""The round's plan (ted_fl.schedule.orders.plan_round), one test per policy, and the codec
(ted_fl.federated.codec): an order survives the trip through a Flower RecordDict, key for key."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from ted_fl.config import ExperimentConfig
from ted_fl.federated import codec
from ted_fl.federated import messages as M
from ted_fl.privacy.mechanisms import client_noise_multiplier
from ted_fl.schedule.engine import TrainTask, derive_seed
from ted_fl.schedule.orders import DPOrder, ProbeOrder, Replay, SiteOrder, plan_round

SITES = ["A", "B", "C"]
W = {"w": np.zeros(3, np.float32)}


def _task(stage: int = 1, rnd: int = 0, sites: list[str] | None = None, teacher: bool = True,
          approach: str = "ted_gugf", want_val: bool = False) -> TrainTask:
    return TrainTask(approach=approach, seed=7, stage=stage, round=rnd, sites=sites or ["A", "B"], weights=W,
                     teacher=W if teacher else None, aux={}, steps=3, lr=1e-3,
                     probe_seed=derive_seed(7, stage, rnd, 0x5CA) if teacher else None,
                     probe_count=4 if teacher else 0, probe_shape=(1, 16, 16), want_val=want_val, stage_rounds=2)


def _cfg(**privacy: object) -> ExperimentConfig:
    cfg = ExperimentConfig()
    for k, v in privacy.items():
        setattr(cfg.privacy, k, v)
    return cfg


def test_server_teacher_every_trainer_holds_it_and_gets_the_rounds_probes() -> None:
    task = _task()
    orders = plan_round(task, _cfg(), SITES)
    assert [o.sites for o in orders] == [("A",), ("B",)] and [o.site_index for o in orders] == [0, 1]
    assert all(o.teacher.key == "ted_gugf|7|1" and not o.teacher.from_weights for o in orders)
    assert all(o.probes == ProbeOrder("sent", task.probe_seed, 4, (1, 16, 16)) for o in orders)
    cfg = _cfg()
    cfg.federated.probes = "seed"
    assert all(o.probes.source == "seeded" and o.probes.seed == task.probe_seed for o in plan_round(task, cfg, SITES))


def test_site_teacher_only_the_arriving_site_holds_it_and_draws_its_own_probes() -> None:
    cfg = _cfg(teacher="site")
    early, arriving = plan_round(_task(rnd=0), cfg, SITES, {"A": [0], "B": [0, 1]})[0], \
        plan_round(_task(rnd=0), cfg, SITES, {"A": [0], "B": [0, 1]})[1:]
    assert not early.teacher.held and early.probes == ProbeOrder()
    for o in arriving:
        assert o.teacher.key == "ted_gugf|7|1" and o.teacher.from_weights  # round 0: the weights are the teacher
        assert o.probes == ProbeOrder("site", derive_seed(7, 1, 0, 1, o.client, 0x517E), 4, (1, 16, 16))
    assert arriving[0].probes.seed != arriving[1].probes.seed  # each client its own
    later = plan_round(_task(rnd=1), cfg, SITES)[1]
    assert later.teacher.held and not later.teacher.from_weights  # kept from round 0


def test_no_teacher_means_no_probes() -> None:
    orders = plan_round(_task(teacher=False), _cfg(teacher="site"), SITES)
    assert all(not o.teacher.held and o.probes.source == "none" for o in orders)


def test_replay_an_earlier_site_trains_on_its_buffer() -> None:
    cfg = _cfg(replay=5)
    cfg.federated.retention = 1
    a, b = plan_round(_task(), cfg, SITES)
    assert a.replay == (Replay("A", 5, derive_seed(7, 0, 0xB0F, 0)),) and b.replay == (Replay("B"),)
    cfg.federated.clients_per_site = 2  # on Flower clients: n // k each, a seed per client
    a0, a1, _ = plan_round(_task(), cfg, SITES, {"A": [0, 1], "B": [0]})
    assert (a0.replay[0].size, a1.replay[0].size) == (2, 2)
    assert a1.replay[0].seed == derive_seed(7, 0, 0xB0F, 1) != a0.replay[0].seed
    assert plan_round(_task(), _cfg(), SITES)[0].replay == (Replay("A"),)  # replay = 0: the whole share


def test_dp_levels() -> None:
    assert all(o.dp == DPOrder() for o in plan_round(_task(), _cfg(), SITES))
    sample = plan_round(_task(), _cfg(dp="sample", epsilon=4.0, max_grad_norm=0.5), SITES)[0].dp
    assert sample == DPOrder("sample", 4.0, 1e-5, 0.5)
    args = sample.sgd_args(40, 4, 3, 2)
    assert args is not None and args.max_grad_norm == 0.5 and args.noise_multiplier > 0
    client = plan_round(_task(), _cfg(dp="client", epsilon=8.0), SITES)[0].dp
    assert client.mode == "client" and client.noise_multiplier == client_noise_multiplier(8.0, 1e-5, 2)
    assert client.sgd_args(40, 4, 3, 2) is None


def test_only_a_single_trainer_validates_and_never_under_client_dp() -> None:
    assert [o.validate for o in plan_round(_task(sites=["B"], want_val=True), _cfg(), SITES)] == [True]
    assert [o.validate for o in plan_round(_task(want_val=True), _cfg(), SITES)] == [False, False]
    assert [o.validate for o in plan_round(_task(sites=["B"], want_val=True), _cfg(dp="client"), SITES)] == [False]


def test_joint_trains_one_group_in_process_and_one_order_per_client_on_flower() -> None:
    cfg = _cfg(replay=2)
    cfg.federated.retention = 1
    task = _task(approach="joint", teacher=False, sites=["A", "B"])
    (group,) = plan_round(task, cfg, SITES)
    assert group.sites == ("A", "B") and group.site_index == 1 and [r.size for r in group.replay] == [2, 0]
    assert [o.sites for o in plan_round(task, cfg, SITES, {"A": [0], "B": [0]})] == [("A",), ("B",)]


def test_training_seed_per_site_and_client() -> None:
    orders = plan_round(_task(), _cfg(), SITES, {"A": [0, 1], "B": [0]})
    assert [o.train_seed for o in orders] == [derive_seed(7, 1, 0, 0, 0), derive_seed(7, 1, 0, 0, 1),
                                              derive_seed(7, 1, 0, 1, 0)]


def _orders() -> list[tuple[ExperimentConfig, SiteOrder]]:
    out = []
    seeded = _cfg()
    seeded.federated.probes = "seed"
    replay = _cfg(replay=3, teacher="site")
    replay.federated.retention = 1
    for cfg in (_cfg(), seeded, replay, _cfg(dp="sample", epsilon=3.0), _cfg(dp="client", epsilon=8.0)):
        for rnd in (0, 1):
            out += [(cfg, o) for o in plan_round(_task(rnd=rnd, want_val=True, sites=["B"]), cfg, SITES)]
            out += [(cfg, o) for o in plan_round(_task(rnd=rnd), cfg, SITES, {"A": [0], "B": [0]})]
    return out


@pytest.mark.parametrize("i", range(len(_orders())))
def test_codec_round_trip(i: int) -> None:
    cfg, order = _orders()[i]
    pixels = codec.probe_pixels(order, cfg)
    content = codec.encode_train(order, M.to_record(W), probes=pixels, state_dir="/tmp/x")
    back = codec.decode_train(content, cfg, order.site, order.client)
    want = order
    if order.probes.source == "sent":  # the pixels travel, not the seed
        want = dataclasses.replace(order, probes=dataclasses.replace(order.probes, seed=None))
        assert pixels is not None and np.array_equal(codec.sent_probes(content).numpy(),  # type: ignore[union-attr]
                                                     pixels["probes"].numpy())
    assert back == want


def test_the_config_record_is_what_travelled_before() -> None:
    """Key for key the ConfigRecord the server built by hand before the orders (its bytes are audited)."""
    cfg = _cfg(teacher="site", dp="client", epsilon=8.0)
    order = plan_round(_task(rnd=0), cfg, SITES)[1]
    got = dict(codec.order_config(order, "/s"))
    assert got == {"approach": "ted_gugf", "seed": 7, "stage": 1, "round": 0, "steps": 3, "lr": 1e-3,
                   "stage_rounds": 2, "want_val": False, "client_state_dir": "/s", "site_index": 1,
                   "teacher_key": "ted_gugf|7|1", "teacher_from_weights": True, "probe_local": True,
                   "probe_count": 4, "probe_shape": [1, 16, 16],
                   "dp_noise_multiplier": client_noise_multiplier(8.0, 1e-5, 2)}
    plain = dict(codec.order_config(plan_round(_task(teacher=False), _cfg(), SITES)[0]))
    assert "teacher_key" not in plain and "client_state_dir" not in plain  # empty strings never travel
    teacher = ArrayRecord({"w": Array(np.ones(3, np.float32))})
    content = codec.encode_train(order, M.to_record(W), teacher=teacher, aux=ArrayRecord())
    assert list(content.keys()) == [M.WEIGHTS, M.TEACHER, M.AUX, M.CONFIG]
    assert math.isfinite(float(content[M.CONFIG]["dp_noise_multiplier"]))
