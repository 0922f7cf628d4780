"""Split.concat pools sites for the joint upper bound, also when their image sizes differ."""

from __future__ import annotations

import numpy as np

from ted_fl.data import load_site_set_spec
from ted_fl.data.types import Split


def _split(n: int, h: int, w: int, value: float, fov: bool = True) -> Split:
    images = np.full((n, 1, h, w), value, np.float32)
    masks = np.ones((n, h, w), np.int64)
    return Split(images, masks, np.array([f"{h}x{w}-{i}" for i in range(n)]),
                 np.ones((n, h, w), bool) if fov else None)


def test_same_size_is_a_plain_concatenation() -> None:
    a, b = _split(2, 4, 4, 1.0), _split(3, 4, 4, 2.0)
    out = Split.concat([a, b])
    assert out.images.shape == (5, 1, 4, 4) and out.fov is not None and out.fov.all()
    np.testing.assert_array_equal(out.images[:2], a.images)
    np.testing.assert_array_equal(out.masks[2:], b.masks)
    assert list(out.volumes) == list(a.volumes) + list(b.volumes)


def test_different_sizes_pad_bottom_right_as_background_outside_the_fov() -> None:
    small, large = _split(2, 3, 5, 1.0), _split(1, 6, 4, 2.0)
    out = Split.concat([small, large])
    assert out.images.shape == (3, 1, 6, 5) and out.masks.shape == (3, 6, 5)
    # each image keeps its own pixels at the top left, unscaled
    np.testing.assert_array_equal(out.images[:2, :, :3, :5], small.images)
    np.testing.assert_array_equal(out.images[2, :, :6, :4], large.images[0])
    # the pad: zero intensity, background label, outside the field of view
    assert (out.images[:2, :, 3:, :] == 0).all() and (out.images[2, :, :, 4:] == 0).all()
    assert (out.masks[:2, 3:, :] == 0).all() and (out.masks[2, :, 4:] == 0).all()
    assert out.fov is not None
    assert out.fov[:2, :3, :].all() and not out.fov[:2, 3:, :].any()
    assert out.fov[2, :, :4].all() and not out.fov[2, :, 4:].any()
    assert int(out.masks.sum()) == int(small.masks.sum() + large.masks.sum())


def test_different_sizes_without_fov_still_mark_the_pad() -> None:
    out = Split.concat([_split(1, 2, 2, 1.0, fov=False), _split(1, 4, 4, 1.0, fov=False)])
    assert out.fov is not None and int(out.fov[0].sum()) == 4 and out.fov[1].all()


def test_retina_sites_keep_their_cameras_scale() -> None:
    """data.size = 0: DRIVE, STARE, CHASEDB1 at half their cameras' widths (565, 700, 999 px)."""
    spec = load_site_set_spec("retina")
    sizes = {s.name: s.preprocess.size for s in spec.sites}
    assert sizes == {"DRIVE": 288, "STARE": 352, "CHASEDB1": 496}
    assert all(v % 16 == 0 for v in sizes.values())  # four stride-2 levels
