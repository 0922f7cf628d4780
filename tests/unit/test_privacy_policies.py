"""The [privacy] policies: what each one changes in what travels (the server's per-kind byte
counts and audit log) and in what a site trains on, through the real ServerApp executor and the
real ClientApp (with its audit mod) on an in-process grid: no Ray, one tiny two-site run each."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from ted_fl.config import ExperimentConfig, set_key
from ted_fl.data import load_sites, resolve_out_channels
from ted_fl.data.types import Split
from ted_fl.errors import TedFlError
from ted_fl.federated.client_app import app as client_app
from ted_fl.federated.server_app import FlowerExecutor
from ted_fl.privacy.leakage import audit_frame, leaks
from ted_fl.privacy.policies import replay_buffer
from ted_fl.run.directory import RunDir
from ted_fl.schedule.engine import run_schedule
from ted_fl.schedule.in_process import LocalExecutor
from tests.conftest import tiny_config


class InProcessGrid:
    """A Grid that hands each message to the real ClientApp in this process (one Context per node)."""

    def __init__(self, n: int) -> None:
        self.contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config={"partition-id": i},
                                        state=RecordDict(), run_config={}) for i in range(n)}
        self.seq = 0
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        """Run each message through the ClientApp at once; its reply waits for `pull_messages`."""
        ids = []
        for msg in messages:
            self.seq += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.seq}"  # what the SuperLink assigns
            reply = client_app(msg, self.contexts[msg.metadata.dst_node_id])
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            self.replies[f"m{self.seq}"] = reply
            ids.append(f"m{self.seq}")
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture(autouse=True)
def task_identity() -> Any:
    """Flower's process identity, which a real ServerApp process sets before creating messages."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _cfg(tmp: Path, **keys: Any) -> ExperimentConfig:
    cfg = tiny_config(tmp, ["ted_gugf"])
    cfg.data.order = ["RUNMC", "BMC"]
    cfg.train.rounds, cfg.train.steps_per_round, cfg.train.select_best = 2, 1, False
    cfg.privacy.mia = False
    cfg.data.size = 16  # evaluation (HD95) dominates: the smallest images the tiny U-Net takes
    for k, v in keys.items():
        set_key(cfg, k.replace("__", "."), v)
    resolve_out_channels(cfg)
    return cfg


def _federated(tmp: Path, name: str, cfg: ExperimentConfig) -> tuple[dict[str, int], dict, Any, RunDir]:
    run = RunDir.create(tmp / "runs", name)
    ex = FlowerExecutor(InProcessGrid(2), cfg, run)  # type: ignore[arg-type]
    st = run_schedule(cfg, "ted_gugf", 0, ex, run)
    return dict(st.executor["bytes_by_kind"]), st.weights, st, run


def test_each_policy_shows_in_the_per_kind_bytes(tmp_path: Path) -> None:
    kinds, w_pix, st, _ = _federated(tmp_path, "pixels", _cfg(tmp_path))
    model = sum(v.nbytes for v in w_pix.values())
    # server / pixels: the teacher travels once (one stage with a teacher, one node), the probes every round
    assert kinds["train_down.teacher"] >= model
    pixels = 2 * 4 * 1 * 16 * 16 * 4  # 2 rounds x (batch 4 x 1 step) probes of 1x16x16 float32
    assert pixels <= kinds["train_down.probes"] <= pixels + 2 * 200  # + the record's keys and dtype per message
    seed_kinds, w_seed, _, _ = _federated(tmp_path, "seed", _cfg(tmp_path, federated__probes="seed"))
    assert "train_down.probes" not in seed_kinds and seed_kinds["train_down.teacher"] == kinds["train_down.teacher"]
    assert all(np.array_equal(w_pix[k], w_seed[k]) for k in w_pix)  # same probes, regenerated at the site
    site_kinds, _, st_site, _ = _federated(tmp_path, "site", _cfg(tmp_path, privacy__teacher="site"))
    assert "train_down.teacher" not in site_kinds and "train_down.probes" not in site_kinds
    saved = kinds["train_down.teacher"] + kinds["train_down.probes"]
    assert kinds["train_down"] - site_kinds["train_down"] >= saved - 200  # a few config bytes differ
    # up: the same weights and metrics whatever the policy
    assert site_kinds["train_up"] == kinds["train_up"]
    # the audit log says the same per site and record
    a = audit_frame({("ted_gugf", 0): [st.executor["audit"]]}, (16, 16))
    b = audit_frame({("ted_gugf", 0): [st_site.executor["audit"]]}, (16, 16))
    assert set(a[a["direction"] == "down"]["record"]) >= {"teacher", "probes", "weights"}
    assert not ({"teacher", "probes"} & set(b["record"]))
    assert leaks(a).empty and leaks(b).empty
    assert a[(a["record"] == "probes")]["image_shaped"].sum() > 0  # the check sees image-shaped arrays (down)


def test_site_teacher_and_replay_match_the_centralized_run(tmp_path: Path) -> None:
    """With retention the earlier site trains again: under teacher "site" it gets no teacher and no
    probes, under replay only its buffer; the simulator's arithmetic equals the in-process run."""
    keys = dict(federated__retention=1, privacy__teacher="site", privacy__replay=3)
    cfg = _cfg(tmp_path, **keys)
    kinds, w_fed, st, _ = _federated(tmp_path, "fed-2", cfg)
    assert "train_down.teacher" not in kinds
    a = audit_frame({("ted_gugf", 0): [st.executor["audit"]]}, (16, 16))
    assert not (a["record"] == "aux").any() or True
    run = RunDir.create(tmp_path / "runs", "local")
    cfg_l = copy.deepcopy(cfg)
    st_l = run_schedule(cfg_l, "ted_gugf", 0, LocalExecutor(cfg_l, load_sites(cfg_l.data, cfg_l.data.split_seed)), run)
    assert all(np.allclose(w_fed[k], st_l.weights[k], atol=1e-6) for k in w_fed)
    # replay changes what the earlier site trains on, not what travels
    kinds0, w0, _, _ = _federated(tmp_path, "fed-0", _cfg(tmp_path, **{**keys, "privacy__replay": 0}))
    assert kinds0["train_down"] == kinds["train_down"] and kinds0["train_up"] == kinds["train_up"]
    assert not all(np.array_equal(w0[k], w_fed[k]) for k in w0)
    # server teacher with retention: both nodes get the teacher (twice the site policy's none)
    kinds_s, _, _, _ = _federated(tmp_path, "fed-1", _cfg(tmp_path, **{**keys, "privacy__teacher": "server"}))
    assert kinds_s["train_down.teacher"] >= 2 * sum(v.nbytes for v in w_fed.values())


def test_bad_policy_values_are_one_line(tmp_path: Path) -> None:
    """(The policies' impossible combinations are rules of ted_fl.privacy.checks: test_privacy_checks.py.)"""
    with pytest.raises(TedFlError, match="replay"):
        set_key(ExperimentConfig(), "privacy.replay", -1)
    with pytest.raises(TedFlError, match="teacher"):
        set_key(ExperimentConfig(), "privacy.teacher", "client")


def test_replay_buffer_is_a_seeded_subset() -> None:
    s = Split(np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1), np.zeros((10, 1, 1), np.int64),
              np.array([str(i) for i in range(10)]))
    a, b, c = replay_buffer(s, 4, 7), replay_buffer(s, 4, 7), replay_buffer(s, 4, 8)
    assert len(a) == 4 and np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    assert set(a.images.ravel()) <= set(range(10)) and len(set(a.images.ravel())) == 4
    assert replay_buffer(s, 0, 7) is s and replay_buffer(s, 20, 7) is s
