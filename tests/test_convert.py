"""Label Studio conversions round-trip."""

from __future__ import annotations

import numpy as np
import supervision as sv

import pytest
from label_studio_sdk.converter.brush import mask2rle

from ml_backend.labelstudio.config import Control
from ml_backend.labelstudio.convert import (
    box_to_percent, detections_to_results, mask_to_polygons, mask_to_rle, percent_to_box, rle_to_mask,
)


def test_percent_boxes_round_trip():
    box = np.array([12.5, 3.0, 80.25, 47.0], np.float32)
    assert np.allclose(percent_to_box(box_to_percent(box, 160, 90), 160, 90), box, atol=1e-4)


def test_brush_rle_round_trips_exactly():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    assert (rle_to_mask(mask_to_rle(mask), 53, 37) == mask).all()


def _masks():
    rng = np.random.default_rng(1)
    yield np.zeros((3, 3), bool)
    yield np.ones((300, 400), bool)  # one run of 480000 channel values: split into 2**16 pieces
    yield np.ones((1, 1), bool)
    for density in (0.05, 0.5, 0.95):
        yield rng.random((41, 67)) < density
    block = np.zeros((200, 300), bool)
    block[20:150, 40:260] = True
    block[199, 299] = True
    yield block


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_brush_rle_is_bit_identical_to_label_studio_sdk(mask):
    assert mask_to_rle(mask) == mask2rle(mask.astype(np.uint8) * 255)
    assert (rle_to_mask(mask_to_rle(mask), mask.shape[1], mask.shape[0]) == mask).all()


def test_polygon_of_a_rectangle_mask_covers_it():
    mask = np.zeros((50, 100), bool)
    mask[10:30, 20:60] = True
    (polygon,) = mask_to_polygons(mask, 100, 50)
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    assert min(xs) == 20 and max(xs) == 59 and min(ys) == 20 and max(ys) == 58


def test_each_detection_goes_to_every_control_that_has_its_label():
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 2:8, 3:9] = True
    det = sv.Detections(
        xyxy=np.array([[3, 2, 9, 8]], np.float32), mask=mask, confidence=np.array([0.8], np.float32),
        class_id=np.array([0]), data={"class_name": np.array(["Car"], dtype=object)},
    )
    controls = [
        Control("rectanglelabels", "r", "i", "image", ("Car",)),
        Control("brushlabels", "b", "i", "image", ("Car",)),
        Control("polygonlabels", "p", "i", "image", ("Person",)),
    ]
    results = detections_to_results(det, controls, 30, 20)
    assert [r["from_name"] for r in results] == ["r", "b"]
    assert all(r["score"] == 0.8 for r in results)
