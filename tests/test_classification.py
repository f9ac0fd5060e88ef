"""Zero-shot classification (Choices, CVAT tags), two-stage detection + per-region classes, and task metadata in
prompts, offline on tiny random CLIP / SigLIP / Grounding DINO, over real HTTP where Label Studio would call."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from cvat_sdk import models
from cvat_sdk.auto_annotation.driver import _AnnotationMapper
from label_studio_sdk.label_interface import LabelInterface

from ml_backend.cvat.auto_annotation import PrelabelDetectionFunction
from ml_backend.cvat.serverless import DetectorFunction
from ml_backend.errors import ConfigError, ModelUnavailableError, PromptsError
from ml_backend.labelstudio.backend import LabelStudioBackend
from ml_backend.labelstudio.config import parse_config
from ml_backend.labelstudio.server import create_app
from ml_backend.models.classifier import ZeroShotClassifier, build_classifier
from ml_backend.models.tiny import write_tiny_classifier
from ml_backend.ontology import PromptFieldError, PromptsFile
from ml_backend.engine import Engine, classifier_ref
from ml_backend.types import crop
from ml_backend.settings import Settings

from .conftest import LEGACY_TOKEN, RunningServer, encode, make_image, make_settings

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"img0.png": (160, 90), "img1.png": (120, 200), "img2.png": (300, 240)}

SINGLE = """<View><Image name="image" value="$image"/>
  <Choices name="animal" toName="image"><Choice value="Cat"/><Choice value="Dog"/><Choice value="Bird" alias="bird"/></Choices>
</View>"""
MULTI = """<View><Image name="image" value="$image"/>
  <Choices name="scene" toName="image" choice="multiple">
    <Choice value="Indoor"/><Choice value="Outdoor"/><Choice value="Night"/>
  </Choices>
</View>"""
TWO_STAGE = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>
  <Choices name="colour" toName="image" perRegion="true" whenLabelValue="Car">
    <Choice value="Red"/><Choice value="Blue"/><Choice value="White"/>
  </Choices>
  <Choices name="scene" toName="image"><Choice value="Street"/><Choice value="Shop"/></Choices>
</View>"""
PRODUCT = """<View><Image name="image" value="$image"/>
  <Choices name="match" toName="image"><Choice value="Listed"/><Choice value="Other"/></Choices>
</View>"""
PRODUCT_PROMPTS = {"Listed": "{product_name} bottle", "Other": "box"}
ALL_BOXES = dict(box_threshold=0.0, text_threshold=0.0)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory) -> dict[str, ZeroShotClassifier]:
    root = tmp_path_factory.mktemp("classifiers")
    return {
        family: build_classifier(str(write_tiny_classifier(root / family, family=family)), root, torch.device("cpu"))
        for family in ("clip", "siglip")
    }


class CountingDetector:
    """The real tiny detector, counting its calls and the prompts it is asked for."""

    def __init__(self, inner):
        self.inner, self.model_id, self.calls = inner, inner.model_id, []

    def detect(self, images, ontology):
        self.calls.append([p for p, _ in ontology.prompts])
        return self.inner.detect(images, ontology)


@pytest.fixture
def serve(base_pipeline, classifiers, ls_host, tmp_path):
    """Start a backend over real HTTP with a classifier ("clip", "siglip" or None) and a prompts file."""
    servers = []

    def start(prompts: PromptsFile | None = None, classifier: str | None = "clip", **overrides):
        settings = make_settings(base_pipeline, tmp_path, label_studio_url=ls_host.url,
                                 label_studio_api_key=LEGACY_TOKEN, **overrides)
        detector = CountingDetector(base_pipeline.detector)
        pipeline = Engine(detector, base_pipeline.segmenter, prompts or PromptsFile(), settings,
                            classifiers[classifier] if classifier else None)
        servers.append(RunningServer(create_app(pipeline)))
        servers[-1].pipeline = pipeline
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def predict(http, server, tasks, config):
    return http.post(f"{server.url}/predict", json={"tasks": tasks, "label_config": config, "project": "3.1700000000"})


