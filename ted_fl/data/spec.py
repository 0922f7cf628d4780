"""Site sets as data: the schema of `sites/<set>.toml` and its loader.

A site set is an ordered list of sites (hospitals, vendors, cameras). Everything that differs
between sites (where the files are, what the mask values mean, how intensities are normalised,
how the synthetic twin shifts the acquisition) lives in the TOML file, so adding a hospital is
writing an entry, not code. Every table is a pydantic dataclass (allowed values as `Literal`s) and loading goes through
`ted_fl.config.from_dict`, so a misspelt key is refused with the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

from pydantic.dataclasses import dataclass

from ted_fl.config import SCHEMA, from_dict, project_root
from ted_fl.data.layouts import LAYOUT_DEFAULTS, LAYOUTS
from ted_fl.errors import TedFlError, unknown

SPLITS = ("train", "val", "test")
Channel = Literal["gray", "red", "green", "blue", "mean"]  # which channel of RGB images
Normalization = Literal["minmax", "none"]  # minmax: per volume (per image for 2-D sets)
Evaluation = Literal["volume", "image"]  # volume: 3-D sets, per-volume Dice; image: 2-D sets


@dataclass(config=SCHEMA)
class FilesSpec:
    """Where a site's files are: patterns relative to the site folder, `{id}` names the pair.

    `*` matches within one path component; `{id}` is the part shared by an image and its mask.
    """

    image: str = "images/{id}.png"
    mask: str = "masks/{id}.png"
    fov: str = ""  # optional field-of-view masks (retina); empty: the whole image
    official: dict[str, str] = field(default_factory=dict)  # split -> sub-folder (e.g. train = "training")
    dirs: list[str] = field(default_factory=list)  # sub-folders searched and pooled (mnms); empty: the folder
    case_sensitive: bool = False
    volume_sep: str = ""  # 2-D slices: the volume id is the pair id up to the last separator ("" : itself)


@dataclass(config=SCHEMA)
class CsvSpec:
    """The vendor information table of M&Ms-like sets (column names differ between releases)."""

    path: str = ""  # relative to the data root (the set's data_dir)
    id_column: str = "External code"
    vendor_column: str = "Vendor"
    ed_column: str = "ED"
    es_column: str = "ES"
    vendor: str = ""  # the value of vendor_column that selects this site (A=Siemens, B=Philips, ...)
    frame_base: int = 0  # ED/ES indices in the CSV start at this number


@dataclass(config=SCHEMA)
class LabelSpec:
    """What raw mask values mean; anything outside `values` is an error, not a silent zero.

    `classes` maps each class name to the raw values that form it (class k of the table is
    channel k of the network; the background is what no class claims); `regions` names unions
    of classes that are scored too (nnU-Net's regions: the optic disc = rim + cup). Without
    `classes` a site is binary: one class "foreground" made of `foreground` (empty: every value
    above 0), optionally inverted. `targets`/`target` are the older way to pick one structure.
    """

    values: list[int] = field(default_factory=list)  # allowed raw values (empty: any)
    classes: dict[str, Any] = field(default_factory=dict)  # class -> raw values (list[int], checked with a hint below)
    regions: dict[str, list[str]] = field(default_factory=dict)  # evaluation region -> classes it unites
    foreground: list[int] = field(default_factory=list)  # binary sets: raw values of the class (empty: > 0)
    invert: bool = False  # binary sets: the mask marks the background (0 = the structure)
    targets: dict[str, int] = field(default_factory=dict)  # legacy: selectable structures (lv = 1, ...)
    target: str = ""  # legacy: the default target when DataConfig.target is empty


@dataclass(config=SCHEMA)
class PreprocessSpec:
    """Turning raw pixels into the (1, S, S) float32 slices every site shares."""

    size: int = 64  # in-plane size (DataConfig.size > 0 overrides)
    normalize: Normalization = "minmax"
    clip: list[float] = field(default_factory=list)  # [low, high] after normalising (prostate: 0.001, 0.99)
    channel: Channel = "gray"
    crop: int = 0  # centre crop/pad to this many pixels before resizing (mnms: 256); 0: none


@dataclass(config=SCHEMA)
class SyntheticSpec:
    """One site's acquisition shift in the synthetic twin (modelled on multi-centre MRI)."""

    intensity_scale: float = 1.0  # scanner units
    intensity_offset: float = 0.0
    gamma: float = 1.0  # > 1 darkens mid-tones, < 1 brightens them
    contrast: float = 1.0  # linear contrast around the mean (< 1: flatter, > 1: harsher)
    target_contrast: float = 0.6  # target (gland, blood pool) intensity relative to tissue (> 1: brighter)
    tissue: float = 0.5  # base intensity of soft tissue
    fat: float = 0.9  # base intensity of fat / fluid
    bias_field: float = 0.0  # coefficient range of MONAI's RandBiasField (0: none)
    noise_std: float = 0.0  # Gaussian noise std relative to [0, 1] intensities
    blur: float = 0.0  # Gaussian smoothing sigma in pixels
    resolution: float = 1.0  # acquisition resolution relative to native (0.5: half the pixels)
    zoom: float = 1.0  # field of view: > 1 the anatomy looks bigger (tighter FOV)
    texture: float = 0.05  # amplitude of smooth tissue texture


@dataclass(config=SCHEMA)
class SiteSpec:
    """One site: its files, labels, preprocessing and synthetic twin."""

    name: str = ""
    layout: str = "folder"  # a registered loader (see ted_fl.data.loaders.LAYOUTS)
    folder: str = ""  # relative to the data dir, or absolute
    files: FilesSpec = field(default_factory=FilesSpec)
    csv: CsvSpec = field(default_factory=CsvSpec)
    labels: LabelSpec = field(default_factory=LabelSpec)
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)


