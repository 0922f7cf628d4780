"""Diagnostics on a run's checkpoints: `python -m ted_fl.diagnose eval-bn | term-grads RUN_DIR`.

eval-bn: how much does the evaluation's batch norm decide? `python -m ted_fl.diagnose eval-bn RUN_DIR [--approach A]`.

Rescores every stage checkpoint of one approach and seed on every site's test split under both
`eval.bn` modes: "running" (model.eval(): the running statistics, which follow the newest site)
and "batch" (the reference's protocol: each image alone, normalised by its own statistics). The
run's own protocol options (rescale, HD95) are kept; only eval.bn changes. Prints the final
Dice per site and the Avg / BWT / forgetting of each mode's R matrix. Reads the run directory
(config, stage checkpoints) and the researcher's copy of the data; writes
`diagnostics/eval_bn-<approach>-seed<k>.csv` (mode, stage, site, dice) there.

term-grads: how strong is each distillation term against the segmentation loss?
`python -m ted_fl.diagnose term-grads RUN_DIR [--approach A ...] [--stage K]`. Each approach is
measured on its OWN checkpoints (default: every approach of the run that has them; the output
names each): the teacher is its stage-K checkpoint, the student its stage-(K+1) one (the end of
the next site's stage), the batches come from site K+1's training split; for each term,
lambda_d * |grad| / |grad L_seg| over the student's parameters (the run's lambda_d, its batch
size), with the teacher in both `loss.teacher_mode`s, averaged over `--batches` batches. That is
the pull at the END of the stage, an upper bound of the pull during it: at the stage's start the
student equals its teacher (KD's gradient and AKT's mask are zero). The pull during training, the
mean over stage K+1's steps of each weighted term's gradient ratio as the run trained, is printed
beside it when the run recorded it (`--set diagnostics.term_grads=true`: metrics.csv rows
grad_ratio_<term>); otherwise the command says how to record it. Prints tables; writes nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from ted_fl.config import LossConfig, TeacherMode, choices, split_seed_of
from ted_fl.continual import terms as T
from ted_fl.continual.evaluation import EVAL_BN, dice, eval_options, evaluate
from ted_fl.continual.metrics import continual_summary, r_matrix
from ted_fl.continual.networks import build_model
from ted_fl.continual.step import freeze, running_stats_frozen, teacher_mode
from ted_fl.continual.weights import load_weights
from ted_fl.data import load_sites
from ted_fl.errors import TedFlError
from ted_fl.run.directory import RunDir

MODES = EVAL_BN  # every eval.bn mode, the schema's order


def eval_bn(run: RunDir, approach: str, seed: int) -> pd.DataFrame:
    """Rows (mode, stage, stage_site, site, dice): every stage checkpoint scored under both modes."""
    cfg = run.read_config()
    sites = load_sites(cfg.data, split_seed_of(cfg, seed))
    rows = []
    for stage, stage_site in enumerate(s.name for s in sites):
        ckpt = run.load_checkpoint(approach, seed, f"stage{stage}")
        if ckpt is None:
            raise TedFlError(f"{run.path}: no stage{stage} checkpoint for {approach} seed {seed}; "
                             f"pick one of: {', '.join(cfg.approaches)}")
        model = load_weights(build_model(cfg.model), ckpt["weights"])
        for mode in MODES:
            opts = {**eval_options(cfg), "bn": mode}
            for site in sites:
                dice = evaluate(model, site.test, per_volume=site.per_volume, labels=site.labels.labels(),
                                **opts)["dice"]
                rows.append({"mode": mode, "stage": stage, "stage_site": stage_site, "site": site.name,
                             "metric": "dice", "value": dice})
    return pd.DataFrame(rows)


def summarize_modes(df: pd.DataFrame) -> pd.DataFrame:
    """Avg, BWT, forgetting and plasticity of each mode's R matrix."""
    out = []
    for mode in MODES:
        s = continual_summary(r_matrix(df[df["mode"] == mode], "dice"))
        out.append({"eval.bn": mode, **{k: s[k] for k in ("avg", "bwt", "forgetting", "plasticity")}})
    return pd.DataFrame(out)


GRAD_TERMS = ("kd", "ska", "akt", "akt_gugf_batch", "akt_gugf_sample")