def upload_tasks(names=SIZES, **data):
    return [{"id": i + 1, "data": {"image": f"/data/upload/{name}"} | data} for i, name in enumerate(names)]


def assert_valid(prediction: dict, config: str):
    assert LabelInterface(config).validate_prediction(prediction, return_errors=True) == []


def choices_of(result: dict, control: str) -> list[dict]:
    return [r for r in result["result"] if r["type"] == "choices" and r["from_name"] == control]


# --- whole-image Choices -----------------------------------------------------------------------------------------


def test_single_choice_gives_one_valid_choice_per_image_with_scores_on_every_choice(http, serve, image_dir):
    server = serve(PromptsFile(labels={"Cat": ["cat", "kitten"]}))
    response = predict(http, server, upload_tasks(), SINGLE)
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3
    classifier = server.pipeline.classifier
    classification = parse_config(SINGLE).choices[0].classification(server.pipeline.prompts)
    for result, name in zip(results, SIZES):
        assert_valid(result, SINGLE)
        (choice,) = choices_of(result, "animal")
        scores = choice["meta"]["scores"]
        assert list(scores) == ["Cat", "Dog", "bird"], "the values Label Studio stores: aliases where given"
        assert sum(scores.values()) == pytest.approx(1, abs=1e-4), "single choice: softmax over the choices"
        (chosen,) = choice["value"]["choices"]
        assert scores[chosen] == max(scores.values()) == choice["score"] == result["score"]
        # the same probabilities as the classifier gives on the whole image
        image = np.array(make_image(*SIZES[name], list(SIZES).index(name)))
        expected = classifier.classify([image], classification)[0]
        assert list(scores.values()) == pytest.approx(expected.tolist(), abs=1e-4)
    version = results[0]["model_version"]
    assert "+clip-" in version and {r["model_version"] for r in results} == {version}
    texts = classifier.cached_texts()
    assert {"a photo of a cat", "a photo of a kitten", "a photo of a dog", "a photo of a bird"} <= set(texts)


def test_a_choices_only_project_never_runs_the_detector(http, serve):
    server = serve()
    results = predict(http, server, upload_tasks(), SINGLE).json()["results"]
    assert all(len(r["result"]) == 1 for r in results)
    assert server.pipeline.detector.calls == []


def test_text_embeddings_are_computed_once_per_ontology_and_images_in_one_forward(http, serve, classifiers):
    server = serve(PromptsFile(labels={"Dog": ["dog", "puppy"]}))
    classifier = classifiers["clip"]
    predict(http, server, upload_tasks(), SINGLE)
    before = dict(classifier.forward_calls)
    predict(http, server, upload_tasks(), SINGLE)
    after = dict(classifier.forward_calls)
    assert after["text"] == before["text"], "the choices' text embeddings come from the cache"
    assert after["image"] == before["image"] + 1, "three images, one classifier forward"


def test_choice_embedding_averages_every_template_with_every_synonym(classifiers):
    classifier = classifiers["clip"]
    prompts = PromptsFile(templates=["a photo of a {}", "a {} on a shelf"], labels={"Can": ["can", "soda can"]})
    classification = prompts.classification(["Can", "Cup"])
    texts = classification.texts()
    assert texts[0] == ("a photo of a can", "a photo of a soda can", "a can on a shelf", "a soda can on a shelf")
    embedded = classifier.embed_texts(list(texts[0]))
    expected = torch.nn.functional.normalize(embedded.mean(0), dim=-1)
    assert torch.allclose(classifier.choice_embeddings(classification)[0], expected, atol=1e-6)


