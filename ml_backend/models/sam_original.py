"""Original `sam_vit_{b,l,h}*.pth` checkpoints through the `segment-anything` package (extra `sam-original`),
behind the same interface and embedding cache as the transformers SAM. Registered for `.pth` files; no tiny model
(the package builds full-size ViTs only)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelUnavailableError
from .base import ModelLock
from .registry import BOX_PROMPTS, CLICKS, MASKS, SEGMENTER, register
from .sam import CachedEncoding, EmbeddingCache, choose_multimask

ENCODER_WIDTH = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def checkpoint_type(path: Path) -> str:
    match = re.search(r"vit_([blh])", path.name)
    if match:
        return f"vit_{match.group(1)}"
    state = torch.load(path, map_location="cpu", weights_only=True)
    width = state["image_encoder.patch_embed.proj.weight"].shape[0]
    return ENCODER_WIDTH[width]


@register(name="sam-original", suffixes=(".pth", ".pt"), roles=SEGMENTER, capabilities=(MASKS, BOX_PROMPTS, CLICKS))
class OriginalSamSegmenter(CachedEncoding):
    def __init__(self, path: Path, model_id: str, device: torch.device, cache_size: int = 8):
        try:
            from segment_anything import SamPredictor, sam_model_registry
        except ImportError:
            raise ModelUnavailableError(
                f"{path} is an original SAM checkpoint: install the extra `pip install prelabel[sam-original]`"
            ) from None
        self.model_id = model_id
        self.device = device
        sam = sam_model_registry[checkpoint_type(path)](checkpoint=str(path)).to(device).eval()
        self.predictor = SamPredictor(sam)
        self.cache = EmbeddingCache(cache_size)
        self._lock = ModelLock()

    @torch.inference_mode()
    def _encode(self, image: np.ndarray):
        with self._lock:
            self.predictor.set_image(image, image_format="RGB")
            p = self.predictor
            return p.features, p.original_size, p.input_size

    @torch.inference_mode()
    def segment(self, image, boxes=None, points=None, point_labels=None):
        state = self._embedding(image)
        h, w = image.shape[:2]
        multimask = choose_multimask(boxes, points)
        with self._lock:
            p = self.predictor
            p.features, p.original_size, p.input_size = state
            p.is_image_set = True
            if points is None:
                if boxes is None or len(boxes) == 0:
                    return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
                box_t = p.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float, device=self.device), (h, w))
                masks, iou, _ = p.predict_torch(None, None, boxes=box_t, multimask_output=False)
                return masks[:, 0].cpu().numpy(), iou[:, 0].cpu().numpy().astype(np.float32)
            labels = np.ones(len(points)) if point_labels is None else np.asarray(point_labels)
            box = None if boxes is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4)[0]
            masks, iou, _ = p.predict(np.asarray(points, np.float32), labels, box=box, multimask_output=multimask)
            best = int(np.argmax(iou))
            return masks[best : best + 1].astype(bool), iou[best : best + 1].astype(np.float32)
