"""The model registry's contract: every registered kind's tiny model (written by the writer `prelabel dev
tiny-models` uses) builds through the registry and does what its family declares; adding a family is one
registration; OWLv2 works through the Label Studio and CVAT doors without adapter changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import supervision as sv
import torch

from ml_backend.engine import Engine, RequestSpec
from ml_backend.errors import ModelUnavailableError
from ml_backend.labelstudio.server import create_app
from ml_backend.media import MediaItem
from ml_backend.models import ImageEncoder, build_detector, build_embedder, build_segmenter, families, model_id, register
from ml_backend.models.classifier import build_classifier
from ml_backend.models.registry import (
    BOXES, CLASSIFIER, DETECTOR, EMBEDDER, SEGMENTER, TEXT_PROMPTS, find, tiny_kinds, unregister,
)
from ml_backend.models.student import student_id
from ml_backend.models.tiny import write_tiny_kinds
from ml_backend.ontology import PromptsFile
from ml_backend.settings import Settings
from ml_backend.types import CLASS_NAME, NEAR_MISS_BAND, NEAR_MISSES, PROMPT, RUNNER_UP, SYNONYM_SPREAD, make_detections

from .conftest import LEGACY_TOKEN, RunningServer, make_image, make_settings

CPU = torch.device("cpu")
KINDS = tiny_kinds()  # {kind: (family, writer)}


def kinds_of(role: str) -> list[str]:
    return sorted(k for k, (family, _) in KINDS.items() if role in family.roles)


def awkward_images() -> list[np.ndarray]:
    """Wide, tall, odd-sized and square."""
    return [np.array(make_image(w, h, seed)) for seed, (w, h) in enumerate([(160, 90), (40, 120), (97, 61), (80, 80)])]


ONTOLOGY = PromptsFile(labels={"Car": ["car", "truck"], "Person": ["person"]}, box_threshold=0.0,
                       text_threshold=0.0).ontology()


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> dict[str, str]:
    return write_tiny_kinds(tmp_path_factory.mktemp("kinds"))


@pytest.fixture(scope="module")
def built(refs):
    cache: dict[tuple[str, str], object] = {}
    builders = {DETECTOR: build_detector, SEGMENTER: build_segmenter, CLASSIFIER: build_classifier,
                EMBEDDER: lambda ref, model_dir, device: build_embedder(ref, model_dir, device)}

    def get(kind: str, role: str):
        if (kind, role) not in cache:
            cache[kind, role] = builders[role](refs[kind], refs[kind], CPU)
        return cache[kind, role]

    return get


# -- what the registry holds ---------------------------------------------------------------------------------------


def test_every_family_but_original_sam_has_tiny_models_and_each_kind_is_written(refs):
    assert {f.name for f in families() if not f.tiny} == {"sam-original"}  # segment-anything builds full-size ViTs
    assert set(refs) == set(KINDS) >= {"grounding-dino", "mm-grounding-dino", "owlv2", "owlvit", "sam", "clip",
                                       "siglip", "student"}
    assert refs["student"].startswith("student:")


def test_each_tiny_kind_resolves_to_the_family_that_wrote_it(refs):
    for kind, (family, _) in KINDS.items():
        for role in family.roles:
            assert find(refs[kind], refs[kind], role)[0] == family


# -- detectors -----------------------------------------------------------------------------------------------------


def assert_detections_follow_the_contract(det: sv.Detections, image: np.ndarray, text_prompted: bool) -> None:
    h, w = image.shape[:2]
    names = ONTOLOGY.names
    assert det.xyxy.shape == (len(det), 4) and det.confidence.shape == (len(det),)
    assert (det.xyxy >= 0).all() and (det.xyxy[:, [0, 2]] <= w).all() and (det.xyxy[:, [1, 3]] <= h).all()
    assert (det.xyxy[:, 2] >= det.xyxy[:, 0]).all() and (det.xyxy[:, 3] >= det.xyxy[:, 1]).all()
    assert set(det.class_id) <= set(range(len(names)))
    assert list(det.data[CLASS_NAME]) == [names[i] for i in det.class_id]
    assert ((det.confidence >= 0) & (det.confidence <= 1)).all() and len(det) <= ONTOLOGY.max_detections
    assert ((det.data[RUNNER_UP] >= 0) & (det.data[RUNNER_UP] <= 1)).all()
    gaps = np.asarray(det.metadata.get(NEAR_MISSES, []))
    assert ((gaps < 0) & (gaps >= -NEAR_MISS_BAND - 1e-6)).all()
    if text_prompted:
        for label, prompt in zip(det.class_id, det.data[PROMPT]):
            assert prompt in ONTOLOGY.labels[label].prompts
        assert (det.data[SYNONYM_SPREAD] >= 0).all()


@pytest.mark.parametrize("kind", kinds_of(DETECTOR))
def test_a_detector_kind_finds_ontology_labels_in_wide_and_tall_images_with_the_named_extras(kind, built):
    detector = built(kind, DETECTOR)
    family = KINDS[kind][0]
    assert BOXES in family.capabilities
    images = awkward_images()
    batched = detector.detect(images, ONTOLOGY)
    assert len(batched) == len(images) and sum(len(d) for d in batched) > 0
    for image, det in zip(images, batched):
        assert_detections_follow_the_contract(det, image, TEXT_PROMPTS in family.capabilities)
        (alone,) = detector.detect([image], ONTOLOGY)  # an image's boxes do not depend on its batch
        np.testing.assert_allclose(alone.xyxy, det.xyxy, atol=1e-3)
        np.testing.assert_allclose(alone.confidence, det.confidence, atol=1e-4)
    assert detector.detect([], ONTOLOGY) == []


@pytest.mark.parametrize("kind", kinds_of(DETECTOR))
def test_a_detector_kind_runs_through_the_engine(kind, built, refs, tmp_path):
    detector = built(kind, DETECTOR)
    engine = Engine(detector, None, PromptsFile(), Settings(detector=refs[kind], model_dir=tmp_path))
    images = awkward_images()
    results = engine.run([MediaItem(im, f"image {i}") for i, im in enumerate(images)], RequestSpec(ontology=ONTOLOGY))
    assert [r.error for r in results] == [None] * len(images)
    for result, direct in zip(results, detector.detect(images, ONTOLOGY)):
        np.testing.assert_allclose(result.detections.xyxy, direct.xyxy, atol=1e-3)
        assert list(result.detections.data[CLASS_NAME]) == list(direct.data[CLASS_NAME])
        assert 0 <= result.score <= 1


@pytest.mark.parametrize("kind", [k for k in kinds_of(DETECTOR) if TEXT_PROMPTS in KINDS[k][0].capabilities])
def test_a_text_prompted_kind_merges_synonyms_and_keeps_labels_apart(kind, built):
    detector = built(kind, DETECTOR)
    image = awkward_images()[0]
    unmerged = PromptsFile(labels={"Car": ["car", "truck", "van"]}, box_threshold=0.0, text_threshold=0.0,
                           nms_iou=1.0).ontology()
    merged = PromptsFile(labels={"Car": ["car", "truck", "van"]}, box_threshold=0.0, text_threshold=0.0,
                         nms_iou=0.3).ontology()
    (raw,) = detector.detect([image], unmerged)
    (det,) = detector.detect([image], merged)
    assert len(det) <= len(raw)
    iou = sv.box_iou_batch(det.xyxy, det.xyxy)
    np.fill_diagonal(iou, 0)
    assert not (iou > 0.3 + 1e-6).any()
    strict = PromptsFile(labels={"Car": {"prompts": ["car"], "threshold": 1.0}}).ontology()
    assert len(detector.detect([image], strict)[0]) == 0


def test_owlv2_maps_boxes_back_from_its_padded_square_as_transformers_does(built):
    from transformers import AutoModelForZeroShotObjectDetection

    detector = built("owlv2", DETECTOR)
    one = PromptsFile(labels={"Car": ["car"]}, box_threshold=0.0, nms_iou=1.0, max_detections=1000).ontology()
    model = AutoModelForZeroShotObjectDetection.from_pretrained(detector.model_id).eval()
    for image in awkward_images()[:2]:
        h, w = image.shape[:2]
        inputs = detector.processor(images=[image], text=[["car"]], return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        side = max(h, w)  # the known correct target size for OWLv2: the padded square
        (reference,) = detector.processor.post_process_grounded_object_detection(
            outputs, threshold=0.0, target_sizes=[(side, side)])
        expected = reference["boxes"].numpy().clip(0, [w, h, w, h])
        expected = expected[(expected[:, 2] > expected[:, 0]) & (expected[:, 3] > expected[:, 1])]
        (det,) = detector.detect([image], one)
        assert len(det) and len(det) == len(expected)
        distance = np.abs(det.xyxy[:, None, :] - expected[None, :, :]).max(-1)  # each box is one of the reference's
        assert (distance.min(1) < 1e-3).all()


def test_a_prompt_longer_than_owls_text_is_named(built):
    detector = built("owlv2", DETECTOR)
    long = "a" * 40
    with pytest.raises(ValueError, match=f"prompt '{long}' is longer than the detector's 32 tokens"):
        detector.detect(awkward_images()[:1], PromptsFile(labels={"Car": [long]}).ontology())


# -- segmenters, classifiers, embedders ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", kinds_of(SEGMENTER))
def test_a_segmenter_kind_gives_full_size_boolean_masks_for_boxes_and_clicks(kind, built):
    segmenter = built(kind, SEGMENTER)
    for image in awkward_images()[:2]:
        h, w = image.shape[:2]
        masks, scores = segmenter.segment(image, boxes=np.array([[0, 0, w / 2, h / 2], [w / 4, h / 4, w, h]]))
        assert masks.shape == (2, h, w) and masks.dtype == bool and scores.shape == (2,)
        masks, scores = segmenter.segment(image, points=np.array([[w // 2, h // 2]]), point_labels=np.array([1]))
        assert masks.shape == (1, h, w) and masks.dtype == bool and scores.shape == (1,)


@pytest.mark.parametrize("kind", kinds_of(CLASSIFIER))
def test_a_classifier_kind_gives_single_choice_probabilities_summing_to_one(kind, built):
    classifier = built(kind, CLASSIFIER)
    classification = PromptsFile().classification(["car", "person", "dog"])
    probs = classifier.probabilities(classifier.embed_images(awkward_images()), classification)
    assert probs.shape == (len(awkward_images()), 3) and ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert [len(c) for c in classifier.decide(probs, classification)] == [1] * len(probs)


@pytest.mark.parametrize("kind", kinds_of(EMBEDDER))
def test_an_embedder_kind_gives_finite_unit_vectors_of_a_fixed_size(kind, built):
    encoder = built(kind, EMBEDDER)
    assert isinstance(encoder, ImageEncoder)
    sizes = set()
    for image in awkward_images():
        h, w = image.shape[:2]
        whole, boxes = encoder.embed(image, np.array([[0, 0, w / 2, h / 2], [w / 3, h / 3, w, h], [w - 1, h - 1, w, h]]))
        assert whole.ndim == 1 and boxes.shape[0] == 3 and np.isfinite(whole).all() and np.isfinite(boxes).all()
        np.testing.assert_allclose(np.linalg.norm(boxes, axis=1), 1.0, rtol=1e-4)
        sizes.add((whole.shape, boxes.shape[1]))
        assert encoder.embed(image, np.zeros((0, 4)))[1].shape == (0, boxes.shape[1])
    assert len(sizes) == 1


# -- adding a family; errors ----------------------------------------------------------------------------------------


class WholeImageDetector:
    """A detector of a new family: one whole-image box per label, at its threshold."""

    def __init__(self, path, model_id, device, batch_size=4):
        self.model_id = model_id

    def detect(self, images, ontology):
        out = []
        for image in images:
            h, w = image.shape[:2]
            n = len(ontology.labels)
            out.append(make_detections([[0, 0, w, h]] * n, [s.threshold for s in ontology.labels], range(n),
                                       ontology.names, **{RUNNER_UP: np.zeros(n)}))
        return out


@pytest.fixture
def whole_image_family(tmp_path):
    register("whole-image", roles=DETECTOR, capabilities=[BOXES])(WholeImageDetector)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "whole-image"}))
    yield tmp_path
    unregister("whole-image")


def test_a_new_family_is_one_registration_away_from_build_detector_and_the_engine(whole_image_family, tmp_path):
    detector = build_detector(str(whole_image_family), tmp_path, CPU)
    assert isinstance(detector, WholeImageDetector) and detector.model_id == str(whole_image_family)
    engine = Engine(detector, None, PromptsFile(), Settings(detector=str(whole_image_family), model_dir=tmp_path))
    (result,) = engine.run([MediaItem(awkward_images()[0], "wide")], RequestSpec(ontology=ONTOLOGY))
    assert list(result.detections.data[CLASS_NAME]) == ["Car", "Person"]
    with pytest.raises(ModelUnavailableError, match=r"segmenter .* is a 'whole-image' model; supported: .*'sam'"):
        build_segmenter(str(whole_image_family), tmp_path, CPU)


def test_an_unknown_model_type_names_the_registered_types_of_the_role(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ModelUnavailableError) as err:
        build_detector(str(tmp_path), tmp_path, CPU)
    message = str(err.value)
    assert "is a 'resnet' model" in message
    assert all(t in message for t in ("'grounding-dino'", "'mm-grounding-dino'", "'owlv2'", "'owlvit'", "'student:DIR'"))
    assert "'sam'" not in message and "'clip'" not in message
    with pytest.raises(ModelUnavailableError, match="'resnet' model; supported: CLIP-style models"):
        build_classifier(str(tmp_path), tmp_path, CPU)


def test_unloadable_references_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="has no readable config.json with a model_type"):
        build_detector(str(tmp_path / "empty"), tmp_path, CPU)
    (tmp_path / "weights.onnx").write_bytes(b"")
    with pytest.raises(ModelUnavailableError, match=r"a file of a kind no model family loads; supported: .*'\*\.pth'"):
        build_segmenter(str(tmp_path / "weights.onnx"), tmp_path, CPU)
    with pytest.raises(ModelUnavailableError, match="student directory .*nowhere does not exist"):
        build_detector("student:nowhere", tmp_path, CPU)


def test_registrations_with_unknown_roles_or_taken_model_types_are_refused():
    with pytest.raises(ValueError, match="unknown roles or capabilities \\['teleporter'\\]"):
        register("x-teleporter", roles="teleporter", capabilities=[])
    with pytest.raises(ValueError, match="model types \\['owlv2'\\] are registered already"):
        register("owlv2", name="another-owl", roles=DETECTOR, capabilities=[BOXES])(WholeImageDetector)
    assert "another-owl" not in {f.name for f in families()}


def test_a_student_is_known_by_its_weights_digest_without_loading(refs, tmp_path):
    directory = refs["student"].removeprefix("student:")
    assert model_id(refs["student"], tmp_path) == student_id(directory)
    assert model_id("IDEA-Research/grounding-dino-tiny", tmp_path) == "IDEA-Research/grounding-dino-tiny"


# -- OWLv2 through the doors ---------------------------------------------------------------------------------------


def test_owlv2_predicts_through_label_studio_predict(built, refs, base_pipeline, ls_host, image_dir, tmp_path, http):
    from .test_server import CONFIG, assert_valid, upload_tasks

    settings = make_settings(base_pipeline, tmp_path, detector=refs["owlv2"], label_studio_url=ls_host.url,
                             label_studio_api_key=LEGACY_TOKEN, local_files_document_root=image_dir)
    engine = Engine(built("owlv2", DETECTOR), base_pipeline.segmenter, PromptsFile(box_threshold=0.05), settings)
    server = RunningServer(create_app(engine))
    try:
        response = http.post(f"{server.url}/predict",
                             json={"tasks": upload_tasks(), "label_config": CONFIG, "project": "1.1700000000"})
    finally:
        server.stop()
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3 and all(r["model_version"].startswith("owlv2+segmenter-") for r in results)
    boxes = [r for result in results for r in result["result"] if r["type"] == "rectanglelabels"]
    assert boxes and {b["value"]["rectanglelabels"][0] for b in boxes} <= {"Car", "Person"}
    for result in results:
        assert_valid(result)


def test_owlv2_serves_as_the_cvat_nuclio_detector(refs, tiny_models, tmp_path, monkeypatch):
    from ml_backend.cvat.serverless import SHAPE_ENV

    from .test_cvat_functions import Function, b64

    monkeypatch.setenv("PRELABEL_DETECTOR", refs["owlv2"])
    monkeypatch.setenv("PRELABEL_SEGMENTER", str(tiny_models["segmenter"]))
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("PRELABEL_DEVICE", "cpu")
    monkeypatch.setenv(SHAPE_ENV, "rectangle")
    monkeypatch.delenv("PRELABEL_PROMPTS", raising=False)
    detector = Function("grounding_dino")
    status, shapes = detector({"image": b64(make_image(160, 120, seed=3)), "threshold": 0.0})
    assert status == 200 and shapes
    assert type(detector.function.engine.detector).__name__ == "OwlDetector"
    for shape in shapes:
        x1, y1, x2, y2 = shape["points"]
        assert shape["type"] == "rectangle" and 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120
