"""The data layer: site sets from `sites/*.toml`, real loaders per layout, and the synthetic twin.

Others code against `load_sites`, `load_site_set_spec`, `list_site_sets` and `check_sites`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ted_fl.config import DataConfig, ExperimentConfig
from ted_fl.data.loaders import LAYOUTS, load_site
from ted_fl.data.spec import LabelSet, SiteSetSpec, SiteSpec, list_site_sets, load_site_set_spec
from ted_fl.data.synthetic import ensure_twin
from ted_fl.data.types import SiteData, Split
from ted_fl.errors import TedFlError, unknown

__all__ = [
    "LAYOUTS", "CheckReport", "LabelSet", "SiteData", "SiteReport", "SiteSetSpec", "SiteSpec", "Split",
    "check_sites", "check_splits", "data_root", "site_order", "list_site_sets", "load_site_set_spec", "load_sites",
    "ordered_sites", "resolve_out_channels", "set_out_channels", "size_note",
]


def ordered_sites(spec: SiteSetSpec, order: list[str]) -> list[SiteSpec]:
    """The set's sites in arrival order, or in `order` (a subset is allowed; names are checked)."""
    if not order:
        return list(spec.sites)
    out = []
    for name in order:
        try:
            out.append(spec.site(name))
        except TedFlError:
            raise unknown("site", name, spec.site_names, f"data.order of site set '{spec.name}'") from None
    return out