def test_multiple_choice_with_siglip_uses_sigmoid_scores_and_per_choice_thresholds(http, serve, classifiers):
    prompts = PromptsFile(labels={"Indoor": {"prompts": ["room"], "threshold": 0.0}, "Night": {"threshold": 1.0}},
                          choice_threshold=0.0)
    server = serve(prompts, classifier="siglip")
    results = predict(http, server, upload_tasks(), MULTI).json()["results"]
    classification = parse_config(MULTI).choices[0].classification(prompts)
    for result, name in zip(results, SIZES):
        assert_valid(result, MULTI)
        (choice,) = choices_of(result, "scene")
        assert choice["value"]["choices"][0] in {"Indoor", "Outdoor"}
        assert set(choice["value"]["choices"]) == {"Indoor", "Outdoor"}, "thresholds 0 and 0 (file default) pass, 1 not"
        image = np.array(make_image(*SIZES[name], list(SIZES).index(name)))
        expected = classifiers["siglip"].classify([image], classification)[0]
        logits = torch.logit(torch.tensor(expected))  # sigmoid scores, independent per choice: no softmax
        assert list(choice["meta"]["scores"].values()) == pytest.approx(expected.tolist(), abs=1e-4)
        assert not np.isclose(expected.sum(), 1.0) and torch.isfinite(logits).all()
    assert "+siglip-" in results[0]["model_version"]


def test_multiple_choice_with_clip_picks_choices_above_a_uniform_guess(http, serve):
    server = serve(PromptsFile())
    for result in predict(http, server, upload_tasks(), MULTI).json()["results"]:
        assert_valid(result, MULTI)
        for choice in choices_of(result, "scene"):
            scores = choice["meta"]["scores"]
            assert set(choice["value"]["choices"]) == {k for k, v in scores.items() if v >= 1 / 3}
            assert choice["score"] == min(scores[c] for c in choice["value"]["choices"])


def test_a_choices_only_config_on_a_server_without_classifier_is_refused_naming_the_control(http, serve):
    server = serve(classifier=None)
    response = predict(http, server, upload_tasks(), SINGLE)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["kind"] == "config" and "animal" in error["message"] and "PRELABEL_CLASSIFIER" in error["message"]
    setup = http.post(f"{server.url}/setup", json={"project": "3.1", "schema": SINGLE})
    assert setup.status_code == 422 and "classifier" in setup.json()["error"]["message"]
    # with boxes to give, the Choices are skipped instead (tests/test_controls.py)
    assert predict(http, server, upload_tasks(["img0.png"]), TWO_STAGE).status_code == 200


def test_the_classifier_comes_from_the_flag_or_env_then_the_prompts_file(monkeypatch, tiny_models, tmp_path):
    monkeypatch.delenv("PRELABEL_CLASSIFIER", raising=False)
    prompts = PromptsFile(classifier="org/from-file")
    assert classifier_ref(Settings(), prompts) == "org/from-file"
    assert classifier_ref(Settings(classifier="org/flag"), prompts) == "org/flag"
    assert classifier_ref(Settings(classifier="none"), prompts) is None, "'none' turns it off"
    assert classifier_ref(Settings(), PromptsFile()) is None, "no classifier unless configured"
    monkeypatch.setenv("PRELABEL_CLASSIFIER", "org/env")
    assert classifier_ref(Settings(), prompts) == "org/env"
    with pytest.raises(ModelUnavailableError, match="'grounding-dino' model; supported: CLIP-style"):
        build_classifier(str(tiny_models["detector"]), tmp_path, torch.device("cpu"))


# --- two-stage ----------------------------------------------------------------------------------------------------


