"""Loaders on the real files in ../shared/data (skipped when the folder is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ted_fl.config import DataConfig
from ted_fl.data import check_sites, list_site_sets, load_site_set_spec, load_sites

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
RETINA = DATA / "retinal_vessels"
SLICES = DATA / "prostate_slices"

pytestmark = [pytest.mark.realdata, pytest.mark.xdist_group("test_data_real")]


def test_site_sets_declared_in_order() -> None:
    assert {"prostate", "mnms", "retina"} <= set(list_site_sets())
    assert load_site_set_spec("prostate").site_names == ["RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"]
    assert load_site_set_spec("mnms").site_names == ["Siemens", "Philips", "GE", "Canon"]
    assert load_site_set_spec("retina").site_names == ["DRIVE", "STARE", "CHASEDB1"]


@pytest.fixture(scope="module")
def retina() -> list:
    if not RETINA.is_dir():
        pytest.skip(f"{RETINA} absent")
    return load_sites(DataConfig(sites="retina", data_dir=str(RETINA), size=32), seed=0)


def test_retina_official_counts(retina: list) -> None:
    expected = {"DRIVE": 20, "STARE": 10, "CHASEDB1": 14}
    assert [s.name for s in retina] == list(expected)
    for site in retina:
        n = expected[site.name]
        assert len(site.train) + len(site.val) == n
        assert len(site.test) == n
        assert len(site.val) >= 1
        assert not site.per_volume
        assert site.warnings == []
        assert set(site.manifest) == {"train", "val", "test"}
        assert all(v.startswith("test/") for v in site.manifest["test"])


def test_retina_arrays(retina: list) -> None:
    for site in retina:
        for split in site.splits.values():
            assert split.images.shape[1:] == (1, 32, 32) and split.images.dtype == np.float32
            assert split.masks.dtype == np.int64 and set(np.unique(split.masks)) <= {0, 1}
            assert split.fov is not None and split.fov.dtype == bool and split.fov.shape == split.masks.shape
            assert 0.02 < split.masks.mean() < 0.25  # vessels are a minority
            assert 0.3 < split.fov.mean() < 0.95


def test_prostate_slices_six_sites_inverted_masks_and_i2cvb_warning() -> None:
    if not SLICES.is_dir():
        pytest.skip(f"{SLICES} absent")
    sites = load_sites(DataConfig(sites="prostate_slices", data_dir=str(SLICES), size=32), seed=0)
    assert [s.name for s in sites] == ["RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"]
    for site in sites:
        fg = np.concatenate([s.masks.ravel() for s in site.splits.values()]).mean()
        assert 0.0 < fg < 0.1, site.name  # 0 = prostate in the PNGs: inverted, so small
        assert len(site.test) == 3 and len(site.train) >= 1 and len(site.val) >= 1
        assert site.manifest["test"] == ["test/00"]
    i2cvb = sites[2]
    assert len(i2cvb.train) + len(i2cvb.val) == 2
    text = " ".join(i2cvb.warnings)
    assert "00_03.png" in text and "00_00.png" in text
    # intensities differ wildly between sites in the raw data; min-max keeps them in [0.001, 0.99]
    for site in sites:
        assert site.train.images.min() >= 0.001 and site.train.images.max() <= 0.99


def test_check_report_on_retina() -> None:
    if not RETINA.is_dir():
        pytest.skip(f"{RETINA} absent")
    rep = check_sites(DataConfig(sites="retina", data_dir=str(RETINA), size=32, order=["STARE"]))
    assert rep.ok and [s.name for s in rep.sites] == ["STARE"]
    assert rep.sites[0].counts["test"] == (10, 10)
    assert rep.sites[0].label_values == [0, 1]
