"""Core Detections -> CVAT shapes, decoded back with cvat_sdk.masks."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.cvat.convert import detections_to_shapes, match_labels, points_to_mask
from ml_backend.errors import ConfigError
from ml_backend.types import make_detections


def detections():
    masks = np.zeros((2, 40, 60), bool)
    masks[0, 5:20, 10:30] = True
    masks[1, 30:32, 50:51] = True  # a speck: no polygon outline
    return make_detections([[10, 5, 30, 20], [50, 30, 51, 32]], [0.9, 0.4], [0, 1], ["Car", "Person"], mask=masks)


def test_rectangles_are_absolute_corners_with_string_confidence():
    shapes = detections_to_shapes(detections(), "rectangle")
    assert shapes[0] == {"confidence": "0.9000", "label": "Car", "type": "rectangle", "points": [10.0, 5.0, 30.0, 20.0]}


def test_masks_decode_back_to_the_original_bitmap():
    det = detections()
    for shape, mask in zip(detections_to_shapes(det, "mask"), det.mask):
        ys, xs = np.nonzero(mask)
        assert shape["mask"][-4:] == [xs.min(), ys.min(), xs.max(), ys.max()], "the inclusive box comes last"
        assert (points_to_mask(shape["mask"], 60, 40) == mask).all()


def test_polygons_lie_inside_the_image_and_specks_keep_their_box():
    big, speck = detections_to_shapes(detections(), "polygon")
    xs, ys = big["points"][0::2], big["points"][1::2]
    assert len(xs) >= 3 and min(xs) >= 10 and max(xs) <= 29 and min(ys) >= 5 and max(ys) <= 19
    assert len(speck["points"]) >= 6 and speck["label"] == "Person"


def test_labels_match_cvat_names_case_insensitively_and_unknown_ones_are_named():
    assert match_labels(["car", "Person"], ["Car", "Person", "Tree"]) == {"car": "Car", "Person": "Person"}
    with pytest.raises(ConfigError, match=r"\['Bike'\] are not labels of the CVAT task"):
        match_labels(["Bike"], ["Car"])


def test_masks_are_required_for_mask_and_polygon_shapes():
    det = detections()
    det.mask = None
    with pytest.raises(ConfigError, match="need masks"):
        detections_to_shapes(det, "mask")