def test_two_stage_classifies_each_car_box_in_one_classifier_batch_under_the_box_id(http, serve, classifiers):
    server = serve(PromptsFile(**ALL_BOXES, labels={"Car": ["car"], "Person": ["person"]}))
    classifier = classifiers["clip"]
    before = classifier.forward_calls["image"]
    results = predict(http, server, upload_tasks(), TWO_STAGE).json()["results"]
    assert classifier.forward_calls["image"] == before + 1, "all crops and whole images of the batch: one forward"
    assert len(server.pipeline.detector.calls) == 1, "one detector pass for the batch"
    cars = 0
    for result in results:
        assert_valid(result, TWO_STAGE)
        boxes = {r["id"]: r for r in result["result"] if r["type"] == "rectanglelabels"}
        per_region = choices_of(result, "colour")
        car_ids = {i for i, r in boxes.items() if r["value"]["rectanglelabels"] == ["Car"]}
        assert {c["id"] for c in per_region} == car_ids, "every Car box, and only Car boxes (whenLabelValue)"
        assert len(per_region) == len(car_ids)
        for choice in per_region:
            box = boxes[choice["id"]]["value"]
            assert {k: choice["value"][k] for k in ("x", "y", "width", "height")} == {k: box[k] for k in ("x", "y", "width", "height")}
            assert len(choice["value"]["choices"]) == 1
        (scene,) = choices_of(result, "scene")
        assert "x" not in scene["value"] and scene["id"] not in boxes
        cars += len(car_ids)
    assert cars >= 2, "the tiny detector at threshold 0 finds cars in these images"


def test_per_region_choices_follow_when_tag_name_onto_brush_regions(http, serve):
    config = """<View><Image name="image" value="$image"/>
      <RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels>
      <BrushLabels name="brush" toName="image"><Label value="Car"/></BrushLabels>
      <Choices name="kind" toName="image" perRegion="true" whenTagName="brush"><Choice value="Sedan"/><Choice value="Van"/></Choices>
    </View>"""
    server = serve(PromptsFile(**ALL_BOXES, max_detections=3, labels={"Car": ["car"]}))
    for result in predict(http, server, upload_tasks(["img0.png"]), config).json()["results"]:
        assert_valid(result, config)
        brushes = {r["id"] for r in result["result"] if r["type"] == "brushlabels"}
        kinds = choices_of(result, "kind")
        assert brushes and {r["id"] for r in kinds} == brushes, "brush regions only (whenTagName)"
        assert all(r["value"] == {"choices": r["value"]["choices"]} for r in kinds), "no geometry copied off a mask"


