"""data.split_seed = "seed": each run seed draws its own split (issue 24, item 6), schema-checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from ted_fl.config import ExperimentConfig, for_seed, from_dict, set_key, split_seed_of
from ted_fl.errors import TedFlError
from tests.conftest import tiny_config


def test_split_seed_accepts_an_integer_or_seed_and_nothing_else() -> None:
    cfg = from_dict(ExperimentConfig, {"data": {"split_seed": "seed"}}, "f.toml")
    assert cfg.data.split_seed == "seed"
    set_key(cfg, "data.split_seed", 7)
    assert cfg.data.split_seed == 7
    with pytest.raises(TedFlError) as info:
        from_dict(ExperimentConfig, {"data": {"split_seed": "seeds"}}, "f.toml")
    assert str(info.value).startswith("f.toml: data.split_seed: ") and "(or 'seed')" in str(info.value)
    assert "\n" not in str(info.value)


def test_the_split_seed_each_run_seed_draws_with() -> None:
    cfg = ExperimentConfig(seeds=[0, 1, 2])
    assert split_seed_of(cfg) == 42 and split_seed_of(cfg, 1) == 42 and for_seed(cfg, 1) is cfg
    cfg.data.split_seed = "seed"
    assert [split_seed_of(cfg, s) for s in (0, 1, 2)] == [0, 1, 2]
    one = for_seed(cfg, 2)
    assert one.data.split_seed == 2 and cfg.data.split_seed == "seed"  # a copy
    with pytest.raises(TedFlError, match="no seed to pick"):
        split_seed_of(cfg)
    assert split_seed_of(ExperimentConfig(seeds=[5], data=cfg.data)) == 5


def _manifests(cfg: ExperimentConfig, seed: int) -> dict:
    from ted_fl.schedule.lifecycle import check_data

    return {s.name: s.manifest for s in check_data(for_seed(cfg, seed))}


def test_two_seeds_draw_different_splits_and_one_seed_the_same(tmp_path: Path) -> None:
    """On the synthetic twin (the split and the twin both follow the split seed)."""
    cfg = tiny_config(tmp_path)
    cfg.data.order = ["RUNMC", "BMC"]
    cfg.seeds = [0, 1]
    cfg.data.split_seed = "seed"
    a, b, again = _manifests(cfg, 0), _manifests(cfg, 1), _manifests(cfg, 0)
    assert a == again
    assert a != b
    cfg.data.split_seed = 42  # the fixed split: every seed the same
    assert _manifests(cfg, 0) == _manifests(cfg, 1)


def test_real_images_are_reassigned_between_train_and_validation(shared_data: Path) -> None:
    from ted_fl.data import load_sites

    cfg = ExperimentConfig(seeds=[0, 1])
    cfg.data.sites, cfg.data.data_dir, cfg.data.size = "retina", str(shared_data / "retinal_vessels"), 32
    cfg.data.split_seed = "seed"

    def split(seed: int) -> dict:
        return load_sites(cfg.data, split_seed_of(cfg, seed), only=["STARE"])[0].manifest

    s0, s1 = split(0), split(1)
    assert s0 == split(0)
    assert sorted(s0["train"] + s0["val"]) == sorted(s1["train"] + s1["val"])  # the same images...
    assert s0["val"] != s1["val"]  # ...split differently
    assert s0["test"] == s1["test"]  # the official test set stays


def test_the_flower_simulation_takes_one_seed_per_run_with_its_own_split() -> None:
    from ted_fl.config import federated_split_seed

    cfg = ExperimentConfig(seeds=[0, 1])
    federated_split_seed(cfg)  # a fixed split: any number of seeds
    cfg.data.split_seed = "seed"
    with pytest.raises(TedFlError, match="one seed per run"):
        federated_split_seed(cfg)
    cfg.seeds = [1]
    federated_split_seed(cfg)
    assert split_seed_of(cfg) == 1
