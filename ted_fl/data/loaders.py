"""Real-data loaders, one per on-disk layout, registered by name and chosen by the site's TOML entry.

Every loader turns files into `Item`s (one volume or image, already preprocessed to S x S);
`build_site` then splits them per volume, seeded, into train/val/test `Split`s. The synthetic
twin is written in the real layouts, so the same code path reads both.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ted_fl.data.io import Pair, find_pairs, read_fov, read_image, read_mask
from ted_fl.data.layouts import LAYOUT_DEFAULTS, LAYOUTS, register  # noqa: F401 (re-exported)
from ted_fl.data.spec import SiteSetSpec, SiteSpec, class_values, label_set, resolve_class
from ted_fl.data.types import SiteData, Split
from ted_fl.errors import TedFlError, closest


@dataclass
class Item:
    """One volume (3-D sets) or image (2-D sets) after preprocessing."""

    vid: str  # volume id, unique within the site
    group: str  # split unit: volumes of one patient (ED/ES) share a group
    official: str | None  # the source's own split, when it has one
    images: np.ndarray  # (n, S, S) float32
    masks: np.ndarray  # (n, S, S) int64 class indices (0 background, 1..K the classes)
    fov: np.ndarray | None = None  # (n, S, S) bool


@dataclass
class LoadContext:
    """What a loader needs: the site entry, where its files are, and the run's choices."""

    site: SiteSpec
    root: Path  # the site's folder
    data_root: Path  # the set's data dir (mnms keeps its CSV there)
    size: int
    target: str  # the one class kept ("" : every class of the set)
    crop: int
    set_path: Path
    warnings: list[str] = field(default_factory=list)


Loader = Callable[[LoadContext], list[Item]]


# ----------------------------------------------------------------------------- preprocessing


def map_labels(raw: np.ndarray, ctx: LoadContext, path: Path) -> np.ndarray:
    """Raw mask values -> class indices (0 background, k = the k-th class) as the TOML declares.

    Undeclared raw values are an error. A binary site without `classes` keeps the older rules:
    `foreground` (empty: every value > 0), optionally inverted.
    """
    lab = ctx.site.labels
    present = np.unique(raw)
    if lab.values:
        bad = sorted(set(present.tolist()) - set(lab.values))
        if bad:
            raise TedFlError(
                f"{path}: mask values {bad[:8]} are outside the declared labels.values {lab.values} of site "
                f"'{ctx.site.name}'; fix the mask or add them to the site's [sites.labels] table (key "
                f"'values') in {ctx.set_path}"
            )
    classes = class_values(lab)
    if ctx.target:
        classes = {ctx.target: classes[ctx.target]}
    if len(classes) == 1 and not lab.classes:  # binary, declared the older way
        (vals,) = classes.values()
        fg = np.isin(raw, vals) if vals else raw > 0
        if lab.invert:
            fg = ~fg
        return fg.astype(np.int64)
    out = np.zeros(raw.shape, np.int64)
    for k, vals in enumerate(classes.values(), 1):
        out[np.isin(raw, vals)] = k
    return out


def crop_or_pad(arr: np.ndarray, crop: int) -> np.ndarray:
    """Centre crop/pad (n, H, W) to (n, crop, crop), as the M&Ms protocol does."""
    if crop <= 0:
        return arr
    import torch
    from monai.transforms import ResizeWithPadOrCrop

    out = ResizeWithPadOrCrop(spatial_size=(crop, crop))(torch.as_tensor(arr))
    return np.asarray(out).astype(arr.dtype, copy=False)


def normalize(vol: np.ndarray, ctx: LoadContext) -> np.ndarray:
    """Min-max over the whole volume (or image), then clip: removes scanner units."""
    pre = ctx.site.preprocess
    vol = vol.astype(np.float32, copy=False)
    if pre.normalize == "minmax":
        lo, hi = float(vol.min()), float(vol.max())
        vol = (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)
    if pre.clip:
        vol = np.clip(vol, pre.clip[0], pre.clip[1])
    return vol.astype(np.float32, copy=False)


