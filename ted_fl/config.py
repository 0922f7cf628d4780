"""Experiment configuration: one schema for `simulations/*.toml`, the command lines and `config.toml`.

Every section is a dataclass; loading checks every key against it and names the closest key
when one is misspelt, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ted_fl.errors import TedFlError, closest


@dataclass
class DataConfig:
    """Which sites, where their files are, and the image size every site is resampled to."""

    sites: str = "prostate"  # a site-set name (sites/<name>.toml) or a path to a TOML file
    data_dir: str = ""  # empty: the embedded synthetic twin
    order: list[str] = field(default_factory=list)  # overrides the set's arrival order
    size: int = 64  # in-plane size of every slice (the reference uses 192)
    target: str = ""  # structure for multi-structure sets (mnms: lv, myo, rv)
    max_train: int = 0  # cap on training images per site (0: all), for quick runs
    cache_dir: str = ""  # where the synthetic twin is written (default ~/.cache/ted-fl)
    synthetic_volumes: int = 0  # volumes per synthetic site (0: the set's default)
    split_seed: int = 42  # seeds the train/val/test split and the synthetic twin (the reference's 42)


@dataclass
class ModelConfig:
    """The 2-D segmentation network, by name (ted_fl.continual.networks.NETWORKS).

    "monai_unet" (default): MONAI's UNet with num_res_units = 0 (strided convs, PReLU; 0.66 M
    parameters at 16..256 channels), about ten times cheaper per CPU step than "reference_unet",
    the reference code's fepegar U-Net (max pooling, ReLU, two 3x3 convs per level; 2.31 M
    parameters at 16..256 channels), which the paper configs use. docs/protocol.md compares them.
    """

    name: str = "monai_unet"  # a registered network (ted_fl.continual.networks.NETWORKS)
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    num_res_units: int = 0
    norm: str = "batch"  # batch | instance | group
    dropout: float = 0.0
    in_channels: int = 1
    out_channels: int = 0  # 0: the site set's classes + background (set at run start); else must match


@dataclass
class TrainConfig:
    """The schedule: rounds per stage (an epoch in the reference), steps per round, Adam + StepLR.

    The defaults are CPU-sized so that the bare `python -m ted_fl.simulate --sites prostate`
    finishes in a few minutes on 2 cores and still shows forgetting: 4 rounds x 20 steps a site
    at batch 8 with rates 1e-3 / 5e-4 (at the reference's 2e-4 / 1e-4 a few hundred steps
    barely learn the first site). The reference schedule (50 epochs of one pass each, batch 4,
    2e-4 / 1e-4) is spelt out in simulations/prostate-ted.toml.
    """

    rounds: int = 4  # rounds (epochs) per stage
    steps_per_round: int = 20  # 0: one pass over the training split per round
    joint_rounds_factor: float = 2.0  # the joint upper bound trains this many times longer
    batch_size: int = 8
    lr_first: float = 1e-3
    lr_later: float = 5e-4
    lr_gamma: float = 0.99  # StepLR gamma, stepped every round
    select_best: bool = True  # restore the best round on the arriving site's validation split
    eval_every_round: bool = False  # also evaluate every site after every round
    eval_val_all: bool = False  # also score every site's validation split at each stage's end (split val_stage)
    threads: int = 1  # torch threads per trainer (Ray clients and the centralized run alike)
    device: str = "auto"  # auto (a visible GPU if any, else CPU) | cpu | cuda


@dataclass
class LossConfig:
    """Weights and switches of the loss terms (see ted_fl.continual.terms).

    lambda_d defaults to 0.01, not the paper's 0.001 (simulations/prostate-ted.toml keeps 0.001):
    the CPU-sized schedule has a few hundred steps a site. It is not tuned for TED: measured on
    the twin with eval.bn = "batch" (docs/results.md), TED at 0.01 forgets more than seq, at
    0.001 about as much, and at 0.1 AKT (averaged over the disagreeing pixels only, and with
    the batch-broadcast GUGF ~batch-size times larger again) stalls it.
    """

    lambda_d: float = 0.01  # distillation weight shared by KD, SKA and AKT (reference: 0.001)
    w_kd: float = 1.0  # per-term multipliers on top of lambda_d
    w_ska: float = 1.0
    w_akt: float = 1.0
    w_lwf: float = 1.0  # LwF, MiB and PLOP distillation multipliers (also on top of lambda_d)
    w_mib: float = 1.0
    w_plop: float = 1.0
    ska_distribution: str = "normal"  # normal | uniform
    ska_mean: float = 0.0
    ska_std: float = 1.0
    ska_count: int = 0  # noise images per step (0: the batch size)
    probe_bn_update: bool = False  # let SKA probes update the student's BN running stats (reference)
    teacher_mode: str = "eval"  # eval | train (the reference code's batch statistics)
    gugf: str = "batch"  # batch (reference broadcasting) | normalized (batch mean) | sample
    temperature: float = 2.0  # LwF
    ewc_lambda: float = 100.0
    mas_lambda: float = 1.0
    plop_threshold: float = 0.5  # PLOP pseudo-label confidence quantile
    pod_weight: float = 0.0  # PLOP's POD feature term, only when asked (> 0); the reference has none
    baseline_variant: str = "paper"  # paper | reference: ewc/mas/mib/plop as their papers or as the reference code
    kd_reduce: str = "class"  # class | reference (the reference's width-axis sum for kd/ska/akt/akt_gugf; never ted)


@dataclass
class FederatedConfig:
    """Flower + Ray: who trains when, what travels, where it runs."""

    clients_per_site: int = 1
    retention: int = 0  # earlier sites that keep training (0: strict domain-continual; -1: all)
    probes: str = "pixels"  # pixels (server sends the noise) | seed (client regenerates it)
    num_cpus: float = 1.0  # per client
    num_gpus: float = 0.0  # per client (fractions allowed)
    ray_address: str = ""  # join an existing Ray cluster ("auto" or host:port)
    timeout: float = 600.0  # seconds a client may take to reply
    connect_timeout: float = 300.0  # seconds the first (hello) reply may take: clients start up
    retries: int = 1
    on_failure: str = "retry"  # retry | skip | abort


@dataclass
class EvalConfig:
    """How test and validation images are scored.

    bn = "running": batch norm normalises with its running statistics (model.eval()), which
    follow the newest site. bn = "batch": the reference's protocol (it never calls .eval()):
    each test image (2-D) or slice (3-D) is forwarded alone and batch norm normalises it with
    its own statistics; no buffer changes, the model's mode is restored afterwards.
    """

    bn: str = "batch"  # batch (the reference's protocol) | running
    batch_size: int = 16  # images per forward under bn = "running"


@dataclass
class ExperimentConfig:
    """A whole experiment: what `simulations/*.toml` holds and `config.toml` records."""

    name: str = "experiment"
    approaches: list[str] = field(default_factory=lambda: ["seq", "kd", "ted_gugf"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # mean ± std over 3 seeds by default
    out: str = "runs"
    # "reference": the reference code's evaluation rescale (percentiles 0.1-99), pooled HD95,
    # joint as one run over all sites selected on the first site, seq keeping lr_first;
    # "ted-fl": this simulator's choices (docs/protocol.md has the table)
    protocol: str = "ted-fl"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (list,):
        if not isinstance(value, list):
            raise TedFlError(f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint) or (
        hint is int and isinstance(value, bool)
    ):
        raise TedFlError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys with the closest valid one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise TedFlError(
                f"unknown key '{key}' in {where}{closest(key, names)}; valid keys: {', '.join(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise TedFlError(f"{where}.{key} must be a table [{key}]")
            kwargs[key] = from_dict(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_type(value, hint, f"{where}.{key}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_experiment(path: str | Path | None = None) -> ExperimentConfig:
    """Load `simulations/NAME.toml` (or a path); None gives the defaults."""
    if path is None:
        return ExperimentConfig()
    p = resolve_experiment_path(path)
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TedFlError(f"{p}: not valid TOML ({exc}); fix the syntax") from None
    return from_dict(ExperimentConfig, data, str(p))


def resolve_experiment_path(path: str | Path) -> Path:
    """Accept a path, or a bare name looked up in ./simulations and the package's simulations/."""
    p = Path(path)
    if p.is_file():
        return p
    for base in (Path.cwd() / "simulations", project_root() / "simulations"):
        for cand in (base / p.name, base / f"{p.name}.toml"):
            if cand.is_file():
                return cand
    known = sorted(q.stem for q in (project_root() / "simulations").glob("*.toml"))
    raise TedFlError(
        f"experiment file '{path}' not found{closest(p.stem, known)}; known: {', '.join(known)}"
    )


