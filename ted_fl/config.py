"""Experiment configuration: one typed schema for `simulations/*.toml`, `--set`, `config.toml`,
`flwr run`'s run config and a SuperNode's node config.

Every section is a pydantic dataclass: attribute access and defaults as plain dataclasses, but
every value is checked on construction and on assignment, unknown keys are refused with the
closest valid one, and every allowed value lives here, in a `Literal` (nowhere else lists them:
the command lines take their choices from these types). Errors become one-line `TedFlError`s
that name the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shlex
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import tomli_w
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from ted_fl.errors import TedFlError, closest

# Refuse unknown keys; check assignments too, so `cfg.train.rounds = "x"` fails where it is made.
SCHEMA = ConfigDict(extra="forbid", validate_assignment=True)

# Every allowed value, once. A registry keyed on one of these checks it covers exactly these names.
ApproachName = Literal[
    "seq", "joint", "kd", "kd_ref", "ska", "akt", "akt_gugf", "ted", "ted_gugf", "ewc", "mas", "mib", "plop", "lwf"
]
# The rows every comparison is read against, by role (the reports and summaries name them through these):
# fine-tuning with no term against forgetting, and training on every site seen so far.
LOWER_BOUND: ApproachName = "seq"
UPPER_BOUND: ApproachName = "joint"
# The student rows of `python -m ted_fl.generalize` (ted_fl.continual.gkd.gkd_approach builds them).
GKDApproachName = Literal["student", "student_aug", "kd", "kd_aug", "at", "skd", "gkd", "intra", "inter", "cross", "intra_inter"]
Norm = Literal["batch", "instance", "group"]
Device = Literal["auto", "cpu", "cuda"]
Distribution = Literal["normal", "uniform"]
TeacherMode = Literal["train", "eval"]
GugfMode = Literal["batch", "normalized", "sample"]
ProbeTransport = Literal["pixels", "seed"]  # pixels: the server sends the noise; seed: clients regenerate it
OnFailure = Literal["retry", "skip", "abort"]
DPLevel = Literal["off", "sample", "client"]  # sample: Opacus DP-SGD in a site; client: Flower DP on what leaves it
Clipping = Literal["fixed", "adaptive"]
NoiseSide = Literal["server", "client"]
TeacherPlace = Literal["server", "site"]  # where the frozen teacher lives (privacy.teacher)
EvalSlices = Literal["one", "batched"]  # eval.bn = "batch": slices a forward (ted_fl.continual.device.batch_statistics)
Compile = Literal["off", "on"]  # train.compile: torch.compile the networks' forwards (ted_fl.continual.compiled)
# federated.strategy: Flower's Message-API strategies that make sense inside a stage (ted_fl.continual.strategies)
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"]
AmpMode = Literal["auto", "bf16", "off"]  # train.amp (ted_fl.continual.device.amp_dtype_for)
BaselineVariant = Literal["paper", "reference"]  # loss.baseline_variant: ewc/mas/mib/plop as their papers or the reference code
KDReduce = Literal["class", "reference"]  # loss.kd_reduce (ted_fl.continual.terms.cross_entropy)
EvalBN = Literal["running", "batch"]  # eval.bn: batch statistics per image (the reference) or running ones
FixedTerm = Literal["kd", "at", "skd"]  # gkd.fixed_term (ted_fl.continual.combined.FixedTeacherDistill)
Augment = Literal["spec", "mild"]  # gkd.augment (ted_fl.continual.gkd.AUGMENT)
Checkpoints = Literal["resume", "stages", "all"]  # output.checkpoints
ProtocolName = Literal["ted-fl", "reference"]  # protocol (docs/protocol.md)
# Numbers: every float is finite unless its key says what infinity means (privacy.epsilon); a count,
# a rate or a weight that cannot be negative is refused there, naming the key, not deep inside torch.
Positive = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Real = Annotated[float, Field(allow_inf_nan=False)]
Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # a loss weight or multiplier: 0 switches it off
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # a learning rate, factor, temperature, time-out
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]  # a moment's decay rate
FlowerDefault = Literal["flower"]  # a server-optimizer key left at its strategy's Flower default
CellsInParallel = Literal["auto"] | Positive  # train.cells_in_parallel: "auto" or how many cells at once


def choices(literal: Any) -> tuple[Any, ...]:
    """The allowed values of one of the `Literal` types above (for command-line choices and loops over
    every value); typed Any so that a value passes where the schema expects that Literal."""
    return tuple(get_args(literal))


@dataclass(config=SCHEMA)
class DataConfig:
    """Which sites, where their files are, and the image size every site is resampled to."""

    sites: str = "prostate"  # a site-set name (sites/<name>.toml) or a path to a TOML file
    data_dir: str = ""  # empty: the embedded synthetic twin
    order: list[str] = field(default_factory=list)  # overrides the set's arrival order
    size: Count = 64  # in-plane size of every slice (the reference uses 192); 0: each site's preprocess.size
    target: str = ""  # structure for multi-structure sets (mnms: lv, myo, rv)
    max_train: Count = 0  # cap on training images per site (0: all), for quick runs
    cache_dir: str = ""  # where the synthetic twin is written (default ~/.cache/ted-fl)
    synthetic_volumes: Count = 0  # volumes per synthetic site (0: the set's default)
    # seeds the train/val/test split and the synthetic twin (the reference's 42); "seed": each run
    # seed also draws its own split (and twin), so the spread over seeds includes the split's variance
    split_seed: Count | Literal["seed"] = 42


@dataclass(config=SCHEMA)
class ModelConfig:
    """The 2-D segmentation network, by name (ted_fl.continual.networks.NETWORKS).

    "monai_unet" (default): MONAI's UNet with num_res_units = 0 (strided convs, PReLU; 0.66 M
    parameters at 16..256 channels, ~14x fewer MACs than "reference_unet"),
    the reference code's fepegar U-Net (max pooling, ReLU, two 3x3 convs per level; 2.31 M
    parameters at 16..256 channels), which the paper configs use. docs/protocol.md compares them.
    """

    name: str = "monai_unet"  # a registered network (ted_fl.continual.networks.NETWORKS)
    channels: Annotated[list[Positive], Field(min_length=1)] = field(default_factory=lambda: [16, 32, 64, 128, 256])
    strides: list[Positive] = field(default_factory=lambda: [2, 2, 2, 2])
    num_res_units: Count = 0
    norm: Norm = "batch"
    dropout: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    in_channels: Positive = 1
    out_channels: Count = 0  # 0: the site set's classes + background (set at run start); else must match


@dataclass(config=SCHEMA)
class TrainConfig:
    """The schedule: rounds per stage (an epoch in the reference), steps per round, Adam + StepLR.

    The defaults are CPU-sized so that the bare `python -m ted_fl.simulate --sites prostate`
    (3 approaches x 3 seeds) takes about 5 minutes on 2 cores and still shows forgetting on the twin,
    whose last site (HK) shifts the model: 4 rounds x 20 steps a site
    at batch 8 with rates 1e-3 / 5e-4 (at the reference's 2e-4 / 1e-4 a few hundred steps
    barely learn the first site). The reference schedule (50 epochs of one pass each, batch 4,
    2e-4 / 1e-4) is spelt out in simulations/prostate-ted.toml.
    """

    rounds: Positive = 4  # Flower rounds per stage; a round is steps_per_round steps (an epoch only when that is 0)
    steps_per_round: Count = 20  # 0: one pass over the training split per round
    joint_rounds_factor: Rate = 2.0  # the joint upper bound trains this many times longer
    batch_size: Positive = 8
    lr_first: Rate = 1e-3
    lr_later: Rate = 5e-4
    lr_gamma: Rate = 0.99  # StepLR gamma, stepped every round
    select_best: bool = True  # restore the best round on the arriving site's validation split
    eval_every_round: bool = False  # also evaluate every site after every round
    eval_val_all: bool = False  # also score every site's validation split at each stage's end (split val_stage)
    threads: Positive = 1  # torch threads per trainer (Ray clients and the centralized run alike)
    # Independent schedules (approach x seed x grid point) run at once: "auto" = as many as the machine
    # holds (CPU cores / threads, GPU share, a Ray cluster's own scheduling), or a number (1: one after
    # another). It never changes a cell's numbers (ted_fl.schedule.cells); a cell's identity ignores it.
    cells_in_parallel: CellsInParallel = "auto"
    device: Device = "auto"  # auto: a visible GPU if any, else CPU
    amp: AmpMode = "auto"  # mixed precision: auto (bf16 autocast on a GPU that supports it, off on CPU) | bf16 | off
    cudnn_benchmark: bool = True  # on a GPU: cuDNN autotuning and channels-last (false: deterministic cuDNN)
    # on: the networks' training forwards (and backward) through torch.compile: CUDA graphs on a GPU
    # ("reduce-overhead"), Inductor's C++ on a CPU (eager, with one warning, without a C++ compiler);
    # the first steps pay the compilation. Not bitwise the eager arithmetic (ted_fl.continual.compiled).
    compile: Compile = "off"


@dataclass(config=SCHEMA)
class LossConfig:
    """Weights and switches of the loss terms (see ted_fl.continual.terms).

    lambda_d defaults to 0.01, not the paper's 0.001 (simulations/prostate-ted.toml keeps 0.001):
    the CPU-sized schedule has 80 steps a site. At 0.01 KD's and SKA's gradients are a few percent of
    L_seg's and AKT + GUGF's is of the order of L_seg's (AKT averages over the disagreeing pixels
    only and the reference's batch-broadcast GUGF multiplies it by up to the batch size): measured on
    each approach's own checkpoints and over a stage's steps by `python -m ted_fl.diagnose
    term-grads`, docs/results-twin.md (section "Term gradients on each approach's own
    checkpoints"). At 0.001 kd and ted_gugf were
    indistinguishable from seq on the twin (seed 0: BWT -0.369 / -0.386 against seq's -0.388);
    at 0.01 ted_gugf forgot less (-0.221) and learnt each new site less (plasticity 0.777 against
    0.833). The values come from docs/results-twin.md's runs, not from tuning for TED.
    """

    lambda_d: Weight = 0.01  # distillation weight shared by KD, SKA and AKT (reference: 0.001)
    w_kd: Weight = 1.0  # per-term multipliers on top of lambda_d
    w_ska: Weight = 1.0
    w_akt: Weight = 1.0
    w_lwf: Weight = 1.0  # LwF, MiB and PLOP distillation multipliers (also on top of lambda_d)
    w_mib: Weight = 1.0
    w_plop: Weight = 1.0
    ska_distribution: Distribution = "normal"
    ska_mean: Real = 0.0
    ska_std: Weight = 1.0
    ska_count: Count = 0  # noise images per step (0: the batch size)
    probe_bn_update: bool = False  # let SKA probes update the student's BN running stats (reference)
    # train (default, the reference's): the teacher normalises each batch with the batch's own
    # statistics, as eval.bn = "batch" scores every model; eval: its running statistics, which
    # follow the teacher's own (previous) site. The teacher should be normalised the way the model
    # is evaluated: with eval.bn = "running" set teacher_mode = "eval" too. Under eval.bn = "batch"
    # an "eval" teacher is another function than the model R[t-1] scores (on the twin, RUNMC's model
    # scores Dice 0.39 on BMC's images with its running statistics, 0.63 with batch statistics), and
    # AKT + GUGF distil it hard (docs/results-twin.md, "Term gradients on each approach's own checkpoints").
    teacher_mode: TeacherMode = "train"
    gugf: GugfMode = "batch"  # batch: the reference's broadcasting (see ted_fl.continual.terms.GUGF)
    temperature: Rate = 2.0  # LwF
    ewc_lambda: Weight = 100.0
    mas_lambda: Weight = 1.0
    plop_threshold: Fraction = 0.5  # PLOP pseudo-label confidence quantile
    pod_weight: Weight = 0.0  # PLOP's POD feature term, only when asked (> 0); the reference has none
    baseline_variant: BaselineVariant = "paper"  # paper | reference: ewc/mas/mib/plop as their papers or as the reference code
    kd_reduce: KDReduce = "class"  # class | reference (the reference's width-axis sum for kd/ska/akt/akt_gugf; never ted)


@dataclass(config=SCHEMA)
class FederatedConfig:
    """Flower + Ray: who trains when, what travels, where it runs."""

    clients_per_site: Positive = 1
    retention: Annotated[int, Field(ge=-1)] = 0  # earlier sites that keep training (0: strict domain-continual; -1: all)
    probes: ProbeTransport = "pixels"
    num_cpus: Rate = 1.0  # per client
    num_gpus: Weight = 0.0  # per client (fractions allowed)
    ray_address: str = ""  # join an existing Ray cluster ("auto" or host:port)
    timeout: Rate = 600.0  # seconds a client may take to reply
    connect_timeout: Rate = 300.0  # seconds the first (hello) reply may take: clients start up
    retries: Count = 1
    on_failure: OnFailure = "retry"
    client_app: str = "ted_fl.federated.client_app:app"  # module:attribute of the ClientApp the simulation runs
    fast_polling: bool = False  # patch Flower's 0.1 s message polling in the simulation (ted_fl.federated.simulation)
    # How a stage's rounds combine the clients' models (ted_fl.continual.strategies): fedavg; fedprox (FedAvg
    # plus mu/2 ||w - w_global||^2 in every local step); fedadam / fedyogi / fedadagrad (a server optimizer
    # over the averaged update, its state kept across the rounds of one stage). Keys and defaults are Flower's.
    strategy: StrategyName = "fedavg"
    fraction_train: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0  # of a site's clients, each round
    proximal_mu: Weight = 0.0  # fedprox's mu (Flower's default 0: FedAvg)
    # The server optimizer's keys, Flower's names; "flower": the chosen strategy's own default in Flower
    eta: Rate | FlowerDefault = "flower"  # server learning rate
    beta_1: Beta | FlowerDefault = "flower"  # first-moment decay (fedadam, fedyogi; FedAdagrad has none)
    beta_2: Beta | FlowerDefault = "flower"  # second-moment decay (fedadam, fedyogi)
    tau: Rate | FlowerDefault = "flower"  # adaptivity: added to sqrt(v) in the step's denominator


@dataclass(config=SCHEMA)
class GKDConfig:
    """Generalizable distillation (`python -m ted_fl.generalize`, docs gkd-method.md) and the
    continual combination (a fixed large teacher distilled into the student while sites arrive).

    Defaults follow the spec where it is explicit (D = 512, s = 16, K = 4, tau = 0.1, weights
    1 / 1 / 0.5); step counts are CPU-sized. *_channels = [] keeps the network's own widths.
    """

    source: str = "CHASEDB1"  # the site that trains; every other site of the set is an unseen target
    approaches: list[GKDApproachName] = field(default_factory=lambda: list(get_args(GKDApproachName)))
    teacher: str = "basic_unet"  # a registered network (python -m ted_fl.networks)
    student: str = "mobilenetv2_unet"
    teacher_channels: list[int] = field(default_factory=list)
    student_channels: list[int] = field(default_factory=list)
    rounds: Positive = 1  # Flower rounds per stage (weights return to the server after each)
    steps_teacher: Positive = 200  # steps per round of each stage
    steps_student: Positive = 200
    steps_psae: Positive = 100
    steps_act: Positive = 100
    batch_size: Positive = 4
    crop: Count = 0  # random square training crops (0: whole images); evaluation is on whole images
    lr: Rate = 1e-3  # Adam
    views: Positive = 4  # K augmented views per anchor (DCGD)
    augment: Augment = "spec"  # spec (gamma, contrast, blur, noise, flips) | mild (no blur, narrower): gkd.AUGMENT
    seg_on_views: bool = False  # true: the old rule, L_seg also on the views in gkd / intra / inter / cross (spec 2.5 now: anchors only)
    tau: Rate = 0.1
    w_intra: Weight = 1.0
    w_inter: Weight = 1.0
    w_cross: Weight = 0.5
    w_kd: Weight = 1.0
    w_at: Weight = 1.0
    w_pair: Weight = 1.0
    code_dim: Positive = 512  # D (the P-SAE's last width)
    code_side: Positive = 16  # s
    psae_channels: list[Positive] = field(default_factory=lambda: [64, 128, 256, 512])
    latency_repeats: Positive = 5
    # continual combination: a checkpoint written by `generalize` (checkpoints/teacher-seed<N>/teacher.pt)
    fixed_teacher: str = ""
    fixed_term: FixedTerm = "kd"  # kd | at | skd: how the fixed teacher distils into the student
    w_fixed: Weight = 1.0


@dataclass(config=SCHEMA)
class EvalConfig:
    """How test and validation images are scored.

    bn = "running": batch norm normalises with its running statistics (model.eval()), which
    follow the newest site. bn = "batch": the reference's protocol (it never calls .eval()):
    each test image (2-D) or slice (3-D) is normalised by batch norm with its own statistics; no
    buffer changes, the model's mode is restored afterwards. slices = "batched" (default) forwards
    batch_size such slices at once, batch norm computed as instance normalisation with the layer's
    weight, bias and eps, which is what train-mode batch norm over one slice computes (equal to the
    one-at-a-time forward to float rounding, checked on every registered network); a network with
    a layer outside torch.nn and MONAI's activations falls back to one at a time. "one": the
    reference's loop, one slice a forward.
    """

    bn: EvalBN = "batch"  # batch (the reference's protocol) | running
    batch_size: Positive = 16  # images per forward (under bn = "batch" with slices = "batched" too)
    slices: EvalSlices = "batched"  # bn = "batch": batched (same numbers, batch_size a forward) | one


@dataclass(config=SCHEMA)
class PrivacyConfig:
    """Differential privacy, secure aggregation and the privacy policies (docs/privacy.md says
    what each DP level protects; every key is a study axis of `python -m ted_fl.study privacy`).

    dp = "sample": DP-SGD inside every site (Opacus: per-sample clipping at max_grad_norm,
    Gaussian noise, Poisson sampling), protecting each patient image of a site; the noise is
    calibrated with Opacus' RDP accountant so that one site's training in one stage spends
    `epsilon` at `delta`. dp = "client": what leaves a site (its weight update) is clipped at
    clip_norm and noised with Flower's DP strategies and mods, protecting a whole client (a
    site, or one department of it); `epsilon` is spent over the stage's rounds. noise = "server":
    central DP (Flower's DifferentialPrivacy*Clipping strategies add noise to the aggregate;
    clip_on says where updates are clipped); noise = "client": local DP (Flower's LocalDpMod
    adds the noise before the update leaves the site). epsilon = inf: clipping only, no noise.

    secagg: every round's updates are summed with Flower's SecAgg+ (ted_fl.federated.secagg): the
    server sees masked vectors and their examples-weighted mean only. Federated runs with at least
    2 clients a round (federated.clients_per_site >= 2); secagg_* are Flower's protocol settings
    (shares, reconstruction threshold, and the clipping and quantisation of the update values).

    teacher: "server" (default) keeps the frozen teacher and the SKA probes at the server: it
    sends the teacher to every node that trains in a stage (once per node and stage) and the
    probes every round (pixels or seed, federated.probes). "site": the teacher is handed only
    to the arriving site: its nodes freeze the stage's first weights they receive (bitwise the
    server's teacher, so no separate teacher payload travels) and draw their SKA probes
    themselves from a seed of their own (no probes travel); retained earlier sites train
    without a teacher. replay = N: an earlier site that keeps training (federated.retention)
    trains on a seeded buffer of at most N of its own training images (0: all of them).
    mia: run the membership-inference attack (ted_fl.privacy.mia) on every site at the end.
    """

    dp: DPLevel = "off"
    epsilon: Annotated[float, Field(gt=0)] = math.inf  # target epsilon per site (client) and stage; inf: no noise
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 1e-5
    max_grad_norm: Rate = 1.0  # sample level: per-sample gradient clipping bound
    clip_norm: Rate = 1.0  # client level: update clipping bound (initial one if adaptive)
    clipping: Clipping = "fixed"  # client level: fixed | adaptive (Andrew et al., Flower's adaptive wrappers)
    noise: NoiseSide = "server"  # client level: server (central DP) | client (local DP, Flower's LocalDpMod)
    clip_on: NoiseSide = "client"  # client level, central DP: where updates are clipped (Flower's mods or the server)
    secagg: bool = False  # Flower's SecAgg+ sums a round's updates (federated runs, >= 2 clients a round)
    secagg_shares: Positive = 3  # SecAgg+ num_shares: each client's key is split among this many neighbours
    secagg_reconstruction_threshold: Positive = 2  # shares that rebuild a dropped client's key (< secagg_shares)
    secagg_clipping_range: Rate = 8.0  # each weighted update coordinate is clipped to +-this before quantisation
    secagg_quantization_range: Positive = 4194304  # integer levels over [-range, range] (2**22; step 2 range / this)
    teacher: TeacherPlace = "server"  # server | site: where the frozen teacher lives
    replay: Count = 0  # images an earlier site keeps for its retention rounds (0: all)
    mia: bool = True  # membership-inference attack on every site's final model (metrics.csv split "privacy")


@dataclass(config=SCHEMA)
class OutputConfig:
    """What a run keeps on disk once it ends (during the run, everything resume needs is kept).

    checkpoints = "stages" (default): the model after every stage (the report's sample predictions)
    and a slim `last.pt` (the rows; the weights live in the last stage's file); "resume": only the
    final model and the slim `last.pt` (the report shows no per-stage samples); "all": the full
    resume state, a checkpoint after every round, and the sites' optimizer state.
    """

    checkpoints: Checkpoints = "stages"


@dataclass(config=SCHEMA)
class DiagnosticsConfig:
    """What a run measures besides its scores (costs training time; off by default).

    term_grads: at every training step, each term's weighted gradient norm over the student's
    parameters divided by the segmentation loss's (one extra backward per term), written to
    metrics.csv as train rows grad_ratio_<term> (and grad_seg), the mean over each round's steps;
    `python -m ted_fl.diagnose term-grads` reports their mean over a stage. Not under DP-SGD.
    """

    term_grads: bool = False


@dataclass(config=SCHEMA)
class ExperimentConfig:
    """A whole experiment: what `simulations/*.toml` holds and `config.toml` records."""

    name: str = "experiment"
    approaches: Annotated[list[ApproachName], Field(min_length=1)] = field(default_factory=lambda: ["seq", "kd", "ted_gugf"])
    seeds: Annotated[list[Count], Field(min_length=1)] = field(default_factory=lambda: [0, 1, 2])  # mean ± std over 3 seeds by default
    out: str = "runs"
    # "reference": the reference code's evaluation rescale (percentiles 0.1-99), pooled HD95,
    # joint as one run over all sites selected on the first site, seq keeping lr_first;
    # "ted-fl": this simulator's choices (docs/protocol.md has the table)
    protocol: ProtocolName = "ted-fl"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)


def split_seed_of(cfg: ExperimentConfig, seed: int | None = None) -> int:
    """The split seed a run seed's data is drawn with: data.split_seed, or the run seed itself
    when it is "seed" (`seed`, else the config's only seed)."""
    fixed = cfg.data.split_seed
    if fixed != "seed":
        return int(fixed)
    if seed is not None:
        return int(seed)
    if len(cfg.seeds) == 1:
        return int(cfg.seeds[0])
    raise TedFlError(f"data.split_seed = 'seed' draws one split per run seed, and this step has no seed to pick one of "
                     f"{cfg.seeds}; run one seed (--seed N) or set data.split_seed to an integer")


def federated_split_seed(cfg: ExperimentConfig) -> None:
    """The Flower simulation loads each site's split once per node, so data.split_seed = "seed" runs
    there with one seed per run; refuse several (one line, before anything starts)."""
    if cfg.data.split_seed == "seed" and len(cfg.seeds) > 1:
        raise TedFlError(f"data.split_seed = 'seed' with seeds {cfg.seeds}: the Flower simulation loads each site's "
                         "split once per node, so it runs one seed per run; pass one --seed per run, run the seeds "
                         "as sweep / study cells, or use python -m ted_fl.centralized")


def for_seed(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The experiment as run seed `seed` trains it: a copy whose data.split_seed is that seed when the
    config says "seed" (the config itself otherwise)."""
    if cfg.data.split_seed != "seed":
        return cfg

    out = copy.deepcopy(cfg)
    out.data.split_seed = int(seed)
    return out


SECAGG_MODULUS = 2**32  # Flower's SecAggPlusWorkflow modulus_range (its default; must exceed the quantisation range)


def strategy_conflicts(cfg: ExperimentConfig) -> None:
    """federated.* keys the chosen federated.strategy would not read (a one-line TedFlError naming the key):
    proximal_mu outside fedprox, the server optimizer's keys outside fedadam / fedyogi / fedadagrad, and
    beta_1 / beta_2 with fedadagrad (Flower's FedAdagrad fixes them at 0)."""
    fed = cfg.federated
    server = ("fedadam", "fedyogi", "fedadagrad")
    for key in ("eta", "beta_1", "beta_2", "tau"):
        value = getattr(fed, key)
        if value == "flower":
            continue
        if fed.strategy not in server or (fed.strategy == "fedadagrad" and key.startswith("beta")):
            users = "fedadam or fedyogi" if key.startswith("beta") else "fedadam, fedyogi or fedadagrad"
            raise TedFlError(f"federated.{key} = {value} is read by federated.strategy = {users}, not "
                             f"'{fed.strategy}'; remove federated.{key} or change federated.strategy")
    if fed.proximal_mu and fed.strategy != "fedprox":
        raise TedFlError(f"federated.proximal_mu = {fed.proximal_mu} is read by federated.strategy = 'fedprox', not "
                         f"'{fed.strategy}'; set federated.strategy = 'fedprox' or remove federated.proximal_mu")


def _describe(err: dict[str, Any], where: str) -> str:
    """One line for pydantic's first error: where, the dotted key, what is wrong, how to fix it."""
    # a union's member tag ('constrained-int', "literal['seed']") is no key: data.split_seed, not data.split_seed.int
    loc = [str(p) for p in err["loc"] if not any(c in str(p) for c in "-[(")]
    key = ".".join(loc)
    head = f"{where}: " if where else ""
    kind, value = err["type"], err.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        table = ".".join(loc[:-1])
        return f"{head}unknown key '{loc[-1]}'" + (f" in [{table}]" if table else "")
    if kind == "literal_error":
        number = err.get("number")  # a Literal | int union (train.cells_in_parallel): the int's bound too
        return (f"{head}{key} = {value!r} is not one of {err['ctx']['expected']}"
                + (f" or a whole number >= {number}" if number is not None else ""))
    if kind in ("dataclass_type", "dataclass_exact_type"):
        return f"{head}{key} must be a table [{key}], got {value!r}"
    if kind == "dict_type":
        return f"{head}{key} must be a table, e.g. {loc[-1]} = {{ name = ... }}, got {value!r}"
    if kind == "list_type":
        return f"{head}{key} must be a list, e.g. {loc[-1]} = [...], got {value!r}"
    return f"{head}{key}: {err['msg'][0].lower()}{err['msg'][1:]}, got {value!r}"


def _first_error(exc: ValidationError) -> dict[str, Any]:
    """pydantic's first error; for a Literal | int union, with the int's lower bound as "number"."""
    errors = exc.errors()
    err: dict[str, Any] = dict(errors[0])
    if err["type"] == "literal_error" and len(errors) > 1 and errors[1]["type"] == "greater_than_equal":
        err["number"] = errors[1]["ctx"]["ge"]
        err["loc"] = tuple(p for p in err["loc"] if not str(p).startswith("literal["))
    return err


def _union_alternative(exc: ValidationError) -> str:
    """' (or 'seed')' when the failing key is a union with a Literal member (data.split_seed): the
    first error names the number member only."""
    for e in exc.errors()[1:]:
        if e["type"] == "literal_error" and e["loc"][:-1] == exc.errors()[0]["loc"][:-1]:
            return f" (or {e['ctx']['expected']})"
    return ""


def _as_error(exc: ValidationError, cls: type, where: str) -> TedFlError:
    err = _first_error(exc)
    line = _describe(err, where) + _union_alternative(exc)
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        owner = _section(cls, [str(p) for p in err["loc"][:-1]])
        names = [f.name for f in dataclasses.fields(owner)] if owner else []
        line += f"{closest(str(err['loc'][-1]), names)}; valid keys: {', '.join(names)}"
    return TedFlError(line)


def _section(cls: type, path: list[str]) -> type | None:
    """The dataclass reached from `cls` by following `path` through nested sections."""
    for part in path:
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        nested = getattr(cls, "__pydantic_fields__", {}).get(part)
        typ = nested.annotation if nested is not None else hints.get(part)
        if not (isinstance(typ, type) and dataclasses.is_dataclass(typ)):
            return None
        cls = typ
    return cls


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build schema class `cls` from `data`; a bad key or value is one line naming it and the fix."""
    if not isinstance(data, dict):
        raise TedFlError(f"{where} must be a table, got {data!r}")
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as exc:
        raise _as_error(exc, cls, where) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_experiment(path: str | Path | None = None) -> ExperimentConfig:
    """Load `simulations/NAME.toml` (or a path); None gives the defaults."""
    if path is None:
        return ExperimentConfig()
    p = resolve_experiment_path(path)
    return from_dict(ExperimentConfig, read_toml(p), str(p))


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as a dict; a syntax error is one line naming the file."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TedFlError(f"{path}: not valid TOML ({exc}); fix the syntax") from None


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


def set_key(cfg: ExperimentConfig, dotted: str, value: Any, source: str = "--set") -> None:
    """Override one key ('train.rounds') through the schema, as if the TOML file had said it."""
    *sections, last = dotted.split(".")
    obj: Any = cfg
    for depth, part in enumerate(sections):
        names = [f.name for f in dataclasses.fields(obj)]
        tables = [n for n in names if dataclasses.is_dataclass(getattr(obj, n))]
        if part in names and part not in tables:
            raise TedFlError(f"{source} {dotted}: '{'.'.join(sections[:depth + 1])}' is a value, not a table; "
                             f"write {'.'.join(sections[:depth + 1])}=VALUE")
        if part not in names:
            raise TedFlError(f"{source} {dotted}: unknown table '{part}'{closest(part, tables)}; "
                             f"valid: {', '.join(tables)}")
        obj = getattr(obj, part)
    names = [f.name for f in dataclasses.fields(obj)]
    if last in names and dataclasses.is_dataclass(getattr(obj, last)):
        raise TedFlError(f"{source} {dotted}: '{dotted}' is a table; name one of its keys, e.g. {dotted}."
                         f"{dataclasses.fields(getattr(obj, last))[0].name}=VALUE")
    if last not in names:
        raise TedFlError(f"{source} {dotted}: unknown key '{last}'{closest(last, names)}; "
                         f"valid keys: {', '.join(names)}")
    if isinstance(value, str) and isinstance(getattr(obj, last), list):
        value = _words(value)  # run and node configs hold no lists: "seq ted_gugf" or '["seq", "ted_gugf"]'
    try:
        setattr(obj, last, value)
    except ValidationError as exc:
        err = dict(_first_error(exc), loc=(*sections, last))
        raise TedFlError(_describe(err, source) + _union_alternative(exc)) from None


def _words(text: str) -> Any:
    if text.strip().startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            return text
    return text.replace(",", " ").split()


LAUNCH_KEYS = ("keep_superlink",)  # run-config keys about the launch (ted_fl.federated.flwr_app), not the experiment


def from_run_config(run_config: dict[str, Any], source: str = "run config") -> ExperimentConfig:
    """The experiment of `flwr run`: `experiment` (a file), then schema keys, then `set`.

    Flower flattens `[tool.flwr.app.config]`'s tables into dotted keys (`data.sites`), which are
    this schema's keys; `set` holds further `KEY=VALUE` overrides separated by spaces (Flower
    refuses run-config keys that pyproject.toml does not list).
    """
    rc = {k: v for k, v in run_config.items() if k not in LAUNCH_KEYS}
    cfg = load_experiment(str(rc.pop("experiment"))) if rc.get("experiment") else ExperimentConfig()
    extra = str(rc.pop("set", "") or "")
    apply_overrides(cfg, rc, source)
    for item in shlex.split(extra):
        key, value = parse_override(item)
        set_key(cfg, key, value, f"{source} set")
    return cfg


def node_overrides(node_config: dict[str, Any]) -> dict[str, Any]:
    """The schema keys of a SuperNode's node config (dotted, e.g. data.data_dir = "/data/bmc");
    its other keys (site, client, state-dir, partition-id) say who the node is."""
    return {k: v for k, v in node_config.items() if "." in k}


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any], source: str) -> ExperimentConfig:
    """Apply flat dotted keys (`flwr run --run-config`, a SuperNode's node config) through the schema."""
    for key, value in overrides.items():
        set_key(cfg, key, value, source)
    return cfg


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


def dump_toml(data: dict[str, Any]) -> str:
    """Nested dicts as TOML (tables and arrays of tables), written by tomli-w."""
    return tomli_w.dumps(data)
