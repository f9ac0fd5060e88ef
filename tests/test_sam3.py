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
    assert engine.gives_masks and engine.model_version(engine.ontology()).startswith("sam3-")


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
            # a TextArea prompt: SAM 3 finds that text's instances, boxes and its own masks, as the label named
            region = {"type": "textarea", "from_name": "prompt", "to_name": "image", "value": {"text": ["Person: a small person"]}}
            typed = http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": CONFIG,
                                                              "params": {"context": {"result": [region]}}})
            (answer,) = typed.json()["results"]
            assert typed.status_code == 200 and answer["result"]
            assert {r["value"][r["type"]][0] for r in answer["result"]} == {"Person"}
            assert {"rectanglelabels", "brushlabels"} <= {r["type"] for r in answer["result"]}
        long = PromptsFile(labels={"Car": ["car " * 20]}, box_threshold=0.0)
        with pytest.raises(ValueError, match="longer than SAM 3's"):
            sam3.detect([np.array(make_image(30, 20))], long.ontology())
    finally:
        server.stop()


# -- issue 17: one load for text, exemplars, clicks and embeddings -------------------------------------------------
def scene(height=96, width=160, seed=1):
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def test_batched_images_give_the_same_answers_as_one_by_one(sam3):
    images = [scene(96, 160, s) for s in range(3)] + [scene(40, 200, 9), scene(120, 120, 4)]
    sam3.batch_size = 2
    try:
        batched = sam3.detect(images, PROMPTS.ontology())
    finally:
        sam3.batch_size = 4
    for image, together in zip(images, batched):
        (alone,) = sam3.detect([image], PROMPTS.ontology())
        np.testing.assert_allclose(together.xyxy, alone.xyxy, atol=1e-3)
        np.testing.assert_allclose(together.confidence, alone.confidence, atol=1e-5)
        assert (together.mask == alone.mask).mean() > 0.999


def test_boxes_only_never_makes_full_size_masks(sam3, monkeypatch):
    def refuse(*_):
        raise AssertionError("a full-size mask was made for a boxes-only request")

    monkeypatch.setattr(type(sam3), "_full_masks", staticmethod(refuse))
    (found,) = sam3.detect([scene()], PROMPTS.ontology(), masks=False)
    assert len(found) and found.mask is None


def test_uncertainty_signals_are_computed_for_sam3(engine):
    strict = PromptsFile(labels={"Car": {"prompts": ["car", "truck"], "threshold": 0.5}, "Person": ["person"]},
                         box_threshold=0.0)
    (found,) = engine.detect([scene()], strict.ontology())
    assert {"runner_up", "synonym_spread"} <= set(found.data) and "near_misses" in found.metadata
    assert all(-0.1 <= m < 0 for m in found.metadata["near_misses"])
    (result,) = engine.run([MediaItem(scene(), "s.png")], RequestSpec(strict.ontology()))
    assert 0.0 <= result.score <= 1.0


def test_find_all_like_this_from_exemplar_boxes(engine, sam3):
    image = scene()
    before = sam3.cache_info()
    found = engine.find_like(image, np.array([[10, 10, 60, 70]]), np.array([1]), "Car")
    after_first = sam3.cache_info()
    assert after_first["misses"] == before["misses"] + 1  # the first exemplar pays the vision encoder
    assert len(found) and set(found.data["class_name"]) == {"Car"} and found.mask.shape == (len(found), 96, 160)
    assert (found.confidence >= 0.0).all() and (found.xyxy[:, 2] <= 160).all() and (found.xyxy[:, 3] <= 96).all()
    # a second exemplar (and a negative one) on the same image reuses its vision features
    again = engine.find_like(image, np.array([[70, 20, 120, 90], [10, 10, 60, 70]]), np.array([1, 0]), "Car", masks=False)
    assert sam3.cache_info()["misses"] == after_first["misses"] and sam3.cache_info()["hits"] > after_first["hits"]
    assert again.mask is None and set(again.data["class_name"]) <= {"Car"}


