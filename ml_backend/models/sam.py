"""SAM through transformers' SamModel, with an LRU cache of image embeddings keyed by image content, so that
further clicks or boxes on the same image cost only the mask decoder. The same cached image embedding serves as an
image encoder (`embed`, for review)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import SamModel, SamProcessor
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

from .base import ModelLock
from .features import FeatureMap, embed_feature_map
from .registry import BOX_PROMPTS, CLICKS, EMBEDDER, EMBEDDINGS, MASKS, SEGMENTER, register
from .tiny import write_tiny_segmenter

DECODER_CHUNK = 16  # boxes decoded (and upscaled to full size) at once, bounding memory on large images


def image_key(image: np.ndarray) -> str:
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16)
    digest.update(repr(image.shape).encode())
    return digest.hexdigest()


class EmbeddingCache:
    """A thread-safe LRU of per-image encoder state, with hit/miss counters."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        value = self.peek(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def peek(self, key: str) -> Any | None:
        """The item under `key` (counted as a hit), or None (a miss); `put` stores what the caller computed."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key: str, value: Any) -> None:
        if self.size:
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.size:
                    self._items.popitem(last=False)

    def info(self) -> dict:
        with self._lock:
            return {"size": len(self._items), "capacity": self.size, "hits": self.hits, "misses": self.misses}


def choose_multimask(boxes, points) -> bool:
    """One lone click is ambiguous (part or whole?): ask SAM for three masks and keep the best."""
    return boxes is None and points is not None and len(points) == 1


class CachedEncoding:
    """Per-image encoder state (`_encode`) kept in an LRU (`cache`), so that a further prompt on the same image
    costs only the mask decoder."""

    cache: EmbeddingCache

    def _encode(self, image: np.ndarray) -> Any: ...

    def cache_info(self) -> dict:
        return self.cache.info()

    def prepare(self, image: np.ndarray) -> None:
        self._embedding(image)

    def _embedding(self, image: np.ndarray) -> Any:
        return self.cache.get_or_compute(image_key(image), lambda: self._encode(image))


class HeadByHeadGlobalAttention(SamVisionSdpaAttention):
    """SAM's global attention one head at a time. All heads at once materialise a relative-position bias of
    heads x (HW)^2 floats (805 MB per layer for SAM-B at 1024 px); one head needs a twelfth of it. Same math."""

    def forward(self, hidden_states: torch.Tensor, output_attentions=False):
        b, h, w, _ = hidden_states.shape
        heads = self.num_attention_heads
        q, k, v = self.qkv(hidden_states).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.empty_like(q)
        for i in range(heads):
            bias = None
            if self.use_rel_pos:
                rel = self.get_decomposed_rel_pos(q[:, i], self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
                bias = rel.reshape(b, h * w, h * w)
            out[:, i] = scaled_dot_product_attention(q[:, i], k[:, i], v[:, i], attn_mask=bias)
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out), None


def lean_global_attention(model: SamModel) -> SamModel:
    for layer in model.vision_encoder.layers:
        if layer.window_size == 0:
            layer.attn.__class__ = HeadByHeadGlobalAttention
    return model


@register("sam", roles=(SEGMENTER, EMBEDDER), capabilities=(MASKS, BOX_PROMPTS, CLICKS, EMBEDDINGS),
          tiny={"sam": write_tiny_segmenter})
class HfSamSegmenter(CachedEncoding):
    def __init__(self, path: Path, model_id: str, device: torch.device, cache_size: int = 8):
        self.model_id = model_id
        self.device = device
        self.processor = SamProcessor.from_pretrained(path)
        self.model = lean_global_attention(SamModel.from_pretrained(path).to(device).eval())
        self.cache = EmbeddingCache(cache_size)
        self._lock = ModelLock()

    @torch.inference_mode()
    def _encode(self, image: np.ndarray):
        inputs = self.processor(images=image, return_tensors="pt", input_data_format="channels_last")
        with self._lock:
            embeddings = self.model.get_image_embeddings(inputs["pixel_values"].to(self.device))
        return embeddings, inputs["original_sizes"], inputs["reshaped_input_sizes"]

    def feature_map(self, image: np.ndarray) -> FeatureMap:
        """The (cached) image embedding over the padded input; the image covers its top-left cells."""
        feats, original, reshaped = self._embedding(image)
        feats = feats.float().cpu()
        (h, w), (rh, rw) = original[0].tolist(), reshaped[0].tolist()
        pad = self.processor.image_processor.pad_size
        cell_y, cell_x = pad["height"] / feats.shape[-2], pad["width"] / feats.shape[-1]
        valid = (max(1, int(np.ceil(rh / cell_y))), max(1, int(np.ceil(rw / cell_x))))
        return FeatureMap(feats, (rw / w / cell_x, rh / h / cell_y), valid)

    @torch.inference_mode()
    def embed(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return embed_feature_map(self.feature_map(image), boxes)

    @torch.inference_mode()
    def segment(self, image, boxes=None, points=None, point_labels=None):
        embeddings, original_sizes, reshaped = self._embedding(image)
        h, w = original_sizes[0].tolist()
        rh, rw = reshaped[0].tolist()
        scale = torch.tensor([rw / w, rh / h])
        multimask = choose_multimask(boxes, points)
        prompts: list[dict] = []
        if boxes is not None and points is None:
            box_tensor = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 2, 2) * scale
            box_tensor = box_tensor.reshape(-1, 4)
            prompts = [{"input_boxes": box_tensor[i : i + DECODER_CHUNK][None]} for i in range(0, len(box_tensor), DECODER_CHUNK)]
        else:
            pts = torch.as_tensor(np.asarray(points, dtype=np.float32)).reshape(-1, 2) * scale
            labels = torch.as_tensor(np.asarray(point_labels if point_labels is not None else np.ones(len(pts))))
            prompt = {"input_points": pts[None, None], "input_labels": labels.long()[None, None]}
            if boxes is not None:
                box = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 2, 2)[:1] * scale
                prompt["input_boxes"] = box.reshape(1, 1, 4)
            prompts = [prompt]
        masks, scores = [], []
        for prompt in prompts:
            with self._lock:
                out = self.model(
                    image_embeddings=embeddings,
                    multimask_output=multimask,
                    **{k: v.to(self.device) for k, v in prompt.items()},
                )
            iou = out.iou_scores[0].float().cpu()  # (n, k)
            best = iou.argmax(-1)
            low_res = out.pred_masks[0][torch.arange(len(best)), best][:, None]  # (n, 1, h, w)
            full = self.processor.post_process_masks(low_res[None].cpu(), original_sizes, reshaped)[0][:, 0]
            masks.append(full.numpy().astype(bool))
            scores.append(iou[torch.arange(len(best)), best].numpy())
        if not masks:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        return np.concatenate(masks), np.concatenate(scores).astype(np.float32)