def resize(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Resize (n, H, W) in-plane: linear (antialiased) for images, nearest for labels."""
    import torch
    import torch.nn.functional as F

    if arr.shape[-2:] == (size, size):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[:, None]
    if nearest:
        out = F.interpolate(t, size=(size, size), mode="nearest")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0].numpy()


def prepare(
    images: np.ndarray,
    masks: np.ndarray,
    fov: np.ndarray | None,
    ctx: LoadContext,
    image_path: Path,
    mask_path: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(n, H, W) raw stacks -> (n, S, S) normalised images, {0,1} masks and FOV."""
    if images.shape != masks.shape:
        raise TedFlError(
            f"{image_path}: image shape {tuple(images.shape)} differs from its mask {mask_path.name} "
            f"{tuple(masks.shape)}; the pair must have the same size (re-export the mask or fix the pairing)"
        )
    if fov is not None and fov.shape != images.shape:
        raise TedFlError(f"{image_path}: field-of-view mask shape {tuple(fov.shape)} differs from the image "
                         f"{tuple(images.shape)}; fix the FOV file")
    m = map_labels(masks, ctx, mask_path)
    images, m = crop_or_pad(images, ctx.crop), crop_or_pad(m, ctx.crop)
    images = normalize(images, ctx)
    img = resize(images, ctx.size, nearest=False).astype(np.float32)
    pre = ctx.site.preprocess
    if pre.clip or pre.normalize == "minmax":  # interpolation may overshoot the range by rounding
        lo, hi = pre.clip or (0.0, 1.0)
        img = np.clip(img, np.float32(lo), np.float32(hi))
    msk = resize(m, ctx.size, nearest=True).astype(np.int64)
    fv = None
    if fov is not None:
        fv = resize(crop_or_pad(fov.astype(np.uint8), ctx.crop), ctx.size, nearest=True) > 0.5
    return img, msk, fv


def as_slices(arr: np.ndarray, path: Path) -> np.ndarray:
    """A 2-D image -> (1, H, W); a 3-D volume -> its slices along the last axis (n, H, W)."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return np.moveaxis(arr, -1, 0)
    raise TedFlError(f"{path}: {arr.ndim}-D data (shape {arr.shape}); this layout reads 2-D images or 3-D "
                     "volumes (use layout 'mnms' for 4-D cine, or extract the frames)")


# ----------------------------------------------------------------------------- pair layouts


def _volume_of(key: str, sep: str) -> str:
    return key.rsplit(sep, 1)[0] if sep and sep in key else key


def _load_pairs(ctx: LoadContext, want_3d: bool = False) -> list[Item]:
    """Shared engine of the pair layouts: official split folders or the folder itself."""
    files = ctx.site.files
    subs: list[tuple[str | None, str]] = [(s, d) for s, d in files.official.items()] or [
        (None, d) for d in (files.dirs or [""])
    ]
    items: list[Item] = []
    pairs_found: list[tuple[str | None, str, Pair]] = []
    for split, sub in subs:
        base = ctx.root / sub if sub else ctx.root
        if not base.is_dir():
            raise TedFlError(f"site '{ctx.site.name}': folder '{base}' is missing; the site entry in "
                             f"{ctx.set_path} expects it (files.official / files.dirs)")
        pairs, warns = find_pairs(base, files)
        ctx.warnings.extend(warns)
        pairs_found.extend((split, sub, p) for p in pairs)
    if not pairs_found:
        hint = ""
        if want_3d and any(ctx.root.rglob("*.png")):
            hint = "; it holds PNG slices: use the site set 'prostate_slices' (layout png_slices)"
        searched = ", ".join(f"'{ctx.root / sub if sub else ctx.root}'" for _, sub in subs)
        where = "each of " if len(subs) > 1 else ""
        raise TedFlError(
            f"site '{ctx.site.name}': no image/mask pairs in {searched} (image '{files.image}', mask "
            f"'{files.mask}', relative to {where}{'that folder' if len(subs) == 1 else 'these folders'}); "
            f"point the site's folder, files.official / files.dirs or files patterns in {ctx.set_path} "
            f"at the data{hint}"
        )
    for split, sub, pair in pairs_found:
        img = as_slices(read_image(pair.image, ctx.site.preprocess.channel), pair.image)
        if want_3d and img.shape[0] == 1:
            ctx.warnings.append(f"{pair.image}: a 2-D image where a volume was expected; read as one slice")
        msk = as_slices(read_mask(pair.mask), pair.mask)
        fov = as_slices(read_fov(pair.fov), pair.fov) if pair.fov is not None else None
        img, msk, fov = prepare(img, msk, fov, ctx, pair.image, pair.mask)
        vid = _volume_of(pair.key, files.volume_sep)
        if split is not None:
            vid = f"{sub}/{vid}"
        items.append(Item(vid, vid, split, img, msk, fov))
    return items


_PROSTATE = {
    "files": {"image": "{id}.nii.gz", "mask": "{id}_segmentation.nii.gz", "case_sensitive": False},
    "labels": {"values": [0, 1, 2]},
    "preprocess": {"normalize": "minmax", "clip": [0.001, 0.99]},
}


@register("prostate_nifti", _PROSTATE)
def load_prostate_nifti(ctx: LoadContext) -> list[Item]:
    """SAML multi-site prostate: CaseNN.nii.gz + CaseNN_segmentation.nii.gz, slices on the last axis."""
    return _load_pairs(ctx, want_3d=True)


@register(
    "png_slices",
    {
        "files": {"image": "image/{id}.png", "mask": "mask/{id}.png", "volume_sep": "_",
                  "official": {"train": "train", "test": "test"}},
        "labels": {"values": [0, 255], "foreground": [255], "invert": True},
        "preprocess": {"normalize": "minmax", "clip": [0.001, 0.99]},
    },
)
def load_png_slices(ctx: LoadContext) -> list[Item]:
    """2-D slices `<site>/{train,test}/{image,mask}/<case>_<slice>.png` (ProstateSlice)."""
    return _load_pairs(ctx)


@register(
    "retina",
    {
        "files": {"official": {"train": "training", "test": "test"}},
        "labels": {"values": [0, 255], "foreground": [255]},
        "preprocess": {"channel": "green", "normalize": "minmax"},
    },
)
def load_retina(ctx: LoadContext) -> list[Item]:
    """Fundus photographs with vessel masks and FOV masks (DRIVE, STARE, CHASE_DB1)."""
    if not ctx.site.files.fov:
        ctx.warnings.append(f"site '{ctx.site.name}': no files.fov pattern; evaluating over the whole image")
    return _load_pairs(ctx)


@register("folder")
def load_folder(ctx: LoadContext) -> list[Item]:
    """Any folder of image/mask pairs (PNG, TIFF, JPEG, NIfTI...) matched by `{id}`: no code needed."""
    return _load_pairs(ctx)


# ----------------------------------------------------------------------------- M&Ms


@register(
    "mnms",
    {
        "files": {"image": "{id}/{id}_sa.nii.gz", "mask": "{id}/{id}_sa_gt.nii.gz",
                  "dirs": ["Training/Labeled", "Validation", "Testing"]},
        "csv": {"path": "mnms_dataset_info.csv"},
        "labels": {"values": [0, 1, 2, 3], "classes": {"LV": [1], "MYO": [2], "RV": [3]}},
        "preprocess": {"normalize": "minmax", "clip": [0.001, 0.99], "crop": 256},
    },
)
def load_mnms(ctx: LoadContext) -> list[Item]:
    """M&Ms cine MRI: one vendor's subjects (from the CSV), ED and ES frames as two volumes."""
    spec = ctx.site.csv
    table = _read_vendor_csv(ctx)
    dirs = [d for d in ctx.site.files.dirs if (ctx.root / d).is_dir()] or [""]
    pairs: list[Pair] = []
    for d in dirs:
        found, warns = find_pairs(ctx.root / d if d else ctx.root, ctx.site.files)
        pairs.extend(found)
        ctx.warnings.extend(warns)
    mine = {code for code, row in table.items() if row[spec.vendor_column].strip() == spec.vendor}
    if not mine:
        vendors = sorted({row[spec.vendor_column].strip() for row in table.values()})
        raise TedFlError(f"site '{ctx.site.name}': no subject of vendor '{spec.vendor}' in the CSV "
                         f"(column '{spec.vendor_column}' has {vendors}); fix csv.vendor in {ctx.set_path}")
    chosen = [p for p in pairs if p.key in mine]
    missing = sorted(mine - {p.key for p in pairs})
    if missing:
        ctx.warnings.append(f"site '{ctx.site.name}': {len(missing)} subject(s) of the CSV have no image/mask "
                            f"pair: {', '.join(missing[:10])}")
    if not chosen:
        raise TedFlError(f"site '{ctx.site.name}': no image/mask pairs for vendor '{spec.vendor}' under "
                         f"'{ctx.root}' (dirs {ctx.site.files.dirs}, image '{ctx.site.files.image}')")
    items: list[Item] = []
    for pair in chosen:
        img4, msk4 = read_image(pair.image), read_mask(pair.mask)
        if img4.ndim != 4 or img4.shape != msk4.shape:
            raise TedFlError(f"{pair.image}: expected a 4-D cine (x, y, z, t) with a mask of the same shape, "
                             f"got {img4.shape} and {msk4.shape}; check the M&Ms files")
        row = table[pair.key]
        for phase, column in (("ED", spec.ed_column), ("ES", spec.es_column)):
            try:
                t = int(float(row[column])) - spec.frame_base
            except ValueError:
                raise TedFlError(f"{table_path(ctx)}: {column}='{row[column]}' of {pair.key} is not a frame "
                                 "number; fix the CSV") from None
            if not 0 <= t < img4.shape[-1]:
                raise TedFlError(f"{pair.image}: {phase} frame {t} outside 0..{img4.shape[-1] - 1}; check "
                                 f"csv.frame_base in {ctx.set_path}")
            img, msk = np.moveaxis(img4[..., t], -1, 0), np.moveaxis(msk4[..., t], -1, 0)
            img, msk, _ = prepare(img, msk, None, ctx, pair.image, pair.mask)
            items.append(Item(f"{pair.key}_{phase}", pair.key, None, img, msk))
    return items


def table_path(ctx: LoadContext) -> Path:
    p = Path(ctx.site.csv.path)
    return p if p.is_absolute() else ctx.data_root / p


def _read_vendor_csv(ctx: LoadContext) -> dict[str, dict[str, str]]:
    spec = ctx.site.csv
    path = table_path(ctx)
    if not path.is_file():
        raise TedFlError(f"{path}: the vendor information CSV is missing; set csv.path of site "
                         f"'{ctx.site.name}' in {ctx.set_path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = [c for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TedFlError(f"{path}: cannot read the CSV ({exc}); re-copy it") from None
    for key in ("id_column", "vendor_column", "ed_column", "es_column"):
        col = getattr(spec, key)
        if col not in columns:
            raise TedFlError(f"{path}: no column '{col}'{closest(col, columns)}; set csv.{key} of site "
                             f"'{ctx.site.name}' in {ctx.set_path} (columns: {', '.join(columns)})")
    return {row[spec.id_column].strip(): row for row in rows}


# ----------------------------------------------------------------------------- splits


def _split_groups(
    groups: dict[str, str | None], rng: np.random.Generator, val_frac: float, test_frac: float
) -> dict[str, str]:
    """Group -> split: the official split when there is one, else the reference's 25 % / 15 %."""
    out: dict[str, str] = {}
    official = {g: s for g, s in groups.items() if s is not None}
    if official:
        pool = sorted(g for g, s in official.items() if s == "train")
        out.update({g: s for g, s in official.items() if s != "train"})
        out.update({g: "train" for g in groups if groups[g] is None})
        pool += sorted(g for g in groups if groups[g] is None)
    else:
        pool = sorted(groups)
        n = len(pool)
        if n >= 2:
            n_test = min(max(1, round(test_frac * n)), n - 2 if n >= 3 else 1)
            perm = [pool[i] for i in rng.permutation(n)]
            out.update({g: "test" for g in perm[:n_test]})
            pool = sorted(perm[n_test:])
    n = len(pool)
    perm = [pool[i] for i in rng.permutation(n)]
    n_val = min(max(1, round(val_frac * n)), n - 1) if n >= 2 else 0
    if "val" in official.values():  # an official validation split is kept as it is
        n_val = 0
    out.update({g: "val" for g in perm[:n_val]})
    out.update({g: "train" for g in perm[n_val:]})
    return out


def _stack(items: list[Item], size: int) -> Split:
    if not items:
        return Split(np.zeros((0, 1, size, size), np.float32), np.zeros((0, size, size), np.int64),
                     np.zeros((0,), dtype=str), None)
    imgs = np.concatenate([it.images for it in items])[:, None].astype(np.float32)
    msks = np.concatenate([it.masks for it in items]).astype(np.int64)
    vols = np.concatenate([np.full(len(it.images), it.vid, dtype=object) for it in items]).astype(str)
    fov = np.concatenate([it.fov for it in items]) if all(it.fov is not None for it in items) else None
    return Split(imgs, msks, vols, fov)


def site_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def build_site(items: list[Item], ctx: LoadContext, spec: SiteSetSpec, seed: int, max_train: int) -> SiteData:
    """Split a site's items per volume (seeded), stack them into arrays and record the manifest."""
    rng = site_rng(seed, ctx.site.name)
    groups: dict[str, str | None] = {}
    for it in items:
        groups.setdefault(it.group, it.official)
    assign = _split_groups(groups, rng, spec.val_fraction, spec.test_fraction)
    warnings = ctx.warnings
    splits = {s: _stack([it for it in items if assign[it.group] == s], ctx.size) for s in ("train", "val", "test")}
    if len(splits["val"]) == 0 and len(splits["train"]) >= 2:
        tr = splits["train"]
        n_val = max(1, round(spec.val_fraction * len(tr)))
        idx = rng.permutation(len(tr))
        val_idx, tr_idx = np.sort(idx[:n_val]), np.sort(idx[n_val:])
        splits["val"], splits["train"] = tr.take(val_idx), tr.take(tr_idx)
        warnings.append(f"site '{ctx.site.name}': too few training volumes to hold one out; validation "
                        f"takes {n_val} training slice(s) (not volume-disjoint)")
    for s, sp in splits.items():
        if len(sp) == 0:
            warnings.append(f"site '{ctx.site.name}': the {s} split is empty ({len(groups)} volume(s) in all)")
    manifest = {s: sorted(set(sp.volumes.tolist())) for s, sp in splits.items()}
    if max_train and len(splits["train"]) > max_train:
        keep = np.sort(rng.permutation(len(splits["train"]))[:max_train])
        splits["train"] = splits["train"].take(keep)
    return SiteData(name=ctx.site.name, splits=splits, per_volume=spec.per_volume, warnings=warnings,
                    manifest=manifest)


def load_site(
    spec: SiteSetSpec,
    site: SiteSpec,
    data_root: Path,
    *,
    size: int,
    target: str,
    seed: int,
    max_train: int = 0,
    crop: int = -1,
) -> SiteData:
    """Load one site with its layout's loader and split it."""
    folder = Path(site.folder)
    root = folder if folder.is_absolute() else data_root / folder
    if not root.is_dir():
        present = sorted(p.name for p in data_root.iterdir() if p.is_dir()) if data_root.is_dir() else []
        raise TedFlError(f"site '{site.name}': folder '{root}' does not exist{closest(site.folder, present)}; "
                         f"set its 'folder' in {spec.path} (folders present: {', '.join(present) or 'none'})")
    ctx = LoadContext(
        site=site, root=root, data_root=data_root, size=size or site.preprocess.size,
        target=resolve_class(spec, site, target),
        crop=site.preprocess.crop if crop < 0 else crop, set_path=spec.path,
    )
    items = LAYOUTS[site.layout](ctx)
    data = build_site(items, ctx, spec, seed, max_train)
    data.labels = label_set(spec, site, target)
    return data
