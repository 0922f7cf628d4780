"""Multi-class site sets on small made files: each documented layout, each label error, small sites.

The site-set TOML is docs/sites.md's own worked example wherever one exists, so the page and the
loader are checked together.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ted_fl.commands.shared import run_command
from ted_fl.config import DataConfig, ExperimentConfig
from ted_fl.continual.evaluation import score
from ted_fl.data import check_sites, check_splits, load_site_set_spec, load_sites, resolve_out_channels
from ted_fl.errors import TedFlError
from ted_fl.sites import main as sites_main
from tests.unit.test_docs_sites import toml_examples

N = 16  # image side: loaded at size 16, so no resampling blurs the hand-made masks


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def disc(cx: int, cy: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:N, :N]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def fundus_mask(i: int, cup_value: int) -> np.ndarray:
    """Grey levels: 255 background, 128 disc rim, `cup_value` cup (0, or 64 on camera C)."""
    m = np.full((N, N), 255, np.uint8)
    m[disc(7 + i % 3, 8, 5)] = 128
    m[disc(7 + i % 3, 8, 2.5)] = cup_value
    return m


def write_fundus(tmp: Path, n: int = 5, toml: str | None = None) -> tuple[Path, Path]:
    data = tmp / "data"
    rng = np.random.default_rng(0)
    for cam in ("CamA", "CamB", "CamC", "CamD"):
        for i in range(n):
            mask = fundus_mask(i, 64 if cam == "CamC" else 0)
            img = np.stack([rng.integers(0, 255, (N, N))] * 3, axis=-1)
            _png(data / cam / "images" / f"f{i}.png", img)
            _png(data / cam / "masks" / f"f{i}.png", mask)
    path = tmp / "fundus.toml"
    path.write_text(toml or toml_examples()["fundus"])
    return path, data


def _load(toml: Path, data: Path, **kw: object) -> list:
    return load_sites(DataConfig(sites=str(toml), data_dir=str(data), size=N, **kw), seed=0)


# ----------------------------------------------------------------------------- grey-level classes, regions


def test_grey_level_three_class_set_with_a_region(tmp_path: Path) -> None:
    toml, data = write_fundus(tmp_path)
    sites = _load(toml, data)
    assert [s.name for s in sites] == ["CamA", "CamB", "CamC", "CamD"]
    for s in sites:
        assert s.labels.classes == ("rim", "cup") and s.labels.out_channels == 3
        assert s.labels.labels() == [("rim", (1,)), ("cup", (2,)), ("disc", (1, 2))]
        split = s.train
        vol_ids = split.volumes
        for k, vid in enumerate(vol_ids):
            raw = fundus_mask(int(vid.split("f")[-1]), 64 if s.name == "CamC" else 0)
            expected = np.where(raw == 128, 1, np.where(raw == 255, 0, 2))
            np.testing.assert_array_equal(split.masks[k], expected)  # 255 -> 0, rim -> 1, cup -> 2


def test_regions_are_scored_on_the_union_of_their_classes(tmp_path: Path) -> None:
    toml, data = write_fundus(tmp_path)
    site = _load(toml, data, order=["CamA"])[0]
    split, labels = site.test, site.labels.labels()
    gt = split.masks
    rim, cup = (gt == 1).sum(), (gt == 2).sum()
    assert rim > 0 and cup > 0 and len(split) == 1  # per image: one test image here
    out = score(gt.copy(), split, per_volume=False, labels=labels)
    assert out == {"dice": 1.0, "iou": 1.0, "hd95": 0.0,
                   **{f"{n}/{m}": v for n in ("rim", "cup", "disc") for m, v in
                      (("dice", 1.0), ("iou", 1.0), ("hd95", 0.0))}}
    # the cup predicted as rim: rim Dice 2|rim| / (2|rim| + |cup|), cup 0, the disc still perfect
    pred = np.where(gt == 2, 1, gt)
    out = score(pred, split, per_volume=False, labels=labels)
    rim_dice = 2 * rim / (2 * rim + cup)
    assert out["rim/dice"] == pytest.approx(rim_dice)
    assert out["cup/dice"] == 0.0 and out["disc/dice"] == pytest.approx(1.0)
    assert out["dice"] == pytest.approx((rim_dice + 0.0 + 1.0) / 3)  # the mean label
    assert out["rim/iou"] == pytest.approx(rim / (rim + cup))


def test_binary_set_mean_equals_its_class(tmp_path: Path) -> None:
    """A one-class set scores its class and the mean alike, and as the older binary evaluation."""
    toml, data = write_fundus(tmp_path)
    site = _load(toml, data, order=["CamB"])[0]
    split = site.test
    gt_any = (split.masks > 0).astype(np.int64)
    pred = np.roll(gt_any, 1, axis=-1)
    binary = score(pred, split.__class__(split.images, gt_any, split.volumes), per_volume=False)
    one = score(pred, split.__class__(split.images, gt_any, split.volumes), per_volume=False,
                labels=[("disc", (1,))])
    assert one["dice"] == one["disc/dice"] == binary["dice"] and one["hd95"] == binary["hd95"]


def test_target_keeps_one_class_of_a_multiclass_set(tmp_path: Path) -> None:
    toml, data = write_fundus(tmp_path)
    multi = _load(toml, data, order=["CamC"])[0]
    cup = _load(toml, data, order=["CamC"], target="CUP")[0]
    assert cup.labels.classes == ("cup",) and cup.labels.out_channels == 2
    np.testing.assert_array_equal(cup.train.masks, (multi.train.masks == 2).astype(np.int64))
    with pytest.raises(TedFlError, match="unknown data.target 'cpu'.*did you mean 'cup'"):
        _load(toml, data, target="cpu")


def test_out_channels_follow_the_site_set(tmp_path: Path) -> None:
    toml, _ = write_fundus(tmp_path)
    cfg = ExperimentConfig()
    cfg.data.sites = str(toml)
    assert resolve_out_channels(cfg).classes == ("rim", "cup") and cfg.model.out_channels == 3
    cfg.data.target = "rim"
    cfg.model.out_channels = 0
    resolve_out_channels(cfg)
    assert cfg.model.out_channels == 2
    cfg.data.target, cfg.model.out_channels = "", 2
    with pytest.raises(TedFlError, match=r"model.out_channels = 2 contradicts .* rim, cup \+ background = 3"):
        resolve_out_channels(cfg)


# ----------------------------------------------------------------------------- the other layouts


def test_inverted_binary_masks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        m = np.full((N, N), 255, np.uint8)
        m[3:9, 4:12] = 0  # the lesion is 0
        _png(data / "H1" / "images" / f"a{i}.png", np.full((N, N), 30 * i, np.uint8))
        _png(data / "H1" / "masks" / f"a{i}.png", m)
    toml = tmp_path / "inv.toml"
    toml.write_text(toml_examples()["inverted"])
    (site,) = _load(toml, data)
    assert site.labels.classes == ("lesion",)
    for mk in site.train.masks:
        assert mk.sum() == 48 and mk[3:9, 4:12].all()


def test_rgb_masks_read_as_grey_levels(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        m = np.zeros((N, N, 3), np.uint8)
        m[2:6, 2:10] = [255, 0, 0]  # red: tumour (L = 76)
        m[8:14, 4:12] = [0, 255, 0]  # green: oedema (L = 150)
        _png(data / "Lab1" / "seg" / f"c{i}_mask.png", m)
        (data / "Lab1" / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((N, N, 3), 40 * i, np.uint8)).save(data / "Lab1" / "img" / f"c{i}.jpg")
    toml = tmp_path / "rgb.toml"
    toml.write_text(toml_examples()["rgb"])
    (site,) = _load(toml, data)
    m = site.train.masks[0]
    assert site.labels.classes == ("tumour", "oedema")
    assert (m[2:6, 2:10] == 1).all() and (m[8:14, 4:12] == 2).all() and m.sum() == 32 + 2 * 48
    # a colour the TOML does not declare (blue, L = 29) is an error naming the file and the table
    bad = np.zeros((N, N, 3), np.uint8)
    bad[0:2, 0:2] = [0, 0, 255]
    _png(data / "Lab1" / "seg" / "c0_mask.png", bad)
    with pytest.raises(TedFlError, match=r"c0_mask.png: mask values \[29\].*\[sites.labels\] table"):
        _load(toml, data)


def test_nifti_volumes_with_classes_and_region(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = np.random.default_rng(1)
    for folder, seg in (("A", "_seg"), ("B", "_Seg")):
        for i in range(5):
            lab = np.zeros((N, N, 4), np.uint8)
            lab[4:12, 4:12, 1:3] = 2
            lab[6:10, 6:10, 1:3] = 1
            img = rng.normal(size=(N, N, 4)).astype(np.float32) + lab
            (data / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(img, np.eye(4)), str(data / folder / f"p{i}_t2.nii.gz"))
            nib.save(nib.Nifti1Image(lab, np.eye(4)), str(data / folder / f"p{i}{seg}.nii.gz"))
    toml = tmp_path / "nifti.toml"
    toml.write_text(toml_examples()["nifti"])
    sites = _load(toml, data)
    for s in sites:
        assert s.per_volume and s.labels.labels()[-1] == ("gland", (1, 2))
        n_vol = sum(sp.num_volumes for sp in s.splits.values())
        assert n_vol == 5 and len(s.train) % 4 == 0  # 4 slices a volume, volume-disjoint splits
        assert set(np.unique(s.train.masks)) == {0, 1, 2}
        assert (s.train.masks == 1).sum() == 16 * 2 * len(s.train) // 4


def test_official_splits_are_kept(tmp_path: Path) -> None:
    data = tmp_path / "data" / "centre1"
    counts = {"training": 4, "validation": 2, "testing": 3}
    for sub, n in counts.items():
        for i in range(n):
            m = np.zeros((N, N), np.uint8)
            m[4:8, 4:8] = 1
            _png(data / sub / f"{sub}{i}.png", np.full((N, N), 10 * i, np.uint8))
            _png(data / sub / f"{sub}{i}_gt.png", m)
    toml = tmp_path / "official.toml"
    toml.write_text(toml_examples()["official"])
    (site,) = _load(toml, tmp_path / "data")
    assert (len(site.train), len(site.val), len(site.test)) == (4, 2, 3)
    assert all(v.startswith("validation/") for v in site.manifest["val"])


# ----------------------------------------------------------------------------- label errors


def _fundus_variant(tmp: Path, old: str, new: str) -> Path:
    text = toml_examples()["fundus"]
    assert old in text
    path = tmp / "variant.toml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(("old", "new", "message"), [
    ('classes = { rim = [128], cup = [64] }', 'classes = { cup = [64], rim = [128] }',
     r"site 'CamC' declares classes \['cup', 'rim'\].*'CamA' declares \['rim', 'cup'\].*must agree"),
    ('classes = { rim = [128], cup = [0] }', 'classes = { rim = [128], cup = [128] }',
     r"raw value 128 is claimed by both 'rim' and 'cup'.*mutually exclusive"),
    ('regions = { disc = ["rim", "cup"] }', 'regions = { disc = ["rim", "cupp"] }',
     r"unknown class 'cupp' in .*regions.disc \(did you mean 'cup'\?\)"),
    ('regions = { disc = ["rim", "cup"] }', 'regions = { rim = ["rim", "cup"] }', r"'rim' clashes with a class"),
    ('classes = { rim = [128], cup = [0] }', 'classes = { rim = [128], cup = [0] }\nforeground = [128]',
     r"labels.classes replaces foreground, invert and targets"),
    ('classes = { rim = [128], cup = [0] }', 'classes = { rim = [128], cup = [7] }',
     r"classes.cup: raw values \[7\] are not in labels.values"),
    ('classes = { rim = [128], cup = [0] }', 'classes = { rim = 128, cup = [0] }',
     r"classes.rim must be a non-empty list of integer raw mask values"),
    ('classes = { rim = [128], cup = [0] }', 'clases = { rim = [128], cup = [0] }', r"did you mean 'classes'"),
    ('classes = { rim = [128], cup = [0] }', 'classes = { rim = [128], mean = [0] }', r"'mean' is reserved"),
    ('regions = { disc = ["rim", "cup"] }', 'regions = ["rim", "cup"]', r"labels.regions must be a table"),
])
def test_label_errors_are_one_line_naming_site_and_fix(tmp_path: Path, old: str, new: str, message: str) -> None:
    path = _fundus_variant(tmp_path, old, new)
    with pytest.raises(TedFlError, match=message) as err:
        load_site_set_spec(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_undeclared_value_names_the_table_in_sites_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The message names the TOML table [sites.labels]; rich must not swallow it as markup."""
    toml, data = write_fundus(tmp_path)
    _png(data / "CamB" / "masks" / "f0.png", np.full((N, N), 200, np.uint8))
    assert sites_main(["check", str(toml), "--data-dir", str(data), "--size", str(N)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "mask values [200] are outside the declared labels.values [0, 128, 255]" in out
    assert "site's [sites.labels] table (key 'values')" in out


# ----------------------------------------------------------------------------- sites too small to split


SMALL = """
name = "small"
evaluation = "image"
[[sites]]
name = "H1"
folder = "H1"
[sites.files]
official = {{ train = "train", test = "test" }}
[sites.labels]
values = [0, 255]
classes = {{ lesion = [255] }}
{more}
"""


def write_small(tmp: Path, n_train: int = 1, second: bool = True) -> tuple[Path, Path]:
    data = tmp / "data"
    sites = ["H1", "H2"] if second else ["H1"]
    for site in sites:
        for split, n in (("train", n_train), ("test", 2)):
            for i in range(n):
                m = np.zeros((N, N), np.uint8)
                m[2:7, 3:9] = 255
                _png(data / site / split / "images" / f"{split}{i}.png", np.full((N, N), 9 * i, np.uint8))
                _png(data / site / split / "masks" / f"{split}{i}.png", m)
    more = '[[sites]]\nname = "H2"\nfolder = "H2"\nfiles.official = { train = "train", test = "test" }\n' \
           'labels.values = [0, 255]\nlabels.classes = { lesion = [255] }' if second else ""
    toml = tmp / "small.toml"
    toml.write_text(SMALL.format(more=more))
    return toml, data


def test_site_too_small_for_validation_is_reported_and_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    toml, data = write_small(tmp_path)
    cfg = DataConfig(sites=str(toml), data_dir=str(data), size=N)
    report = check_sites(cfg)
    assert [s.validation for s in report.sites] == ["no", "no"]
    assert any("validation is impossible" in w for w in report.sites[0].warnings)
    sites = load_sites(cfg, seed=0)
    with pytest.raises(TedFlError, match=r"site 'H1' .*val split is empty.*train.select_best=false.*val folder"):
        check_splits(sites, need_val=True)
    check_splits(sites, need_val=False)  # without best-round selection the site is usable
    assert sites_main(["check", str(toml), "--data-dir", str(data), "--size", str(N)]) == 0
    assert "H1: the val split is empty: validation is impossible, so simulate needs train.select_best=false" \
        in " ".join(capsys.readouterr().out.split())


def test_simulate_refuses_a_small_site_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """One line naming the site, the split and the fix, exit 2, before Ray starts (no run left behind)."""
    from ted_fl.federated import simulation

    def no_ray(*_a: object, **_k: object) -> None:
        raise AssertionError("the Flower simulation (Ray) was started")

    monkeypatch.setattr(simulation, "simulate_cells", no_ray)
    toml, data = write_small(tmp_path)
    out = tmp_path / "runs"
    rc = run_command("simulate", ["--sites", str(toml), "--data-dir", str(data), "--quiet", "--out", str(out),
                                  "--set", f"data.size={N}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == [next(line for line in err if line.startswith("error:"))]
    assert "site 'H1'" in err[0] and "val split" in err[0] and "train.select_best=false" in err[0]
    assert not out.exists() or not any(out.iterdir())  # no half-written run directory


def test_site_without_test_images_is_refused(tmp_path: Path) -> None:
    toml, data = write_small(tmp_path, second=False)
    sites = load_sites(DataConfig(sites=str(toml), data_dir=str(data), size=N), seed=0)
    sites[0].splits["test"] = sites[0].splits["test"].__class__(
        sites[0].test.images[:0], sites[0].test.masks[:0], sites[0].test.volumes[:0])
    with pytest.raises(TedFlError, match=r"site 'H1' .*test split is empty.*files.official.test"):
        check_splits(sites, need_val=False)


def test_simulate_help_lists_the_site_sets_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--help names the sets in sites/, not a fixed list: a new TOML file shows up."""
    from ted_fl.data import spec as S

    with pytest.raises(SystemExit):
        run_command("simulate", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mnms, prostate, prostate_slices, retina" in text
    (tmp_path / "fundus.toml").write_text(toml_examples()["fundus"])
    monkeypatch.setattr(S, "sites_dir", lambda: tmp_path)
    with pytest.raises(SystemExit):
        run_command("simulate", ["--help"])
    assert "site set: fundus, or a path" in " ".join(capsys.readouterr().out.split())
