"""The ClientApp: one site (or one department of a site), a thin adapter over `ted_fl.schedule.worker`.

A node learns which site it is from its node config (`site`/`client`, or the simulation's
`partition-id`), loads only that site's files, and keeps across messages the experiment
configuration (in `context.state`), the frozen teacher of the current stage and its optimizer's
moments. The teacher and the moments live in the worker's memory and in the site's own state
folder (`client_state_dir`, or the node config's `state-dir`), from which another Ray worker
serving the node, or a resumed run, reads them; not in `context.state`, which Flower's simulation
ships to the worker and back with every message (with no folder, they fall back to it).
Replies carry weights, the number of examples and metrics.
"""

from __future__ import annotations

import copy
import io
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ted_fl.config import ExperimentConfig, apply_overrides, from_dict, node_overrides, split_seed_of
from ted_fl.data import load_sites, site_order
from ted_fl.data.types import SiteData, Split
from ted_fl.federated import codec, secagg
from ted_fl.federated import messages as M
from ted_fl.federated.dp import client_mod
from ted_fl.federated.message_log import audit_mod
from ted_fl.federated.notices import silence
from ted_fl.files import atomic_torch_save, atomic_write
from ted_fl.privacy.policies import replay_buffer
from ted_fl.schedule.worker import SiteWorker

_CACHE: dict[Any, Any] = {}  # per process: parsed configs, loaded site data, workers


def _config(context: Context, content: RecordDict) -> ExperimentConfig:
    """The experiment config arrives with the first message and is kept in context.state."""
    if M.CONFIG in content and "experiment_toml" in content[M.CONFIG]:
        context.state["experiment"] = ConfigRecord({"toml": content[M.CONFIG]["experiment_toml"]})
    text = str(context.state["experiment"]["toml"])
    local = node_overrides(dict(context.node_config))  # e.g. where this hospital keeps its data
    key = ("cfg", hash(text), repr(sorted(local.items())))
    if key not in _CACHE:
        cfg = from_dict(ExperimentConfig, tomllib.loads(text), "experiment config")
        _CACHE[key] = apply_overrides(cfg, local, "node config")
    return _CACHE[key]


