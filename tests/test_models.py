"""Model registry, tiny models, batching, synonyms and the SAM embedding cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from ml_backend.errors import ModelUnavailableError
from ml_backend.models import build_detector, build_segmenter
from ml_backend.models.registry import tiny_kinds
from ml_backend.models.sam import EmbeddingCache
from ml_backend.ontology import PromptsFile

from .conftest import free_port, make_image


def images():
    return [np.array(make_image(w, h, i)) for i, (w, h) in enumerate([(160, 90), (120, 200), (300, 240)])]


@pytest.mark.slow  # writes and loads every tiny kind in a process of its own (SAM 3's too): ~8 s
def test_tiny_models_cli_writes_loadable_models_offline(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "ml_backend.cli", "dev", "tiny-models", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    detector = build_detector(str(tmp_path / "detector"), tmp_path, torch.device("cpu"))
    segmenter = build_segmenter(str(tmp_path / "segmenter"), tmp_path, torch.device("cpu"))
    assert (tmp_path / "detector" / "tokenizer.json").exists()
    assert detector.detect(images()[:1], PromptsFile().ontology(["car"]))[0].xyxy.shape[1] == 4
    assert segmenter.segment(images()[0], boxes=np.array([[0, 0, 50, 50]]))[0].shape == (1, 90, 160)
    for kind in tiny_kinds():  # and one of every registered kind, as its family loads it
        assert (tmp_path / kind).is_dir() and f"{kind}: " in done.stdout, kind


def test_mm_grounding_dino_loads_and_detects(tmp_path):
    from ml_backend.models.tiny import write_tiny_detector

    path = write_tiny_detector(tmp_path / "mm", family="mm-grounding-dino")
    detector = build_detector(str(path), tmp_path, torch.device("cpu"))
    assert type(detector.model).__name__ == "MMGroundingDinoForObjectDetection"
    # randomly initialised MM-Grounding-DINO scores near its 0.01 prior: accept every box
    (det,) = detector.detect(images()[:1], PromptsFile(box_threshold=0, text_threshold=0).ontology(["car"]))
    assert len(det) and set(det.data["class_name"]) == {"car"}


def test_uncached_hub_model_fails_at_once_naming_model_and_model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        build_detector("IDEA-Research/grounding-dino-tiny", tmp_path / "models", torch.device("cpu"))
    assert time.monotonic() - start < 30, "fails at once (a hub lookup would hang for minutes)"
    message = str(err.value)
    assert "'IDEA-Research/grounding-dino-tiny'" in message and "HF_HUB_OFFLINE" in message
    assert str(tmp_path / "models" / "grounding-dino-tiny") in message and "\n" not in message


def test_unreachable_hub_fails_fast_without_offline_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        build_segmenter("facebook/sam-vit-base", tmp_path, torch.device("cpu"))
    assert time.monotonic() - start < 30, "fails at once (a hub lookup would hang for minutes)"


def test_models_are_found_under_model_dir_by_name(tiny_models, tmp_path):
    (tmp_path / "grounding-dino-tiny").symlink_to(tiny_models["detector"])
    detector = build_detector("IDEA-Research/grounding-dino-tiny", tmp_path, torch.device("cpu"))
    assert detector.model_id == "IDEA-Research/grounding-dino-tiny"


def test_missing_local_path_and_wrong_model_family_are_named(tiny_models, tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        build_detector("./no/such/dir", tmp_path, torch.device("cpu"))
    with pytest.raises(ModelUnavailableError, match="is a 'sam' model"):
        build_detector(str(tiny_models["segmenter"]), tmp_path, torch.device("cpu"))


def test_batched_detection_equals_one_image_at_a_time(base_pipeline):
    ontology = PromptsFile(labels={"Car": ["car", "truck"], "Person": ["person"]}).ontology()
    detector = base_pipeline.detector
    mixed = images() + [np.array(make_image(160, 90, seed)) for seed in (5, 6, 7, 8, 9)]
    batched = detector.detect(mixed, ontology)
    for image, together in zip(mixed, batched):
        (alone,) = detector.detect([image], ontology)
        assert np.allclose(alone.xyxy, together.xyxy, atol=1e-3)
        assert list(alone.data["class_name"]) == list(together.data["class_name"])
        assert np.allclose(alone.confidence, together.confidence, atol=1e-4)


def test_boxes_are_absolute_pixels_inside_each_image(base_pipeline):
    ontology = PromptsFile().ontology(["car"])
    for image, det in zip(images(), base_pipeline.detector.detect(images(), ontology)):
        h, w = image.shape[:2]
        assert len(det) and (det.xyxy >= 0).all()
        assert (det.xyxy[:, [0, 2]] <= w).all() and (det.xyxy[:, [1, 3]] <= h).all()


def test_synonyms_do_not_duplicate_boxes(base_pipeline):
    """Many synonyms overflow the tiny model's 32-token text, so they run as separate captions whose queries
    land on the same places; class-aware NMS must merge them."""
    synonyms = ["car", "truck", "bus", "van", "red car", "blue car", "small car", "big truck", "white car", "black car",
                "green car", "small truck", "big bus", "white van", "black van", "red truck"]
    merged = PromptsFile(labels={"Car": synonyms}, nms_iou=0.5).ontology()
    unmerged = PromptsFile(labels={"Car": synonyms}, nms_iou=1.0).ontology()
    detector = base_pipeline.detector
    assert len(detector.captions(synonyms)) > 1
    image = images()[2]
    (raw,) = detector.detect([image], unmerged)
    (det,) = detector.detect([image], merged)
    iou = box_iou(torch.tensor(raw.xyxy), torch.tensor(raw.xyxy)).fill_diagonal_(0)
    assert (iou > 0.5).any(), "the test needs overlapping synonym boxes to be meaningful"
    iou = box_iou(torch.tensor(det.xyxy), torch.tensor(det.xyxy)).fill_diagonal_(0)
    assert not (iou > 0.5).any()
    assert 0 < len(det) < len(raw)


def test_boxes_of_different_labels_are_not_merged_with_each_other(base_pipeline):
    ontology = PromptsFile(labels={"Car": ["car"], "Person": ["person"]}, nms_iou=0.5).ontology()
    (det,) = base_pipeline.detector.detect([images()[2]], ontology)
    assert set(det.class_id) <= {0, 1}
    for label in set(det.class_id):
        same = torch.tensor(det.xyxy[det.class_id == label])
        assert not (box_iou(same, same).fill_diagonal_(0) > 0.5).any()


def test_per_label_threshold_and_detection_cap(base_pipeline):
    image = images()[2]
    strict = PromptsFile(labels={"Car": {"prompts": ["car"], "threshold": 1.0}}).ontology()
    assert len(base_pipeline.detector.detect([image], strict)[0]) == 0
    capped = PromptsFile(labels={"Car": ["car"]}, max_detections=2).ontology()
    assert len(base_pipeline.detector.detect([image], capped)[0]) == 2


def test_masks_are_full_size_booleans_one_per_box(base_pipeline):
    image = images()[1]
    masks, scores = base_pipeline.segmenter.segment(image, boxes=np.array([[0, 0, 60, 60], [10, 20, 100, 150]]))
    assert masks.shape == (2, 200, 120) and masks.dtype == bool and scores.shape == (2,)


def test_embedding_cache_is_keyed_by_content_and_evicts_least_recently_used():
    cache = EmbeddingCache(size=2)
    calls = []
    for key in ["a", "b", "a", "c", "b"]:
        cache.get_or_compute(key, lambda key=key: calls.append(key) or key)
    assert calls == ["a", "b", "c", "b"]
    assert cache.info() == {"size": 2, "capacity": 2, "hits": 1, "misses": 4}


def test_same_pixels_hit_the_cache_and_different_pixels_miss(base_pipeline):
    segmenter = base_pipeline.segmenter
    image = np.array(make_image(70, 50, 11))
    before = segmenter.cache_info()
    segmenter.segment(image, points=np.array([[10, 10]]), point_labels=np.array([1]))
    segmenter.segment(image.copy(), boxes=np.array([[5, 5, 30, 30]]))
    changed = image.copy()
    changed[0, 0] ^= 1
    segmenter.segment(changed, points=np.array([[10, 10]]))
    after = segmenter.cache_info()
    assert after["misses"] - before["misses"] == 2 and after["hits"] - before["hits"] == 1


def test_head_by_head_global_attention_matches_transformers_sam(tiny_models):
    from transformers import SamModel

    from ml_backend.models.sam import lean_global_attention

    reference = SamModel.from_pretrained(tiny_models["segmenter"]).eval()
    lean = lean_global_attention(SamModel.from_pretrained(tiny_models["segmenter"]).eval())
    assert any(type(layer.attn).__name__ == "HeadByHeadGlobalAttention" for layer in lean.vision_encoder.layers)
    size = reference.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        assert torch.allclose(reference.get_image_embeddings(pixels), lean.get_image_embeddings(pixels), atol=1e-5)


def test_query_chunked_deformable_attention_matches_transformers(tiny_models):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from ml_backend.models.grounding_dino import chunk_deformable_attention

    reference = AutoModelForZeroShotObjectDetection.from_pretrained(tiny_models["detector"]).eval()
    chunked = chunk_deformable_attention(AutoModelForZeroShotObjectDetection.from_pretrained(tiny_models["detector"]).eval(), chunk=7)
    processor = AutoProcessor.from_pretrained(tiny_models["detector"])
    inputs = processor(images=images()[:2], text=["car . person ."] * 2, return_tensors="pt")
    with torch.inference_mode():
        a, b = reference(**inputs), chunked(**inputs)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.pred_boxes, b.pred_boxes, atol=1e-6)


def test_a_pipeline_known_by_model_ids_only_versions_like_the_loaded_one(base_pipeline):
    from ml_backend.engine import Engine

    ids_only = Engine.from_settings(base_pipeline.settings, load=False)
    assert ids_only.detector.model_id == base_pipeline.detector.model_id
    assert ids_only.segmenter.model_id == base_pipeline.segmenter.model_id
    ontology = base_pipeline.ontology(["Car", "Person"])
    assert ids_only.model_version(ontology) == base_pipeline.model_version(ontology)
    with pytest.raises(RuntimeError, match="not loaded in this process"):
        ids_only.detect([np.zeros((8, 8, 3), np.uint8)], ontology)


# -- every tiny kind takes any image shape -------------------------------------------------------------------------
SHAPES = {"square": (300, 300), "tall-thin": (1000, 20), "1-px-high": (1, 200), "1-px-wide": (200, 1)}  # (h, w)


@pytest.fixture(scope="module")
def tiny_kind_models(tmp_path_factory, tiny_models):
    """Every tiny kind built for its roles, once, plus the default tiny detector (for SAM's boxes)."""
    from ml_backend.models import build_embedder, build_tracker
    from ml_backend.models.classifier import build_classifier
    from ml_backend.models.registry import CLASSIFIER, DETECTOR, EMBEDDER, SEGMENTER, TRACKER
    from ml_backend.models.tiny import write_tiny_kinds, write_tiny_sam3

    cpu, root = torch.device("cpu"), tmp_path_factory.mktemp("any-shape")
    refs = write_tiny_kinds(root)
    wide_sam3 = str(write_tiny_sam3(root / "sam3-wide", width=128))  # the tiny SAM 3 is too narrow for video memory
    builders = {DETECTOR: build_detector, SEGMENTER: build_segmenter, CLASSIFIER: build_classifier,
                EMBEDDER: lambda ref, model_dir, device: build_embedder(ref, model_dir, device),
                TRACKER: lambda ref, model_dir, device: build_tracker(wide_sam3 if ref == refs.get("sam3") else ref,
                                                                      model_dir, device)}
    built = {kind: {role: builders[role](refs[kind], root, cpu) for role in family.roles}
             for kind, (family, _) in tiny_kinds().items()}
    return built, build_detector(str(tiny_models["detector"]), root, cpu)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", sorted(tiny_kinds()))
def test_every_tiny_kind_takes_square_thin_and_one_pixel_images_through_the_engine(kind, shape, tiny_kind_models, tmp_path):
    from ml_backend.engine import ClassifyRequest, Engine, RequestSpec
    from ml_backend.media import MediaItem
    from ml_backend.settings import Settings

    built, default_detector = tiny_kind_models
    roles = built[kind]
    prompts = PromptsFile(labels={"Car": ["car", "truck"], "Person": "person"}, box_threshold=0.0, text_threshold=0.0)
    engine = Engine(roles.get("detector", default_detector), roles.get("segmenter"), prompts, Settings(model_dir=tmp_path),
                    roles.get("classifier"))
    h, w = SHAPES[shape]
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    classify = (ClassifyRequest("scene", prompts.classification(["street", "shop"])),) if "classifier" in roles else ()
    spec = RequestSpec(engine.ontology(), classify, masks="segmenter" in roles)
    (result,) = engine.run([MediaItem(image, f"{shape}.png")], spec)
    assert result.error is None, result.error
    if "segmenter" in roles:
        assert len(result.detections) and result.detections.mask.shape == (len(result.detections), h, w)
    if classify:
        assert result.classes[0].probs.shape == (1, 2)
    if "embedder" in roles:  # review embeddings: the image and a box covering it
        whole, boxes = roles["embedder"].embed(image, np.array([[0, 0, w, h]], np.float32))
        assert np.isfinite(whole).all() and boxes.shape[0] == 1 and np.isfinite(boxes).all()
    if "tracker" in roles:  # a video of such frames: an object given by a box covering the frame, followed
        session = roles["tracker"].start()
        for new in ({1: [0, 0, w, h]}, None):
            (answer,) = session.step(image, new).values()
            box, score = answer
            assert 0 <= score <= 1 and (box is None or (0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h))
