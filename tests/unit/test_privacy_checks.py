"""The [privacy] rules (`ted_fl.privacy.checks`, one module) and the resolved experiment
(`ted_fl.schedule.experiment.resolve`): one test per rule, one-line errors naming the key and the fix,
resolve changes nothing it is given and returns a frozen record, and every entry point resolves once."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import opacus  # noqa: F401  (imported at collection: its ~3 s import is no test's time)
import pytest

import ted_fl
from ted_fl.config import ExperimentConfig, set_key, to_dict
from ted_fl.errors import TedFlError
from ted_fl.privacy import checks
from ted_fl.privacy.checks import PrivacyError
from ted_fl.schedule.experiment import ResolvedExperiment, resolve


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
    assert checks.problems(cfg) == [] and checks.describe(cfg) == []
    exp = resolve(cfg)
    assert exp.notes == () and exp.cfg.model.norm == "batch" and not exp.dp_converted


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


# One case per rule of ted_fl.privacy.checks: the settings that break it, and the words of its fix.
RULES = {
    "secagg_one_client": ({"secagg": True}, {}, "federated.clients_per_site = 2 or more"),
    "secagg_shares": ({"secagg": True, "secagg_shares": 2}, {"federated.clients_per_site": 3},
                      "privacy.secagg_shares = 3 or more"),
    "secagg_threshold_high": ({"secagg": True, "secagg_reconstruction_threshold": 3},
                              {"federated.clients_per_site": 3}, "threshold <"),
    "secagg_threshold_low": ({"secagg": True, "secagg_reconstruction_threshold": 1},
                             {"federated.clients_per_site": 3}, "2 <= threshold"),
    "secagg_threshold_clients": ({"secagg": True, "secagg_shares": 5, "secagg_reconstruction_threshold": 3},
                                 {"federated.clients_per_site": 2}, "lower the threshold"),
    "secagg_quantization": ({"secagg": True, "secagg_quantization_range": 2**32}, {"federated.clients_per_site": 2},
                            "modulus 2**32"),
    "secagg_server_clipping": ({"secagg": True, "dp": "client", "clip_on": "server"},
                               {"federated.clients_per_site": 2}, "privacy.clip_on = 'client'"),
    "secagg_adaptive": ({"secagg": True, "dp": "client", "clipping": "adaptive", "clip_on": "client"},
                        {"federated.clients_per_site": 2}, "under privacy.secagg"),
    "epsilon_without_dp": ({"epsilon": 4.0}, {}, "set privacy.dp or privacy.epsilon = inf"),
    "term_grads": ({"dp": "sample"}, {"diagnostics.term_grads": True}, "diagnostics.term_grads = false"),
    "importances_sample": ({"dp": "sample"}, {"approaches": ["ewc"]}, "remove 'ewc' from approaches"),
    "importances_client": ({"dp": "client"}, {"approaches": ["mas"]}, "remove 'mas' from approaches"),
    "gugf_batch": ({"dp": "sample"}, {"approaches": ["ted_gugf"]}, "set loss.gugf = 'sample'"),
    "plop_reference": ({"dp": "sample"}, {"approaches": ["plop"], "loss.baseline_variant": "reference"},
                       "set loss.baseline_variant = 'paper'"),
    "adaptive_local": ({"dp": "client", "noise": "client", "clipping": "adaptive"}, {},
                       "set privacy.clipping = 'fixed'"),
    "replay_without_retention": ({"replay": 4}, {}, "set federated.retention = k (or -1) or replay = 0"),
    "network": ({"dp": "sample"}, {"model.name": "basic_unet", "model.channels": [8, 8, 16, 32, 64, 8]},
                "not DP-compatible"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_refuses_its_combination_in_one_line(rule: str) -> None:
    privacy, other, words = RULES[rule]
    cfg = _cfg(**privacy)
    for key, value in other.items():
        set_key(cfg, key, value)
    found = checks.problems(cfg)
    assert len(found) == 1 and words in found[0], found  # this rule, and no other
    with pytest.raises(PrivacyError) as err:
        checks.check(cfg)
    assert words in str(err.value) and "\n" not in str(err.value) and isinstance(err.value, TedFlError)
    with pytest.raises(PrivacyError, match="privacy"):  # the entry point's one call says the same
        resolve(cfg)


def test_the_rules_allow_what_they_do_not_name() -> None:
    """The neighbours of each refused combination pass: a rule is no blanket refusal."""
    ok = [
        ({"dp": "sample", "epsilon": 4.0}, {"loss.gugf": "sample", "approaches": ["ted_gugf", "plop"]}),
        ({"dp": "client", "epsilon": 4.0}, {"approaches": ["ted_gugf"], "diagnostics.term_grads": True}),
        ({"dp": "client", "noise": "server", "clipping": "adaptive"}, {}),
        ({"replay": 4}, {"federated.retention": 1}),
    ]
    for privacy, other in ok:
        cfg = _cfg(**privacy)
        for key, value in other.items():
            set_key(cfg, key, value)
        assert checks.problems(cfg) == [], (privacy, other)


def test_the_torch_free_rules_skip_the_network() -> None:
    cfg = _cfg(dp="sample")
    set_key(cfg, "model.name", "basic_unet")
    set_key(cfg, "model.channels", [8, 8, 16, 32, 64, 8])
    assert checks.problems(cfg, network=False) == [] and checks.problems(cfg)


def test_secagg_with_two_clients_a_round_is_accepted() -> None:
    """fl-dp-sa's combination (clients clip at a fixed norm, the server noises the sum) passes."""
    cfg = _cfg(secagg=True)
    set_key(cfg, "federated.clients_per_site", 2)
    assert checks.problems(cfg) == []
    cfg.privacy.dp = "client"
    assert checks.problems(cfg) == []


