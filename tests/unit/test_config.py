"""The one configuration schema: TOML files, --set and flat overrides all go through it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ted_fl.config import (
    ApproachName,
    ExperimentConfig,
    GugfMode,
    apply_overrides,
    choices,
    dump_toml,
    from_dict,
    load_experiment,
    project_root,
    set_key,
    to_dict,
)
from ted_fl.continual.approaches import APPROACHES
from ted_fl.continual.terms import GUGF_MODES
from ted_fl.errors import TedFlError


def test_registry_covers_exactly_the_schema_names() -> None:
    assert set(APPROACHES) == set(choices(ApproachName))
    assert choices(GugfMode) == GUGF_MODES


@pytest.mark.parametrize("path", sorted((project_root() / "simulations").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_experiments_load_and_round_trip(path: Path) -> None:
    cfg = load_experiment(path)
    again = from_dict(ExperimentConfig, tomllib.loads(dump_toml(to_dict(cfg))), "round trip")
    assert again == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"roundz": 3}}, r"^f.toml: unknown key 'roundz' in \[train\] \(did you mean 'rounds'\?\); valid keys: rounds,"),
        ({"tran": {}}, r"^f.toml: unknown key 'tran' \(did you mean 'train'\?\)"),
        ({"loss": {"gugf": "sampel"}}, r"^f.toml: loss.gugf = 'sampel' is not one of 'batch', 'normalized' or 'sample'$"),
        ({"train": {"rounds": 0}}, r"^f.toml: train.rounds: input should be greater than or equal to 1, got 0$"),
        ({"train": 3}, r"^f.toml: train must be a table \[train\], got 3$"),
        ({"approaches": ["sq"]}, r"^f.toml: approaches.0 = 'sq' is not one of 'seq',"),
        ({"data": {"order": "BMC"}}, r"^f.toml: data.order must be a list, e.g. order = \[...\], got .BMC.$"),
    ],
)
def test_bad_file_values_are_one_line(data: dict, message: str) -> None:
    with pytest.raises(TedFlError, match=message) as info:
        from_dict(ExperimentConfig, data, "f.toml")
    assert "\n" not in str(info.value)


def test_sample_gugf_is_accepted_everywhere() -> None:
    cfg = from_dict(ExperimentConfig, {"loss": {"gugf": "sample"}}, "f.toml")
    set_key(cfg, "loss.gugf", "sample")
    assert cfg.loss.gugf == "sample"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.rounds.x", 1, r"'train.rounds' is a value, not a table"),
        ("train.rounds", "x", r"train.rounds: input should be a valid integer"),
        ("tran.rounds", 1, r"unknown table 'tran' \(did you mean 'train'\?\)"),
        ("train", 1, r"'train' is a table; name one of its keys"),
        ("federated.on_failure", "retyr", r"federated.on_failure = 'retyr' is not one of 'retry', 'skip' or 'abort'"),
    ],
)
def test_bad_overrides_are_one_line(key: str, value: object, message: str) -> None:
    cfg = ExperimentConfig()
    with pytest.raises(TedFlError, match=message) as info:
        set_key(cfg, key, value)
    assert "\n" not in str(info.value)
    assert cfg == ExperimentConfig()


def test_flat_overrides_name_their_source() -> None:
    cfg = apply_overrides(ExperimentConfig(), {"train.rounds": 2, "federated.probes": "seed"}, "node config")
    assert (cfg.train.rounds, cfg.federated.probes) == (2, "seed")
    with pytest.raises(TedFlError, match="^node config: federated.probes = 'x'"):
        apply_overrides(cfg, {"federated.probes": "x"}, "node config")


def test_cli_exits_2_on_nested_value_key(capsys: pytest.CaptureFixture[str]) -> None:
    from ted_fl.simulate import main

    assert main(["--set", "train.rounds.x=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.rounds" in err


def test_flwr_run_config_goes_through_the_schema() -> None:
    """pyproject.toml's [tool.flwr.app.config], flattened by Flower, then `set` overrides."""
    import tomllib

    from flwr.common.config import flatten_dict

    from ted_fl.config import from_run_config, node_overrides

    rc = flatten_dict(tomllib.loads((project_root() / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    cfg = from_run_config(rc)
    assert cfg.approaches == ["ted_gugf"] and cfg.seeds == [0] and cfg.data.sites == "prostate"
    rc.update({"approaches": "seq ted_gugf", "set": 'train.rounds=2 federated.probes="seed"'})
    cfg = from_run_config(rc)
    assert (cfg.approaches, cfg.train.rounds, cfg.federated.probes) == (["seq", "ted_gugf"], 2, "seed")
    with pytest.raises(TedFlError, match=r"^run config set: train.rounds: input should be greater"):
        from_run_config({**rc, "set": "train.rounds=0"})
    with pytest.raises(TedFlError, match=r"^run config: approaches = 'sq' is not one of"):
        from_run_config({**rc, "approaches": "sq"})
    assert node_overrides({"site": "BMC", "partition-id": 0, "data.data_dir": "/data"}) == {"data.data_dir": "/data"}


def _numeric_keys() -> list[tuple[str, type]]:
    """Every int and float key of the schema, dotted (the walk finds keys added later too)."""
    import dataclasses

    out = []
    for table in dataclasses.fields(ExperimentConfig):
        section = getattr(ExperimentConfig(), table.name)
        if not dataclasses.is_dataclass(section):
            continue
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if type(value) in (int, float):
                out.append((f"{table.name}.{f.name}", type(value)))
    return out


NUMERIC = _numeric_keys()
INF_MEANS_SOMETHING = {"privacy.epsilon"}  # inf: clipping only, no noise
MAY_BE_NEGATIVE = {"loss.ska_mean", "federated.retention"}  # the probes' mean; retention -1: every earlier site


def test_the_walk_sees_the_numeric_keys() -> None:
    keys = dict(NUMERIC)
    assert len(keys) > 60 and keys["loss.lambda_d"] is float and keys["train.rounds"] is int


@pytest.mark.parametrize(("key", "kind"), NUMERIC, ids=[k for k, _ in NUMERIC])
def test_non_finite_and_negative_numbers_are_refused_with_the_key(key: str, kind: type) -> None:
    """`--set loss.lambda_d=nan` (or inf, or -1) is refused at once, naming the key, not deep in torch."""
    bad: list[object] = [float("nan"), "nan"] if kind is float else [1.5]
    if kind is float and key not in INF_MEANS_SOMETHING:
        bad += [float("inf"), float("-inf")]
    if key not in MAY_BE_NEGATIVE:
        bad.append(-1 if kind is int else -1.0)
    for value in bad:
        cfg = ExperimentConfig()
        with pytest.raises(TedFlError, match=rf"^--set: {key}: input should be") as info:
            set_key(cfg, key, value)
        assert "\n" not in str(info.value)
        with pytest.raises(TedFlError, match=rf"^f.toml: {key}: "):
            section, name = key.split(".")
            from_dict(ExperimentConfig, {section: {name: value}}, "f.toml")
    cfg = ExperimentConfig()
    set_key(cfg, key, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]))  # the default passes


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("federated.retention", -2, r"greater than or equal to -1"),
        ("model.dropout", 1.0, r"model.dropout: input should be less than 1"),
        ("loss.plop_threshold", 1.5, r"loss.plop_threshold: input should be less than or equal to 1"),
        ("train.lr_first", 0.0, r"train.lr_first: input should be greater than 0"),
        ("federated.timeout", 0.0, r"federated.timeout: input should be greater than 0"),
        ("approaches", [], r"approaches: list should have at least 1 item"),
        ("seeds", [], r"seeds: list should have at least 1 item"),
        ("seeds", [0, -1], r"seeds: input should be greater than or equal to 0"),
        ("model.channels", [16, 0], r"model.channels: input should be greater than or equal to 1"),
    ],
)
def test_meaningless_values_are_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(TedFlError, match=message):
        set_key(ExperimentConfig(), key, value)


def test_infinite_epsilon_still_means_no_noise() -> None:
    cfg = ExperimentConfig()
    set_key(cfg, "privacy.epsilon", float("inf"))
    set_key(cfg, "loss.ska_mean", -0.5)
    set_key(cfg, "federated.retention", -1)
    assert cfg.privacy.epsilon == float("inf")