def test_per_region_probabilities_belong_to_the_crop_of_their_own_box(base_pipeline, classifiers, ls_host, tmp_path):
    settings = make_settings(base_pipeline, tmp_path, label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    prompts = PromptsFile(**ALL_BOXES, labels={"Car": ["car"], "Person": ["person"]})
    pipeline = Engine(base_pipeline.detector, None, prompts, settings, classifiers["clip"])
    backend = LabelStudioBackend.for_batch(pipeline)
    config = parse_config(TWO_STAGE)
    ontology = backend.ontology_for(config)
    seen = {}
    batch = backend.load_tasks(upload_tasks(), config)
    entries = backend.infer(batch, config, ontology, backend.version_for(config, ontology),
                            on_image=lambda i, key, img, det: seen.__setitem__(i, (img.array, det)))
    classification = config.choices[0].classification(prompts)
    checked = 0
    for i, entry in enumerate(entries):
        image, det = seen[i]
        by_id = {r["id"]: r for r in entry["result"]}
        rectangles = [r for r in entry["result"] if r["type"] == "rectanglelabels"]
        assert len(rectangles) == len(det)
        for k, rect in enumerate(rectangles):  # regions come in the order of the detections
            if rect["value"]["rectanglelabels"] != ["Car"]:
                continue
            choice = next(r for r in entry["result"] if r["type"] == "choices" and r["id"] == rect["id"])
            alone = classifiers["clip"].classify([crop(image, det.xyxy[k])], classification)[0]
            assert list(choice["meta"]["scores"].values()) == pytest.approx(alone.tolist(), abs=1e-4)
            checked += 1
        assert len(by_id) <= len(entry["result"])
    assert checked >= 2


# --- task metadata in prompts -------------------------------------------------------------------------------------


def test_task_metadata_fills_the_classifier_prompts_per_task_with_one_model_version(http, serve, classifiers):
    server = serve(PromptsFile(labels=PRODUCT_PROMPTS))
    tasks = [{"id": 11, "data": {"image": "/data/upload/img0.png", "product_name": "Red Soda"}},
             {"id": 12, "data": {"image": "/data/upload/img0.png", "product_name": "blue glass"}}]
    results = predict(http, server, tasks, PRODUCT).json()["results"]
    texts = classifiers["clip"].cached_texts()
    assert "a photo of a red soda bottle" in texts and "a photo of a blue glass bottle" in texts
    first, second = (choices_of(r, "match")[0]["meta"]["scores"] for r in results)
    assert first["Listed"] != pytest.approx(second["Listed"], abs=1e-6), "same image, different prompt, different score"
    assert first["Other"] != second["Other"]
    assert results[0]["model_version"] == results[1]["model_version"]
    other = predict(http, server, [{"id": 13, "data": {"image": "/data/upload/img1.png", "product_name": "cup"}}], PRODUCT)
    assert other.json()["results"][0]["model_version"] == results[0]["model_version"], "hash of templates, not of text"
    for result in results:
        assert_valid(result, PRODUCT)


def test_task_metadata_fills_the_detector_prompts_per_task(base_pipeline, classifiers, ls_host, tmp_path):
    settings = make_settings(base_pipeline, tmp_path, label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    detector = CountingDetector(base_pipeline.detector)
    pipeline = Engine(detector, None, PromptsFile(**ALL_BOXES, labels={"Product": "{product_name}"}), settings)
    backend = LabelStudioBackend.for_batch(pipeline)
    config = parse_config('<View><Image name="i" value="$image"/><RectangleLabels name="b" toName="i">'
                          '<Label value="Product"/></RectangleLabels></View>')
    tasks = [{"id": 1, "data": {"image": "/data/upload/img0.png", "product_name": "Red Can"}},
             {"id": 2, "data": {"image": "/data/upload/img1.png", "product_name": "glass bottle"}},
             {"id": 3, "data": {"image": "/data/upload/img2.png", "product_name": "red can"}}]
    prompts = {}
    ontology = backend.ontology_for(config)
    entries = backend.infer(backend.load_tasks(tasks, config), config, ontology, "v",
                            on_image=lambda i, key, img, det: prompts.__setitem__(i, set(det.data["prompt"])))
    assert sorted(map(tuple, detector.calls)) == [("glass bottle",), ("red can",)], "one pass per distinct prompt set"
    assert prompts == {0: {"red can"}, 1: {"glass bottle"}, 2: {"red can"}}
    assert all(e["result"] for e in entries)
    assert ontology.fields == ["product_name"]


def test_a_task_without_the_prompt_field_fails_alone_with_the_task_and_field_named(http, serve):
    server = serve(PromptsFile(labels=PRODUCT_PROMPTS))
    tasks = [{"id": 21, "data": {"image": "/data/upload/img0.png", "product_name": "red soda"}},
             {"id": 22, "data": {"image": "/data/upload/img1.png", "title": "no product here"}},
             {"id": 23, "data": {"image": "/data/upload/img2.png", "product_name": ""}}]
    response = predict(http, server, tasks, PRODUCT)
    assert response.status_code == 200
    ok, missing, empty = response.json()["results"]
    assert choices_of(ok, "match")
    for entry, tid, how in ((missing, 22, "does not have"), (empty, 23, "has empty")):
        assert entry["task"] == tid and "result" not in entry
        message = entry["error"]["message"]
        assert entry["error"]["kind"] == "prompt_field"
        assert message.startswith(f"task {tid}:") and "'product_name'" in message and how in message
        assert "Listed" in message
    assert http.get(f"{server.url}/health").json()["status"] == "UP"
    again = predict(http, server, tasks[:1], PRODUCT).json()["results"][0]
    assert choices_of(again, "match"), "the server keeps serving"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("labels:\n  Cola: ['{product_name bottle']\n", "labels.Cola.prompts.*not a valid template"),
        ("labels:\n  Cola: ['{0} bottle']\n", "'{0}' is not a task data field name"),
        ("labels:\n  Cola: ['a {} bottle']\n", "name a task data field"),
        ("templates: ['a photo']\n", "templates.*exactly one '{}'"),
        ("labels:\n  Cola: {prompts: [cola], templates: ['{}{name!r}']}\n", "format spec or conversion"),
        ("tags: {labels: []}\n", "tags.labels"),
    ],
)
def test_bad_prompt_templates_are_named_when_the_prompts_file_loads(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PromptsError, match=problem) as err:
        PromptsFile.load(path)
    assert "bad.yaml" in str(err.value)


