"""The synthetic twin: anatomy-like volumes written in the real on-disk layouts, then read by the real loaders.

Writing files (rather than handing arrays over) means the default run exercises exactly the
code path real data takes. Each site gets a strong acquisition shift (contrast of the target
against tissue, gamma, bias field, noise, blur, resolution, field of view) taken from its
`[sites.synthetic]` table, so that plain fine-tuning measurably forgets earlier sites.
Everything is drawn from seeded generators: the same seed gives byte-identical arrays.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ted_fl.data.spec import SiteSetSpec, SyntheticSpec
from ted_fl.errors import TedFlError

VERSION = 1  # bump when the generator changes, so stale caches are not reused


def default_cache_base() -> Path:
    return Path.home() / ".cache" / "ted-fl" / "synthetic"


def twin_params(spec: SiteSetSpec, seed: int, volumes: int = 0) -> dict:
    """Everything the twin depends on; its hash names the cache folder."""
    return {
        "version": VERSION,
        "set": spec.name,
        "seed": seed,
        "set_synthetic": dataclasses.asdict(spec.synthetic),
        "volumes": volumes or spec.synthetic.volumes,
        "sites": [
            {"name": s.name, "folder": s.folder, "image": s.files.image, "mask": s.files.mask,
             "dirs": s.files.dirs, "csv": dataclasses.asdict(s.csv), "synthetic": dataclasses.asdict(s.synthetic)}
            for s in spec.sites
        ],
    }


def twin_dir(spec: SiteSetSpec, seed: int, cache_dir: str = "", volumes: int = 0) -> Path:
    blob = json.dumps(twin_params(spec, seed, volumes), sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:12]
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_base()
    return base / f"{spec.name}-{digest}"


def ensure_twin(spec: SiteSetSpec, seed: int, cache_dir: str = "", volumes: int = 0) -> Path:
    """Write the set's synthetic twin once (tmp dir, then an atomic rename) and return its folder."""
    gen = GENERATORS.get(spec.synthetic.generator)
    if gen is None:
        raise TedFlError(
            f"site set '{spec.name}' has no synthetic twin ([synthetic] generator = "
            f"'{spec.synthetic.generator}'); pass its real data with --data-dir / data.data_dir"
        )
    root = twin_dir(spec, seed, cache_dir, volumes)
    if root.is_dir():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TedFlError(f"cannot create the synthetic cache '{root.parent}' ({exc}); set data.cache_dir") from None
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        gen(spec, tmp, seed, volumes or spec.synthetic.volumes)
        try:
            tmp.rename(root)
        except OSError:
            if not root.is_dir():  # someone else finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----------------------------------------------------------------------------- helpers


def _rng(seed: int, *keys: str | int) -> np.random.Generator:
    return np.random.default_rng([seed] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys])


def _fill(pattern: str, key: str, where: str) -> str:
    if "*" in pattern:
        raise TedFlError(f"{where}: the synthetic twin cannot write pattern '{pattern}' (it has '*'); "
                         "use literal names around {id}")
    return pattern.replace("{id}", key)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma)
    return f / (np.abs(f).max() + 1e-6)


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, rx: float, ry: float,
             angle: float = 0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u, v = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def acquire(vol: np.ndarray, p: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Apply a site's acquisition to an (H, W, Z) [0, 1] volume: resolution, blur, bias, gamma, noise."""
    import torch
    import torch.nn.functional as F
    from monai.transforms import GaussianSmooth, RandBiasField, RandGaussianNoise

    h, w, _ = vol.shape
    chan = np.moveaxis(vol, -1, 0)[None]  # (1, Z, H, W): slices as a batch for in-plane ops
    if p.resolution < 1.0:
        t = torch.from_numpy(np.ascontiguousarray(chan[0]))[:, None]
        lo = max(4, round(h * p.resolution)), max(4, round(w * p.resolution))
        t = F.interpolate(F.interpolate(t, size=lo, mode="area"), size=(h, w), mode="bilinear",
                          align_corners=False)
        chan = t[:, 0].numpy()[None]
    if p.blur > 0:
        chan = np.asarray(GaussianSmooth(sigma=(0.0, p.blur, p.blur))(chan))
    vol = np.moveaxis(chan[0], 0, -1)[None]  # (1, H, W, Z)
    if p.bias_field > 0:
        bias = RandBiasField(degree=3, coeff_range=(p.bias_field * 0.5, p.bias_field), prob=1.0)
        bias.set_random_state(int(rng.integers(2**31)))
        vol = np.asarray(bias(vol))
    top = float(np.percentile(vol, 99.5))  # a bias hot spot must not darken the rest
    vol = np.clip(vol / max(top, 1e-6), 0.0, 1.0) ** p.gamma
    if p.contrast != 1.0:
        m = float(vol.mean())
        vol = np.clip(m + p.contrast * (vol - m), 0.0, 1.0)
    if p.noise_std > 0:
        noise = RandGaussianNoise(prob=1.0, std=p.noise_std, sample_std=False)
        noise.set_random_state(int(rng.integers(2**31)))
        vol = np.asarray(noise(vol))
    out = np.clip(vol[0], 0.0, None) * p.intensity_scale + p.intensity_offset
    return out.astype(np.float32)


def _save_nifti(path: Path, arr: np.ndarray, dtype: type) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine=np.diag([1.0, 1.0, 3.0, 1.0]))
    img.header.set_data_dtype(dtype)
    nib.save(img, str(path))