@pytest.mark.parametrize("boxes, labels, message", [
    ([[10, 10, 10, 50]], [1], r"exemplar box \[10.0, 10.0, 10.0, 50.0\] has no area"),
    ([[200, 10, 260, 50]], [1], "lies outside the 160x96 image"),
    ([[10, 10, 50, 50]], [0], "at least one positive box"),
    ([[np.nan, 10, 50, 50]], [1], "has no area"),
])
def test_bad_exemplar_boxes_name_themselves(engine, boxes, labels, message):
    from ml_backend.errors import RequestError

    with pytest.raises(RequestError, match=message):
        engine.find_like(scene(), np.array(boxes, float), np.array(labels), "Car")


def test_clicks_go_to_sam3s_tracker_when_there_is_no_segmenter(engine, sam3):
    image = scene()
    engine.prepare(image)
    hits = sam3.cache_info()["hits"]
    mask, score = engine.segment(image, np.array([[40, 30]]), np.array([1]), None)
    assert mask.shape == (96, 160) and mask.dtype == bool and 0.0 <= score <= 1.0
    assert sam3.cache_info()["hits"] == hits + 1  # the click cost only the decoder
    masks, scores = sam3.segment(image, boxes=np.array([[10, 10, 60, 70], [70, 20, 120, 90]]))
    assert masks.shape == (2, 96, 160) and scores.shape == (2,)
    image_embedding, box_embeddings = sam3.embed(image, np.array([[10, 10, 60, 70]]))
    assert image_embedding.ndim == 1 and box_embeddings.shape[0] == 1
    assert np.isclose(np.linalg.norm(box_embeddings[0]), 1.0, atol=1e-4)


def test_one_load_serves_detector_and_segmenter(sam3, tmp_path):
    path = sam3.model_id
    engine = Engine.from_settings(Settings(detector=path, segmenter=path, model_dir=tmp_path))
    assert engine.segmenter is engine.detector and engine.clicker is engine.detector


def test_a_detector_only_checkpoint_refuses_clicks_by_name(sam3, tmp_path):
    from transformers import Sam3Model

    from ml_backend.errors import ConfigError

    plain = tmp_path / "sam3-detector"
    Sam3Model.from_pretrained(sam3.model_id).save_pretrained(plain)
    sam3.processor.save_pretrained(plain)
    detector = build_detector(str(plain), tmp_path, torch.device("cpu"))
    assert not detector.clicks and len(detector.detect([scene()], PROMPTS.ontology())[0])
    with pytest.raises(ConfigError, match="detector-only SAM 3 checkpoint"):
        detector.segment(scene(), points=np.array([[5, 5]]), point_labels=np.array([1]))
    engine = Engine(detector, None, PROMPTS, Settings(detector=str(plain), segmenter="", model_dir=tmp_path))
    with pytest.raises(ConfigError, match="without a segmenter"):
        engine.segment(scene(), np.array([[5, 5]]), np.array([1]), None)


def test_precision_is_for_cuda_and_a_wrong_one_is_named(caplog):
    from ml_backend.errors import ConfigError
    from ml_backend.models.sam3 import model_dtype

    assert model_dtype("bfloat16", torch.device("cpu")) is torch.float32 and "for CUDA" in caplog.text
    assert model_dtype("float16", torch.device("cuda")) is torch.float16
    with pytest.raises(ConfigError, match="precision 'half' is not one of"):
        model_dtype("half", torch.device("cpu"))


def test_a_checkpoint_of_the_wrong_kind_is_named(sam3, tmp_path):
    from ml_backend.errors import ModelUnavailableError
    from ml_backend.models import build_embedder
    from ml_backend.models.registry import CLASSIFIER, find
    from ml_backend.models.tiny import write_tiny_segmenter

    sam = write_tiny_segmenter(tmp_path / "sam")
    with pytest.raises(ModelUnavailableError, match=r"detector '.*sam' is a 'sam' model; supported: open-vocabulary detectors"):
        build_detector(str(sam), tmp_path, torch.device("cpu"))
    with pytest.raises(ModelUnavailableError, match="is a 'sam3_video' model"):
        find(sam3.model_id, tmp_path, CLASSIFIER)
    broken = tmp_path / "broken-sam3"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "sam3_video"}')
    with pytest.raises(ModelUnavailableError, match=r"embedder '.*broken-sam3' \(sam3\) could not be loaded from .*broken-sam3"):
        build_embedder(str(broken), tmp_path, torch.device("cpu"))


