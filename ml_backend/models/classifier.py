"""Zero-shot image classification with CLIP-style models (CLIP, SigLIP, SigLIP 2) through transformers.

Images (whole images or region crops) are embedded in batches of `batch_size`, one forward per batch whatever
number of crops or tasks it holds; text embeddings are computed once per distinct text and cached. A choice's
embedding is the mean of its normalised text embeddings (every template with every synonym), normalised again.

Probabilities: a softmax over the choices of a single-choice classification (the model's logit scale applies); for
multi-label classification a sigmoid per choice where the model was trained with one (SigLIP), else the softmax,
with per-choice thresholds deciding.

The image tower also serves as an image encoder (`embed`: the whole image and each box's crop, for review).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor

from ..ontology import Classification
from ..types import crop
from .base import ModelLock
from .registry import CLASSIFICATION, CLASSIFIER, EMBEDDER, EMBEDDINGS, build, register
from .tiny import write_tiny_classifier

log = logging.getLogger(__name__)

SIGMOID_TYPES = {"siglip", "siglip2"}
SIGMOID_THRESHOLD = 0.5


def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected features as `pooler_output` of a model output; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register(
    "clip", "siglip", "siglip2", "chinese_clip", "altclip", roles=(CLASSIFIER, EMBEDDER),
    capabilities=(CLASSIFICATION, EMBEDDINGS),
    tiny={"clip": write_tiny_classifier, "siglip": lambda out: write_tiny_classifier(out, family="siglip")},
)
class ZeroShotClassifier:
    def __init__(self, path: Path, model_id: str, device: torch.device, batch_size: int = 64, text_cache_size: int = 4096):
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.kind = self.model.config.model_type
        self.sigmoid = self.kind in SIGMOID_TYPES
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.max_text_len = int(getattr(text_config, "max_position_embeddings", 77))
        self.forward_calls: Counter = Counter()  # "image" and "text" forwards, for metrics and benchmarks
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._lock = ModelLock()

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def default_threshold(self, n_choices: int) -> float:
        """Multi-label threshold for choices without their own: 0.5 on sigmoid scores, else above a uniform guess."""
        return SIGMOID_THRESHOLD if self.sigmoid else 1.0 / max(1, n_choices)

    # -- embeddings ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_images(self, images: list[np.ndarray]) -> torch.Tensor:
        """(N, D) normalised embeddings of RGB uint8 HxWx3 images, `batch_size` images per forward."""
        if not images:
            return torch.zeros((0, 0))
        out = []
        for start in range(0, len(images), self.batch_size):
            # channels-first copies made by numpy: torch's multi-threaded strided copy of a HxWx3 uint8 view is
            # ~10x slower on a busy CPU, and region crops are such views
            chunk = [np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)) for im in images[start : start + self.batch_size]]
            inputs = self.processor.image_processor(
                images=chunk, return_tensors="pt", input_data_format="channels_first"
            ).to(self.device)
            with self._lock:
                features = _features(self.model.get_image_features(**inputs))
                self.forward_calls["image"] += 1
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    def embed(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The image and each box's crop (at least one pixel) through the image tower: ((D,), (N, D))."""
        crops = [crop(image, b) for b in np.asarray(boxes, np.float32).reshape(-1, 4)]
        embedded = self.embed_images([image, *crops]).numpy()  # normalised
        return embedded[0], embedded[1:]

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(T, D) normalised text embeddings; texts not seen before are embedded in one forward and cached."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._texts))
        if missing:
            padding = {"padding": "max_length"} if self.sigmoid else {"padding": True}  # SigLIP was trained padded
            tokens = self.tokenizer(missing, truncation=True, max_length=self.max_text_len, return_tensors="pt", **padding)
            inputs = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            if self.sigmoid:
                inputs.pop("attention_mask", None)  # SigLIP's text tower attends over the padding it was trained with
            with self._lock:
                features = _features(self.model.get_text_features(**inputs))
                self.forward_calls["text"] += 1
                for text, row in zip(missing, torch.nn.functional.normalize(features.float(), dim=-1).cpu()):
                    self._texts[text] = row
                while len(self._texts) > self._text_cache_size:
                    self._texts.popitem(last=False)
        with self._lock:
            for t in texts:
                self._texts.move_to_end(t)
            return torch.stack([self._texts[t] for t in texts])

    def cached_texts(self) -> list[str]:
        """The texts whose embeddings are cached (what the text tower has received), oldest first."""
        with self._lock:
            return list(self._texts)

    def choice_embeddings(self, classification: Classification) -> torch.Tensor:
        """(C, D): per choice, the normalised mean of its texts' embeddings (a filled classification)."""
        groups = classification.texts()
        flat = [t for group in groups for t in group]
        embedded = self.embed_texts(flat)
        rows, start = [], 0
        for group in groups:
            rows.append(embedded[start : start + len(group)].mean(0))
            start += len(group)
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    # -- scores -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def probabilities(self, image_embeddings: torch.Tensor, classification: Classification) -> np.ndarray:
        """(N, C) probabilities of `classification`'s choices for N embedded images."""
        if len(image_embeddings) == 0:
            return np.zeros((0, len(classification.choices)), np.float32)
        choices = self.choice_embeddings(classification)
        logits = image_embeddings @ choices.T * self.model.logit_scale.exp().float().cpu()
        bias = getattr(self.model, "logit_bias", None)
        if bias is not None:
            logits = logits + bias.float().cpu()
        if classification.multiple and self.sigmoid:
            probs = logits.sigmoid()
        else:
            probs = logits.softmax(-1)
        return probs.numpy().astype(np.float32)

    def classify(self, images: list[np.ndarray], classification: Classification) -> np.ndarray:
        """(N, C) probabilities for N images: one image forward per `batch_size` images."""
        return self.probabilities(self.embed_images(images), classification)

    def decide(self, probs: np.ndarray, classification: Classification) -> list[list[int]]:
        """Chosen choice indices per row, with this model's default multi-label threshold."""
        return classification.decide(probs, self.default_threshold(len(classification.choices)))


def build_classifier(ref: str, model_dir: Path, device: torch.device, batch_size: int = 64) -> ZeroShotClassifier:
    """A registered classifier family (CLIP-style) from a hub id or directory."""
    return build(CLASSIFIER, ref, model_dir, device, batch_size=batch_size)
