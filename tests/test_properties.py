"""Property tests for every format conversion: Label Studio percent boxes and points, brush RLE and polygons
(labelstudio/convert.py), CVAT rectangles, masks and polygons (cvat/convert.py) round-trip exactly or within a pixel."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import supervision as sv
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ml_backend.labelstudio.convert import box_to_percent, mask_to_polygons, mask_to_rle, percent_to_box, percent_to_point, rle_to_mask

cvat = pytest.importorskip("ml_backend.cvat.convert")

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def image_and_box(draw):
    w, h = draw(st.integers(1, 8000)), draw(st.integers(1, 8000))
    x1, x2 = sorted(draw(st.floats(0, w, allow_nan=False)) for _ in range(2))
    y1, y2 = sorted(draw(st.floats(0, h, allow_nan=False)) for _ in range(2))
    return w, h, np.array([x1, y1, x2, y2])


masks = st.integers(1, 48).flatmap(lambda h: st.integers(1, 48).flatmap(lambda w: arrays(bool, (h, w))))


@st.composite
def convex_shape(draw):
    """A filled rectangle or ellipse inside an image: no holes, one outline."""
    w, h = draw(st.integers(8, 96)), draw(st.integers(8, 96))
    mask = np.zeros((h, w), np.uint8)
    x1, x2 = sorted(draw(st.integers(0, w - 1)) for _ in range(2))
    y1, y2 = sorted(draw(st.integers(0, h - 1)) for _ in range(2))
    if draw(st.booleans()):
        mask[y1 : y2 + 1, x1 : x2 + 1] = 1
    else:
        cv2.ellipse(mask, ((x1 + x2) // 2, (y1 + y2) // 2), (max(1, (x2 - x1) // 2), max(1, (y2 - y1) // 2)), 0, 0, 360, 1, -1)
    return mask.astype(bool)


def within_one_pixel(a: np.ndarray, b: np.ndarray) -> bool:
    """Every pixel of each mask lies within one pixel (8-neighbourhood) of the other mask."""
    kernel = np.ones((3, 3), np.uint8)
    grow = lambda m: cv2.dilate(m.astype(np.uint8), kernel).astype(bool)  # noqa: E731
    return not (a & ~grow(b)).any() and not (b & ~grow(a)).any()


@PROPERTY
@given(image_and_box())
def test_label_studio_percent_boxes_round_trip(case):
    w, h, xyxy = case
    value = box_to_percent(xyxy, w, h)
    assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100
    np.testing.assert_allclose(percent_to_box(value, w, h), xyxy, atol=0.01)
    np.testing.assert_allclose(percent_to_point(value, w, h), xyxy[:2], atol=0.01)


@PROPERTY
@given(masks)
def test_brush_rle_round_trips_exactly_and_matches_the_sdk_encoder(mask):
    from label_studio_sdk.converter.brush import mask2rle

    rle = mask_to_rle(mask)
    h, w = mask.shape
    assert np.array_equal(rle_to_mask(rle, w, h), mask)
    assert rle == mask2rle(mask.astype(np.uint8) * 255)


def test_brush_rle_splits_runs_longer_than_two_to_the_sixteen():
    mask = np.ones((300, 300), bool)
    mask[150, 150] = False
    assert np.array_equal(rle_to_mask(mask_to_rle(mask), 300, 300), mask)


@PROPERTY
@given(convex_shape())
def test_label_studio_polygons_outline_the_mask_within_one_pixel(mask):
    h, w = mask.shape
    x1, y1, x2, y2 = sv.mask_to_xyxy(mask[None])[0]
    assume(x2 - x1 >= 1 and y2 - y1 >= 1)  # a one-pixel-wide line has no polygon (2-point contour): see cvat's fallback
    (polygon,) = mask_to_polygons(mask, w, h)
    points = np.array([[x * w / 100.0, y * h / 100.0] for x, y in polygon])
    assert ((points >= 0) & (points <= [w, h])).all()
    assert within_one_pixel(sv.polygon_to_mask(np.round(points).astype(int), (w, h)).astype(bool), mask)


@PROPERTY
@given(masks.filter(lambda m: m.any()))
def test_cvat_masks_round_trip_exactly(mask):
    h, w = mask.shape
    assert np.array_equal(cvat.points_to_mask(cvat.mask_points(mask), w, h).astype(bool), mask)


@PROPERTY
@given(image_and_box())
def test_cvat_empty_mask_with_a_box_becomes_the_box_filled(case):
    w, h, xyxy = case
    w, h = min(w, 64), min(h, 64)
    xyxy = np.minimum(xyxy, [w - 1, h - 1, w, h])
    decoded = cvat.points_to_mask(cvat.mask_points(np.zeros((h, w), bool), xyxy), w, h).astype(bool)
    ys, xs = np.nonzero(decoded)
    assert decoded.any()
    assert abs(xs.min() - xyxy[0]) <= 1 and abs(ys.min() - xyxy[1]) <= 1
    assert xs.max() + 1 >= xyxy[2] - 1 and ys.max() + 1 >= xyxy[3] - 1


@PROPERTY
@given(image_and_box())
def test_cvat_rectangles_keep_the_box_to_a_hundredth_of_a_pixel(case):
    _, _, xyxy = case
    np.testing.assert_allclose(cvat.rectangle_points(xyxy), xyxy, atol=0.005 + 1e-9)


@PROPERTY
@given(convex_shape())
def test_cvat_polygons_outline_the_mask_within_one_pixel(mask):
    h, w = mask.shape
    flat = cvat.outline_points(mask, sv.mask_to_xyxy(mask[None])[0])
    points = np.array(flat).reshape(-1, 2)
    assert len(points) >= 3
    assert within_one_pixel(sv.polygon_to_mask(np.round(points).astype(int), (w, h)).astype(bool), mask)


@PROPERTY
@given(st.lists(st.integers(0, 3), max_size=12), st.integers(1, 5))
def test_batch_pieces_keep_every_task_and_image_in_order_and_within_the_size(images_per_task, max_images):
    from ml_backend.labelstudio.backend import LoadedTasks
    from ml_backend.labelstudio.server import _split

    tasks = [{"id": i} for i in range(len(images_per_task))]
    images = [(i, f"key{k}", f"img{i}.{k}") for i, n in enumerate(images_per_task) for k in range(n)]
    batch = LoadedTasks(tasks, [None] * len(tasks), images)
    pieces = _split(batch, max_images)
    assert [t for _, p in pieces for t in p.tasks] == tasks
    assert [(i + start, k, img) for start, p in pieces for i, k, img in p.images] == images
    for start, piece in pieces:
        assert piece.tasks == tasks[start : start + len(piece.tasks)]
        assert len(piece.images) <= max(max_images, max(images_per_task[start : start + len(piece.tasks)], default=0))
