"""The ClientApp of `python -m ted_fl.generalize`: one site, a thin adapter over `continual.gkd_stages`.

train: the source site runs one stage's round ("teacher", "student", "psae", "act_teacher",
"act_student", "distill") on the weights it receives; the frozen parts a stage needs (teacher,
scratch student, P-SAE, TAN, SAN) arrive once per node and seed and are kept in context.state.
evaluate: any site scores a model on its own test split and, given the model's alignment network,
returns the summed statistics (n, sum z, sum z z^T) of its codes. Replies carry weights, metrics
and those sums only; the audit mod checks every reply.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from ted_fl.config import ExperimentConfig, GKDConfig, ModelConfig
from ted_fl.continual import gkd as G
from ted_fl.continual import gkd_stages as S
from ted_fl.continual.networks import build_model
from ted_fl.continual.scores import split_scores
from ted_fl.continual.training import set_determinism
from ted_fl.federated import messages as M
from ted_fl.federated.client_app import hello, node_task, site_data
from ted_fl.federated.message_log import audit_mod
from ted_fl.schedule.engine import derive_seed, load_weights, model_weights
from ted_fl.schedule.worker import pick_device

FROZEN = ("teacher", "scratch", "psae", "tan", "san")  # record names of the frozen parts: "frozen.<name>"
_OPT: dict[Any, Any] = {}  # per process: optimizer state of a stage between its rounds


BINARY = 2  # the protocol is binary (spec 1): background + one structure, a 2-channel softmax head


def model_config(name: str, channels: list[int], in_channels: int = 1) -> ModelConfig:
    """A ModelConfig for network `name` with the binary head; `channels` (when given) also sets strides."""
    if channels:
        return ModelConfig(name=name, channels=list(channels), strides=[2] * (len(channels) - 1),
                           in_channels=in_channels, out_channels=BINARY)
    return ModelConfig(name=name, in_channels=in_channels, out_channels=BINARY)


def build_part(part: str, g: GKDConfig, image_shape: tuple[int, ...]) -> nn.Module:
    """An untrained module of one kind: teacher, student (also scratch), psae, tan, san."""
    if part == "teacher":
        return build_model(model_config(g.teacher, g.teacher_channels, image_shape[0]))
    if part in ("student", "scratch"):
        return build_model(model_config(g.student, g.student_channels, image_shape[0]))
    if part == "psae":
        return G.PSAE(tuple(g.psae_channels), g.code_side)
    if part in ("tan", "san"):
        owner = build_part("teacher" if part == "tan" else "student", g, image_shape)
        return G.build_msan(owner, image_shape, g.code_dim, g.code_side)
    raise ValueError(f"unknown part '{part}'")


TRAINED_PART = {"teacher": "teacher", "student": "student", "psae": "psae", "act_teacher": "tan",
                "act_student": "san", "distill": "student"}


def _frozen(context: Context, content: RecordDict, key: str, names: list[str], g: GKDConfig,
            shape: tuple[int, ...]) -> dict[str, nn.Module]:
    """The frozen parts for `key` (seed): from this message, else from the node's context.state."""
    out = {}
    for name in names:
        rec_name = f"frozen.{name}"
        if rec_name in content:
            context.state[rec_name] = content[rec_name]
            context.state[f"{rec_name}.key"] = ConfigRecord({"key": key})
        if rec_name not in context.state or str(context.state[f"{rec_name}.key"]["key"]) != key:
            raise RuntimeError(f"frozen part '{name}' for '{key}' was never received by this node")
        mod = load_weights(build_part(name, g, shape), M.from_record(context.state[rec_name]))  # type: ignore[arg-type]
        out[name] = S.freeze(mod).eval()
    return out


app = ClientApp(mods=[audit_mod])


app.query("hello")(hello)  # the same hello as the continual ClientApp: site, client and counts only