def test_cross_prompt_scores_give_runner_up_and_synonym_spread():
    from ml_backend.models.prompted import merge, prompt_labels, score_boxes
    from ml_backend.models.sam3 import cross_scores

    prompts = PromptsFile(labels={"Car": ["car", "truck"], "Person": ["person"]}, box_threshold=0.3)
    onto = prompts.ontology()
    names = [p for p, _ in onto.prompts]
    car, truck, person = (names.index(n) for n in ("car", "truck", "person"))
    scores = torch.zeros(3, 2)
    xyxy = torch.tensor([[[0, 0, 10, 10], [50, 50, 60, 60]]] * 3, dtype=torch.float32)
    scores[car] = torch.tensor([0.9, 0.0])  # one object: "car" 0.9, "truck" 0.5, "person" 0.4
    scores[truck] = torch.tensor([0.5, 0.0])
    scores[person] = torch.tensor([0.4, 0.8])  # and a lone person elsewhere
    xyxy[truck, 0] = torch.tensor([1, 0, 10, 10])  # IoU 0.9 with the car's box
    table = cross_scores(scores, xyxy)
    assert table[car * 2, truck] == pytest.approx(0.5) and table[car * 2, person] == pytest.approx(0.4)
    assert table[person * 2 + 1, car] == 0  # nothing of "car" overlaps the lone person
    found = merge([score_boxes(table, prompt_labels(names, onto), names, onto, xyxy.reshape(-1, 4))], onto)
    by_label = {name: k for k, name in enumerate(found.data["class_name"])}
    # one object, one label (as with Grounding DINO): the "person" instance on the car is the car, seen by "person"
    assert set(by_label) == {"Car", "Person"} and len(found) == 2
    car_row = int(np.argmax(found.confidence * (found.data["class_name"] == "Car")))
    assert found.data["runner_up"][car_row] == pytest.approx(0.4)  # Person's score on the same object
    assert found.data["synonym_spread"][car_row] == pytest.approx(0.4)  # car 0.9 vs truck 0.5


def test_a_gated_model_says_how_to_get_access():
    import httpx as hx
    from huggingface_hub.errors import GatedRepoError

    from ml_backend.models.loading import download_error

    response = hx.Response(403, request=hx.Request("GET", "https://huggingface.co/api/models/facebook/sam3"))
    error = download_error("facebook/sam3", GatedRepoError("Access to model facebook/sam3 is restricted.\nmore", response=response))
    assert "is gated: accept its licence at https://huggingface.co/facebook/sam3" in str(error) and "HF_TOKEN" in str(error)
    assert "\n" not in str(download_error("x/y", OSError("first line\nsecond")))


def test_versions_name_sam3_alone_and_agree_between_loaded_and_unloaded_engines(sam3, tmp_path):
    for segmenter in ("", sam3.model_id):
        settings = Settings(detector=sam3.model_id, segmenter=segmenter, model_dir=tmp_path)
        loaded, unloaded = Engine.from_settings(settings), Engine.from_settings(settings, load=False)
        assert loaded.base_version == unloaded.base_version == "sam3"
        assert unloaded.detector_masks and unloaded.finds_exemplars


def test_sam3_from_the_hub_fails_fast_offline_in_one_line(tmp_path, monkeypatch):
    from ml_backend.errors import ModelUnavailableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(ModelUnavailableError) as error:
        Engine.from_settings(Settings(detector="facebook/sam3", segmenter="", model_dir=tmp_path))
    assert "facebook/sam3" in str(error.value) and "HF_HUB_OFFLINE" in str(error.value) and "\n" not in str(error.value)


def test_the_default_sam_is_not_loaded_beside_sam3(sam3, tmp_path):
    from ml_backend.engine import model_refs

    empty = PromptsFile()
    assert model_refs(Settings(detector=sam3.model_id, model_dir=tmp_path), empty) == (sam3.model_id, None)
    chosen = Settings(detector=sam3.model_id, segmenter="facebook/sam-vit-base", model_dir=tmp_path)
    assert model_refs(chosen, empty)[1] == "facebook/sam-vit-base"  # asked for: clicks go to that SAM
    # a hub id not downloaded yet is not looked up online: the default stands until the detector is here
    assert model_refs(Settings(detector="facebook/sam3", model_dir=tmp_path), empty)[1] == Settings().segmenter