def data_root(cfg: DataConfig, spec: SiteSetSpec, seed: int) -> tuple[Path, bool]:
    """Where the set's files are, and whether that is the synthetic twin (written on demand)."""
    if not cfg.data_dir:
        return ensure_twin(spec, seed, cfg.cache_dir, cfg.synthetic_volumes), True
    root = Path(cfg.data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise TedFlError(f"data folder '{root}' is a file, not a folder; point data.data_dir / --data-dir at "
                         "the folder that holds the site folders (leave it empty for the synthetic twin)")
    if not root.is_dir():
        raise TedFlError(f"data folder '{root}' does not exist; fix data.data_dir / --data-dir "
                         "(leave it empty for the synthetic twin)")
    return root, False


def _load(cfg: DataConfig, spec: SiteSetSpec, site: SiteSpec, root: Path, synthetic: bool, seed: int
          ) -> SiteData:
    crop = spec.synthetic.crop if synthetic else -1
    return load_site(spec, site, root, size=cfg.size, target=cfg.target, seed=seed,
                     max_train=cfg.max_train, crop=crop)


def load_sites(cfg: DataConfig, seed: int, only: list[str] | None = None) -> list[SiteData]:
    """Every site of `cfg.sites` in arrival order (or `cfg.order`); empty data_dir: the synthetic twin.

    `only` restricts loading to the named sites: a federated client reads its own site's files only.
    """
    spec = load_site_set_spec(cfg.sites)
    sites = ordered_sites(spec, cfg.order)
    if only is not None:
        names = [s.name for s in sites]
        for name in only:
            if name not in names:
                raise unknown("site", name, names, f"site set '{spec.name}'")
        sites = [s for s in sites if s.name in only]
    root, synthetic = data_root(cfg, spec, seed)
    return [_load(cfg, spec, s, root, synthetic, seed) for s in sites]


def size_note(cfg: DataConfig, key: str = "data.size") -> str:
    """A note when `cfg.size` (> 0) replaces a size the site set declares (preprocess.size), so that
    the default 64 px never silently resamples, say, a 496 px camera; "" when nothing is replaced."""
    if cfg.size == 0:
        return ""
    spec = load_site_set_spec(cfg.sites)
    replaced = [f"{s.name} {s.preprocess.size}" for s in ordered_sites(spec, cfg.order)
                if s.preprocess.size != cfg.size]
    if not replaced:
        return ""
    return (f"{key} = {cfg.size} replaces the preprocess.size of site set '{spec.name}' ({', '.join(replaced)} px): "
            f"every site is resampled to {cfg.size} x {cfg.size}; {key} = 0 keeps each site's own size")


def site_order(cfg: DataConfig) -> list[str]:
    """The arrival order of the sites, from the TOML alone (the server reads no data)."""
    return [s.name for s in ordered_sites(load_site_set_spec(cfg.sites), cfg.order)]


def resolve_out_channels(cfg: ExperimentConfig) -> LabelSet:
    """Set model.out_channels from the site set (its classes + background); a contradiction is an error.

    Called at run start, before anything builds a network, so user configs need not set it.
    """
    spec = load_site_set_spec(cfg.data.sites)
    labels = spec.label_set(cfg.data.target)
    set_out_channels(cfg, labels, spec.name)
    return labels


def set_out_channels(cfg: ExperimentConfig, labels: LabelSet, set_name: str) -> None:
    """model.out_channels = the classes + background; a different non-zero value is refused."""
    want = labels.out_channels
    if cfg.model.out_channels not in (0, want):
        what = f"{len(labels.classes)} class(es) {', '.join(labels.classes)} + background"
        raise TedFlError(f"model.out_channels = {cfg.model.out_channels} contradicts site set '{set_name}' "
                         f"({what} = {want} channels); remove model.out_channels (it follows the site set) "
                         f"or set it to {want}")
    cfg.model.out_channels = want


def check_splits(sites: list[SiteData], *, need_val: bool) -> None:
    """Refuse, before anything starts, a site whose train or test split is empty, or whose
    validation split is empty when the run selects the best round on it (train.select_best)."""
    for s in sites:
        n_vol = len({v for split in s.splits.values() for v in split.volumes.tolist()})
        what = f"site '{s.name}' ({n_vol} volume(s)/image(s) in all)"
        if len(s.train) == 0:
            raise TedFlError(f"{what}: the train split is empty; give the site more images (or its "
                             "files.official.train folder)")
        if len(s.test) == 0:
            raise TedFlError(f"{what}: the test split is empty, so it cannot be scored; give the site more "
                             "images or a test folder (files.official.test), or leave it out with data.order")
        if need_val and len(s.val) == 0:
            raise TedFlError(f"{what}: the val split is empty, so the best round cannot be selected; set "
                             "train.select_best=false, or give the site a val folder (files.official.val) or "
                             "more training images")


@dataclass
class SiteReport:
    """What `check` found for one site."""

    name: str
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (images, volumes)
    size: tuple[int, ...] = ()
    label_values: list[int] = field(default_factory=list)  # class indices found (0 background)
    foreground: float = 0.0  # fraction of foreground pixels (any class) over all splits
    validation: str = ""  # "yes" or why the best round cannot be selected on this site
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems


@dataclass
class CheckReport:
    """What `check` found for a site set."""

    set_name: str
    data_dir: str
    synthetic: bool
    sites: list[SiteReport]
    labels: LabelSet | None = None  # the classes and regions the run would segment and score

    @property
    def ok(self) -> bool:
        return all(s.usable for s in self.sites)


def check_sites(cfg: DataConfig, seed: int = 0) -> CheckReport:
    """Load every site, collecting counts, warnings and problems instead of stopping at the first."""
    spec = load_site_set_spec(cfg.sites)
    sites = ordered_sites(spec, cfg.order)
    root, synthetic = data_root(cfg, spec, seed)
    reports = []
    for site in sites:
        rep = SiteReport(site.name)
        try:
            data = _load(cfg, spec, site, root, synthetic, seed)
        except TedFlError as exc:
            rep.problems.append(str(exc))
            reports.append(rep)
            continue
        rep.warnings = list(data.warnings)
        rep.counts = {k: (len(s), s.num_volumes) for k, s in data.splits.items()}
        nonempty = [s for s in data.splits.values() if len(s)]
        if nonempty:
            rep.size = tuple(nonempty[0].images.shape[1:])
            masks = np.concatenate([s.masks.ravel() for s in nonempty])
            rep.label_values = sorted(int(v) for v in np.unique(masks))
            rep.foreground = float((masks > 0).mean())
        for split in ("train", "test"):
            if rep.counts.get(split, (0, 0))[0] == 0:
                rep.problems.append(f"no {split} images")
        if len(data.val):
            rep.validation = "yes"
        else:
            rep.validation = "no"
            rep.warnings.append("the val split is empty: validation is impossible, so simulate needs "
                                "train.select_best=false (or give the site a val folder, files.official.val)")
        if rep.counts and rep.foreground == 0.0:
            rep.problems.append("no foreground pixel in any mask; check labels.foreground / labels.invert")
        reports.append(rep)
    return CheckReport(spec.name, "" if synthetic else str(root), synthetic, reports, spec.label_set(cfg.target))
