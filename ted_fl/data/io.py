"""Reading files and pairing images with masks by name, with one-line errors for bad files.

Pillow and nibabel raise many different exceptions for broken files (OSError, EOFError,
zlib.error, ImageFileError...); they are all turned into a TedFlError naming the file, so a
truncated download never surfaces as a deep traceback.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ted_fl.data.spec import FilesSpec
from ted_fl.errors import TedFlError

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr")
RGB_INDEX = {"red": 0, "green": 1, "blue": 2}


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_image(path: Path, channel: str = "gray") -> np.ndarray:
    """Read an image or volume as float32; RGB images reduce to one channel (`channel`)."""
    if is_volume_file(path):
        return _read_nifti(path, integer=False)
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()
            im: Image.Image = opened
            if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
                im = im.convert("RGB")
                arr = np.asarray(im, dtype=np.float32)
                return arr.mean(axis=-1) if channel == "mean" else (
                    np.ascontiguousarray(arr[..., RGB_INDEX.get(channel, 1)]) if channel != "gray"
                    else np.asarray(im.convert("L"), dtype=np.float32))
            if im.mode == "1":
                im = im.convert("L")
            return np.asarray(im, dtype=np.float32)
    except TedFlError:
        raise
    except Exception as exc:
        raise _unreadable(path, exc) from None


def read_mask(path: Path) -> np.ndarray:
    """Read a label image or volume as int64 raw values (1-bit images become 0/255)."""
    if is_volume_file(path):
        return _read_nifti(path, integer=True)
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()
            im: Image.Image = opened
            if im.mode in ("1", "RGB", "RGBA", "LA"):
                im = im.convert("L")
            return np.asarray(im).astype(np.int64)
    except Exception as exc:
        raise _unreadable(path, exc) from None


def read_fov(path: Path) -> np.ndarray:
    """Read a field-of-view mask: anything above zero is inside."""
    return read_mask(path) > 0


def _read_nifti(path: Path, integer: bool) -> np.ndarray:
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))  # a spatial image (dataobj, get_fdata) for every suffix read here
        if integer:
            arr = np.asanyarray(img.dataobj)
            return (np.rint(arr) if arr.dtype.kind == "f" else arr).astype(np.int64)
        return np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: Exception) -> TedFlError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TedFlError(
        f"{path}: cannot read the file ({type(exc).__name__}: {detail}); it is truncated, corrupt or not "
        f"an image; re-copy it from the source or delete it"
    )


def pattern_regex(pattern: str, case_sensitive: bool) -> re.Pattern[str]:
    """Turn 'images/{id}_*.tif' into a regex; a repeated {id} must match the same text."""
    out: list[str] = []
    seen_id = False
    for token in re.split(r"(\{id\}|\*)", pattern):
        if token == "{id}":
            out.append("(?P=id)" if seen_id else "(?P<id>[^/]+?)")
            seen_id = True
        elif token == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(token))
    return re.compile("".join(out) + r"\Z", 0 if case_sensitive else re.IGNORECASE)


def list_files(root: Path) -> list[str]:
    """All files under `root` as sorted posix paths relative to it."""
    found: list[str] = []
    for dirpath, _dirs, names in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / n).as_posix() for n in names)
    return sorted(found)


@dataclass
class Pair:
    """An image with its mask (and field of view) sharing the id `key`."""

    key: str
    image: Path
    mask: Path
    fov: Path | None = None


def find_pairs(root: Path, files: FilesSpec) -> tuple[list[Pair], list[str]]:
    """Pair images with masks under `root` by `{id}`; unmatched files become warnings."""
    img_re = pattern_regex(files.image, files.case_sensitive)
    mask_re = pattern_regex(files.mask, files.case_sensitive)
    fov_re = pattern_regex(files.fov, files.case_sensitive) if files.fov else None

    def norm(key: str) -> str:
        return key if files.case_sensitive else key.lower()

    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    fovs: dict[str, str] = {}
    for rel in list_files(root):
        if (m := mask_re.match(rel)) is not None:
            masks[norm(m["id"])] = rel
        elif fov_re is not None and (m := fov_re.match(rel)) is not None:
            fovs[norm(m["id"])] = rel
        elif (m := img_re.match(rel)) is not None:
            images.setdefault(norm(m["id"]), rel)
    warnings: list[str] = []
    no_mask = sorted(images[k] for k in images if k not in masks)
    no_image = sorted(masks[k] for k in masks if k not in images)
    if no_mask:
        warnings.append(f"{root}: skipped {len(no_mask)} image(s) without a mask ('{files.mask}'): "
                        + ", ".join(no_mask))
    if no_image:
        warnings.append(f"{root}: skipped {len(no_image)} mask(s) without an image ('{files.image}'): "
                        + ", ".join(no_image))
    pairs: list[Pair] = []
    for k in sorted(images):
        if k not in masks:
            continue
        fov = None
        if fov_re is not None:
            if k not in fovs:
                warnings.append(f"{root}: no field-of-view mask ('{files.fov}') for {images[k]}; "
                                "using the whole image")
            else:
                fov = root / fovs[k]
        key = img_re.match(images[k])["id"]  # type: ignore[index]
        pairs.append(Pair(key, root / images[k], root / masks[k], fov))
    return pairs, warnings