def identity(context: Context, cfg: ExperimentConfig) -> tuple[str, int]:
    """(site, client index) of this node: declared in the node config, or from the partition id."""
    node = context.node_config
    if "site" in node:
        return str(node["site"]), int(node.get("client", 0))

    order = site_order(cfg.data)
    k = cfg.federated.clients_per_site
    pid = int(node["partition-id"])
    if pid >= serving_partitions(context, cfg):
        raise RuntimeError(f"partition {pid} has no site: {len(order)} sites x {k} clients")
    pid %= len(order) * k  # block b of a simulation running cells at once serves the sites again
    return order[pid // k], pid % k


def serving_partitions(context: Context, cfg: ExperimentConfig) -> int:
    """How many of a simulated federation's partitions serve a site: every whole block of
    sites x clients_per_site (the simulator gives each concurrent cell a block, ted_fl.federated.simulation);
    the rest of a larger federation stays idle."""
    block = len(site_order(cfg.data)) * cfg.federated.clients_per_site
    total = int(context.node_config.get("num-partitions", block))
    return max(1, total // block) * block


def node_task(msg: Message, context: Context) -> tuple[ExperimentConfig, dict[str, Any], str, int]:
    """What a handler starts from: the experiment config, the message's config record and this node's
    (site, client). Shared by this ClientApp and `gkd_client`'s."""
    cfg = _config(context, msg.content)
    site, client = identity(context, cfg)
    return cfg, dict(msg.content[M.CONFIG]), site, client


def partition_split(split: Split, k: int, index: int, seed: int) -> Split:
    """Client `index` of `k`: a seeded, volume-wise share of the site's split."""
    if k == 1:
        return split
    vols = np.unique(split.volumes)
    rng = np.random.default_rng(seed)
    mine = set(rng.permutation(vols)[index::k])
    return split.take(np.array([v in mine for v in split.volumes]))


def site_data(cfg: ExperimentConfig, site: str, client: int) -> tuple[SiteData, Split]:
    """This node's site (loaded once per process) and its share of the training split."""
    key = ("data", hash(repr(cfg.data)), site)
    if key not in _CACHE:
        (_CACHE[key],) = load_sites(cfg.data, split_seed_of(cfg), only=[site])
    data: SiteData = _CACHE[key]
    seed = split_seed_of(cfg)
    share_key = ("share", *key, seed, cfg.federated.clients_per_site, client)
    if share_key not in _CACHE:  # the same arrays every round: a GPU keeps one copy (device.on_device)
        _CACHE[share_key] = partition_split(data.train, cfg.federated.clients_per_site, client, seed)
    return data, _CACHE[share_key]


def worker(cfg: ExperimentConfig) -> SiteWorker:
    key = ("worker", hash(repr(cfg.model)), hash(repr(cfg.loss)), cfg.train.threads)
    if key not in _CACHE:
        _CACHE[key] = SiteWorker(cfg)
    w: SiteWorker = _CACHE[key]
    w.cfg = cfg
    return w


def _opt_to_array(state: dict[str, Any]) -> Array:
    buf = io.BytesIO()
    torch.save(state, buf)
    return Array(np.frombuffer(buf.getvalue(), dtype=np.uint8).copy())


def _opt_from_array(arr: Array) -> dict[str, Any]:
    return torch.load(io.BytesIO(arr.numpy().tobytes()), weights_only=False)


def _state_file(c: dict, site: str, client: int, context: Context | None = None) -> Path | None:
    """The folder where this site keeps its optimizer state: its node config's `state-dir` (a deployed
    SuperNode's own disk), else the folder the simulation names in the run directory."""
    node_dir = context.node_config.get("state-dir") if context is not None else None
    d = str(node_dir or c.get("client_state_dir", ""))
    # one folder per schedule: schedules of one run may train the same site at the same time (ted_fl.schedule.cells)
    return Path(d) / f"{c['approach']}-s{c['seed']}" / f"{site}-{client}" if d else None


def _load_optimizer(context: Context, c: dict, site: str, client: int) -> dict[str, Any] | None:
    """Adam's moments from the previous round of this stage, or None at a stage's first round.

    From this process's memory when it served that round, else from the site's disk (another
    Ray worker served it, or the run was resumed), else from context.state (no state folder).
    """
    if int(c["round"]) == 0:
        return None
    want = f"{c['approach']}|{c['seed']}|{c['stage']}|{int(c['round']) - 1}"
    path = _state_file(c, site, client, context)
    cached = _CACHE.get(("optimizer", str(path), site, client))
    if cached is not None and cached[0] == want:
        return copy.deepcopy(cached[1])
    if path is not None:
        file = path / f"{want.replace('|', '_')}.pt"
        return torch.load(file, weights_only=False) if file.is_file() else None
    if "optimizer" in context.state and str(context.state["optimizer_meta"]["tag"]) == want:
        return _opt_from_array(context.state["optimizer"]["state"])
    return None


def _save_optimizer(context: Context, c: dict, site: str, client: int, state: dict[str, Any]) -> None:
    """Keep the round's optimizer state in memory and on the site's own disk (for resume)."""
    tag = f"{c['approach']}|{c['seed']}|{c['stage']}|{c['round']}"
    path = _state_file(c, site, client, context)
    _CACHE[("optimizer", str(path), site, client)] = (tag, state)
    if path is None:  # nowhere on disk: keep it in the node's context (it then travels with it)
        context.state["optimizer"] = ArrayRecord({"state": _opt_to_array(state)})
        context.state["optimizer_meta"] = ConfigRecord({"tag": tag})
        return
    path.mkdir(parents=True, exist_ok=True)
    file = path / f"{tag.replace('|', '_')}.pt"
    atomic_torch_save(state, file)
    # Keep this round and the previous one: a resume may redo the round in flight.
    prev = f"{c['approach']}|{c['seed']}|{c['stage']}|{int(c['round']) - 1}".replace("|", "_") + ".pt"
    for old in path.glob("*.pt"):
        if old.name not in (file.name, prev):
            old.unlink(missing_ok=True)


def _teacher_slot(c: dict, site: str, client: int, context: Context) -> tuple[tuple, Path | None]:
    """Where this node keeps the stage's teacher of one schedule (approach, seed): its key in this
    process's cache and its file in the node's state folder (None: no folder)."""
    folder = _state_file(c, site, client, context)
    schedule = f"{c['approach']}_{c['seed']}"
    file = folder / f"teacher-{schedule}.npz" if folder is not None else None
    return ("teacher", str(folder), site, client, schedule), file


def _keep_teacher(context: Context, c: dict, site: str, client: int, key: str, weights: ArrayRecord,
                  aux: Any) -> tuple[M.Weights, M.Weights]:
    """Keep the stage's teacher (and importances) on this node: in this process's memory and, for the
    other Ray workers that may serve the node, in its state folder; context.state only when there is
    no folder, since Flower's simulation ships context.state to the worker and back with every message."""
    teacher = M.from_record(weights)
    extra = M.from_record(aux) if isinstance(aux, ArrayRecord) else {}
    slot, file = _teacher_slot(c, site, client, context)
    _CACHE[slot] = (key, teacher, extra)
    if file is None:
        context.state["teacher"] = weights
        context.state["aux"] = aux if isinstance(aux, ArrayRecord) else ArrayRecord()
        context.state["teacher_meta"] = ConfigRecord({"key": key})
        return teacher, extra
    arrays = {"key": np.array(key), **{f"t/{k}": v for k, v in teacher.items()},
              **{f"a/{k}": np.asarray(v) for k, v in extra.items()}}

    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(file, write)
    return teacher, extra


def _teacher(context: Context, c: dict, site: str, client: int, content: RecordDict,
             key: str) -> tuple[M.Weights, M.Weights]:
    """The stage's teacher and importances: from the message once, then from this process's memory,
    the node's state folder (another worker received it) or context.state (no folder)."""
    if M.TEACHER in content:
        return _keep_teacher(context, c, site, client, key, content[M.TEACHER], content.get(M.AUX))
    slot, file = _teacher_slot(c, site, client, context)
    cached = _CACHE.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    if file is not None and file.is_file():
        with np.load(file, allow_pickle=False) as z:
            if str(z["key"]) == key:
                teacher = {k[2:]: z[k] for k in z.files if k.startswith("t/")}
                extra = {k[2:]: z[k] for k in z.files if k.startswith("a/")}
                _CACHE[slot] = (key, teacher, extra)
                return teacher, extra
    if "teacher" in context.state and str(context.state["teacher_meta"]["key"]) == key:
        return M.from_record(context.state["teacher"]), M.from_record(context.state["aux"])
    raise RuntimeError(f"teacher '{key}' was never received by this node; the server must resend it")


def _drop_teacher(context: Context, c: dict, site: str, client: int) -> None:
    """After the stage's last round the node forgets its teacher (a retry or a resume gets it again
    from the server): a study's many schedules leave no teacher per schedule on the site's disk."""
    slot, file = _teacher_slot(c, site, client, context)
    _CACHE.pop(slot, None)
    if file is not None:
        file.unlink(missing_ok=True)


def privacy_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """privacy.dp = "client": Flower's client-side DP mod on the train reply (ted_fl.federated.dp)."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    cfg = _config(context, msg.content)
    if cfg.privacy.dp != "client":
        return call_next(msg, context)

    return client_mod(cfg.privacy, msg, context, call_next)


def secure_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """privacy.secagg = true: Flower's SecAgg+ around the train handler; the update leaves masked
    (ted_fl.federated.secagg), after the privacy mod's clipping."""
    if msg.metadata.message_type != "train" or not _config(context, msg.content).privacy.secagg:
        return call_next(msg, context)
    return secagg.client_mod(_config(context, msg.content), msg, context, call_next)


# The audit sees what leaves (masked under SecAgg+), after clipping and noise
app = ClientApp(mods=[audit_mod, secure_mod, privacy_mod])
silence()  # under `flwr run` this module loads before Flower's Ray backend starts (ted_fl.federated.notices)


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    """Tell the server which site this node serves and how many examples it has (counts only)."""
    cfg = _config(context, msg.content)
    node = context.node_config
    if "site" not in node and int(node["partition-id"]) >= serving_partitions(context, cfg):
        # a simulated federation larger than the experiment: this node stays idle
        idle = {"idle": True, "site": "(idle)", "client": -1, "image_shape": [0, 0]}  # no '' (Flower's count_bytes)
        return Message(RecordDict({M.IDENTITY: ConfigRecord(idle)}), reply_to=msg)
    site, client = identity(context, cfg)
    data, train = site_data(cfg, site, client)
    ident = {
        "site": site, "client": client, "partition": int(context.node_config.get("partition-id", -1)),
        "n_train": len(train), "n_val": len(data.val), "n_test": len(data.test),
        "image_shape": [int(x) for x in data.train.images.shape[1:]],
    }
    return Message(RecordDict({M.IDENTITY: ConfigRecord(ident)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Decode the site's order (ted_fl.federated.codec), carry it out (SiteWorker.run), reply."""
    cfg = _config(context, msg.content)
    c = dict(msg.content[M.CONFIG])
    site, client = identity(context, cfg)
    data, share = site_data(cfg, site, client)
    order = codec.decode_train(msg.content, cfg, site, client)
    teacher, aux = None, {}
    if order.teacher.held:
        if order.teacher.from_weights and M.TEACHER not in msg.content:
            # privacy.teacher = "site": this round's weights are the stage's teacher; keep them as such.
            _keep_teacher(context, c, site, client, order.teacher.key, msg.content[M.WEIGHTS], msg.content.get(M.AUX))
        teacher, aux = _teacher(context, c, site, client, msg.content, order.teacher.key)
    replay = order.replay[0]
    if replay.size:  # an earlier site keeps only its replay buffer
        replay_key = ("replay", site, client, replay.size, order.seed, id(share))
        if replay_key not in _CACHE:  # built once per seed: the same arrays every round
            _CACHE[replay_key] = replay_buffer(share, replay.size, replay.seed)
        share = _CACHE[replay_key]
    out = worker(cfg).run(
        # The key names the schedule's stage; with the configuration's, two cells of a study (same approach,
        # seed and stage, another epsilon) served by this process never share a loaded teacher.
        order, data=share, weights=M.from_record(msg.content[M.WEIGHTS]), teacher=teacher,
        teacher_id=(order.teacher.key, hash(str(context.state["experiment"]["toml"]))), aux=aux,
        optimizer_state=_load_optimizer(context, c, site, client), val=data.val, per_volume=data.per_volume,
        labels=data.labels.labels(), probes=codec.sent_probes(msg.content),
    )
    _save_optimizer(context, c, site, client, out.optimizer_state)
    if order.teacher.held and order.round + 1 >= order.stage_rounds:
        _drop_teacher(context, c, site, client)
    content = RecordDict({
        M.WEIGHTS: M.to_record(out.weights),
        M.METRICS: M.metric_record({**out.metrics, "num_examples": out.num_examples}),
    })
    if out.val is not None:
        content[M.VAL] = M.metric_record(out.val)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the global model on this site's own split; only metrics go back."""
    cfg, c, site, client = node_task(msg, context)
    data, _ = site_data(cfg, site, client)
    split = data.splits[str(c["split"])]
    scores = worker(cfg).evaluate(M.from_record(msg.content[M.WEIGHTS]), split, data.per_volume,
                                  data.labels.labels())
    return Message(RecordDict({M.METRICS: M.metric_record({**scores, "num_examples": len(split)})}),
                   reply_to=msg)


@app.query("leakage")
def leakage(msg: Message, context: Context) -> Message:
    """Membership inference on this site's own images (ted_fl.privacy.mia): only the scores go back."""
    cfg = _config(context, msg.content)
    site, client = identity(context, cfg)
    data, _ = site_data(cfg, site, client)
    scores = worker(cfg).leakage(M.from_record(msg.content[M.WEIGHTS]), M.from_record(msg.content[M.REFERENCE]),
                                 data.train, data.test, int(msg.content[M.CONFIG]["seed"]))
    return Message(RecordDict({M.METRICS: M.metric_record(scores)}), reply_to=msg)


@app.query("importance")
def importance(msg: Message, context: Context) -> Message:
    """Parameter importances (EWC's Fisher, MAS) on this site's data: arrays shaped like the model."""
    cfg, c, site, client = node_task(msg, context)
    _, share = site_data(cfg, site, client)
    state = worker(cfg).importance(str(c["approach"]), M.from_record(msg.content[M.WEIGHTS]), share)
    return Message(RecordDict({M.AUX: M.to_record(state),
                               M.METRICS: M.metric_record({"num_examples": len(share)})}), reply_to=msg)
