"""The in-memory form every loader produces: 2-D slices with their masks, FOV and volume ids.

Images of the target sets are small (a site is at most a few thousand 2-D slices of 64-256 px),
so a split is held as numpy arrays; training draws batches from them and evaluation groups
slices back into volumes through `volumes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ted_fl.data.spec import DEFAULT_CLASS, LabelSet


@dataclass
class Split:
    """One split (train, val or test) of one site."""

    images: np.ndarray  # (N, C, H, W) float32, intensities normalised as the site set says
    masks: np.ndarray  # (N, H, W) int64 class indices: 0 background, k the k-th class of the site set
    volumes: np.ndarray  # (N,) str: the volume (3-D sets) or image (2-D sets) each slice belongs to
    fov: np.ndarray | None = None  # (N, H, W) bool field-of-view, evaluation only (retina)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_volumes(self) -> int:
        return int(len(np.unique(self.volumes))) if len(self) else 0

    def take(self, idx: np.ndarray) -> Split:
        """The slices at `idx` (indices or a boolean mask), every array sliced alike."""
        return Split(self.images[idx], self.masks[idx], self.volumes[idx],
                     None if self.fov is None else self.fov[idx])

    @classmethod
    def concat(cls, splits: list[Split]) -> Split:
        """The union of several splits (the joint upper bound pools sites).

        Sites of different image sizes (a site set with per-site `preprocess.size`, data.size = 0)
        are zero-padded at the bottom and right to the largest height and width: the pad is
        background in the mask and outside the field of view, so joint training sees each image
        at its own scale, as the sequential stages do.
        """
        if len(splits) == 1:
            return splits[0]
        h = max(s.images.shape[-2] for s in splits)
        w = max(s.images.shape[-1] for s in splits)

        def pad(a: np.ndarray | None, fill: float | bool = 0) -> np.ndarray | None:
            if a is None or a.shape[-2:] == (h, w):
                return a
            widths = [(0, 0)] * (a.ndim - 2) + [(0, h - a.shape[-2]), (0, w - a.shape[-1])]
            return np.pad(a, widths, constant_values=fill)

        if all(s.images.shape[-2:] == (h, w) for s in splits):
            fov = np.concatenate([s.fov for s in splits]) if all(s.fov is not None for s in splits) else None
        else:  # a site without a FOV counts whole; the pad is never in the field of view
            fov = np.concatenate([pad(np.ones((len(s), *s.images.shape[-2:]), bool) if s.fov is None else s.fov,
                                      False) for s in splits])
        return cls(np.concatenate([pad(s.images) for s in splits]), np.concatenate([pad(s.masks) for s in splits]),
                   np.concatenate([s.volumes for s in splits]), fov)


@dataclass
class SiteData:
    """A site (hospital, vendor, camera) with its splits, ready for the continual core."""

    name: str
    splits: dict[str, Split]  # keys: "train", "val", "test"
    per_volume: bool = True  # evaluate per volume (3-D sets) rather than per image
    warnings: list[str] = field(default_factory=list)  # skipped files and other soft problems
    manifest: dict[str, list[str]] = field(default_factory=dict)  # split -> volume/image ids (saved with runs)
    labels: LabelSet = field(default_factory=lambda: LabelSet((DEFAULT_CLASS,)))  # classes and regions scored

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def val(self) -> Split:
        return self.splits["val"]

    @property
    def test(self) -> Split:
        return self.splits["test"]
