"""The prediction engine's own contract, without any adapter: one result per item, template filling from each
item's fields, grouping, per-item isolation of model failures, masks on demand, classifications and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml_backend.active import task_score
from ml_backend.engine import ClassifyRequest, Engine, RequestSpec
from ml_backend.errors import ConfigError, InferenceError
from ml_backend.media import Frame, MediaItem
from ml_backend.models.classifier import build_classifier
from ml_backend.models.tiny import write_tiny_classifier
from ml_backend.ontology import PromptFieldError, PromptsFile
from ml_backend.settings import Settings
from ml_backend.types import CLASS_NAME, RUNNER_UP

from .conftest import make_image

ALL = dict(box_threshold=0.0, text_threshold=0.0)


class CountingDetector:
    """The real tiny detector, recording each call's image widths and prompts; raises on an image `bad_width`
    pixels wide (as a model does on an input it cannot take)."""

    def __init__(self, inner, bad_width: int | None = None):
        self.inner, self.model_id, self.bad_width, self.calls = inner, inner.model_id, bad_width, []

    def detect(self, images, ontology):
        self.calls.append(([im.shape[1] for im in images], [p for p, _ in ontology.prompts]))
        if any(im.shape[1] == self.bad_width for im in images):
            raise RuntimeError(f"cannot take a {self.bad_width} px wide image")
        return self.inner.detect(images, ontology)


def item(width: int, height: int, seed: int = 0, **fields) -> MediaItem:
    return MediaItem(np.array(make_image(width, height, seed)), f"img-{width}x{height}", fields or None)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-clip")
    return build_classifier(str(write_tiny_classifier(root / "clip")), root, torch.device("cpu"))


def engine_with(base_pipeline, tmp_path, labels, classifier=None, bad_width=None, segmenter=True) -> Engine:
    detector = CountingDetector(base_pipeline.detector, bad_width)
    return Engine(detector, base_pipeline.segmenter if segmenter else None, PromptsFile(**ALL, labels=labels),
                  Settings(model_dir=tmp_path), classifier)


def test_one_result_per_item_in_order_with_the_detectors_own_detections(base_pipeline, tmp_path):
    engine = engine_with(base_pipeline, tmp_path, {"Car": ["car", "truck"], "Person": "person"})
    items = [item(160, 90, 0), item(120, 200, 1), item(160, 90, 2)]
    ontology = engine.ontology()
    results = engine.run(items, RequestSpec(ontology))
    assert len(results) == 3 and all(r.error is None for r in results)
    alone = [base_pipeline.detector.detect([it.array], ontology)[0] for it in items]
    for result, own in zip(results, alone):
        np.testing.assert_allclose(result.detections.xyxy, own.xyxy, atol=1e-3)
        assert list(result.detections.data[CLASS_NAME]) == list(own.data[CLASS_NAME])
        assert result.score == task_score(own, ontology) and result.uncertainty == pytest.approx(1 - result.score)
        assert result.detections.mask is None, "no masks unless asked"
    assert sorted(len(widths) for widths, _ in engine.detector.calls) == [3], "one batched call for the batch"


def test_prompt_templates_are_filled_from_each_items_fields_and_grouped(base_pipeline, tmp_path):
    engine = engine_with(base_pipeline, tmp_path, {"Product": "{brand} bottle"})
    items = [item(160, 90, 0, brand="cola"), item(120, 200, 1, brand="pepsi"), item(150, 90, 2, brand="cola"),
             item(100, 70, 3)]
    results = engine.run(items, RequestSpec(engine.ontology()))
    assert [r.error is None for r in results] == [True, True, True, False]
    assert isinstance(results[3].error, PromptFieldError) and "'brand'" in str(results[3].error)
    prompts = sorted(tuple(p) for _, p in engine.detector.calls)
    assert prompts == [("cola bottle",), ("pepsi bottle",)], "one detector call per filled ontology"
    assert [r.ontology.labels[0].prompts for r in results[:3]] == [("cola bottle",), ("pepsi bottle",), ("cola bottle",)]


def test_a_model_failure_fails_only_the_item_that_causes_it(base_pipeline, tmp_path):
    engine = engine_with(base_pipeline, tmp_path, {"Car": "car"}, bad_width=77)
    items = [item(160, 90, 0), item(77, 60, 1), item(120, 80, 2)]
    results = engine.run(items, RequestSpec(engine.ontology()))
    assert results[0].error is None and results[2].error is None
    assert isinstance(results[1].error, InferenceError)
    assert "img-77x60" in str(results[1].error) and "RuntimeError: cannot take a 77 px wide image" in str(results[1].error)
    assert len(results[0].detections) and len(results[2].detections)


def test_user_mistakes_fail_the_whole_request(base_pipeline, tmp_path):
    engine = engine_with(base_pipeline, tmp_path, {"Car": "car"}, segmenter=False)
    with pytest.raises(ConfigError, match="without a segmenter"):
        engine.run([item(160, 90)], RequestSpec(engine.ontology(), masks=True))
    with pytest.raises(ConfigError, match="PRELABEL_CLASSIFIER"):
        engine.run([item(160, 90)], RequestSpec(None, (ClassifyRequest("scene", PromptsFile().classification(["a", "b"])),)))


def test_masks_come_full_size_for_all_or_only_where_a_mask_label_was_found(base_pipeline, tmp_path):
    engine = engine_with(base_pipeline, tmp_path, {"Car": "car", "Person": "person"})
    items = [item(160, 90, 0), item(120, 200, 1)]
    every = engine.run(items, RequestSpec(engine.ontology(), masks=True))
    for it, r in zip(items, every):
        assert r.detections.mask.shape == (len(r.detections), it.height, it.width) and r.detections.mask.dtype == bool
    found = [set(r.detections.data[CLASS_NAME]) for r in every]
    label = next(iter(found[0]))
    only = engine.run(items, RequestSpec(engine.ontology(), masks=frozenset({label})))
    for r, names in zip(only, found):
        assert (r.detections.mask is not None) == (label in names)
    nothing = engine.run(items, RequestSpec(engine.ontology(), masks=frozenset({"no such label"})))
    assert all(r.detections.mask is None for r in nothing)


def test_classifications_of_whole_images_and_of_regions_share_one_classifier_batch(base_pipeline, tmp_path, clip):
    engine = engine_with(base_pipeline, tmp_path, {"Car": "car", "Person": "person"}, classifier=clip)
    scene = ClassifyRequest("scene", PromptsFile().classification(["street", "shop"]))
    items = [item(160, 90, 0), item(120, 200, 1)]
    plain = engine.run(items, RequestSpec(engine.ontology()))
    label = str(plain[0].detections.data[CLASS_NAME][0])
    colour = ClassifyRequest("colour", PromptsFile().classification(["red", "blue"]), frozenset({label}))
    before = clip.forward_calls["image"]
    results = engine.run(items, RequestSpec(engine.ontology(), (scene, colour)))
    assert clip.forward_calls["image"] == before + 1, "every image and crop of the batch in one forward"
    for it, r in zip(items, results):
        whole, regions = r.classes
        assert whole.request is scene and whole.probs.shape == (1, 2) and whole.probs.sum() == pytest.approx(1, abs=1e-5)
        expected = clip.classify([it.array], scene.classification)
        np.testing.assert_allclose(whole.probs, expected, atol=1e-5)
        rows = [k for k, n in enumerate(r.detections.data[CLASS_NAME]) if n == label]
        if rows:
            assert regions.probs.shape == (len(r.detections), 2)
            assert all(regions.probs[k].sum() == pytest.approx(1, abs=1e-5) for k in rows)
            assert all(not regions.probs[k].any() and regions.chosen[k] == [] for k in range(len(r.detections)) if k not in rows)
        scores = [c.confidence for c in r.classes if c.probs.size] + [task_score(r.detections, r.ontology)]
        assert r.score == min(scores)


def test_two_stage_labels_take_their_class_from_the_classifier(base_pipeline, tmp_path, clip):
    labels = {"Cola": {"prompts": ["red can"], "detect": ["bottle", "can"]},
              "Pepsi": {"prompts": ["blue can"], "detect": ["bottle", "can"]}}
    engine = engine_with(base_pipeline, tmp_path, labels, classifier=clip)
    (result,) = engine.run([item(160, 90)], RequestSpec(engine.ontology()))
    assert len(result.detections) and set(result.detections.data[CLASS_NAME]) <= {"Cola", "Pepsi"}
    assert RUNNER_UP in result.detections.data
    assert engine.detector.calls[-1][1] == ["bottle", "can"], "the detector looks for the group's prompts"


def test_a_frame_of_a_video_is_predicted_like_an_image(base_pipeline, tmp_path):
    engine = engine_with(base_pipeline, tmp_path, {"Car": "car"})
    image = item(160, 90)
    frame = MediaItem(image.array, "clip.mp4", frame=Frame(index=12, timestamp=0.48))
    as_image, as_frame = engine.run([image, frame], RequestSpec(engine.ontology()))
    np.testing.assert_allclose(as_frame.detections.xyxy, as_image.detections.xyxy, atol=1e-3)
    assert frame.frame.index == 12 and as_frame.score == pytest.approx(as_image.score, abs=1e-5)


def test_an_empty_batch_and_an_empty_ontology_are_answered_without_the_model(base_pipeline, tmp_path):
    engine = engine_with(base_pipeline, tmp_path, {})
    assert engine.run([], RequestSpec(engine.ontology())) == []
    (result,) = engine.run([item(160, 90)], RequestSpec(engine.ontology()))
    assert result.error is None and len(result.detections) == 0 and result.score == 1.0
    assert engine.detector.calls == []