def run_stage(cfg: ExperimentConfig, task: str, approach: str, weights: M.Weights, frozen: dict[str, nn.Module],
              split: Any, steps: int, seed: int, opt_state: dict | None) -> tuple[M.Weights, dict[str, float], dict]:
    """One round of one stage on this site's training split; returns (weights, metrics, optimizer)."""
    g = cfg.gkd
    shape = tuple(int(x) for x in split.images.shape[1:])
    device = pick_device(cfg.train.device)  # train.device: a GPU when one is visible (auto)
    model = load_weights(build_part(TRAINED_PART[task], g, shape), weights).to(device)
    frozen = {k: m.to(device) for k, m in frozen.items()}
    common = dict(steps=steps, batch_size=g.batch_size, crop=g.crop, lr=g.lr, seed=seed, optimizer_state=opt_state)
    if task in ("teacher", "student"):
        metrics, opt = S.train_with_terms(model, None, G.gkd_approach("student"), split, **common)
    elif task == "psae":
        metrics, opt = S.train_psae(model, split, **common)  # type: ignore[arg-type]
    elif task in ("act_teacher", "act_student"):
        owner = frozen["teacher" if task == "act_teacher" else "scratch"]
        # each alignment network is fitted in the mode it is used in: TAN on the eval-mode teacher (DICD and
        # every GKD row run the teacher so), SAN on the student with batch statistics (it reads the training student)
        mode = "eval" if task == "act_teacher" else "batch"
        metrics, opt = S.train_alignment(owner, model, frozen["psae"], split, augment=g.augment,  # type: ignore[arg-type]
                                         mode=mode, **common)
    else:
        appr = G.gkd_approach(approach, frozen.get("tan"), frozen.get("san"), w_intra=g.w_intra, w_inter=g.w_inter,
                              w_cross=g.w_cross, w_kd=g.w_kd, w_at=g.w_at, w_pair=g.w_pair, tau=g.tau,
                              seg_on_views=g.seg_on_views)
        views = g.views if G.uses_views(approach, g.seg_on_views) else 0
        teacher = frozen.get("teacher") if appr.needs_teacher else None
        metrics, opt = S.train_with_terms(model, teacher, appr, split, views=views, augment=g.augment, **common)
    return model_weights(model), metrics, opt


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, c, site, client = node_task(msg, context)
    _, share = site_data(cfg, site, client)
    set_determinism(int(c["seed"]), cfg.train.threads)
    shape = tuple(int(x) for x in share.images.shape[1:])
    names = [n for n in str(c.get("frozen", "")).split(",") if n]
    frozen = _frozen(context, msg.content, str(c["frozen_key"]), names, cfg.gkd, shape) if names else {}
    tag = (str(c["task"]), str(c.get("approach", "")), int(c["seed"]), site, client)
    rnd = int(c["round"])
    opt_state = copy.deepcopy(_OPT[tag][1]) if rnd > 0 and tag in _OPT and _OPT[tag][0] == rnd - 1 else None
    weights, metrics, opt = run_stage(
        cfg, str(c["task"]), str(c.get("approach", "")), M.from_record(msg.content[M.WEIGHTS]), frozen, share,
        int(c["steps"]), derive_seed(int(c["seed"]), int(c["stage"]), rnd, client), opt_state)
    _OPT[tag] = (rnd, opt)
    content = RecordDict({M.WEIGHTS: M.to_record(weights),
                          M.METRICS: M.metric_record({**metrics, "num_examples": len(share)})})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score a model (teacher or student) on this site's split; with its MSAN, the sums of its codes."""
    cfg, c, site, client = node_task(msg, context)
    data, _ = site_data(cfg, site, client)
    split = data.splits[str(c.get("split", "test"))]
    set_determinism(0, cfg.train.threads)
    shape = tuple(int(x) for x in split.images.shape[1:])
    part = str(c["part"])
    device = pick_device(cfg.train.device)
    model = load_weights(build_part(part, cfg.gkd, shape), M.from_record(msg.content[M.WEIGHTS])).to(device)
    scores = split_scores(model, split)
    content = RecordDict({M.METRICS: M.metric_record({**scores, "num_examples": len(split)})})
    if "msan" in msg.content:
        msan = load_weights(build_part("tan" if part == "teacher" else "san", cfg.gkd, shape),
                            M.from_record(msg.content["msan"])).to(device)
        stats = S.code_stats(model, msan, split.images)  # type: ignore[arg-type]
        content[M.STATS] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in stats.to_arrays().items()})
    torch.set_num_threads(max(1, cfg.train.threads))
    return Message(content, reply_to=msg)