def _grid(n: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    ax = np.linspace(-1.0, 1.0, n, dtype=np.float32) / max(zoom, 1e-3)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    return xx, yy


# ----------------------------------------------------------------------------- prostate


def prostate_volume(p: SyntheticSpec, rng: np.random.Generator, n: int, slices: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A pelvis-like T2 volume: body, fat, bones, bladder, rectum and an ellipsoidal gland (labels 1-2)."""
    xx, yy = _grid(n, p.zoom)
    img = np.zeros((n, n, slices), np.float32)
    lab = np.zeros((n, n, slices), np.uint8)
    bx, by = rng.uniform(0.85, 0.95), rng.uniform(0.62, 0.78)
    gx, gy = rng.normal(0, 0.04), rng.uniform(0.02, 0.14)
    grx, gry, grz = rng.uniform(0.26, 0.36), rng.uniform(0.2, 0.28), rng.uniform(0.8, 1.0)
    ang = rng.uniform(-0.3, 0.3)
    bone_r = rng.uniform(0.13, 0.19)
    texture = _smooth_field(rng, (n, n, slices), sigma=3.0) * p.texture
    for k in range(slices):
        z = -1.0 + 2.0 * (k + 0.5) / slices
        s = np.zeros((n, n), np.float32)
        body = _ellipse(xx, yy, 0, 0, bx, by)
        s[body] = p.fat
        s[_ellipse(xx, yy, 0, 0.02, bx * 0.82, by * 0.8)] = p.tissue
        for side in (-1, 1):
            bone = _ellipse(xx, yy, side * 0.58, 0.05, bone_r, bone_r * 1.1)
            s[bone] = p.tissue * 0.3
            s[_ellipse(xx, yy, side * 0.58, 0.05, bone_r * 0.6, bone_r * 0.66)] = p.fat * 0.8
        if z < 0.35:  # bladder towards the base
            s[_ellipse(xx, yy, gx, gy - gry - 0.2, 0.28 * (0.35 - z + 0.3), 0.14)] = min(1.0, p.fat * 1.1)
        s[_ellipse(xx, yy, gx, gy + gry + 0.13, 0.11, 0.08)] = p.tissue * 0.35  # rectum
        scale = 1.0 - (z / grz) ** 2
        if scale > 0.05:
            r = np.sqrt(scale)
            gland = _ellipse(xx, yy, gx, gy, grx * r, gry * r, ang)
            inner = _ellipse(xx, yy, gx, gy - 0.02, grx * r * 0.55, gry * r * 0.55, ang)
            s[gland] = p.tissue * p.target_contrast
            s[inner] = p.tissue * p.target_contrast * 0.85
            lab[..., k][gland] = 1
            lab[..., k][inner] = 2
        s = np.where(body, np.clip(s + texture[..., k], 0.0, 1.0), 0.0)
        img[..., k] = s
    return acquire(img, p, rng), lab


def write_prostate(spec: SiteSetSpec, root: Path, seed: int, volumes: int) -> None:
    """`<site folder>/CaseNN.nii.gz` + the site's mask pattern (BMC: `_Segmentation`)."""
    syn = spec.synthetic
    for site in spec.sites:
        for v in range(volumes):
            rng = _rng(seed, site.name, v)
            img, lab = prostate_volume(site.synthetic, rng, syn.native, syn.slices)
            key = f"Case{v:02d}"
            where = f"{spec.path}: site {site.name}"
            _save_nifti(root / site.folder / _fill(site.files.image, key, where), img, np.float32)
            _save_nifti(root / site.folder / _fill(site.files.mask, key, where), lab, np.uint8)


# ----------------------------------------------------------------------------- cardiac (M&Ms)


def cardiac_volume(p: SyntheticSpec, rng: np.random.Generator, n: int, slices: int, frames: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A short-axis cine (x, y, z, t): LV blood pool (1), myocardium ring (2), RV crescent (3)."""
    xx, yy = _grid(n, p.zoom)
    img = np.zeros((n, n, slices, frames), np.float32)
    lab = np.zeros((n, n, slices, frames), np.uint8)
    cx, cy = rng.normal(0.05, 0.04), rng.normal(0.0, 0.04)
    r_lv, wall = rng.uniform(0.2, 0.26), rng.uniform(0.07, 0.1)
    r_rv, rv_dx = rng.uniform(0.28, 0.34), rng.uniform(0.26, 0.32)
    squeeze = rng.uniform(0.2, 0.35)
    texture = _smooth_field(rng, (n, n, slices), sigma=3.0) * p.texture
    blood = min(1.0, p.tissue * p.target_contrast)
    for t in range(frames):
        phase = 1.0 - squeeze * np.sin(np.pi * t / max(frames - 1, 1)) ** 2  # ED at 0, ES near 2/3
        for k in range(slices):
            taper = 1.0 - 0.5 * k / max(slices - 1, 1)  # base to apex
            s = np.zeros((n, n), np.float32)
            body = _ellipse(xx, yy, 0, 0, 0.92, 0.75)
            s[body] = p.tissue
            for side in (-1, 1):  # lungs
                s[_ellipse(xx, yy, side * 0.5, -0.1, 0.3, 0.45)] = p.tissue * 0.1
            s[_ellipse(xx, yy, -0.25, 0.5, 0.45, 0.2)] = p.fat * 0.7  # liver
            rl = r_lv * taper * phase
            rv = _ellipse(xx, yy, cx - rv_dx, cy, r_rv * taper * (0.6 + 0.4 * phase), r_rv * 1.2 * taper)
            myo = _ellipse(xx, yy, cx, cy, rl + wall, rl + wall)
            lv = _ellipse(xx, yy, cx, cy, rl, rl)
            rv &= ~myo
            s[myo] = p.tissue * 0.6
            s[rv] = blood * 0.95
            s[lv] = blood
            s = np.where(body, np.clip(s + texture[..., k], 0.0, 1.0), 0.0)
            img[..., k, t] = s
            lab[..., k, t][rv] = 3
            lab[..., k, t][myo & ~lv] = 2
            lab[..., k, t][lv] = 1
    out = np.stack([acquire(img[..., t], p, rng) for t in range(frames)], axis=-1)
    return out, lab


def write_cardiac(spec: SiteSetSpec, root: Path, seed: int, volumes: int) -> None:
    """M&Ms layout: `<dir>/<code>/<code>_sa.nii.gz` + `_sa_gt`, and the vendor CSV (ED = 0, ES = 2)."""
    syn = spec.synthetic
    frames, ed, es = 4, 0, 2
    rows: dict[str, list[dict[str, str]]] = {}
    for site in spec.sites:
        c = site.csv
        where = f"{spec.path}: site {site.name}"
        if not c.vendor:
            raise TedFlError(f"{where}: csv.vendor is empty; the twin needs the vendor code (A, B, ...)")
        sub = site.files.dirs[0] if site.files.dirs else ""
        for v in range(volumes):
            code = f"{c.vendor}{v:03d}X"
            rng = _rng(seed, site.name, v)
            img, lab = cardiac_volume(site.synthetic, rng, syn.native, syn.slices, frames)
            base = root / site.folder / sub
            _save_nifti(base / _fill(site.files.image, code, where), img, np.float32)
            _save_nifti(base / _fill(site.files.mask, code, where), lab, np.uint8)
            rows.setdefault(c.path, []).append({
                c.id_column: code, c.vendor_column: c.vendor,
                c.ed_column: str(ed + c.frame_base), c.es_column: str(es + c.frame_base),
            })
    for rel, table in rows.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(k for r in table for k in r))
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns)
            w.writeheader()
            w.writerows(table)


GENERATORS: dict[str, Callable[[SiteSetSpec, Path, int, int], None]] = {
    "prostate": write_prostate,
    "cardiac": write_cardiac,
}

