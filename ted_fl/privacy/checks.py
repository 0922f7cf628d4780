"""Every check of the [privacy] keys against the rest of an experiment, in one place.

Why one module: the rules used to live in three (config.py before torch loads, the policy module,
and the DP mechanisms at run start) and were re-run at several layers. Now `ted_fl.schedule.resolve`
calls `check` once per experiment, before anything runs, and everything below receives the resolved
experiment without checking again.

`problems` lists what is wrong (one line each, naming the key and the fix); `check` raises the first
as a `PrivacyError` (a TedFlError: the command lines print it as one `error:` line, exit 2). Every rule
but the network's needs only the configuration (no torch: an entry point answers at once); the
network rule builds the network as DP will run it (`dp_model`: batch norm becomes group norm) and asks
Opacus' ModuleValidator, so it imports torch, and only when privacy.dp != "off".
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

from ted_fl.config import SECAGG_MODULUS
from ted_fl.errors import TedFlError

if TYPE_CHECKING:
    from ted_fl.config import ExperimentConfig, ModelConfig

# Approach properties the torch-free rules need (tests/unit/test_privacy_checks.py checks them against
# ted_fl.continual.approaches, which imports torch).
IMPORTANCE_APPROACHES = frozenset({"ewc", "mas"})  # send parameter importances computed on a site's images
GUGF_APPROACHES = frozenset({"akt_gugf", "ted_gugf"})  # weight AKT by GUGF's uncertainty

DP_NORM_NOTE = ("model.norm 'batch' -> 'group' (GroupNorm: Opacus computes no per-sample gradient through batch "
                "statistics, and running statistics are unclipped data-dependent buffers)")


class PrivacyError(TedFlError):
    """An impossible [privacy] combination: one line naming the key and the fix."""


def problems(cfg: ExperimentConfig, *, network: bool = True) -> list[str]:
    """Every impossible [privacy] combination of `cfg`, one line each ([] when there is none).

    `network=False` skips the one rule that imports torch (the network's DP compatibility)."""
    out = _config_problems(cfg)
    if network and not out and cfg.privacy.dp != "off":
        out += network_problems(cfg)
    return out


def check(cfg: ExperimentConfig, *, network: bool = True) -> None:
    """Raise the first of `problems(cfg)` as a PrivacyError; return quietly when there is none."""
    found = problems(cfg, network=network)
    if found:
        raise PrivacyError(found[0])


def _config_problems(cfg: ExperimentConfig) -> list[str]:
    """The rules the configuration alone shows (no torch)."""
    p, out = cfg.privacy, []
    if p.secagg:
        out += _secagg_problems(cfg)
    if p.dp == "off":
        if math.isfinite(p.epsilon):
            out.append(f"privacy.epsilon = {p.epsilon:g} needs privacy.dp = 'sample' or 'client' "
                       "(dp = 'off' adds no noise); set privacy.dp or privacy.epsilon = inf")
    else:
        out += _dp_problems(cfg)
    if p.replay > 0 and cfg.federated.retention == 0:
        out.append(f"privacy.replay = {p.replay} keeps images for retention rounds, but "
                   "federated.retention = 0 has none; set federated.retention = k (or -1) or replay = 0")
    return out


def _secagg_problems(cfg: ExperimentConfig) -> list[str]:
    """privacy.secagg = true: what Flower's SecAgg+ (ted_fl.federated.secagg) cannot hold."""
    p, fed, out = cfg.privacy, cfg.federated, []
    if p.secagg_shares < 3:
        out.append(f"privacy.secagg_shares = {p.secagg_shares}: Flower's SecAgg+ needs at least 3 shares; "
                   "set privacy.secagg_shares = 3 or more")
    elif not 2 <= p.secagg_reconstruction_threshold < p.secagg_shares:
        out.append(f"privacy.secagg_reconstruction_threshold = {p.secagg_reconstruction_threshold}: Flower's "
                   f"SecAgg+ needs 2 <= threshold < privacy.secagg_shares ({p.secagg_shares}); set it in between")
    if p.secagg_quantization_range >= SECAGG_MODULUS:
        out.append(f"privacy.secagg_quantization_range = {p.secagg_quantization_range}: must be below Flower's "
                   "modulus 2**32; use 4194304 (2**22)")
    if fed.clients_per_site < 2:
        out.append("privacy.secagg = true: SecAgg+ hides one client's update in the sum of at least 2, and a "
                   "round of the first stage trains one site's clients only; set federated.clients_per_site = 2 "
                   "or more")
    elif p.secagg_reconstruction_threshold > fed.clients_per_site:
        out.append(f"privacy.secagg_reconstruction_threshold = {p.secagg_reconstruction_threshold} exceeds the "
                   f"{fed.clients_per_site} clients of a first-stage round (federated.clients_per_site): no round "
                   "could rebuild a dropped client's key; lower the threshold or raise federated.clients_per_site")
    if p.dp == "client":
        if p.noise == "server" and p.clip_on == "server":
            out.append("privacy.clip_on = 'server' clips each client's update, which the server never sees under "
                       "privacy.secagg; set privacy.clip_on = 'client'")
        if p.clipping == "adaptive":
            out.append("privacy.clipping = 'adaptive' sends each client's clipping bit beside its update, which "
                       "SecAgg+ would not protect; set privacy.clipping = 'fixed' under privacy.secagg")
    return out


def _dp_problems(cfg: ExperimentConfig) -> list[str]:
    """What DP (privacy.dp != 'off') cannot cover: data leaving a site outside the mechanism, and
    per-sample gradients that are not one image's."""
    p, out = cfg.privacy, []
    where = f"privacy.dp = '{p.dp}'"
    if p.dp == "sample" and cfg.diagnostics.term_grads:
        out.append(f"{where}: diagnostics.term_grads measures non-private gradients of a site's images; "
                   "set diagnostics.term_grads = false")
    for name in cfg.approaches:
        if name in IMPORTANCE_APPROACHES:
            out.append(f"{where}: approach '{name}' sends parameter importances computed on a site's "
                       f"images outside any DP mechanism; remove '{name}' from approaches or set privacy.dp = 'off'")
        if p.dp == "sample" and name in GUGF_APPROACHES and cfg.loss.gugf != "sample":
            out.append(f"{where}: loss.gugf = '{cfg.loss.gugf}' mixes the images of a batch, so a per-sample "
                       "gradient is not one image's; set loss.gugf = 'sample'")
        if p.dp == "sample" and name == "plop" and cfg.loss.baseline_variant == "reference":
            out.append(f"{where}: PLOP's reference variant takes one Dice over the whole batch; "
                       "set loss.baseline_variant = 'paper'")
    if p.dp == "client" and p.noise == "client" and p.clipping == "adaptive":
        out.append("privacy.clipping = 'adaptive' needs privacy.noise = 'server' (Flower's LocalDpMod clips "
                   "at a fixed norm); set privacy.clipping = 'fixed'")
    return out


def dp_model(cfg: ExperimentConfig) -> tuple[ModelConfig, list[str]]:
    """The network as the run builds it (a copy of cfg.model) and what changed, one note each.

    Under any DP level, batch norm becomes group norm: Opacus cannot compute per-sample gradients
    through batch statistics, and for client-level DP the running statistics are data-dependent
    buffers outside the clipped parameters (the integer batch counter cannot take Gaussian noise)."""
    model = copy.deepcopy(cfg.model)
    if cfg.privacy.dp == "off" or model.norm != "batch":
        return model, []
    model.norm = "group"
    return model, [f"privacy: privacy.dp = '{cfg.privacy.dp}': {DP_NORM_NOTE}"]


def network_problems(cfg: ExperimentConfig) -> list[str]:
    """The DP rule on the network: the converted network (`dp_model`) must hold nothing Opacus refuses
    (networks that ignore model.norm may still hold batch norm). Imports torch."""
    from ted_fl.continual.networks import build_model
    from ted_fl.privacy.mechanisms import compatibility_errors

    model, _ = dp_model(cfg)
    errors = compatibility_errors(build_model(model))
    if not errors:
        return []
    return [f"privacy.dp = '{cfg.privacy.dp}': model.name = '{model.name}' is not DP-compatible ({errors[0]}); "
            "use model.name = 'monai_unet' or 'reference_unet' with model.norm = 'group'"]


def describe(cfg: ExperimentConfig) -> list[str]:
    """What the [privacy] settings mean for this run, for run.log (nothing when privacy.dp = 'off')."""
    p = cfg.privacy
    if p.dp == "off":
        return []
    where = f"privacy.dp = '{p.dp}'"
    notes = []
    if math.isinf(p.epsilon):
        notes.append(f"privacy: {where} with epsilon = inf: clipping only, no noise (no privacy guarantee)")
    if p.dp == "sample":
        notes.append(f"privacy: DP-SGD (Opacus, Poisson sampling, RDP accountant): target epsilon {p.epsilon:g} per "
                     f"site and stage at delta {p.delta:g}, per-sample clipping at {p.max_grad_norm:g}")
    else:
        if p.noise == "server":
            clip = f"{'ClientSide' if p.clip_on == 'client' else 'ServerSide'}{p.clipping.capitalize()}Clipping"
            side = f"central DP, Flower's DifferentialPrivacy{clip}"
        else:
            side = "local DP, Flower's LocalDpMod"
        notes.append(f"privacy: client-level DP ({side}): target epsilon {p.epsilon:g} per client and stage at "
                     f"delta {p.delta:g}, updates clipped at {p.clip_norm:g}"
                     + (" (initial, adaptive)" if p.clipping == "adaptive" else ""))
    return notes
