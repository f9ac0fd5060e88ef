"""No zero-size, off-image or NaN region leaves prelabel: the student drops boxes in its letterbox padding, the engine
keeps only boxes with an area inside their image (clipped to it) whatever a detector returns, and every adapter's
conversion (Label Studio, CVAT, COCO, FiftyOne) drops a degenerate box it is handed directly, and an empty mask's
brush or segmentation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import supervision as sv
import torch

from ml_backend.coco import annotations as coco_annotations
from ml_backend.cvat.convert import detections_to_sdk_shapes, detections_to_shapes
from ml_backend.engine import Engine, RequestSpec
from ml_backend.labelstudio.config import Control
from ml_backend.labelstudio.convert import detections_to_results, percent_to_box
from ml_backend.media import MediaItem
from ml_backend.models import build_detector
from ml_backend.models.registry import DETECTOR, tiny_kinds
from ml_backend.models.student import StudentDetector
from ml_backend.models.tiny import write_tiny_kinds, write_tiny_student
from ml_backend.ontology import PromptsFile
from ml_backend.settings import Settings
from ml_backend.types import CLASS_NAME, RUNNER_UP, make_detections

from .conftest import make_image

DETECTOR_KINDS = sorted(k for k, (family, _) in tiny_kinds().items() if DETECTOR in family.roles)
SIZES = [(160, 90), (40, 120), (7, 3), (64, 64)]  # wide, tall, tiny, square
ANYTHING = PromptsFile(labels={"car": ["car"], "person": ["person"]}, box_threshold=0.0, text_threshold=0.0).ontology()


def images() -> list[np.ndarray]:
    return [np.array(make_image(w, h, seed)) for seed, (w, h) in enumerate(SIZES)]


def assert_regions_of(xyxy: np.ndarray, image: np.ndarray) -> None:
    """Every box has x2 > x1 and y2 > y1, all four coordinates finite and inside the image."""
    h, w = image.shape[:2]
    assert np.isfinite(xyxy).all()
    assert (xyxy[:, 2] > xyxy[:, 0]).all() and (xyxy[:, 3] > xyxy[:, 1]).all(), xyxy
    assert (xyxy >= 0).all() and (xyxy[:, [0, 2]] <= w).all() and (xyxy[:, [1, 3]] <= h).all(), (w, h, xyxy)


# -- detectors -----------------------------------------------------------------------------------------------------


def test_the_student_drops_boxes_in_its_letterbox_padding_at_a_very_low_threshold(tmp_path):
    detector = StudentDetector(write_tiny_student(tmp_path / "student"))
    found = detector.detect(images(), ANYTHING)
    for image, det in zip(images(), found):
        assert len(det), "a random student finds boxes everywhere at threshold 0"
        assert_regions_of(det.xyxy, image)
        assert len(det.data[RUNNER_UP]) == len(det)


@pytest.fixture(scope="module")
def detector_refs(tmp_path_factory) -> dict[str, str]:
    return write_tiny_kinds(tmp_path_factory.mktemp("detectors"), DETECTOR_KINDS)


@pytest.mark.parametrize("kind", DETECTOR_KINDS)
def test_every_detector_kind_gives_only_boxes_inside_the_image_through_the_engine(kind, detector_refs, tmp_path):
    detector = build_detector(detector_refs[kind], tmp_path, torch.device("cpu"))
    engine = Engine(detector, None, PromptsFile(), Settings(detector=detector_refs[kind], model_dir=tmp_path))
    results = engine.run([MediaItem(im, f"image {i}") for i, im in enumerate(images())], RequestSpec(ANYTHING))
    assert [r.error for r in results] == [None] * len(SIZES)
    assert sum(len(r.detections) for r in results) > 0
    for image, result in zip(images(), results):
        assert_regions_of(result.detections.xyxy, image)


class WildDetector:
    """A detector that returns every kind of degenerate box beside one good one, on a 30 x 20 image."""

    model_id = "wild"

    def detect(self, images, ontology):
        det = make_detections(BOXES, np.linspace(0.9, 0.1, len(BOXES)), np.zeros(len(BOXES), int), ["car"] * len(BOXES),
                              **{RUNNER_UP: np.zeros(len(BOXES))})
        det.xyxy[NAN] = [np.nan, 2, 9, 8]  # supervision refuses NaN at construction, not after
        return [det for _ in images]


def test_the_engine_drops_degenerate_boxes_whatever_the_detector_returns(tmp_path):
    engine = Engine(WildDetector(), None, PromptsFile(), Settings(model_dir=tmp_path))
    image = np.zeros((H, W, 3), np.uint8)
    (result,) = engine.run([MediaItem(image, "wild")], RequestSpec(ANYTHING))
    np.testing.assert_allclose(result.detections.xyxy, [GOOD, [0, 0, 4, 3]])  # the partly outside one, clipped
    assert list(result.detections.data[CLASS_NAME]) == ["car", "car"] and len(result.detections.data[RUNNER_UP]) == 2
    (direct,) = engine.detect([image], ANYTHING)  # the building block the workbench, distill and review use
    np.testing.assert_allclose(direct.xyxy, result.detections.xyxy)


# -- converters ----------------------------------------------------------------------------------------------------

W, H = 30, 20
GOOD = [3, 2, 9, 8]
BOXES = [
    GOOD,
    [5, 5, 5, 10],  # zero width
    [5, 5, 10, 5],  # zero height
    [40, 2, 50, 8],  # right of the image
    [3, 25, 9, 30],  # below it
    [9, 8, 3, 2],  # inverted
    [0, 0, 1, 1],  # NaN, set below
    [-5, -5, 4, 3],  # partly outside: kept, clipped
]
NAN = 6


def degenerate(masks: bool = True) -> sv.Detections:
    """The boxes above, every one with a non-empty mask of its good part (the good box's own pixels)."""
    n = len(BOXES)
    mask = np.zeros((n, H, W), bool)
    mask[:, 2:8, 3:9] = True
    det = make_detections(BOXES, np.full(n, 0.5), np.zeros(n, int), ["Car"] * n, mask=mask if masks else None)
    det.xyxy[NAN] = [np.nan, 2, 9, 8]
    return det


def controls() -> list[Control]:
    return [Control(kind, kind[0], "i", "image", ("Car",)) for kind in ("rectanglelabels", "brushlabels", "polygonlabels")]


def test_label_studio_results_hold_no_degenerate_region():
    results = detections_to_results(degenerate(), controls(), W, H)
    rectangles = [r for r in results if r["type"] == "rectanglelabels"]
    boxes = np.array([percent_to_box(r["value"], W, H) for r in rectangles])
    np.testing.assert_allclose(boxes, [GOOD, [0, 0, 4, 3]], atol=1e-5)
    assert [r["type"] for r in results].count("brushlabels") == 2 and [r["type"] for r in results].count("polygonlabels") == 2


def test_an_empty_mask_becomes_no_brush_and_no_polygon_but_keeps_its_rectangle():
    det = degenerate()[np.array([0])]
    det.mask[:] = False
    results = detections_to_results(det, controls(), W, H)
    assert [r["type"] for r in results] == ["rectanglelabels"]


@pytest.mark.parametrize("shape_type", ["rectangle", "mask", "polygon"])
def test_cvat_shapes_hold_no_degenerate_region(shape_type):
    shapes = detections_to_shapes(degenerate(), shape_type, W, H)
    assert len(shapes) == 2
    if shape_type == "rectangle":
        assert [s["points"] for s in shapes] == [GOOD, [0, 0, 4, 3]]
    sdk = detections_to_sdk_shapes(degenerate(), {"Car": shape_type}, width=W, height=H)
    assert len(sdk) == 2
    # without a size, the masks' size bounds the boxes; without masks, zero-size and NaN boxes still go
    assert len(detections_to_shapes(degenerate(), shape_type)) == 2
    if shape_type == "rectangle":
        assert len(detections_to_shapes(degenerate(masks=False), shape_type)) == 4  # off-image ones unknown as such


def test_a_sliver_cvat_would_round_to_zero_width_is_dropped():
    det = make_detections([[5, 5, 5.004, 10], GOOD], [0.5, 0.5], [0, 0], ["Car", "Car"])
    assert [s["points"] for s in detections_to_shapes(det, "rectangle", W, H)] == [GOOD]


def test_coco_annotations_hold_no_degenerate_region():
    anns = coco_annotations(degenerate(), 1, ["Car"], width=W, height=H)
    assert [a["bbox"] for a in anns] == [[3, 2, 6, 6], [0, 0, 4, 3]]
    assert all(a["area"] == 36 for a in anns)  # the mask's pixels
    boxes_only = coco_annotations(degenerate(masks=False), 1, ["Car"], width=W, height=H)
    assert [a["bbox"] for a in boxes_only] == [[3, 2, 6, 6], [0, 0, 4, 3]] and "segmentation" not in boxes_only[0]
    sliver = make_detections([[5, 5, 5.004, 10]], [0.5], [0], ["Car"])
    assert coco_annotations(sliver, 1, ["Car"], width=W, height=H) == []


def test_an_empty_mask_becomes_no_coco_segmentation_but_keeps_its_box():
    det = degenerate()[np.array([0])]
    det.mask[:] = False
    (ann,) = coco_annotations(det, 1, ["Car"], width=W, height=H)
    assert ann["bbox"] == [3, 2, 6, 6] and ann["area"] == 36 and "segmentation" not in ann


FIFTYONE = """
import json, sys
import numpy as np
sys.path.insert(0, ".")
from tests.test_degenerate import degenerate, W, H
from ml_backend.review.convert import to_detections
print(json.dumps([d.bounding_box for d in to_detections(degenerate(), W, H).detections]))
"""


@pytest.mark.slow  # FiftyOne imported in a process of its own: over ten seconds
def test_fiftyone_detections_hold_no_degenerate_region(tmp_path):
    pytest.importorskip("fiftyone", reason="FiftyOne is installed by the project's review extra")
    # in a process of its own: importing FiftyOne here would fix its database directory before tests/test_review.py
    # sets its own
    env = os.environ | {"FIFTYONE_DATABASE_DIR": str(tmp_path / "db"), "FIFTYONE_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-c", FIFTYONE], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    boxes = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(boxes, [[3 / W, 2 / H, 6 / W, 6 / H], [0, 0, 4 / W, 3 / H]])


def test_valid_boxes_is_false_for_each_kind_of_degenerate_box():
    from ml_backend.types import valid_boxes

    det = degenerate()
    assert valid_boxes(det.xyxy, W, H).tolist() == [True, False, False, False, False, False, False, True]
    assert valid_boxes(det.xyxy).tolist() == [True, False, False, True, True, False, False, True]
