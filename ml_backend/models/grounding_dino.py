"""Grounding DINO (and MM-Grounding-DINO) through transformers, batched over images of the same size.

All prompts of the ontology go into one caption ("bottle . plastic bottle . soda can ."), split into several
captions only when they exceed the model's text length. Each query's score for a prompt is the highest token
probability inside that prompt's token span; a label scores its best prompt. A box is kept when its label score
reaches the label's threshold and its prompt's mean token probability reaches `text_threshold`; boxes of one label
(from any of its synonyms) are then merged by class-aware NMS (`prompted.py`, shared with OWL). Its Swin backbone's
last stage also serves as an image encoder (`embed`, for review).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import supervision as sv
import torch
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from ..ontology import Ontology
from .base import ModelLock
from .features import FeatureMap, embed_feature_map
from .prompted import merge, nothing_to_run, prompt_labels, score_boxes, to_pixels
from .registry import BOXES, DETECTOR, EMBEDDER, EMBEDDINGS, TEXT_PROMPTS, register
from .tiny import write_tiny_detector

log = logging.getLogger(__name__)



class QueryChunkedDeformableAttention(torch.nn.Module):
    """Multi-scale deformable attention over chunks of queries. The pure-PyTorch kernel samples
    queries x heads x levels x points x head_dim values at once and keeps several copies (~1 GB for the ~20k encoder
    queries of an 800x1200 image); queries are independent of each other, so the output is the same."""

    def __init__(self, inner: torch.nn.Module, chunk: int = 4096):
        super().__init__()
        self.inner = inner
        self.chunk = chunk

    def forward(self, value, shapes, shapes_list, level_start, locations, weights, im2col_step):
        n = locations.shape[1]
        if n <= self.chunk:
            return self.inner(value, shapes, shapes_list, level_start, locations, weights, im2col_step)
        return torch.cat(
            [
                self.inner(value, shapes, shapes_list, level_start, locations[:, i : i + self.chunk],
                           weights[:, i : i + self.chunk], im2col_step)
                for i in range(0, n, self.chunk)
            ],
            dim=1,
        )


def chunk_deformable_attention(model: torch.nn.Module, chunk: int = 4096) -> torch.nn.Module:
    for module in model.modules():
        if type(getattr(module, "attn", None)).__name__ == "MultiScaleDeformableAttention":
            module.attn = QueryChunkedDeformableAttention(module.attn, chunk)
    return model


@register(
    "grounding-dino", "mm-grounding-dino", roles=(DETECTOR, EMBEDDER), capabilities=(BOXES, TEXT_PROMPTS, EMBEDDINGS),
    tiny={"grounding-dino": write_tiny_detector,
          "mm-grounding-dino": lambda out: write_tiny_detector(out, family="mm-grounding-dino")},
)
class GroundingDinoDetector:
    def __init__(self, path: Path, model_id: str, device: torch.device, batch_size: int = 4):
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(path).to(device).eval()
        self.model = chunk_deformable_attention(model)
        self.max_text_len = int(getattr(self.model.config, "max_text_len", 256))
        self._lock = ModelLock()

    # -- captions -----------------------------------------------------------------------------------------------
    def _token_count(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=True)["input_ids"])

    def captions(self, prompts: list[str]) -> list[list[str]]:
        """Group prompts into captions that fit the model's text length."""
        groups: list[list[str]] = [[]]
        for prompt in prompts:
            trial = groups[-1] + [prompt]
            if groups[-1] and self._token_count(" . ".join(trial) + " .") > self.max_text_len:
                groups.append([prompt])
            else:
                groups[-1] = trial
        for group in groups:
            if self._token_count(" . ".join(group) + " .") > self.max_text_len:
                raise ValueError(f"prompt {group[0]!r} is longer than the detector's {self.max_text_len} tokens")
        return groups

    def _spans(self, prompts: list[str]) -> tuple[str, list[list[int]]]:
        caption = " . ".join(prompts) + " ."
        enc = self.processor.tokenizer(caption, return_offsets_mapping=True, add_special_tokens=True)
        spans, start = [], 0
        for prompt in prompts:
            end = start + len(prompt)
            tokens = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= start and b <= end]
            spans.append(tokens)
            start = end + len(" . ")
        return caption, spans

    # -- inference ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, images: list[np.ndarray], caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.processor(images=images, text=[caption] * len(images), return_tensors="pt",
                                input_data_format="channels_last").to(self.device)
        outputs = self.model(**inputs)
        return outputs.logits.sigmoid().float().cpu(), outputs.pred_boxes.float().cpu()

    def detect(self, images: list[np.ndarray], ontology: Ontology) -> list[sv.Detections]:
        if (answer := nothing_to_run(images, ontology)) is not None:
            return answer
        candidates: list[list[dict]] = [[] for _ in images]
        for group in self.captions([p for p, _ in ontology.prompts]):
            caption, spans = self._spans(group)
            labels = prompt_labels(group, ontology)
            for batch in self._batches(images):
                with self._lock:
                    probs, boxes = self._forward([images[i] for i in batch], caption)
                for offset, i in enumerate(batch):
                    found = self._score(probs[offset], boxes[offset], spans, labels, group, ontology, images[i].shape[:2])
                    candidates[i].append(found)
        return [merge(parts, ontology) for parts in candidates]

    def _batches(self, images: list[np.ndarray]) -> list[list[int]]:
        """Indices batched by image size: padding would change a DETR's output, and an image's boxes must not
        depend on which other images shared its batch."""
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(i)
        return [
            same[start : start + self.batch_size]
            for same in by_size.values()
            for start in range(0, len(same), self.batch_size)
        ]

    @staticmethod
    def _score(probs, boxes, spans, labels, group, ontology: Ontology, hw) -> dict:
        """A prompt's score for a query is its peak token probability; its mean must reach `text_threshold`."""
        peak = torch.stack([probs[:, s].max(-1).values if s else torch.zeros(len(probs)) for s in spans], -1)
        mean = torch.stack([probs[:, s].mean(-1) if s else torch.zeros(len(probs)) for s in spans], -1)
        h, w = hw
        xyxy = to_pixels(boxes, (w, h), hw)
        return score_boxes(peak, labels, group, ontology, xyxy, prompt_ok=mean >= ontology.text_threshold)

    # -- embeddings ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def feature_map(self, image: np.ndarray) -> FeatureMap:
        """The backbone's last stage (Swin) on one image: no padding beyond the resize."""
        inputs = self.processor.image_processor(images=[image], return_tensors="pt", input_data_format="channels_last").to(self.device)
        with self._lock:
            feats, _ = self.model.model.backbone.conv_encoder(inputs["pixel_values"], inputs["pixel_mask"])[-1]
        feats = feats.float().cpu()
        (h, w), (fh, fw) = image.shape[:2], feats.shape[-2:]
        return FeatureMap(feats, (fw / w, fh / h), (fh, fw))

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return embed_feature_map(self.feature_map(image), boxes)