@dataclass(config=SCHEMA)
class SetSyntheticSpec:
    """How the set's synthetic twin is generated (the per-site shifts sit in each site)."""

    generator: str = ""  # prostate | cardiac | retina ; empty: no synthetic twin
    volumes: int = 8  # per site (DataConfig.synthetic_volumes > 0 overrides)
    slices: int = 12
    native: int = 96  # native in-plane size of the written volumes
    crop: int = -1  # replaces the sites' preprocess.crop when reading the twin (-1: keep)


@dataclass(config=SCHEMA)
class SiteSetHeader:
    """The set-level keys of a site-set file (sites and defaults are parsed separately)."""

    name: str = ""
    description: str = ""
    evaluation: Evaluation = "volume"
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    synthetic: SetSyntheticSpec = field(default_factory=SetSyntheticSpec)


DEFAULT_CLASS = "foreground"  # the class of a binary site that declares no labels.classes
MEAN_LABEL = "mean"  # the label of the mean over classes and regions (metrics.csv)


@dataclasses.dataclass(frozen=True)  # built by the loader, not read from TOML: a plain dataclass
class LabelSet:
    """The classes a run segments (network channel k = class k, 0 = background) and what is scored.

    `labels()` lists the evaluation labels: each class, then each region, as (name, class
    indices); the mean over them is reported under MEAN_LABEL.
    """

    classes: tuple[str, ...]
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def out_channels(self) -> int:
        return len(self.classes) + 1

    def labels(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(c, (k,)) for k, c in enumerate(self.classes, 1)] + [(n, idx) for n, idx in self.regions]


@dataclass(config=SCHEMA)
class SiteSetSpec:
    """A loaded site set: header fields plus the sites in arrival order."""

    name: str
    path: Path
    description: str
    evaluation: str
    val_fraction: float
    test_fraction: float
    synthetic: SetSyntheticSpec
    sites: list[SiteSpec]

    @property
    def per_volume(self) -> bool:
        return self.evaluation == "volume"

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    def site(self, name: str) -> SiteSpec:
        for s in self.sites:
            if s.name.lower() == name.lower():
                return s
        raise unknown("site", name, self.site_names, f"site set '{self.name}'")

    def label_set(self, target: str = "") -> LabelSet:
        """The run's classes and regions (every site agrees, checked at load); `target` keeps one class."""
        return label_set(self, self.sites[0], target)


def class_values(labels: LabelSpec) -> dict[str, list[int]]:
    """Class name -> raw values, in channel order; a binary site's one class may be [] (every value > 0)."""
    if labels.classes:
        return dict(labels.classes)
    if labels.targets:
        return {k: [v] for k, v in labels.targets.items()}
    return {DEFAULT_CLASS: list(labels.foreground)}


