"""Image batch + ontology -> Detections (masks on demand), zero-shot classification of images and of region crops
(two-stage), and interactive SAM prompts -> one mask."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import supervision as sv

from .errors import ConfigError
from .models import Detector, Segmenter, UnloadedModel, build_detector, build_segmenter, model_id, pick_device
from .models.base import Classifier
from .ontology import Classification, Ontology, PromptsFile
from .settings import Settings
from .types import make_detections

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _short(model_id: str) -> str:
    name = Path(model_id.rstrip("/")).name if model_id else "none"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def model_refs(settings: Settings, prompts: PromptsFile) -> tuple[str, str | None]:
    """(detector, segmenter or None): flags/env first, then the prompts file's `detector`/`segmenter`, then defaults."""
    fields = settings.model_fields_set
    detector = settings.detector if "detector" in fields or not prompts.detector else prompts.detector
    segmenter = settings.segmenter if "segmenter" in fields or not prompts.segmenter else prompts.segmenter
    return detector, segmenter or None


def classifier_ref(settings: Settings, prompts: PromptsFile) -> str | None:
    """The classifier: flag/env (PRELABEL_CLASSIFIER, "" or "none" for none) first, then the prompts file's."""
    ref = settings.classifier if "classifier" in settings.model_fields_set else (prompts.classifier or settings.classifier)
    return None if not ref or ref.lower() == "none" else ref