def test_prompts_files_in_the_repository_load():
    two_stage = PromptsFile.load(ROOT / "prompts" / "two_stage.yaml")
    classification = two_stage.classification(["Cola", "Pepsi", "Other"])
    assert classification.fields == ["product_name"] and two_stage.classifier
    assert len(classification.fill({"product_name": "fanta"}).texts()[2]) == 6
    with pytest.raises(PromptFieldError, match="product_name"):
        classification.texts()


# --- CVAT -------------------------------------------------------------------------------------------------------

TAGS = {"labels": ["Indoor", "Outdoor", "Night"], "multiple": False}


def test_cvat_detector_function_returns_tags_after_shapes(base_pipeline, classifiers, tmp_path):
    prompts = PromptsFile(**ALL_BOXES, tags=TAGS, labels={"Car": "car", "Indoor": ["room", "indoor scene"]})
    pipeline = Engine(base_pipeline.detector, None, prompts, Settings(model_dir=tmp_path), classifiers["clip"])
    function = DetectorFunction(pipeline)
    assert function.label_spec() == [{"id": 0, "name": "Car", "type": "rectangle"}, {"id": 1, "name": "Indoor", "type": "tag"},
                                     {"id": 2, "name": "Outdoor", "type": "tag"}, {"id": 3, "name": "Night", "type": "tag"}]
    image = make_image(160, 120, seed=3)
    out = function({"image": base64.b64encode(encode(image)).decode(), "threshold": 0.0})
    shapes = [s for s in out if s["type"] == "rectangle"]
    (tag,) = [s for s in out if s["type"] == "tag"]
    assert shapes and out[-1] == tag and "points" not in tag
    probs = classifiers["clip"].classify([np.array(image)], prompts.tag_classification())
    chosen = classifiers["clip"].decide(probs, prompts.tag_classification())
    assert tag["label"] == prompts.tag_classification().names[chosen[0][0]]
    assert float(tag["confidence"]) == pytest.approx(float(probs[0].max()), abs=1e-4)
    only = function({"image": base64.b64encode(encode(image)).decode(), "labels": ["indoor", "outdoor", "night"]})
    assert [s["type"] for s in only] == ["tag"], "only tags asked for: the detector does not run"


def test_cvat_tags_need_a_classifier(base_pipeline, tmp_path):
    pipeline = Engine(base_pipeline.detector, None, PromptsFile(tags=TAGS), Settings(model_dir=tmp_path))
    with pytest.raises(ConfigError, match="tags.*PRELABEL_CLASSIFIER"):
        DetectorFunction(pipeline)


