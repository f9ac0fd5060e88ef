"""Registry: build a detector or segmenter from a hub id, a local directory or a checkpoint file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import ModelUnavailableError
from .base import Detector, Segmenter
from .loading import STUDENT_PREFIX, pick_device, resolve_model

log = logging.getLogger(__name__)

__all__ = ["Detector", "Segmenter", "UnloadedModel", "build_detector", "build_segmenter", "model_id", "pick_device"]


def _model_type(path: Path) -> str:
    try:
        return json.loads((path / "config.json").read_text())["model_type"]
    except (OSError, KeyError, ValueError):
        raise ModelUnavailableError(f"{path} has no readable config.json with a model_type") from None


def build_detector(ref: str, model_dir: Path, device: torch.device, batch_size: int = 4) -> Detector:
    """A hub id or directory of an open-vocabulary detector, or `student:DIR` for a distilled student."""
    from .grounding_dino import SUPPORTED_TYPES, GroundingDinoDetector

    path = resolve_model(ref, model_dir)
    if ref.startswith(STUDENT_PREFIX):
        from .student import StudentDetector

        log.info("loading student detector from %s on %s", path, device)
        return StudentDetector(path, device, batch_size)
    kind = _model_type(path)
    if kind not in SUPPORTED_TYPES:
        raise ModelUnavailableError(f"detector {ref!r} is a {kind!r} model; supported: {sorted(SUPPORTED_TYPES)}")
    log.info("loading detector %s from %s on %s", ref, path, device)
    return GroundingDinoDetector(path, ref, device, batch_size)


def model_id(ref: str, model_dir: Path) -> str:
    """The `model_id` the model built from `ref` will have, without loading it (model versions are made of these)."""
    if ref.startswith(STUDENT_PREFIX):
        from .student import student_id

        return student_id(resolve_model(ref, model_dir))
    return ref


class UnloadedModel:
    """A model known by its id only, where it runs elsewhere (Ray actors) and this process only needs versions."""

    def __init__(self, model_id: str):
        self.model_id = model_id

    def __getattr__(self, name: str):
        raise RuntimeError(f"model {self.model_id} is not loaded in this process (only its id is known)")


def build_segmenter(ref: str, model_dir: Path, device: torch.device, cache_size: int = 8) -> Segmenter:
    path = resolve_model(ref, model_dir)
    log.info("loading segmenter %s from %s on %s", ref, path, device)
    if path.is_file():
        from .sam_original import OriginalSamSegmenter

        return OriginalSamSegmenter(path, ref, device, cache_size)
    kind = _model_type(path)
    if kind != "sam":
        raise ModelUnavailableError(f"segmenter {ref!r} is a {kind!r} model; supported: a SAM ('sam') model")
    from .sam import HfSamSegmenter

    return HfSamSegmenter(path, ref, device, cache_size)