def project_root() -> Path:
    """The checkout holding sites/ and simulations/ (the package lives one level below)."""
    return Path(__file__).resolve().parent.parent


def set_key(cfg: ExperimentConfig, dotted: str, value: Any) -> None:
    """Override one key ('train.rounds') with the same checks as the TOML loader."""
    parts = dotted.split(".")
    obj: Any = cfg
    where = "config"
    for part in parts[:-1]:
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise TedFlError(f"unknown section '{part}' in --set {dotted}{closest(part, names)}")
        obj = getattr(obj, part)
        where += f".{part}"
    last = parts[-1]
    names = [f.name for f in dataclasses.fields(obj)]
    if last not in names:
        raise TedFlError(f"unknown key '{last}' in --set {dotted}{closest(last, names)}")
    hint = typing.get_type_hints(type(obj))[last]
    setattr(obj, last, _check_type(value, hint, f"{where}.{last}"))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse 'train.rounds=3' into ('train.rounds', 3) using TOML value syntax."""
    if "=" not in text:
        raise TedFlError(f"--set expects KEY=VALUE (e.g. train.rounds=3), got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip(), value


def toml_value(v: Any) -> str:
    """One TOML value: scalars, lists and inline tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def dump_toml(data: dict[str, Any]) -> str:
    """Write nested dicts as TOML: scalars, then [tables], then [[arrays of tables]], recursively."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        is_array = {k for k, v in table.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
        for k, v in table.items():
            if not isinstance(v, dict) and k not in is_array:
                lines.append(f"{k} = {toml_value(v)}")
        for k, v in table.items():
            if isinstance(v, dict):
                lines.append(f"\n[{prefix}{k}]")
                emit(v, f"{prefix}{k}.")
        for k in is_array:
            for item in table[k]:
                lines.append(f"\n[[{prefix}{k}]]")
                emit(item, f"{prefix}{k}.")

    emit(data, "")
    return "\n".join(lines) + "\n"