def test_secagg_is_refused_in_process() -> None:
    """SecAgg+ is a client-server protocol: the in-process runner says so instead of averaging in the clear."""
    from ted_fl.schedule.in_process import LocalExecutor

    cfg = _cfg(secagg=True)
    set_key(cfg, "federated.clients_per_site", 2)
    with pytest.raises(TedFlError, match="not in-process"):
        LocalExecutor(cfg, [None])  # type: ignore[list-item]


def test_torch_free_privacy_check_knows_the_approaches() -> None:
    """The rules run before torch loads, so they name the approaches by their properties; they must
    be the approaches' own."""
    from typing import get_args

    from ted_fl.config import ApproachName, LossConfig
    from ted_fl.continual.approaches import get_approach

    names = get_args(ApproachName)
    assert {n for n in names if get_approach(n, LossConfig()).importance} == checks.IMPORTANCE_APPROACHES
    assert {n for n in names if get_approach(n, LossConfig()).uses_gugf} == checks.GUGF_APPROACHES


# ------------------------------------------------------------------------------------ resolve
def test_dp_converts_a_copy_of_the_network_and_says_so() -> None:
    for level in ("sample", "client"):
        cfg = _cfg(dp=level, epsilon=4.0)
        before = to_dict(cfg)
        exp = resolve(cfg)
        assert to_dict(cfg) == before and cfg.model.norm == "batch"  # the caller's config is untouched
        assert exp.cfg is not cfg and exp.cfg.model.norm == "group" and exp.dp_converted
        assert any("'batch' -> 'group'" in n for n in exp.notes)
        assert any(("DP-SGD" if level == "sample" else "client-level DP") in n for n in exp.notes)
        again = resolve(exp.cfg)  # a resolved config (a resumed run's config.toml) resolves to itself
        assert to_dict(again.cfg) == to_dict(exp.cfg) and not again.dp_converted


def test_resolve_sets_the_out_channels_on_its_copy_only() -> None:
    cfg = _cfg()
    exp = resolve(cfg)
    assert cfg.model.out_channels == 0 and exp.cfg.model.out_channels == exp.out_channels == 2
    set_key(cfg, "model.out_channels", 5)
    with pytest.raises(TedFlError, match="model.out_channels = 5 contradicts"):
        resolve(cfg)


