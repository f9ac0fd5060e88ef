"""SAM 3 as a text-prompted detector (issue 17, first step): every instance of a label's prompts with its box, score
and its own mask in one model; brush and polygon controls take those masks with no segmenter; a rectangle-only
request carries none. Offline, on the tiny random SAM 3 of `prelabel dev tiny-models` (`OUT/sam3`)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch
from label_studio_sdk.converter.brush import decode_rle

from ml_backend.engine import Engine, RequestSpec
from ml_backend.media import MediaItem
from ml_backend.models import build_detector
from ml_backend.models.tiny import write_tiny_sam3
from ml_backend.ontology import PromptsFile
from ml_backend.settings import Settings

from .conftest import CONFIG, RunningServer, encode, make_image

PROMPTS = PromptsFile(labels={"Car": ["car", "truck"], "Person": ["person"]}, box_threshold=0.0)
BOXES_ONLY = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels></View>"""


@pytest.fixture(scope="module")
def sam3(tmp_path_factory):
    path = write_tiny_sam3(tmp_path_factory.mktemp("models") / "sam3")
    return build_detector(str(path), path.parent, torch.device("cpu"))


@pytest.fixture
def engine(sam3, tmp_path):
    settings = Settings(detector=sam3.model_id, segmenter="", model_dir=tmp_path)
    return Engine(sam3, None, PROMPTS, settings)


@pytest.mark.parametrize("shape", [(90, 160), (120, 120), (600, 12), (1, 200)])
def test_every_instance_comes_with_its_own_full_size_mask(sam3, shape):
    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    (found,) = sam3.detect([image], PROMPTS.ontology())
    assert len(found) and found.mask is not None and found.mask.shape == (len(found), *shape)
    assert set(found.data["class_name"]) <= {"Car", "Person"} and {"prompt", "runner_up", "synonym_spread"} <= set(found.data)
    assert (found.xyxy[:, 2] <= shape[1]).all() and (found.xyxy[:, 3] <= shape[0]).all()


def test_the_engine_takes_the_detectors_masks_without_a_segmenter(engine):
    items = [MediaItem(np.array(make_image(90, 60)), "a.png")]
    (with_masks,) = engine.run(items, RequestSpec(engine.ontology(), masks=True))
    assert with_masks.error is None and with_masks.detections.mask.shape == (len(with_masks.detections), 60, 90)
    (boxes_only,) = engine.run(items, RequestSpec(engine.ontology(), masks=False))
    assert boxes_only.error is None and len(boxes_only.detections) and boxes_only.detections.mask is None
    assert engine.gives_masks and engine.model_version(engine.ontology()).startswith("sam3+nosam-")


def test_label_studio_brush_and_polygons_from_sam3_and_a_too_long_prompt_names_itself(engine, sam3, tmp_path):
    from ml_backend.labelstudio.server import create_app

    server = RunningServer(create_app(engine))
    try:
        uri = "data:image/png;base64," + base64.b64encode(encode(make_image(80, 50))).decode()
        tasks = [{"id": 7, "data": {"image": uri}}]
        with httpx.Client(timeout=60) as http:
            setup = http.post(f"{server.url}/setup", json={"project": "3.1", "schema": CONFIG}).json()
            assert {s["control"] for s in setup["skipped"]} <= {"kp", "prompt"}  # brush and polygons are filled
            (entry,) = http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": CONFIG}).json()["results"]
            types = {r["type"] for r in entry["result"]}
            assert {"rectanglelabels", "brushlabels", "polygonlabels"} <= types, types
            for region in (r for r in entry["result"] if r["type"] == "brushlabels"):
                mask = np.asarray(decode_rle(region["value"]["rle"])).reshape(50, 80, 4)[..., 3]
                assert mask.any()
            (boxes,) = http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": BOXES_ONLY}).json()["results"]
            assert {r["type"] for r in boxes["result"]} == {"rectanglelabels"}
        long = PromptsFile(labels={"Car": ["car " * 20]}, box_threshold=0.0)
        with pytest.raises(ValueError, match="longer than SAM 3's"):
            sam3.detect([np.array(make_image(30, 20))], long.ontology())
    finally:
        server.stop()
