"""The two small interfaces every model family implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import supervision as sv

from ..ontology import Ontology


class Detector(Protocol):
    model_id: str

    def detect(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        """One Detections per RGB uint8 HxWx3 image: absolute xyxy boxes, `class_id` indexing `ontology.labels`,
        `data["class_name"]`, confidence, and the uncertainty signals `data["runner_up"]` (best score of another
        label for the same box), `data["synonym_spread"]` and `metadata["near_misses"]` (see `active.py`)."""
        ...


class Segmenter(Protocol):
    model_id: str

    def segment(
        self,
        image: np.ndarray,
        boxes: np.ndarray | None = None,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks for an RGB image: N boxes (N,4 xyxy) give N masks; points (P,2 xy) with labels (1 positive,
        0 negative), optionally with one box, give one mask. Returns (bool N,H,W masks, N scores)."""
        ...

    def prepare(self, image: np.ndarray) -> None:
        """Compute and cache the image embedding, so that the next `segment` on it costs only the decoder."""
        ...

    def cache_info(self) -> dict: ...