def crop(image: np.ndarray, xyxy) -> np.ndarray:
    """The pixels inside an xyxy box (at least one pixel, clamped to the image)."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    x1, y1 = min(max(0, int(np.floor(x1))), w - 1), min(max(0, int(np.floor(y1))), h - 1)
    x2, y2 = max(x1 + 1, min(w, int(np.ceil(x2)))), max(y1 + 1, min(h, int(np.ceil(y2))))
    return image[y1:y2, x1:x2]


class Pipeline:
    def __init__(
        self,
        detector: Detector,
        segmenter: Segmenter | None,
        prompts: PromptsFile,
        settings: Settings,
        classifier: Classifier | None = None,
    ):
        self.detector = detector
        self.segmenter = segmenter
        self.prompts = prompts
        self.settings = settings
        self.classifier = classifier

    @classmethod
    def from_settings(cls, settings: Settings, load: bool = True) -> Pipeline:
        """Load models once (see `model_refs` for which). `load=False`: models known by id only (`UnloadedModel`),
        for a process that computes model versions while others run the models (the Ray driver)."""
        prompts = PromptsFile.load(settings.prompts)
        detector_ref, segmenter_ref = model_refs(settings, prompts)
        if not load:
            ids = [model_id(r, settings.model_dir) if r else None
                   for r in (detector_ref, segmenter_ref, classifier_ref(settings, prompts))]
            det, seg, clf = (UnloadedModel(i) if i else None for i in ids)
            return cls(det, seg, prompts, settings, clf)
        device = pick_device(settings.device)
        detector = build_detector(detector_ref, settings.model_dir, device, settings.batch_size)
        segmenter = (
            build_segmenter(segmenter_ref, settings.model_dir, device, settings.embedding_cache_size)
            if segmenter_ref
            else None
        )
        classifier = None
        if ref := classifier_ref(settings, prompts):
            from .models.classifier import build_classifier

            classifier = build_classifier(ref, settings.model_dir, device, settings.classifier_batch_size)
        return cls(detector, segmenter, prompts, settings, classifier)

    @property
    def base_version(self) -> str:
        seg = _short(self.segmenter.model_id) if self.segmenter else "nosam"
        return f"{_short(self.detector.model_id)}+{seg}"

    def model_version(self, ontology: Ontology, classifications: list[Classification] | tuple = ()) -> str:
        """Changes whenever a model or a resolved prompt/template/threshold changes. With classifications (Choices,
        tags) the classifier's id and their digests join in; the text filled from task data never does."""
        if not classifications and not ontology.two_stage:
            return f"{self.base_version}-{ontology.digest()}"
        clf = _short(self.classifier.model_id) if self.classifier else "noclassifier"
        digest = hashlib.sha256(" ".join([ontology.digest(), *(c.digest() for c in classifications)]).encode())
        return f"{self.base_version}+{clf}-{digest.hexdigest()[:10]}"

    def ontology(self, labels: list[str] | None = None, predicted_values: dict | None = None) -> Ontology:
        return self.prompts.ontology(labels, predicted_values, self.settings.max_detections)

    def detect(self, images: list[np.ndarray], ontology: Ontology, masks: bool = False) -> list[sv.Detections]:
        """Detections per image, labelled with `ontology`'s labels. Two-stage labels (`detect:` in the prompts
        file) are found by their group's detector prompts, then every such box of every image is classified in one
        classifier batch among its group's labels."""
        if ontology.two_stage:
            results = self._two_stage(images, ontology)
        else:
            results = self.detector.detect(images, ontology)
        if masks:
            for image, detections in zip(images, results):
                self.add_masks(image, detections)
        return results

    def require_classifier(self, what: str = "classification") -> Classifier:
        if self.classifier is None:
            raise ConfigError(
                f"{what} needs a zero-shot classifier, but the server runs without one: set PRELABEL_CLASSIFIER "
                f"(or --classifier, or `classifier:` in the prompts file) to a CLIP/SigLIP model"
            )
        return self.classifier

    def embed_crops(self, images: list[np.ndarray], boxes: list[np.ndarray | None]) -> torch.Tensor:
        """Classifier embeddings of every crop: `boxes[i]` (M,4 xyxy) of `images[i]`, or the whole image where
        `boxes[i]` is None; all of them in one classifier batch (one forward per `classifier_batch_size` crops)."""
        crops = [
            image if b is None else crop(image, xyxy)
            for image, b in zip(images, boxes)
            for xyxy in ([None] if b is None else b)
        ]
        return self.require_classifier().embed_images(crops)

    def classify(self, images: list[np.ndarray], classification: Classification) -> tuple[np.ndarray, list[list[int]]]:
        """Whole images -> ((N, C) probabilities, chosen choice indices per image)."""
        classifier = self.require_classifier()
        probs = classifier.probabilities(self.embed_crops(images, [None] * len(images)), classification)
        return probs, classifier.decide(probs, classification)

    def classify_regions(
        self, image: np.ndarray, detections: sv.Detections, classification: Classification
    ) -> tuple[np.ndarray, list[list[int]]]:
        """Each detection's box crop -> ((M, C) probabilities, chosen choice indices per box), in one batch."""
        classifier = self.require_classifier()
        probs = classifier.probabilities(self.embed_crops([image], [detections.xyxy]), classification)
        return probs, classifier.decide(probs, classification)

    def _two_stage(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        """Stage one: the detector on one-stage labels and group prompts. Stage two: each group box's crop gets the
        best of its group's labels; `confidence` stays the box score (the thresholds apply to it), `runner_up` is
        that score times the second-best label's probability over the chosen one's (`active.py` reads it as label
        confusion), `class_probability` the chosen label's probability."""
        classifier = self.require_classifier(f"two-stage labels ({', '.join(s.name for s in ontology.labels if s.detect)})")
        stage1, index, groups = ontology.stages()
        found = self.detector.detect(images, stage1)
        rows = [np.flatnonzero(np.isin(det.class_id, list(groups))) for det in found]
        embeddings = self.embed_crops([im for im, r in zip(images, rows) if len(r)],
                                      [det.xyxy[r] for det, r in zip(found, rows) if len(r)])
        out, start = [], 0
        for det, picked in zip(found, rows):
            class_id = np.array([index[c] for c in det.class_id], int)
            confidence = det.confidence.astype(np.float32)
            runner_up = np.asarray(det.data.get("runner_up", np.zeros(len(det))), np.float32).copy()
            probability = np.ones(len(det), np.float32)
            emb = embeddings[start : start + len(picked)]
            start += len(picked)
            for g, (members, classification) in groups.items():
                mine = det.class_id[picked] == g
                if not mine.any():
                    continue
                probs = classifier.probabilities(emb[mine], classification)
                order = np.argsort(-probs, axis=1)
                best = probs[np.arange(len(probs)), order[:, 0]]
                second = probs[np.arange(len(probs)), order[:, 1]] if probs.shape[1] > 1 else np.zeros(len(probs))
                at = picked[mine]
                class_id[at] = [members[j] for j in order[:, 0]]
                probability[at] = best
                runner_up[at] = confidence[at] * second / np.maximum(best, 1e-6)
            names = np.array([ontology.labels[c].name for c in class_id], dtype=object)
            data = {k: v for k, v in det.data.items() if k != "class_name"}
            data |= {"runner_up": runner_up, "class_probability": probability}
            result = make_detections(det.xyxy, confidence, class_id, names, **data)
            result.metadata = dict(det.metadata)
            out.append(result)
        return out

    def add_masks(self, image: np.ndarray, detections: sv.Detections) -> None:
        segmenter = self.require_segmenter()
        if len(detections):
            detections.mask = segmenter.segment(image, boxes=detections.xyxy)[0]
        else:
            detections.mask = np.zeros((0, *image.shape[:2]), bool)

    def segment_interactive(
        self, image: np.ndarray, points: np.ndarray | None, point_labels: np.ndarray | None, box: np.ndarray | None
    ) -> tuple[np.ndarray, float]:
        return segment_interactive(self.require_segmenter(), image, points, point_labels, box)

    def require_segmenter(self) -> Segmenter:
        if self.segmenter is None:
            raise ConfigError("masks were asked for, but the server runs without a segmenter (--segmenter)")
        return self.segmenter


def segment_interactive(
    segmenter: Segmenter,
    image: np.ndarray,
    points: np.ndarray | None,
    point_labels: np.ndarray | None,
    box: np.ndarray | None,
) -> tuple[np.ndarray, float]:
    """Clicks (1 positive, 0 negative) and/or one xyxy box -> one full-size boolean mask and its score."""
    masks, scores = segmenter.segment(
        image, boxes=None if box is None else np.asarray(box)[None], points=points, point_labels=point_labels
    )
    return masks[0], float(np.clip(scores[0], 0, 1))  # SAM's predicted IoU can stray just outside [0, 1]
