"""Report building blocks that need no run: slice picking, spread over seeds, the final table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ted_fl.continual.evaluation import class_dice as _slice_dice
from ted_fl.run.html_report import _overlay, mean_std, pick_slices, slice_dice, summary_table


def test_pick_slices_prefers_foreground_from_distinct_volumes() -> None:
    masks = np.zeros((5, 4, 4), dtype=np.int64)
    for i, n in enumerate([3, 9, 8, 1, 5]):
        masks[i].flat[:n] = 1
    volumes = np.array(["a", "b", "b", "c", "c"])
    assert pick_slices(masks, volumes, 2) == [1, 4]  # 2 has more foreground but shares volume b
    assert pick_slices(masks, np.array(["a"] * 5), 2) == [1, 2]  # one volume: the top two anyway
    assert pick_slices(masks[:1], volumes[:1], 2) == [0]


def test_mean_std_single_seed_has_zero_spread() -> None:
    df = pd.DataFrame({"label": ["a", "a", "b"], "stage": [1, 1, 1], "v": [0.2, 0.4, 0.5]})
    out = mean_std(df, ["label", "stage"], "v").set_index("label")
    assert np.isclose(out.loc["a", "mean"], 0.3) and out.loc["a", "std"] > 0
    assert out.loc["b", "std"] == 0 and out.loc["b", "count"] == 1


def test_summary_table_mean_and_spread() -> None:
    s = pd.DataFrame({"label": ["seq", "seq", "ted"], "avg": [0.5, 0.7, 0.8], "ravg": [np.nan] * 3,
                      "bytes_sent": [2e6, 2e6, 3e6]})
    page = summary_table(s)
    assert "0.600 ± 0.141" in page and "0.800" in page and "± " not in page.split("ted")[1]
    assert "needs joint" in page and "nan" not in page  # NaN rAvg: the reason, not a number
    assert "<p" in summary_table(pd.DataFrame())


def test_overlay_and_slice_dice() -> None:
    img = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    mask = np.zeros((4, 4), dtype=np.int64)
    mask[0, 0] = 1
    rgb = _overlay(img, mask)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8 and rgb[0, 0, 1] > rgb[0, 0, 0]
    assert _slice_dice(mask, mask) == 1.0 and _slice_dice(np.zeros_like(mask), mask) == 0.0
    assert _slice_dice(np.zeros_like(mask), np.zeros_like(mask)) == 1.0
    # several classes: the mean over the classes present (class 1 perfect, class 2 missed)
    three = mask.copy()
    three[3, 3] = 2
    assert _slice_dice(mask, three) == pytest.approx((1.0 + 0.0) / 2)


def test_sample_dice_is_the_tables_mean_with_regions() -> None:
    """Under each sample: the mean over classes AND regions, as the tables' `mean` label."""
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[0, 0], gt[1, 1] = 1, 2  # one rim pixel, one cup pixel
    pred = gt.copy()
    pred[1, 1] = 1  # the cup predicted as rim: the disc (rim + cup) is still right
    labels = [("rim", (1,)), ("cup", (2,)), ("disc", (1, 2))]
    assert slice_dice(pred, gt, labels) == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)
    assert _slice_dice(pred, gt) == pytest.approx((2 / 3 + 0.0) / 2)  # classes only: not what the tables show
    assert slice_dice(gt, gt, [("prostate", (1,))]) == _slice_dice(gt, gt)  # one class: the same
