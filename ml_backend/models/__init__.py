"""The models: every model family the server runs, behind five small interfaces (`base.py`: Detector, Segmenter,
Classifier, ImageEncoder, Tracker), found through one registry (`registry.py`) by the `model_type` of a model's
config.json, or by a special form (`student:DIR`, a `.pth` file of original SAM).

This package owns: loading model references (`loading.py`: local dirs, MODEL_DIR, the hub cache), the families
(`grounding_dino.py`, `owlv2.py`, `sam.py`, `sam_original.py`, `sam3.py`, `sam2_video.py`, `classifier.py`,
`student.py`), what they share
(`prompted.py`: text-prompted scoring; `features.py`: feature-map embeddings) and tiny random models (`tiny.py`).

To add a model: write one module here with a class (or function) called as `build(path, model_id, device,
**role_options)` that implements its role's interface, and register it with
`@register("model_type", roles=..., capabilities=..., tiny={"kind": writer})`. Nothing else changes: the builders
below, every adapter (Label Studio, CVAT, workbench, distill) and `prelabel dev tiny-models` find it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Classifier, Detector, ImageEncoder, Segmenter, Tracker, TrackSession
from .loading import pick_device
from .registry import DETECTOR, EMBEDDER, SEGMENTER, TRACKER, Family, build, families, model_id, model_kind, register

__all__ = [
    "Classifier", "Detector", "Family", "ImageEncoder", "Segmenter", "TrackSession", "Tracker", "UnloadedModel",
    "build_detector", "build_embedder", "build_segmenter", "build_tracker", "families", "model_id", "model_kind",
    "pick_device", "register",
]


def build_detector(ref: str, model_dir: Path, device: torch.device, batch_size: int = 4, **options) -> Detector:
    """A hub id or directory of a registered detector family, or `student:DIR` for a distilled student."""
    return build(DETECTOR, ref, model_dir, device, batch_size=batch_size, **options)


def build_segmenter(ref: str, model_dir: Path, device: torch.device, cache_size: int = 8, **options) -> Segmenter:
    """A hub id or directory of a registered segmenter family (SAM, SAM 3), or an original SAM `.pth` checkpoint."""
    return build(SEGMENTER, ref, model_dir, device, cache_size=cache_size, **options)


def build_embedder(ref: str, model_dir: Path, device: torch.device) -> ImageEncoder:
    """Any registered family with the embeddings capability (SAM, Grounding DINO, OWL, CLIP/SigLIP)."""
    return build(EMBEDDER, ref, model_dir, device)


def build_tracker(ref: str, model_dir: Path, device: torch.device, **options) -> Tracker:
    """A hub id or directory of a registered video tracker family: SAM 2 video (`sam2_video`, e.g.
    facebook/sam2.1-hiera-tiny) or SAM 3 (`sam3_video`, facebook/sam3: its tracker on SAM 3's backbone)."""
    return build(TRACKER, ref, model_dir, device, **options)


class UnloadedModel:
    """A model known by its id only, where it runs elsewhere (Ray actors) and this process only needs versions and
    what the model's class declares (`kind`: e.g. SAM 3's `gives_masks`)."""

    def __init__(self, model_id: str, kind: type | None = None):
        self.model_id = model_id
        self.kind = kind

    def __getattr__(self, name: str):
        raise RuntimeError(f"model {self.model_id} is not loaded in this process (only its id is known)")
