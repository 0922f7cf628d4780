"""The synthetic twin: written in the real layouts, deterministic, and strongly shifted between sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from ted_fl.config import DataConfig
from ted_fl.data import load_site_set_spec, load_sites
from ted_fl.data.synthetic import ensure_twin
from ted_fl.errors import TedFlError


def _cfg(tmp: Path, sites: str = "prostate", **kw: object) -> DataConfig:
    return DataConfig(sites=sites, size=32, cache_dir=str(tmp), synthetic_volumes=4, **kw)


def test_prostate_twin_uses_the_real_layout(tmp_path: Path) -> None:
    root = ensure_twin(load_site_set_spec("prostate"), seed=0, cache_dir=str(tmp_path), volumes=3)
    assert (root / "RUNMC" / "Case00.nii.gz").is_file()
    assert (root / "RUNMC" / "Case00_segmentation.nii.gz").is_file()
    assert (root / "BMC" / "Case02_Segmentation.nii.gz").is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, no leftovers


def test_twin_is_deterministic(tmp_path: Path) -> None:
    a = load_sites(_cfg(tmp_path / "a"), seed=1)
    b = load_sites(_cfg(tmp_path / "b"), seed=1)
    c = load_sites(_cfg(tmp_path / "a"), seed=2)
    for x, y, z in zip(a, b, c, strict=True):
        assert x.train.images.tobytes() == y.train.images.tobytes()
        assert np.array_equal(x.train.masks, y.train.masks)
        assert x.manifest == y.manifest
        assert not np.array_equal(x.train.images, z.train.images)


def test_twin_sites_differ_and_are_well_formed(tmp_path: Path) -> None:
    sites = load_sites(_cfg(tmp_path), seed=0)
    assert [s.name for s in sites] == ["RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK"]
    stats = []
    for s in sites:
        assert s.per_volume and all(len(sp) > 0 for sp in s.splits.values())
        assert s.train.images.shape[1:] == (1, 32, 32) and s.train.images.dtype == np.float32
        assert set(np.unique(s.train.masks)) == {0, 1}
        im, m = s.train.images[:, 0], s.train.masks.astype(bool)
        ring = np.stack([binary_dilation(x, iterations=3) for x in m]) & ~m  # tissue around the gland
        stats.append((im.mean(), im.std(), im[m].mean() - im[ring].mean()))
    means = np.array([x[0] for x in stats])
    contrast = np.array([x[2] for x in stats])
    assert means.max() - means.min() > 0.2  # global intensity statistics differ strongly
    assert (contrast < 0).all()  # T2 polarity everywhere: the gland is darker than its surroundings
    assert contrast.max() - contrast.min() > 0.05  # but by site-specific amounts


def test_mnms_twin_is_multiclass_and_targets_keep_one(tmp_path: Path) -> None:
    multi = load_sites(_cfg(tmp_path, "mnms", order=["GE"]), seed=0)[0]
    rv = load_sites(_cfg(tmp_path, "mnms", order=["GE"], target="rv"), seed=0)[0]
    assert multi.name == "GE" and len(multi.train) > 0
    assert all(v.endswith(("_ED", "_ES")) for v in multi.manifest["train"])
    # LV blood pool, myocardial ring and RV crescent are all in the twin, as classes 1, 2, 3
    assert set(np.unique(multi.train.masks)) == {0, 1, 2, 3}
    assert multi.labels.classes == ("LV", "MYO", "RV") and multi.labels.out_channels == 4
    # data.target keeps one structure as a binary run: exactly the RV pixels of the multi-class masks
    assert rv.labels.classes == ("RV",)
    np.testing.assert_array_equal(rv.train.masks, (multi.train.masks == 3).astype(np.int64))
    with pytest.raises(TedFlError, match="did you mean 'MYO'"):
        load_sites(_cfg(tmp_path, "mnms", target="myoo"), seed=0)


def test_max_train_caps_training_images(tmp_path: Path) -> None:
    s = load_sites(_cfg(tmp_path, order=["HK"], max_train=5), seed=0)[0]
    assert len(s.train) == 5


def test_retina_twin_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(TedFlError, match="no synthetic twin.*--data-dir"):
        load_sites(_cfg(tmp_path, "retina"), seed=0)