def test_cvat_auto_annotation_returns_tags_cvat_accepts(tiny_models, tmp_path):
    clip = write_tiny_classifier(tmp_path / "clip")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("box_threshold: 0\ntext_threshold: 0\ntags: {labels: [Indoor, Outdoor, Night], multiple: true}\n"
                       "choice_threshold: 0\nlabels:\n  Car: car\n")
    function = PrelabelDetectionFunction(prompts=str(prompts), detector=str(tiny_models["detector"]),
                                         classifier=str(clip), device="cpu")
    assert [(label.name, label.type) for label in function.spec.labels] == [
        ("Car", "rectangle"), ("Indoor", "tag"), ("Outdoor", "tag"), ("Night", "tag")]

    class Context:
        frame_name, conf_threshold, conv_mask_to_poly = "frame_000001.png", 0.0, False

    out = function.detect(Context(), make_image(160, 120, seed=3))
    tags = [a for a in out if isinstance(a, models.LabeledImageRequest)]
    assert sorted(t.label_id for t in tags) == [1, 2, 3], "multi-label, threshold 0: every tag"
    ds_labels = [models.PatchedLabelRequest(name=n, id=100 + i, type=t, attributes=[], sublabels=[])
                 for i, (n, t) in enumerate([("Car", "rectangle"), ("Indoor", "tag"), ("Outdoor", "tag"), ("Night", "tag")])]
    mapper = _AnnotationMapper(logging.getLogger("test"), function.spec.labels, ds_labels,
                               allow_unmatched_labels=False, conv_mask_to_poly=False)
    remapped_tags, remapped_shapes = mapper.validate_and_remap(out, 4)
    assert sorted(t.label_id for t in remapped_tags) == [101, 102, 103] and remapped_shapes
    assert all(t.frame == 4 and t.source == "auto" for t in remapped_tags)


# --- two-stage with a second label set (`detect:` in the prompts file) -------------------------------------------

LABEL_SET = """<View><Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="Cola"/><Label value="Pepsi"/><Label value="Person"/></RectangleLabels>
</View>"""
LABEL_SET_PROMPTS = dict(
    **ALL_BOXES,
    labels={"Cola": {"prompts": ["red soda can"], "detect": ["bottle", "can"]},
            "Pepsi": {"prompts": ["blue soda can"], "detect": ["bottle", "can"], "templates": ["a {} on a shelf"]},
            "Person": ["person"]},
)


def test_two_stage_label_set_takes_each_box_label_from_the_classifier(base_pipeline, classifiers, ls_host, tmp_path):
    settings = make_settings(base_pipeline, tmp_path, label_studio_url=ls_host.url, label_studio_api_key=LEGACY_TOKEN)
    detector = CountingDetector(base_pipeline.detector)
    prompts = PromptsFile(**LABEL_SET_PROMPTS)
    pipeline = Engine(detector, None, prompts, settings, classifiers["clip"])
    backend = LabelStudioBackend.for_batch(pipeline)
    config = parse_config(LABEL_SET)
    ontology = backend.ontology_for(config)
    seen = {}
    before = classifiers["clip"].forward_calls["image"]
    entries = backend.infer(backend.load_tasks(upload_tasks(), config), config, ontology,
                            backend.version_for(config, ontology),
                            on_image=lambda i, key, img, det: seen.__setitem__(i, (img.array, det)))
    assert classifiers["clip"].forward_calls["image"] == before + 1, "every group box of the batch: one forward"
    assert "+clip-" in entries[0]["model_version"], "the classifier is part of the model version"
    assert detector.calls == [["person", "bottle", "can"]], "the detector looks for the group's prompts, once"
    _, _, groups = ontology.stages()
    ((members, classification),) = groups.values()
    assert [ontology.labels[m].name for m in members] == ["Cola", "Pepsi"]
    assert classification.texts() == (("a photo of a red soda can",), ("a blue soda can on a shelf",))
    grouped = 0
    for i, entry in enumerate(entries):
        assert_valid(entry, LABEL_SET)
        image, det = seen[i]
        labels = [r["value"]["rectanglelabels"][0] for r in entry["result"]]
        assert labels == list(det.data["class_name"])
        for k, prompt in enumerate(det.data["prompt"]):
            if prompt == "person":
                assert labels[k] == "Person" and det.data["class_probability"][k] == 1
                continue
            probs = classifiers["clip"].classify([crop(image, det.xyxy[k])], classification)[0]
            assert labels[k] == ["Cola", "Pepsi"][int(np.argmax(probs))]
            assert det.data["class_probability"][k] == pytest.approx(probs.max(), abs=1e-4)
            assert det.data["runner_up"][k] == pytest.approx(det.confidence[k] * probs.min() / probs.max(), rel=1e-3)
            grouped += 1
    assert grouped >= 2


