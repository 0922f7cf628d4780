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
