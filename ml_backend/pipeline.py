"""Image batch + ontology -> Detections (masks on demand), and interactive SAM prompts -> one mask."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import supervision as sv

from .errors import ConfigError
from .models import Detector, Segmenter, build_detector, build_segmenter, pick_device
from .ontology import Ontology, PromptsFile
from .settings import Settings

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


class Pipeline:
    def __init__(self, detector: Detector, segmenter: Segmenter | None, prompts: PromptsFile, settings: Settings):
        self.detector = detector
        self.segmenter = segmenter
        self.prompts = prompts
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings) -> Pipeline:
        """Load models once (see `model_refs` for which)."""
        prompts = PromptsFile.load(settings.prompts)
        detector_ref, segmenter_ref = model_refs(settings, prompts)
        device = pick_device(settings.device)
        detector = build_detector(detector_ref, settings.model_dir, device, settings.batch_size)
        segmenter = (
            build_segmenter(segmenter_ref, settings.model_dir, device, settings.embedding_cache_size)
            if segmenter_ref
            else None
        )
        return cls(detector, segmenter, prompts, settings)

    @property
    def base_version(self) -> str:
        seg = _short(self.segmenter.model_id) if self.segmenter else "nosam"
        return f"{_short(self.detector.model_id)}+{seg}"

    def model_version(self, ontology: Ontology) -> str:
        """Changes whenever a model or a resolved prompt/threshold changes."""
        return f"{self.base_version}-{ontology.digest()}"

    def ontology(self, labels: list[str] | None = None, predicted_values: dict | None = None) -> Ontology:
        return self.prompts.ontology(labels, predicted_values, self.settings.max_detections)

    def detect(self, images: list[np.ndarray], ontology: Ontology, masks: bool = False) -> list[sv.Detections]:
        results = self.detector.detect(images, ontology)
        if masks:
            for image, detections in zip(images, results):
                self.add_masks(image, detections)
        return results

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
