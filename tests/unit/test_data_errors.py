"""Bad input gives one clear TedFlError naming the file or key and the fix; small broken files in tmp_path."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ted_fl.config import DataConfig
from ted_fl.data import load_site_set_spec, load_sites
from ted_fl.errors import TedFlError
from ted_fl.sites import main as sites_main

SET = """
name = "mine"
evaluation = "image"
[[sites]]
name = "H1"
layout = "folder"
folder = "H1"
[sites.files]
image = "images/{{id}}.png"
mask = "masks/{{id}}_seg.png"
[sites.labels]
values = [0, 255]
foreground = [255]
{extra}
"""


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _site(tmp: Path, n: int = 4, extra: str = "") -> tuple[Path, Path]:
    """A hospital added with TOML only: a folder of image/mask pairs."""
    rng = np.random.default_rng(0)
    for i in range(n):
        _png(tmp / "data" / "H1" / "images" / f"img{i}.png", rng.integers(0, 255, (20, 24)))
        mask = np.zeros((20, 24), np.uint8)
        mask[5:12, 6:15] = 255
        _png(tmp / "data" / "H1" / "masks" / f"img{i}_seg.png", mask)
    toml = tmp / "mine.toml"
    toml.write_text(SET.format(extra=extra))
    return toml, tmp / "data"


def _load(toml: Path, data: Path, **kw: object) -> list:
    return load_sites(DataConfig(sites=str(toml), data_dir=str(data), size=16, **kw), seed=0)


def test_user_folder_site_loads_without_code(tmp_path: Path) -> None:
    toml, data = _site(tmp_path)
    (site,) = _load(toml, data)
    assert site.name == "H1" and not site.per_volume
    assert len(site.train) + len(site.val) + len(site.test) == 4
    assert all(len(s) >= 1 for s in site.splits.values())
    assert site.train.images.shape[1:] == (1, 16, 16)
    assert 0 < site.train.masks.mean() < 0.5


def test_folder_layout_reads_nifti_volumes(tmp_path: Path) -> None:
    base = tmp_path / "data" / "H1"
    base.mkdir(parents=True)
    for i in range(3):
        vol = np.random.default_rng(i).random((12, 12, 5)).astype(np.float32)
        lab = np.zeros((12, 12, 5), np.uint8)
        lab[3:8, 3:8] = 1
        nib.save(nib.Nifti1Image(vol, np.eye(4)), base / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), base / f"c{i}_gt.nii.gz")
    toml = tmp_path / "vol.toml"
    toml.write_text('[[sites]]\nname = "H1"\nfolder = "H1"\nlayout = "folder"\n'
                    'files = { image = "{id}.nii.gz", mask = "{id}_gt.nii.gz" }\n')
    (site,) = _load(toml, tmp_path / "data")
    assert len(site.train) + len(site.val) + len(site.test) == 15
    assert site.train.num_volumes >= 1 and site.test.num_volumes == 1


def test_missing_data_folder(tmp_path: Path) -> None:
    toml, _ = _site(tmp_path)
    with pytest.raises(TedFlError, match=r"data folder '.*nowhere' does not exist.*data_dir"):
        _load(toml, tmp_path / "nowhere")


def test_missing_site_folder_names_it(tmp_path: Path) -> None:
    toml, data = _site(tmp_path)
    (data / "H1").rename(data / "H2")
    with pytest.raises(TedFlError, match=r"site 'H1': folder .*H1' does not exist \(did you mean 'H2'\?\)"):
        _load(toml, data)


def test_site_without_pairs(tmp_path: Path) -> None:
    toml, data = _site(tmp_path, n=0)
    (data / "H1").mkdir(parents=True)
    with pytest.raises(TedFlError, match=r"site 'H1': no image/mask pairs in .*mask 'masks/\{id\}_seg.png'"):
        _load(toml, data)


def test_missing_masks_are_skipped_with_a_warning(tmp_path: Path) -> None:
    toml, data = _site(tmp_path, n=5)
    (data / "H1" / "masks" / "img3_seg.png").unlink()
    (site,) = _load(toml, data)
    assert len(site.train) + len(site.val) + len(site.test) == 4
    assert any("images/img3.png" in w and "without a mask" in w for w in site.warnings)


def test_shape_mismatch(tmp_path: Path) -> None:
    toml, data = _site(tmp_path)
    _png(data / "H1" / "masks" / "img2_seg.png", np.zeros((10, 10)))
    with pytest.raises(TedFlError, match=r"img2.png: image shape \(1, 20, 24\) differs from its mask img2_seg.png"):
        _load(toml, data)


def test_truncated_png(tmp_path: Path) -> None:
    toml, data = _site(tmp_path)
    path = data / "H1" / "images" / "img1.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(TedFlError, match=r"img1.png: cannot read the file .*re-copy"):
        _load(toml, data)


def test_truncated_nifti(tmp_path: Path) -> None:
    spec = load_site_set_spec("prostate")
    base = tmp_path / "RUNMC"
    base.mkdir()
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4)), base / "Case00.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 3), np.uint8), np.eye(4)), base / "Case00_segmentation.nii.gz")
    raw = (base / "Case00.nii.gz").read_bytes()
    (base / "Case00.nii.gz").write_bytes(raw[: len(raw) // 2])
    from ted_fl.data.loaders import load_site

    with pytest.raises(TedFlError, match=r"Case00.nii.gz: cannot read the file"):
        load_site(spec, spec.site("RUNMC"), tmp_path, size=16, target="", seed=0)


def test_mask_values_outside_mapping(tmp_path: Path) -> None:
    toml, data = _site(tmp_path)
    bad = np.zeros((20, 24), np.uint8)
    bad[2:4, 2:4] = 128
    _png(data / "H1" / "masks" / "img0_seg.png", bad)
    with pytest.raises(TedFlError, match=r"img0_seg.png: mask values \[128\] are outside .*labels"):
        _load(toml, data)


def test_unknown_site_set_and_site(tmp_path: Path) -> None:
    with pytest.raises(TedFlError, match=r"unknown site set 'prostat'.*did you mean 'prostate'"):
        load_site_set_spec("prostat")
    toml, data = _site(tmp_path)
    with pytest.raises(TedFlError, match=r"unknown site 'H2'.*did you mean 'H1'"):
        _load(toml, data, order=["H2"])


def test_unknown_key_in_site_toml(tmp_path: Path) -> None:
    toml, _ = _site(tmp_path, extra='[sites.preprocess]\nsiez = 32\n')
    with pytest.raises(TedFlError, match=r"unknown key 'siez'.*did you mean 'size'"):
        load_site_set_spec(toml)
    toml.write_text(SET.format(extra="").replace('layout = "folder"', 'layout = "foldr"'))
    with pytest.raises(TedFlError, match=r"unknown layout 'foldr'.*did you mean 'folder'"):
        load_site_set_spec(toml)


def test_cli_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert sites_main(["check", "prostat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "did you mean 'prostate'" in err and "Traceback" not in err


def test_cli_unusable_site_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml, data = _site(tmp_path)
    assert sites_main(["check", str(toml), "--data-dir", str(data), "--size", "16"]) == 0
    _png(data / "H1" / "masks" / "img0_seg.png", np.full((20, 24), 7))
    assert sites_main(["check", str(toml), "--data-dir", str(data), "--size", "16"]) == 1
    assert "img0_seg.png" in capsys.readouterr().out


def test_official_folders_without_pairs_are_named(tmp_path: Path) -> None:
    """With files.official the patterns are relative to each official sub-folder: the error names the
    folders searched, not the site's folder."""
    for split in ("training", "testing"):
        _png(tmp_path / "data" / "H1" / split / "img0.png", np.zeros((8, 8), np.uint8))  # not under images/
    toml = tmp_path / "mine.toml"
    toml.write_text(SET.format(extra="").replace(
        'mask = "masks/{id}_seg.png"', 'mask = "masks/{id}_seg.png"\nofficial = { train = "training", test = "testing" }'))
    with pytest.raises(TedFlError) as err:
        _load(toml, tmp_path / "data")
    msg = str(err.value)
    assert f"'{tmp_path / 'data' / 'H1' / 'training'}', '{tmp_path / 'data' / 'H1' / 'testing'}'" in msg, msg
    assert "relative to each of these folders" in msg and "files.official" in msg
