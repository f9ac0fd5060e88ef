"""OWLv2 and OWL-ViT (transformers) as text-prompted detectors, the same `Detector` as Grounding DINO.

Every prompt of the ontology is one text query; every image patch predicts one box with a sigmoid score per query,
which is the box's score for that prompt. From there the rules are Grounding DINO's (`prompted.py`): a label scores
its best prompt, a box is kept at its label's threshold, boxes of one label from any synonym are merged by NMS.
`text_threshold` is Grounding DINO's per-token test and does not apply.

OWLv2 pads each image to a square (bottom and right) before resizing it, so its relative boxes are scaled by
max(h, w) on both axes; OWL-ViT stretches the image, so its boxes are scaled by (w, h). Either way each image is
processed alone at a fixed size: its boxes do not depend on the other images of its batch. The vision tower's patch
embeddings also serve as an image encoder (`embed`, for review).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import supervision as sv
import torch
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from ..ontology import Ontology
from .base import ModelLock
from .features import FeatureMap, embed_feature_map
from .prompted import check_prompt_lengths, merge, nothing_to_run, prompt_labels, score_boxes, to_pixels
from .registry import BOXES, DETECTOR, EMBEDDER, EMBEDDINGS, TEXT_PROMPTS, register
from .tiny import write_tiny_owl


@register(
    "owlv2", "owlvit", roles=(DETECTOR, EMBEDDER), capabilities=(BOXES, TEXT_PROMPTS, EMBEDDINGS),
    tiny={"owlv2": write_tiny_owl, "owlvit": lambda out: write_tiny_owl(out, family="owlvit")},
)
class OwlDetector:
    def __init__(self, path: Path, model_id: str, device: torch.device, batch_size: int = 4):
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(device).eval()
        self.square = self.model.config.model_type == "owlv2"  # pads to a square; OWL-ViT stretches
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)
        self._lock = ModelLock()

    def _scale(self, hw: tuple[int, int]) -> tuple[float, float]:
        """Pixels per unit of the model's relative boxes, (x, y)."""
        h, w = hw
        return (max(h, w),) * 2 if self.square else (w, h)

    @torch.inference_mode()
    def _forward(self, images: list[np.ndarray], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(images=images, text=[prompts] * len(images), return_tensors="pt",
                                input_data_format="channels_last").to(self.device)
        with self._lock:
            outputs = self.model(**inputs)
        return outputs.logits.sigmoid().float().cpu(), outputs.pred_boxes.float().cpu()

    def detect(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        if (answer := nothing_to_run(images, ontology)) is not None:
            return answer
        prompts = [p for p, _ in ontology.prompts]
        check_prompt_lengths(self.processor.tokenizer, prompts, self.max_text_len)
        labels = prompt_labels(prompts, ontology)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            probs, boxes = self._forward(chunk, prompts)
            for image, p, b in zip(chunk, probs, boxes):
                hw = image.shape[:2]
                out.append(merge([score_boxes(p, labels, prompts, ontology, to_pixels(b, self._scale(hw), hw))], ontology))
        return out

    # -- embeddings ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def feature_map(self, image: np.ndarray) -> FeatureMap:
        """The vision tower's patch embeddings (merged with the class token, as the heads see them)."""
        pixels = self.processor.image_processor(images=[image], return_tensors="pt", input_data_format="channels_last")
        pixels = pixels["pixel_values"].to(self.device)
        with self._lock:
            embeds = self.model.image_embedder(pixel_values=pixels)[0]
        feats = embeds.permute(0, 3, 1, 2).float().cpu()  # (1, D, gh, gw)
        (h, w), (gh, gw) = image.shape[:2], feats.shape[-2:]
        sx, sy = self._scale((h, w))
        valid = (max(1, math.ceil(h / sy * gh)), max(1, math.ceil(w / sx * gw)))
        return FeatureMap(feats, (gw / sx, gh / sy), valid)

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return embed_feature_map(self.feature_map(image), boxes)