def test_two_stage_label_set_needs_a_classifier_and_consistent_groups(base_pipeline, tmp_path):
    pipeline = Engine(base_pipeline.detector, None, PromptsFile(**LABEL_SET_PROMPTS), Settings(model_dir=tmp_path))
    with pytest.raises(ConfigError, match="two-stage labels \\(Cola, Pepsi\\).*PRELABEL_CLASSIFIER"):
        pipeline.detect([np.array(make_image(64, 48))], pipeline.ontology())
    overlapping = {"Cola": {"detect": ["bottle"]}, "Pepsi": {"detect": ["bottle", "can"]}}
    with pytest.raises(PromptsError, match="'bottle' is given for both labels 'Cola' and 'Pepsi'"):
        PromptsFile(labels=overlapping).ontology()
    same = PromptsFile(labels={"Cola": {"detect": ["bottle"]}, "Pepsi": {"detect": ["bottle"]}}).ontology()
    assert same.two_stage and same.digest() != PromptsFile(labels={"Cola": "bottle", "Pepsi": "can"}).ontology().digest()


# --- through a real Label Studio ---------------------------------------------------------------------------------


def test_label_studio_stores_choices_with_their_scores_and_region_links(label_studio, base_pipeline, classifiers,
                                                                      image_dir, tmp_path, http):
    pytest.importorskip("label_studio")
    from label_studio_sdk.client import LabelStudio

    # no LABEL_STUDIO_URL: the backend learns Label Studio's address and token from /setup
    settings = make_settings(base_pipeline, tmp_path)
    prompts = PromptsFile(**ALL_BOXES, labels={"Car": ["car"], "Person": ["person"]})
    server = RunningServer(create_app(Engine(base_pipeline.detector, None, prompts, settings, classifiers["clip"])))
    try:
        ls = LabelStudio(base_url=label_studio, api_key=LEGACY_TOKEN)
        project = ls.projects.create(title="two-stage", label_config=TWO_STAGE)
        # one form field per file: Label Studio reads `request.FILES.items()`, the last file of a repeated field only;
        # images where the tiny detector finds a Car (in img1 it sees only people)
        files = [(f"file{i}", (f"img{i}.png", (image_dir / f"img{i}.png").read_bytes())) for i in (0, 2)]
        headers = {"Authorization": f"Token {LEGACY_TOKEN}"}
        imported = http.post(f"{label_studio}/api/projects/{project.id}/import", files=files, headers=headers)
        assert imported.status_code == 201 and imported.json()["task_count"] == 2, imported.text
        ls.ml.create(url=server.url, project=project.id, is_interactive=False, title="prelabel")
        response = http.post(f"{label_studio}/api/dm/actions", headers=headers,
                             params={"id": "retrieve_tasks_predictions", "project": project.id},
                             json={"selectedItems": {"all": True, "excluded": []}})
        assert response.status_code == 200, response.text
        tasks = sorted(t.id for t in ls.tasks.list(project=project.id))
        assert len(tasks) == 2
        for task_id in tasks:
            (prediction,) = ls.predictions.list(task=task_id)
            assert "+clip-" in prediction.model_version
            result = prediction.result
            assert_valid({"result": result}, TWO_STAGE)
            cars = {r["id"] for r in result if r["type"] == "rectanglelabels" and r["value"]["rectanglelabels"] == ["Car"]}
            colours = [r for r in result if r["from_name"] == "colour"]
            assert cars and {r["id"] for r in colours} == cars, "stored per-region choices keep their region's id"
            assert all(set(r["meta"]["scores"]) == {"Red", "Blue", "White"} for r in colours), "Label Studio keeps meta"
            (scene,) = [r for r in result if r["from_name"] == "scene"]
            assert scene["value"]["choices"][0] in {"Street", "Shop"} and set(scene["meta"]["scores"]) == {"Street", "Shop"}
    finally:
        server.stop()
