"""The [privacy] section: defaults off, one-line errors naming the key for impossible combinations."""

from __future__ import annotations

import math

import opacus  # noqa: F401  (imported at collection: its ~3 s import is no test's time)
import pytest

from ted_fl.config import ExperimentConfig, set_key
from ted_fl.errors import TedFlError
from ted_fl.privacy.mechanisms import prepare_privacy


def _cfg(**privacy: object) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.approaches = ["seq", "kd"]
    cfg.model.channels, cfg.model.strides = [4, 8], [2]
    for key, value in privacy.items():
        set_key(cfg, f"privacy.{key}", value)
    return cfg


def test_defaults_are_off() -> None:
    p = ExperimentConfig().privacy
    assert (p.dp, p.epsilon, p.secagg) == ("off", math.inf, False)
    cfg = _cfg()
    assert prepare_privacy(cfg) == [] and cfg.model.norm == "batch"


@pytest.mark.parametrize(("key", "value", "words"), [
    ("epsilon", 0, "privacy.epsilon"), ("epsilon", -1.0, "greater than 0"),
    ("delta", 0.0, "privacy.delta"), ("delta", 1.0, "less than 1"),
    ("dp", "central", "'off', 'sample' or 'client'"), ("max_grad_norm", 0, "privacy.max_grad_norm"),
    ("clip_norm", -1, "privacy.clip_norm"), ("noise", "both", "privacy.noise"),
])
def test_bad_values_are_one_line_errors(key: str, value: object, words: str) -> None:
    with pytest.raises(TedFlError) as err:
        _cfg(**{key: value})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_dp_makes_the_network_compatible_and_says_so() -> None:
    for level in ("sample", "client"):
        cfg = _cfg(dp=level, epsilon=4.0)
        notes = prepare_privacy(cfg)
        assert cfg.model.norm == "group" and any("'batch' -> 'group'" in n for n in notes)
        assert not any("'batch' -> 'group'" in n for n in prepare_privacy(cfg))  # idempotent


@pytest.mark.parametrize(("privacy", "other", "words"), [
    ({"dp": "sample"}, {"approaches": ["ewc"]}, "importances"),
    ({"dp": "client"}, {"approaches": ["mas"]}, "importances"),
    ({"dp": "sample"}, {"approaches": ["ted_gugf"]}, "loss.gugf = 'sample'"),
    ({"dp": "sample"}, {"approaches": ["plop"], "loss.baseline_variant": "reference"}, "baseline_variant"),
    ({"dp": "client", "noise": "client", "clipping": "adaptive"}, {}, "privacy.clipping = 'fixed'"),
    ({"secagg": True}, {}, "federated.clients_per_site = 2 or more"),
    ({"secagg": True, "secagg_shares": 2}, {"federated.clients_per_site": 3}, "privacy.secagg_shares = 3 or more"),
    ({"secagg": True, "secagg_reconstruction_threshold": 3}, {"federated.clients_per_site": 3}, "threshold <"),
    ({"secagg": True, "secagg_reconstruction_threshold": 1}, {"federated.clients_per_site": 3}, "2 <= threshold"),
    ({"secagg": True, "secagg_shares": 5, "secagg_reconstruction_threshold": 3}, {"federated.clients_per_site": 2},
     "lower the threshold"),
    ({"secagg": True, "secagg_quantization_range": 2**32}, {"federated.clients_per_site": 2}, "modulus 2**32"),
    ({"secagg": True, "dp": "client", "clip_on": "server"}, {"federated.clients_per_site": 2},
     "privacy.clip_on = 'client'"),
    ({"secagg": True, "dp": "client", "clipping": "adaptive"}, {"federated.clients_per_site": 2},
     "privacy.clipping = 'fixed'"),
    ({"dp": "sample"}, {"model.name": "basic_unet", "model.channels": [8, 8, 16, 32, 64, 8]}, "not DP-compatible"),
])
def test_impossible_combinations_are_refused(privacy: dict, other: dict, words: str) -> None:
    cfg = _cfg(**privacy)
    for key, value in other.items():
        set_key(cfg, key, value)
    with pytest.raises(TedFlError) as err:
        prepare_privacy(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_secagg_with_two_clients_a_round_is_accepted() -> None:
    cfg = _cfg(secagg=True)
    set_key(cfg, "federated.clients_per_site", 2)
    prepare_privacy(cfg)
    cfg.privacy.dp = "client"
    prepare_privacy(cfg)  # fixed client-side clipping with server noise: fl-dp-sa's combination


def test_secagg_is_refused_in_process() -> None:
    """SecAgg+ is a client-server protocol: the in-process runner says so instead of averaging in the clear."""
    from ted_fl.schedule.in_process import LocalExecutor

    cfg = _cfg(secagg=True)
    set_key(cfg, "federated.clients_per_site", 2)
    with pytest.raises(TedFlError, match="not in-process"):
        LocalExecutor(cfg, [None])  # type: ignore[list-item]


def test_torch_free_privacy_check_knows_the_approaches() -> None:
    """config.privacy_conflicts runs before torch loads, so it names the approaches by their
    properties; they must be the approaches' own."""
    from typing import get_args

    from ted_fl.config import GUGF_APPROACHES, IMPORTANCE_APPROACHES, ApproachName, LossConfig
    from ted_fl.continual.approaches import get_approach

    names = get_args(ApproachName)
    assert {n for n in names if get_approach(n, LossConfig()).importance} == IMPORTANCE_APPROACHES
    assert {n for n in names if get_approach(n, LossConfig()).uses_gugf} == GUGF_APPROACHES
