"""The small interfaces model families implement, one per role of the registry (registry.py): Detector, Segmenter,
Classifier (zero-shot, CLIP-style), ImageEncoder (embeddings, e.g. for review) and Tracker (video: follows boxes from
frame to frame), and `ModelLock`, the lock around a model's forward pass."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import supervision as sv

from ..ontology import Classification, Ontology

if TYPE_CHECKING:
    import torch


class ModelLock:
    """The (re-entrant) lock a model holds around its forward pass and the state beside it. It counts the threads
    blocked on any model's lock (`ModelLock.blocked()`): a thread that pauses inside a forward pass (the server's
    batch thread yielding to a click) must go on when the click waits for a model it holds."""

    _blocked = 0
    _count = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.RLock()

    def acquire(self) -> None:
        if self._lock.acquire(blocking=False):
            return
        with ModelLock._count:
            ModelLock._blocked += 1
        try:
            self._lock.acquire()
        finally:
            with ModelLock._count:
                ModelLock._blocked -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> ModelLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @classmethod
    def blocked(cls) -> int:
        return cls._blocked


class Detector(Protocol):
    model_id: str

    def detect(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        """One Detections per RGB uint8 HxWx3 image: absolute xyxy boxes clipped to the image, `class_id` indexing
        `ontology.labels`, `data[CLASS_NAME]`, confidence and, from text-prompted detectors, `data[PROMPT]` and the
        uncertainty signals `data[RUNNER_UP]` (best score of another label for the same box),
        `data[SYNONYM_SPREAD]` and `metadata[NEAR_MISSES]` (names in `types.py`; see `active.py`). A detector whose
        class sets `gives_masks = True` (SAM 3) also fills `mask` (N, H, W) bool: the engine then runs no segmenter."""
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


class Classifier(Protocol):
    """Zero-shot classification (see `models/classifier.py`): images are embedded once per batch, then scored
    against the (cached) text embeddings of any number of classifications."""

    model_id: str

    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """(N, D) normalised embeddings of RGB uint8 HxWx3 images (whole images or region crops)."""
        ...

    def probabilities(self, image_embeddings: torch.Tensor, classification: Classification) -> np.ndarray:
        """(N, C) probabilities of the choices of a filled `ontology.Classification`."""
        ...

    def decide(self, probs: np.ndarray, classification: Classification) -> list[list[int]]:
        """Chosen choice indices per row (single choice: the best; multiple: those over their thresholds)."""
        ...


@runtime_checkable
class ImageEncoder(Protocol):
    """Embeddings from a model's image encoder (the registry's `embeddings` capability)."""

    model_id: str

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For an RGB uint8 HxWx3 image and N pixel xyxy boxes: (image embedding (C,), box embeddings (N, D)),
        both L2-normalised float32; the sizes are fixed per model."""
        ...


class TrackSession(Protocol):
    """One video (or one CVAT track) being followed, frame after frame; frames must all have one size."""

    def step(self, frame: np.ndarray, new: Mapping[int, np.ndarray] | None = None) -> dict[int, tuple[np.ndarray | None, float]]:
        """Advance to the next frame (RGB uint8 HxWx3). Objects in `new` (object id -> xyxy pixel box on this frame)
        start here. Returns, for every object followed (not dropped), its xyxy pixel box on this frame (None where
        the tracker sees it nowhere) and its presence score in [0, 1]."""
        ...

    def drop(self, obj_ids: Iterable[int]) -> None:
        """Stop following these objects: later steps cost nothing for them."""
        ...


class Tracker(Protocol):
    """A video tracker (SAM 2 video, SAM 3's tracker): follows objects given by one box each."""

    model_id: str

    def start(self) -> TrackSession:
        """A new, empty session (its memory is freed with it)."""
        ...