def term_grad_ratios(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     probes: torch.Tensor, loss: LossConfig) -> dict[str, float]:
    """lambda_d * |grad term| / |grad L_seg| over the student's parameters, for each TED term.

    The student forwards in train mode without touching its running statistics; the teacher as
    `loss.teacher_mode` says. Also: the AKT disagreement fraction, the mean GUGF uncertainty and
    the teacher's foreground Dice on (x, y) (how good the targets it distils are).
    """
    freeze(teacher)
    with teacher_mode(teacher, loss.teacher_mode), torch.no_grad():
        q, q_n = T.probabilities(teacher(x)), T.probabilities(teacher(probes))
    params = [p for p in student.parameters() if p.requires_grad]
    was = student.training
    student.train()
    with running_stats_frozen(student):
        p = T.probabilities(student(x))
        p_n = T.probabilities(student(probes))
    values = {
        "seg": T.SegLoss()(p, T.one_hot(y, p.shape[1]).to(p)),
        "kd": T.KD()(p, q),
        "ska": T.SKA()(p_n, q_n),
        "akt": T.AKT()(p, q),
        "akt_gugf_batch": T.AKT(T.GUGF("batch"))(p, q),
        "akt_gugf_sample": T.AKT(T.GUGF("sample"))(p, q),
    }
    norms = {}
    for name, v in values.items():
        g = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.sqrt(sum(((gg.double() ** 2).sum() for gg in g if gg is not None), torch.zeros((), dtype=torch.float64))))
    student.train(was)
    out = {name: loss.lambda_d * norms[name] / max(norms["seg"], 1e-30) for name in GRAD_TERMS}
    out["akt_mask_frac"] = float((T.class_argmax(p.detach()) != T.class_argmax(q)).float().mean())
    out["u_mean"] = float(T.GUGF.uncertainty(p, q).mean())
    out["teacher_dice"] = dice(q.argmax(dim=1) > 0, y > 0)
    return out


def term_grads(run: RunDir, approach: str, seed: int, stage: int, batches: int) -> pd.DataFrame:
    """Rows (teacher_mode, quantity, mean over batches) for teacher = stage `stage`, student = stage + 1."""
    cfg = run.read_config()
    sites = load_sites(cfg.data, split_seed_of(cfg, seed))
    if not 0 <= stage < len(sites) - 1:
        raise TedFlError(f"--stage must be in 0..{len(sites) - 2} (the teacher's stage; the student is the next)")
    nets = []
    for k in (stage, stage + 1):
        ckpt = run.load_checkpoint(approach, seed, f"stage{k}")
        if ckpt is None:
            raise TedFlError(f"{run.path}: no stage{k} checkpoint for {approach} seed {seed}; "
                             f"pick one of: {', '.join(cfg.approaches)}")
        nets.append(load_weights(build_model(cfg.model), ckpt["weights"]))
    teacher, student = nets
    train = sites[stage + 1].train
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    bs = min(cfg.train.batch_size, len(train))
    rows = []
    for mode in choices(TeacherMode):
        loss = dataclasses.replace(cfg.loss, teacher_mode=mode)
        acc: dict[str, list[float]] = {}
        for _ in range(batches):
            idx = rng.choice(len(train), bs, replace=False)
            x = torch.as_tensor(train.images[idx], dtype=torch.float32)
            y = torch.as_tensor(train.masks[idx], dtype=torch.long)
            probes = cfg.loss.ska_mean + cfg.loss.ska_std * torch.randn(x.shape, generator=gen)
            for term, ratio in term_grad_ratios(student, teacher, x, y, probes, loss).items():
                acc.setdefault(term, []).append(ratio)
        rows += [{"teacher_mode": mode, "quantity": k, "value": float(np.mean(v))} for k, v in acc.items()]
    return pd.DataFrame(rows)


def recorded_pull(run: RunDir, approach: str, seed: int, stage: int) -> pd.DataFrame:
    """The pull during stage `stage` as the run trained it: the mean over the stage's rounds (and
    training sites) of the train rows grad_ratio_<term> / grad_seg that diagnostics.term_grads
    recorded (each a mean over one round's steps). Empty when the run did not record them."""
    df = run.metrics()
    if df.empty:
        return pd.DataFrame(columns=["quantity", "value"])
    sel = df[(df["split"] == "train") & (df["approach"] == approach) & (df["seed"] == seed)
             & (df["stage"] == stage) & df["metric"].astype(str).str.startswith(("grad_ratio_", "grad_seg"))]
    if sel.empty:
        return pd.DataFrame(columns=["quantity", "value"])
    out = sel.groupby("metric", sort=False)["value"].mean().reset_index()
    return out.rename(columns={"metric": "quantity"})


def run_approaches(run: RunDir, requested: list[str] | None, seed: int, stage: int) -> list[str]:
    """The approaches to measure: the requested ones, or every approach of the run with its own
    stage-K and stage-(K+1) checkpoints."""
    cfg = run.read_config()
    if requested:
        return list(requested)
    have: list[str] = [a for a in cfg.approaches
            if all((run.ckpt_dir(a, seed) / f"stage{k}.pt").is_file() for k in (stage, stage + 1))]
    if not have:
        raise TedFlError(f"{run.path}: no approach has stage{stage} and stage{stage + 1} checkpoints for seed {seed} "
                         f"(output.checkpoints = \"stages\" keeps them); pick --stage or --seed")
    return have