def resolve_class(spec: SiteSetSpec, site: SiteSpec, target: str) -> str:
    """The one class `target` (or the legacy default target) selects; "" keeps every class."""
    lab = site.labels
    names = list(class_values(lab))
    chosen = target or (lab.target if not lab.classes else "")
    if not chosen:
        if lab.targets and not lab.classes:
            raise TedFlError(f"site set '{spec.name}' needs data.target: one of {', '.join(sorted(names))}")
        return ""
    if not lab.classes and not lab.targets:
        raise TedFlError(f"data.target='{chosen}' but site set '{spec.name}' has a single structure; "
                         "leave data.target empty")
    lower = {n.lower(): n for n in names}
    if chosen.lower() in lower:
        return lower[chosen.lower()]
    near = difflib.get_close_matches(chosen.lower(), list(lower), n=1, cutoff=0.5)
    hint = f" (did you mean '{lower[near[0]]}'?)" if near else ""
    raise TedFlError(f"unknown data.target '{chosen}' for site set '{spec.name}'{hint}; valid: "
                     f"{', '.join(names)} (a class of its labels.classes), or empty for every class")


def label_set(spec: SiteSetSpec, site: SiteSpec, target: str = "") -> LabelSet:
    """The classes and regions of `site` as the run sees them (one class when `target` picks one)."""
    chosen = resolve_class(spec, site, target)
    names = list(class_values(site.labels))
    if chosen:
        return LabelSet((chosen,))
    regions = tuple((r, tuple(names.index(c) + 1 for c in cs)) for r, cs in site.labels.regions.items())
    return LabelSet(tuple(names), regions)


def sites_dir() -> Path:
    return project_root() / "sites"


def list_site_sets() -> list[str]:
    """Names of the site sets shipped in `sites/`."""
    return sorted(p.stem for p in sites_dir().glob("*.toml"))


REPLACED_TABLES = ("classes", "regions")  # a site's class table replaces the default one whole


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in REPLACED_TABLES
        out[k] = _merge(out[k], v) if deep else v
    return out