def test_the_resolved_experiment_is_frozen() -> None:
    exp = resolve(_cfg(dp="client", epsilon=4.0))
    assert isinstance(exp, ResolvedExperiment) and dataclasses.is_dataclass(exp)
    for name in ("cfg", "labels", "notes"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(exp, name, None)
    assert isinstance(exp.notes, tuple)


def test_a_flower_run_refuses_several_seeds_with_one_split_per_seed() -> None:
    cfg = _cfg()
    cfg.data.split_seed, cfg.seeds = "seed", [0, 1]
    assert resolve(cfg).cfg.seeds == [0, 1]  # in-process: one split per seed is fine
    with pytest.raises(TedFlError, match="data.split_seed = 'seed'"):
        resolve(cfg, federated=True)


# ------------------------------------------------------------------ who checks: the import graph
PACKAGE = Path(ted_fl.__file__).parent
# Each entry point, and the one function in it that resolves: simulate / centralized (their run,
# --check and --resume), the deployment engine, sweep and study cells, the benchmark's Flower groups.
ENTRY_POINTS = {
    "commands/shared.py": "check_inputs",
    "federated/flwr_app.py": "validate",
    "studies/grid.py": "resolve_cells",
    "bench/federated.py": "simulate_groups",
}


def _calls(tree: ast.AST, names: set[str], attributes: bool = True) -> list[tuple[str, int]]:
    """(enclosing function, line) of every call to one of `names` (a bare name, or an attribute too)."""
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    called = f.id if isinstance(f, ast.Name) else f.attr if attributes and isinstance(f, ast.Attribute) else ""
                    if called in names:
                        out.append((fn.name, node.lineno))
    return out


def test_only_resolve_checks_and_each_entry_point_resolves_in_one_place() -> None:
    checkers = {"check", "problems", "network_problems"}
    resolves: dict[str, list[tuple[str, int]]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module in ("ted_fl.privacy.checks", "ted_fl.privacy") for a in n.names}
        if rel not in ("privacy/checks.py", "schedule/experiment.py"):
            assert not imported, f"{rel} imports the privacy checks ({imported}): resolve them at the entry point"
        found = _calls(tree, {"resolve"}, attributes=False)  # Path.resolve is no experiment's
        if found:
            resolves[rel] = found
    assert set(resolves) == set(ENTRY_POINTS), resolves  # no runner below an entry point resolves again
    for rel, fn in ENTRY_POINTS.items():
        assert [f for f, _ in resolves[rel]] == [fn], (rel, resolves[rel])
    assert [f for f, _ in _calls(ast.parse((PACKAGE / "schedule/experiment.py").read_text()), checkers)] == ["resolve"]


# ------------------------------------------------------------------ who checks: a run, counted
def count_checks(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Every privacy check and every resolve of this process, recorded (with the resolved config as
    resolve returned it); tests/integration/test_privacy.py counts its centralized DP run with it."""
    from ted_fl.schedule import experiment

    seen: dict[str, list] = {"check": [], "resolve": []}
    real_check, real_resolve = checks.check, experiment.resolve

    def check(cfg: ExperimentConfig, **kw: bool) -> None:
        seen["check"].append(cfg)
        real_check(cfg, **kw)

    def resolve_(cfg: ExperimentConfig, **kw: bool) -> ResolvedExperiment:
        exp = real_resolve(cfg, **kw)
        seen["resolve"].append((exp, to_dict(exp.cfg)))
        return exp

    monkeypatch.setattr(checks, "check", check)
    monkeypatch.setattr(experiment, "resolve", resolve_)
    return seen


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    return count_checks(monkeypatch)


def _toml(tmp: Path, approaches: list[str]) -> str:
    from ted_fl.config import dump_toml
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp, approaches)
    cfg.train.rounds, cfg.train.steps_per_round, cfg.train.select_best = 1, 1, False
    cfg.privacy.mia = False
    cfg.data.order, cfg.data.size = ["RUNMC", "BMC"], 16  # evaluation (HD95) dominates: the smallest run
    path = tmp / "experiment.toml"
    path.write_text(dump_toml(to_dict(cfg)))
    return str(path)


@pytest.mark.parametrize("mode", ["simulate", "centralized"])
def test_check_resolves_once(tmp_path: Path, counted: dict, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    from ted_fl.commands.shared import run_command

    assert run_command(mode, ["--config", _toml(tmp_path, ["seq", "kd"]), "--check"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert len(counted["check"]) == 1 and len(counted["resolve"]) == 1


def test_the_deployment_engine_resolves_once(tmp_path: Path, counted: dict) -> None:
    from ted_fl.federated.flwr_app import validate

    exp, sites = validate({"experiment": _toml(tmp_path, ["seq"]), "set": 'privacy.dp="sample" privacy.epsilon=4'})
    assert len(counted["check"]) == 1 and exp.cfg.model.norm == "group" and len(sites) == 2
    with pytest.raises(PrivacyError, match="approach 'ewc'"):
        validate({"experiment": _toml(tmp_path, ["ewc"]), "set": 'privacy.dp="sample"'})