def resolve_site_set(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.parent != Path("."):
        if not p.is_file():
            raise TedFlError(f"site-set file '{p}' not found; give an existing TOML file or one of: "
                             f"{', '.join(list_site_sets())}")
        return p
    cand = sites_dir() / f"{p.name}.toml"
    if not cand.is_file():
        raise unknown("site set", str(name_or_path), list_site_sets(), str(sites_dir()))
    return cand


def load_site_set_spec(name_or_path: str | Path) -> SiteSetSpec:
    """Load and validate `sites/<name>.toml` (or any TOML path)."""
    path = resolve_site_set(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise TedFlError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    sites_raw = raw.pop("sites", None)
    defaults = raw.pop("defaults", {})
    if not isinstance(defaults, dict):
        raise TedFlError(f"{path}: 'defaults' must be a table [defaults]")
    header: SiteSetHeader = from_dict(SiteSetHeader, raw, str(path))
    if not isinstance(sites_raw, list) or not sites_raw:
        raise TedFlError(f"{path}: no sites; add at least one [[sites]] table with name, layout and folder")
    sites: list[SiteSpec] = []
    for i, entry in enumerate(sites_raw):
        if not isinstance(entry, dict):
            raise TedFlError(f"{path}: sites[{i}] must be a table [[sites]]")
        where = f"{path}: sites[{i}]" + (f" ({entry['name']})" if "name" in entry else "")
        merged = _merge(defaults, entry)
        layout_defaults = LAYOUT_DEFAULTS.get(str(merged.get("layout", "folder")), {})
        if isinstance(merged.get("labels"), dict) and "classes" in merged["labels"]:
            # Declared classes replace the layout's binary label defaults (foreground, invert, targets).
            layout_defaults = copy.deepcopy(layout_defaults)
            lab_defaults = layout_defaults.get("labels", {})
            for key in ("foreground", "invert", "targets", "target", "classes", "regions"):
                lab_defaults.pop(key, None)
        site: SiteSpec = from_dict(SiteSpec, _merge(layout_defaults, merged), where)
        _validate_site(site, where)
        sites.append(site)
    names = [s.name.lower() for s in sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TedFlError(f"{path}: site names must be unique; repeated: {', '.join(dup)}")
    _check_agreement(sites, path)
    return SiteSetSpec(
        name=header.name or path.stem,
        path=path,
        description=header.description,
        evaluation=header.evaluation,
        val_fraction=header.val_fraction,
        test_fraction=header.test_fraction,
        synthetic=header.synthetic,
        sites=sites,
    )


def _validate_site(site: SiteSpec, where: str) -> None:
    if not site.name:
        raise TedFlError(f"{where}: missing key 'name'; every site needs a name")
    if site.layout not in LAYOUTS:
        raise unknown("layout", site.layout, LAYOUTS, where)
    if "{id}" not in site.files.image or "{id}" not in site.files.mask:
        raise TedFlError(f"{where}.files: image and mask patterns must contain {{id}} "
                         f"(got image='{site.files.image}', mask='{site.files.mask}')")
    for split in site.files.official:
        if split not in SPLITS:
            raise unknown("split", split, SPLITS, f"{where}.files.official")
    pre = site.preprocess
    if pre.clip and (len(pre.clip) != 2 or pre.clip[0] >= pre.clip[1]):
        raise TedFlError(f"{where}.preprocess.clip must be [low, high] with low < high, got {pre.clip}")
    if pre.size < 0 or pre.crop < 0:
        raise TedFlError(f"{where}.preprocess: size and crop must be >= 0")
    _validate_labels(site.labels, f"{where}.labels")


def _validate_labels(lab: LabelSpec, where: str) -> None:
    """Classes: integer raw values, declared in `values`, claimed by one class only; regions: known classes."""
    for key in ("classes", "regions", "targets"):
        if not isinstance(getattr(lab, key), dict):
            raise TedFlError(f"{where}.{key} must be a table, e.g. {key} = {{ name = [...] }}, "
                             f"got {getattr(lab, key)!r}")
    if lab.target and not lab.classes and lab.target not in lab.targets:
        raise unknown("target", lab.target, lab.targets, where)
    if lab.classes and (lab.foreground or lab.invert or lab.targets):
        raise TedFlError(f"{where}: labels.classes replaces foreground, invert and targets; remove them and "
                         "list each class's raw values in classes (the background is what no class claims)")
    owner: dict[int, str] = {}
    for name, vals in lab.classes.items():
        if name == MEAN_LABEL or "/" in name:
            raise TedFlError(f"{where}.classes: '{name}' is reserved or has a '/'; rename the class")
        if not isinstance(vals, list) or not vals or not all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in vals):
            raise TedFlError(f"{where}.classes.{name} must be a non-empty list of integer raw mask values, "
                             f"e.g. {name} = [1], got {vals!r}")
        for v in vals:
            if v in owner:
                raise TedFlError(f"{where}.classes: raw value {v} is claimed by both '{owner[v]}' and '{name}'; "
                                 "classes are mutually exclusive (declare overlaps as labels.regions)")
            owner[v] = name
        if lab.values and (bad := sorted(set(vals) - set(lab.values))):
            raise TedFlError(f"{where}.classes.{name}: raw values {bad} are not in labels.values {lab.values}; "
                             "add them to values or fix the class")
    if lab.regions and not lab.classes:
        raise TedFlError(f"{where}.regions needs labels.classes: a region is a union of declared classes")
    for name, members in lab.regions.items():
        if name in lab.classes or name == MEAN_LABEL or "/" in name:
            raise TedFlError(f"{where}.regions: '{name}' clashes with a class name or '{MEAN_LABEL}'; rename it")
        if not isinstance(members, list) or not members:
            raise TedFlError(f"{where}.regions.{name} must be a non-empty list of class names, got {members!r}")
        for c in members:
            if c not in lab.classes:
                raise unknown("class", str(c), lab.classes, f"{where}.regions.{name}")


def _check_agreement(sites: list[SiteSpec], path: Path) -> None:
    """Every site segments the same classes (in the same order) and scores the same regions."""
    first = sites[0]
    want = (list(class_values(first.labels)), first.labels.regions)
    for site in sites[1:]:
        got = (list(class_values(site.labels)), site.labels.regions)
        if got != want:
            raise TedFlError(
                f"{path}: site '{site.name}' declares classes {got[0]} and regions {got[1] or '{}'} but site "
                f"'{first.name}' declares {want[0]} and {want[1] or '{}'}; every site of a set must agree on "
                "the class names, their order and the regions (only the raw values may differ per site)"
            )
